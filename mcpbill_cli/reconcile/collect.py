"""Gathering findings as checks stream rows: counted in full, listed up to a cap."""

from __future__ import annotations

from mcpbill_cli.reconcile.model import FINDINGS, Finding, Row


class Findings:
    """Rows per finding name; each name keeps at most ``max_rows`` rows but counts them all."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self._rows: dict[str, list[Row]] = {}
        self._seen: dict[str, set[tuple[str, str]]] = {}
        self._counts: dict[str, int] = {}
        self._messages: dict[str, str] = {}

    def add(self, name: str, row: Row) -> None:
        """Record one row under ``name``; the same (table, key) twice counts once."""
        if self.show(name, row):
            self._counts[name] = self._counts.get(name, 0) + 1

    def show(self, name: str, row: Row) -> bool:
        """List ``row`` under ``name`` without counting it (the count came from :meth:`note`);
        False if it was listed already."""
        seen = self._seen.setdefault(name, set())
        if (row.table, row.key) in seen:
            return False
        seen.add((row.table, row.key))
        self._counts.setdefault(name, 0)
        rows = self._rows.setdefault(name, [])
        if len(rows) < self.max_rows:
            rows.append(row)
        return True

    def note(self, name: str, count: int, message: str | None = None) -> None:
        """Count ``count`` rows under ``name`` (known from an aggregate; list some with show)."""
        self._counts[name] = self._counts.get(name, 0) + count
        self._rows.setdefault(name, [])
        if message:
            self._messages[name] = message

    def has(self, name: str) -> bool:
        return name in self._counts

    def full(self, name: str) -> bool:
        """True when ``name`` already lists as many rows as it may show."""
        return len(self._rows.get(name, ())) >= self.max_rows

    def findings(self) -> tuple[Finding, ...]:
        """The findings in the order of :data:`FINDINGS` (errors and warnings interleaved)."""
        return tuple(
            Finding(name=name, severity=severity,
                    message=self._messages.get(name, description),
                    rows=tuple(self._rows[name]), count=self._counts[name])
            for name, (severity, description) in FINDINGS.items() if name in self._counts)
