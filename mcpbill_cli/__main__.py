from mcpbill_cli.cli import main

main()
