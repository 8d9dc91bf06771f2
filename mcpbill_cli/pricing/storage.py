"""Writing pricing files: normal form, atomic writes, and locked read-edit-write cycles."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import tomli_w

from mcpbill_cli.errors import NotInitialized, PricingInvalid
from mcpbill_cli.fsutil import file_lock, write_atomic
from mcpbill_cli.pricing.diff import Change, diff_tables
from mcpbill_cli.pricing.parsing import parse_pricing, read_text
from mcpbill_cli.pricing.table import MAX_VERSION, PricingTable, invalid

_NORMAL_FORM_HEADER = (
    "# mcpbill pricing table, in normal form: `mcpbill pricing set/unset` rewrite this file\n"
    "# and do not keep comments. Amounts are USDC decimal strings. See `mcpbill pricing show`.\n\n"
)


def render_pricing(table: PricingTable) -> str:
    """The table as TOML text in normal form, as :func:`save_pricing` writes it."""
    return _NORMAL_FORM_HEADER + tomli_w.dumps(table.to_document())


def save_pricing(path: Path, table: PricingTable) -> None:
    """Write ``table`` atomically (temp file, fsync, rename, fsync dir); never an invalid one."""
    text = render_pricing(table)
    if parse_pricing(text, source=str(path)).to_document() != table.to_document():
        raise PricingInvalid(f"{path}: refusing to write a table that does not read back the "
                             "same (a name or amount outside the schema?)", path=str(path))
    _write_atomically(path, text)


def save_pricing_text(path: Path, text: str) -> PricingTable:
    """Validate TOML ``text`` (comments and all, e.g. :data:`SAMPLE_PRICING`), then write it."""
    table = parse_pricing(text, source=str(path))
    _write_atomically(path, text)
    return table


def _write_atomically(path: Path, text: str) -> None:
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    try:
        write_atomic(path, text.encode("utf-8"), mode=mode)
    except OSError as exc:
        raise PricingInvalid(f"cannot write {path}: {exc.strerror}", path=str(path)) from None


@dataclass(frozen=True)
class PricingEdit:
    """The table before and after one :func:`edit_pricing`."""

    before: PricingTable
    after: PricingTable

    @property
    def changes(self) -> list[Change]:
        return diff_tables(self.before, self.after)

    @property
    def changed(self) -> bool:
        """False for an edit that changed no price: nothing was written, the version stays."""
        return self.after != self.before


def lock_path(path: Path) -> Path:
    """The sibling lock file that serialises edits of ``path``."""
    return path.with_name(path.name + ".lock")


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    if not path.parent.is_dir():
        raise NotInitialized(f"{path.parent} does not exist: run `mcpbill init` first",
                             path=str(path))
    with file_lock(lock_path(path)):
        yield


def edit_pricing(path: Path, edit: Callable[[PricingTable], PricingTable], *,
                 dry_run: bool = False, recorded_version: int = 0) -> PricingEdit:
    """Read, ``edit`` and write the file under an exclusive lock, so no concurrent edit is lost.

    A missing file starts as an empty table at version 0. ``edit`` returns the new table
    (:func:`set_price` and :func:`unset_price` bump the version); it may raise to abort. An
    edit that leaves every price as it was writes nothing and keeps the version, so setting
    a price twice is one version, not two. ``dry_run`` reads (without the lock, which would
    leave a lock file behind) and writes nothing.

    ``recorded_version`` is the highest version the ledger charged with: the edit's version
    goes past it, since a number the ledger holds already names other prices. No edit goes
    past :data:`MAX_VERSION` (:class:`PricingInvalid`, and nothing is written).
    """
    if dry_run:
        return _planned(path, edit, recorded_version)
    with _exclusive_lock(path):
        planned = _planned(path, edit, recorded_version)
        if planned.changed:
            save_pricing(path, planned.after)
    return planned


def _planned(path: Path, edit: Callable[[PricingTable], PricingTable],
             recorded_version: int) -> PricingEdit:
    text = read_text(path)
    before = PricingTable(version=0) if text is None else parse_pricing(text, source=str(path))
    after = edit(before)
    if replace(after, version=before.version).to_document() == before.to_document():
        return PricingEdit(before, before)
    version = max(after.version, recorded_version + 1)
    if version > MAX_VERSION:
        raise _no_version_left(path, recorded_version)
    return PricingEdit(before, replace(after, version=version))


def _no_version_left(path: Path, recorded_version: int) -> PricingInvalid:
    if recorded_version >= MAX_VERSION:
        what_next = "the ledger charged with that one already: no edit can have a new version"
    else:
        what_next = (f"set `version` by hand to a number from {recorded_version + 1} up, "
                     "which the ledger has not charged with, then edit again")
    return invalid(f"{path}: version: an edit cannot bump the version past {MAX_VERSION}, the "
                   f"highest (the ledger keeps it as a 32-bit integer); {what_next}",
                   str(path), key="version")
