"""Creating an mcpbill home (`mcpbill init`): nothing that exists is overwritten without force."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from mcpbill_cli.clock import utcnow
from mcpbill_cli.config import MODES, Settings, default_db_url, redact_url
from mcpbill_cli.errors import AlreadyExists, InvalidInput
from mcpbill_cli.fsutil import write_atomic
from mcpbill_cli.keys import ALGORITHMS, KeyRing, init_keyring, ring_lock


@dataclass(frozen=True)
class InitResult:
    home: Path
    db_url: str
    kid: str
    schema: str
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    @property
    def steps(self) -> list[str]:
        return [f"created {c}" for c in self.created] + [f"kept {k}" for k in self.kept]


def initialize(settings: Settings, *, alg: str, mode: str, force: bool,
               exist_ok: bool = False) -> InitResult:
    """Create what is missing; refuse an initialized home unless ``force`` (then: new keys)
    or ``exist_ok`` (then: change nothing).

    The home is made under its key ring's lock, and whether it is made already is asked
    again under it: of two inits racing on a new home, one makes it and the other finds it
    made, as if it had run second (never a second key that replaces the first one's). The
    first ask, without the lock, leaves an initialized home untouched, lock file and all."""
    if alg not in ALGORITHMS:
        raise InvalidInput(f"algorithm {alg!r} is not one of {', '.join(ALGORITHMS)}")
    if mode not in MODES:
        raise InvalidInput(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if KeyRing.exists(settings.keys_dir) and not force:
        return _initialized(settings, exist_ok=exist_ok)
    settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.keys_dir.mkdir(exist_ok=True, mode=0o700)
    with ring_lock(settings.keys_dir):
        if KeyRing.exists(settings.keys_dir) and not force:
            return _initialized(settings, exist_ok=exist_ok)
        return _make_home(settings, alg=alg, mode=mode, force=force)


def _initialized(settings: Settings, *, exist_ok: bool) -> InitResult:
    """The home as it is for ``exist_ok``; else ALREADY_EXISTS, with nothing changed."""
    if not exist_ok:
        raise AlreadyExists(
            f"{settings.home} is already initialized; nothing was changed. "
            "Pass --force to replace its signing keys."
        )
    return already_initialized(settings)


def _make_home(settings: Settings, *, alg: str, mode: str, force: bool) -> InitResult:
    created: list[str] = []
    kept: list[str] = []
    schema = _migrate(settings)
    created.append(f"ledger at schema {schema} ({redact_url(settings.db_url)})")
    ring = init_keyring(settings.keys_dir, alg, now=utcnow(), force=force)
    ring.save()
    kid = ring.active().kid
    created.append(f"signing key {kid} ({alg}) in {settings.keys_dir}")
    if len(ring.keys) > 1:
        kept.append(f"{len(ring.keys) - 1} earlier signing key(s), retired: they verify no "
                    "token, only the receipts and seals they signed")
    db_url = _chosen_db_url(settings)
    if settings.config_path.exists() and db_url is not None:
        _keep_db_url(settings, db_url, created, kept)
    else:
        _write_if_missing(settings.config_path, _config_text(mode, db_url), created, kept,
                          mode=0o600)
    if settings.pricing_path.exists():
        kept.append(str(settings.pricing_path))
    else:
        from mcpbill_cli.pricing import SAMPLE_PRICING, save_pricing_text

        save_pricing_text(settings.pricing_path, SAMPLE_PRICING)
        created.append(str(settings.pricing_path))
    return InitResult(settings.home, redact_url(settings.db_url), kid, schema, created, kept)


def already_initialized(settings: Settings) -> InitResult:
    """An initialized home as it is (`init --exist-ok`): nothing is created or migrated."""
    kid = KeyRing.load(settings.keys_dir).active().kid
    kept = [str(p) for p in (settings.config_path, settings.keys_dir, settings.pricing_path)
            if p.exists()]
    return InitResult(settings.home, redact_url(settings.db_url), kid,
                      _current_schema(settings) or "", kept=kept)


def _current_schema(settings: Settings) -> str | None:
    from mcpbill_cli.ledger.engine import current_revision, make_engine, sqlite_file

    path = sqlite_file(settings.db_url)
    if path is not None and not path.exists():
        return None
    engine = make_engine(settings.db_url, pool_size=1)
    try:
        return current_revision(engine)
    finally:
        engine.dispose()


def _migrate(settings: Settings) -> str:
    from mcpbill_cli.ledger.engine import make_engine, start_sqlite_file
    from mcpbill_cli.ledger.schema import upgrade

    start_sqlite_file(settings.db_url)
    engine = make_engine(settings.db_url)
    try:
        return upgrade(engine)[1]
    finally:
        engine.dispose()


def _write_if_missing(path: Path, text: str, created: list[str], kept: list[str],
                      mode: int = 0o644) -> None:
    if path.exists():
        kept.append(str(path))
        return
    write_atomic(path, text.encode(), mode=mode)
    created.append(str(path))


def _keep_db_url(settings: Settings, db_url: str, created: list[str], kept: list[str]) -> None:
    """Save the ledger URL init was given into a config.toml that exists without one, so that
    later commands find this ledger; a config.toml naming a ledger of its own is left alone."""
    import tomllib

    path = settings.config_path
    text = path.read_text(encoding="utf-8")
    document = tomllib.loads(text)
    if "db_url" in document:
        kept.append(f"{path} (its db_url is kept; this run used {redact_url(db_url)})"
                    if document["db_url"] != db_url else str(path))
        return
    # A key before the first line is top-level whatever tables the file has.
    edited = tomli_w.dumps({"db_url": db_url}) + text
    write_atomic(path, edited.encode(), mode=path.stat().st_mode & 0o777)
    created.append(f"db_url in {path} ({redact_url(db_url)})")


def _chosen_db_url(settings: Settings) -> str | None:
    """The ledger URL given to init (flag or MCPBILL_DB_URL), kept so that later commands
    find this ledger without it; ``None`` for the home's own SQLite file, which moves with it."""
    return None if settings.db_url == default_db_url(settings.home) else settings.db_url


def _config_text(mode: str, db_url: str | None) -> str:
    header = (
        "# mcpbill settings. Precedence: command-line flag > environment variable > this file.\n"
        + ("" if db_url else
           "# db_url = \"postgresql+psycopg://user@host/mcpbill\"  # or MCPBILL_DB_URL\n")
    )
    body = {"mode": mode, "issuer": "mcpbill", "audience": "mcpbill", "ttl_cap": "24h",
            "default_ttl": "24h", "leeway": "30s", "hold_timeout": "5m"}
    if db_url:
        body = {"db_url": db_url, **body}
    return header + tomli_w.dumps(body)
