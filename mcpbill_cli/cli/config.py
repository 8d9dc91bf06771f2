"""`mcpbill config show`: the settings in force, secrets scrubbed."""

from __future__ import annotations

import typer

from mcpbill_cli.cli.output import JsonOption, emit, handles_errors, print_fields
from mcpbill_cli.cli.state import state
from mcpbill_cli.config import Settings, redact_url
from mcpbill_cli.durations import format_duration

app = typer.Typer(help="Show the settings in force.", no_args_is_help=True)


def scrubbed(settings: Settings) -> dict[str, str]:
    """Every setting as text, with the database password replaced by ***."""
    return {
        "home": str(settings.home),
        "db_url": redact_url(settings.db_url),
        "mode": settings.mode,
        "issuer": settings.issuer,
        "audience": settings.audience,
        "ttl_cap": format_duration(settings.ttl_cap),
        "default_ttl": format_duration(settings.default_ttl),
        "leeway": format_duration(settings.leeway),
        "hold_timeout": format_duration(settings.hold_timeout),
        "replay_result_cap": str(settings.result_cap),
        "mcp_authorization": settings.mcp_authorization,
        "mcp_resource": settings.mcp_resource or "",
        "limits_storage": redact_url(settings.limits_storage) if settings.limits_storage else "",
        "deliver_webhooks": "true" if settings.deliver_webhooks else "false",
        "config_file": str(settings.config_path),
        "pricing_file": str(settings.pricing_path),
        "keys_dir": str(settings.keys_dir),
    }


@app.command("show")
@handles_errors
def show(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Show the resolved settings (flag > environment > config.toml > default)."""
    data = scrubbed(state(ctx).settings)

    emit(data, as_json=as_json, human=lambda: print_fields(data))
