"""Settings, resolved once: command-line flag > environment variable > config file > default."""

from __future__ import annotations

import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mcpbill_cli.durations import parse_duration
from mcpbill_cli.errors import ConfigInvalid, InvalidInput
from mcpbill_cli.redaction import redact

ENV_HOME = "MCPBILL_HOME"
ENV_DB_URL = "MCPBILL_DB_URL"
ENV_MODE = "MCPBILL_MODE"
ENV_TTL_CAP = "MCPBILL_TTL_CAP"
ENV_ISSUER = "MCPBILL_ISSUER"
ENV_AUDIENCE = "MCPBILL_AUDIENCE"
ENV_DEFAULT_TTL = "MCPBILL_DEFAULT_TTL"
ENV_LEEWAY = "MCPBILL_LEEWAY"
ENV_HOLD_TIMEOUT = "MCPBILL_HOLD_TIMEOUT"
ENV_REPLAY_RESULT_CAP = "MCPBILL_REPLAY_RESULT_CAP"
# [wallet] keys of config.toml that a variable overrides (MCPBILL_RPC_URL is --rpc-url's envvar)
ENV_WALLET = {"chain": "MCPBILL_CHAIN", "deposit_address": "MCPBILL_DEPOSIT_ADDRESS"}
ENV_TOKEN = "AGENT_CREDIT_JWT"  # noqa: S105 - the variable's name, not a secret
# [mcp] keys of config.toml that a variable overrides
ENV_MCP = {"authorization": "MCPBILL_MCP_AUTHORIZATION", "resource": "MCPBILL_MCP_RESOURCE"}
# [limits] storage: where rate limits count (a Redis URL; unset: the ledger)
ENV_LIMITS_STORAGE = "MCPBILL_LIMITS_STORAGE"

CONFIG_FILE = "config.toml"
PRICING_FILE = "pricing.toml"
LEDGER_FILE = "ledger.db"
KEYS_DIR = "keys"

MODES = ("demo", "live")
# How an MCP server takes a credit token from the HTTP Authorization header: never ("none"), or
# as the server's own authorization ("bearer"), for tokens issued to its canonical URI only.
MCP_AUTHORIZATIONS = ("none", "bearer")
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
DEFAULT_TENANT = "default"

# Keys a config.toml may hold; anything else is a typo we would rather report than ignore.
_KNOWN_KEYS = {
    "mode", "db_url", "issuer", "audience", "ttl_cap", "default_ttl", "leeway",
    "hold_timeout", "replay_result_cap", "chains", "wallet", "mcp", "x402", "limits",
    "webhooks",
}
_MCP_KEYS = {"authorization", "resource"}
DEFAULT_RESULT_CAP = 256 * 1024
MAX_SETTING_SECONDS = 3650 * 86400
_SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024 * 1024}


def default_home() -> Path:
    """The platform config dir: ``$XDG_CONFIG_HOME/mcpbill`` (``~/.config/mcpbill``) or macOS's."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "mcpbill"
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "mcpbill"


@dataclass(frozen=True)
class Settings:
    home: Path
    db_url: str
    mode: str = "demo"
    issuer: str = "mcpbill"
    audience: str = "mcpbill"
    ttl_cap: int = 24 * 3600
    default_ttl: int = 24 * 3600
    leeway: int = 30
    hold_timeout: int = 300
    result_cap: int = DEFAULT_RESULT_CAP  # bytes of a tool result kept for replays
    mcp_authorization: str = "none"  # [mcp] authorization: see MCP_AUTHORIZATIONS
    mcp_resource: str | None = None  # [mcp] resource: the MCP server's canonical URI
    limits_storage: str | None = None  # [limits] storage: a Redis URL, or None (the ledger)
    deliver_webhooks: bool = False  # [webhooks] deliver: servers deliver alert webhooks
    file: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def config_path(self) -> Path:
        return self.home / CONFIG_FILE

    @property
    def pricing_path(self) -> Path:
        return self.home / PRICING_FILE

    @property
    def keys_dir(self) -> Path:
        return self.home / KEYS_DIR

    @property
    def demo(self) -> bool:
        return self.mode == "demo"


def read_config_file(path: Path) -> dict[str, Any]:
    """The parsed config.toml, ``{}`` when there is none; a broken file is an error."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # TOMLDecodeError, bad UTF-8, a 5,000-digit integer
        raise ConfigInvalid(f"cannot read {path}: {exc}", path=str(path)) from None
    unknown = sorted(set(data) - _KNOWN_KEYS)
    if unknown:
        raise ConfigInvalid(f"{path}: unknown key(s) {', '.join(unknown)}", path=str(path))
    return data


def load_settings(
    *, home: str | Path | None = None, db_url: str | None = None, mode: str | None = None
) -> Settings:
    """Resolve every setting once. Arguments are the command-line flags (``None`` = not given)."""
    home_path = Path(home or os.environ.get(ENV_HOME) or default_home()).expanduser()
    file = _with_table_env(_with_table_env(read_config_file(home_path / CONFIG_FILE),
                                           "wallet", ENV_WALLET), "mcp", ENV_MCP)
    authorization, resource = _mcp_authorization(file.get("mcp", {}))

    def pick(flag: Any, env: str | None, key: str, default: Any) -> Any:
        if flag is not None:
            return flag
        if env and os.environ.get(env):
            return os.environ[env]
        return file.get(key, default)

    resolved_mode = str(pick(mode, ENV_MODE, "mode", "demo"))
    if resolved_mode not in MODES:
        raise ConfigInvalid(f"mode {resolved_mode!r} is not one of {', '.join(MODES)}")
    ttl_cap = _seconds(pick(None, ENV_TTL_CAP, "ttl_cap", "24h"), "ttl_cap")
    return Settings(
        home=home_path,
        db_url=str(pick(db_url, ENV_DB_URL, "db_url", default_db_url(home_path))),
        mode=resolved_mode,
        issuer=str(pick(None, ENV_ISSUER, "issuer", "mcpbill")),
        audience=str(pick(None, ENV_AUDIENCE, "audience", "mcpbill")),
        ttl_cap=ttl_cap,
        default_ttl=min(_seconds(pick(None, ENV_DEFAULT_TTL, "default_ttl", "24h"),
                                 "default_ttl"), ttl_cap),
        leeway=_seconds(pick(None, ENV_LEEWAY, "leeway", "30s"), "leeway"),
        hold_timeout=_seconds(pick(None, ENV_HOLD_TIMEOUT, "hold_timeout", "5m"), "hold_timeout"),
        result_cap=_bytes(pick(None, ENV_REPLAY_RESULT_CAP, "replay_result_cap",
                               DEFAULT_RESULT_CAP), "replay_result_cap"),
        mcp_authorization=authorization,
        mcp_resource=resource,
        limits_storage=_limits_storage(_with_table_env(file, "limits", {
            "storage": ENV_LIMITS_STORAGE}).get("limits", {})),
        deliver_webhooks=_deliver_webhooks(file.get("webhooks", {})),
        file=file,
    )


def _limits_storage(table: Any) -> str | None:
    """``[limits] storage``: a Redis URL (rate limits count there), or None (in the ledger)."""
    if not isinstance(table, dict):
        raise ConfigInvalid("config [limits] must be a table")
    unknown = sorted(set(table) - {"storage"})
    if unknown:
        raise ConfigInvalid(f"config [limits]: unknown key(s) {', '.join(unknown)}")
    uri = table.get("storage")
    if uri is None:
        return None
    if not isinstance(uri, str) or uri.partition("://")[0] not in ("redis", "rediss",
                                                                    "redis+unix"):
        raise ConfigInvalid("config [limits] storage must be a Redis URL (redis://HOST:PORT/DB)"
                            ", or unset to count rate limits in the ledger")
    return uri


def _deliver_webhooks(table: Any) -> bool:
    """``[webhooks] deliver``: whether a verifier built from the settings (every server made
    with ``from_settings``) delivers alert webhooks from a thread of its own process. Off by
    default: ``mcpbill webhooks deliver`` may run on its own instead, or beside servers."""
    if not isinstance(table, dict):
        raise ConfigInvalid("config [webhooks] must be a table")
    unknown = sorted(set(table) - {"deliver"})
    if unknown:
        raise ConfigInvalid(f"config [webhooks]: unknown key(s) {', '.join(unknown)}")
    deliver = table.get("deliver", False)
    if not isinstance(deliver, bool):
        raise ConfigInvalid("config [webhooks] deliver must be true or false")
    return deliver


def _with_table_env(file: dict[str, Any], table: str, envs: dict[str, str]) -> dict[str, Any]:
    """config.toml's settings with ``[table]`` keys replaced by their variables, where set."""
    overrides = {key: os.environ[env] for key, env in envs.items() if os.environ.get(env)}
    if not overrides:
        return file
    current = file.get(table, {})
    if not isinstance(current, dict):
        raise ConfigInvalid(f"config [{table}] must be a table")
    return {**file, table: {**current, **overrides}}


def _mcp_authorization(table: Any) -> tuple[str, str | None]:
    """``[mcp] authorization`` and ``resource``: "bearer" needs the server's canonical URI."""
    if not isinstance(table, dict):
        raise ConfigInvalid("config [mcp] must be a table")
    unknown = sorted(set(table) - _MCP_KEYS)
    if unknown:
        raise ConfigInvalid(f"config [mcp]: unknown key(s) {', '.join(unknown)}")
    authorization = str(table.get("authorization", "none"))
    if authorization not in MCP_AUTHORIZATIONS:
        raise ConfigInvalid(f"config [mcp] authorization {authorization!r} is not one of "
                            f"{', '.join(MCP_AUTHORIZATIONS)}")
    resource = table.get("resource")
    if resource is not None:
        resource = canonical_resource(str(resource))
    if authorization == "bearer" and resource is None:
        raise ConfigInvalid('config [mcp] authorization = "bearer" needs resource, the MCP '
                            'server\'s canonical URI (e.g. "https://mcp.example.com/mcp")')
    return authorization, resource


def canonical_resource(uri: str) -> str:
    """An MCP server's canonical URI (RFC 8707 resource): absolute, https (http only on a
    loopback host), no fragment; scheme and host lower-cased, no trailing slash. Tokens for the
    server carry it as their audience, so it is compared as text, once in this form."""
    parts = urlsplit(uri.strip())
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    secure = scheme == "https" or (scheme == "http" and (
        host in _LOOPBACK_HOSTS or f"[{host}]" in _LOOPBACK_HOSTS))
    if not secure or not parts.netloc or parts.fragment or "@" in parts.netloc:
        raise ConfigInvalid(f"config [mcp] resource {redact(uri)!r} is not a canonical server "
                            "URI: https://host[:port][/path], no fragment (http only for "
                            "localhost)")
    netloc = parts.netloc.lower()
    path = parts.path.rstrip("/")
    return urlunsplit((scheme, netloc, path, parts.query, ""))


def default_db_url(home: Path) -> str:
    """The ledger a home uses when nothing names another: a SQLite file inside it."""
    return f"sqlite:///{home / LEDGER_FILE}"


def _seconds(value: Any, key: str) -> int:
    """A duration setting, at most ten years: tokens, holds and leeway are added to the time
    now, and ``"999999999d"`` would put them past the last date a datetime holds."""
    try:
        seconds = parse_duration(str(value), field=key)
    except InvalidInput as exc:
        raise ConfigInvalid(f"config {key}: {exc}") from None
    if seconds > MAX_SETTING_SECONDS:
        raise ConfigInvalid(f"config {key}: {value!r} is too long: at most "
                            f"{MAX_SETTING_SECONDS // 86400}d")
    return seconds


def _bytes(value: Any, key: str) -> int:
    """A size: a whole number of bytes, or text like ``"256KiB"`` / ``"1MiB"``."""
    text = str(value).strip().lower().replace(" ", "")
    number = text.rstrip("kmib")
    unit = _SIZE_UNITS.get(text[len(number):])
    if isinstance(value, bool) or unit is None or not number.isdigit() or len(number) > 12:
        raise ConfigInvalid(f'config {key}: {value!r} is not a size like 262144 or "256KiB"')
    return int(number) * unit


# Settings are shown through the one redaction function, under the name callers know.
redact_url = redact
