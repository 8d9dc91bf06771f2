"""Options shared by several commands, declared once."""

from __future__ import annotations

from typing import Annotated

import typer

from mcpbill_cli.cli import complete
from mcpbill_cli.config import DEFAULT_TENANT

TenantOption = Annotated[
    str, typer.Option("--tenant", "-t", help="The tenant (customer) whose wallet this is.",
                      autocompletion=complete.tenants)
]
DEFAULT_TENANT_VALUE = DEFAULT_TENANT
DryRunOption = Annotated[bool, typer.Option(
    "--dry-run", help="Show what would change (with --json: data with dry_run true); change "
                      "nothing.")]
