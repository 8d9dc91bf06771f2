"""The rule for tenant, agent, audience and issuer names (mcpbill_cli/names.py)."""

from __future__ import annotations

import pytest
from sqlalchemy import String

from mcpbill_cli.ledger.models import metadata
from mcpbill_cli.names import MAX_LENGTH, name_problem


def test_each_name_fits_every_column_that_keeps_it() -> None:
    columns = [(table.name, column) for table in metadata.tables.values()
               for column in table.columns if column.name in MAX_LENGTH]
    assert {column.name for _, column in columns} == {"tenant", "agent", "audience"}
    for table, column in columns:
        assert isinstance(column.type, String), (table, column.name)
        assert column.type.length == MAX_LENGTH[column.name], (table, column.name)


@pytest.mark.parametrize("name", ["acme", "o'brien & co", "acme/eu", "Zürich 🏔", "a b", "t" * 100])
def test_a_name(name: str) -> None:
    assert name_problem(name, "tenant", 100) is None


@pytest.mark.parametrize("name", ["", " ", "acme ", " acme", "acme\xa0", "a\x00b", "a\x1bb",
                                  "a\nb", "a\rb", "a\tb", "a\x7fb", "a\u200bb", "\udcff"])
def test_not_a_name(name: str) -> None:
    problem = name_problem(name, "tenant", 100)
    assert problem is not None and problem.isprintable() and "outer spaces" in problem


def test_a_name_too_long_for_its_column() -> None:
    assert name_problem("t" * 101, "tenant", 100) == (
        "tenant name 'tttttttttttttttttttt'... is longer than 100 characters")
