#compdef mcpbill

_mcpbill_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _MCPBILL_COMPLETE=complete_zsh mcpbill)
}

compdef _mcpbill_completion mcpbill