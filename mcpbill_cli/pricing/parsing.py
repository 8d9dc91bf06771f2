"""Reading pricing files: TOML text to a validated table, errors with key path and line."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from mcpbill_cli.errors import NotInitialized, PricingInvalid
from mcpbill_cli.pricing.table import PricingTable, Problem, invalid, table_from_document

_TOML_LINE = re.compile(r"at line (\d+)")


def load_pricing(path: Path) -> PricingTable:
    """Read and validate a pricing file; any problem is :class:`PricingInvalid`."""
    text = read_text(path)
    if text is None and not path.parent.is_dir():
        raise NotInitialized(f"no mcpbill home at {path.parent}: check --home or MCPBILL_HOME, "
                             "or run `mcpbill init` to create one", path=str(path.parent))
    if text is None:
        raise PricingInvalid(
            f"no pricing table at {path}: run `mcpbill init` to write a sample, "
            "or `mcpbill pricing set TOOL PRICE` to start one", path=str(path))
    return parse_pricing(text, source=str(path))


def parse_pricing(text: str, *, source: str = "<memory>") -> PricingTable:
    """Parse and validate TOML text; errors name the key path and, where known, the line."""
    try:
        doc = tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, or an integer of more than 4,300 digits
        line = _TOML_LINE.search(str(exc))
        raise invalid(f"{source}: not valid TOML: {exc}", source,
                      line=int(line[1]) if line else None) from None
    try:
        return table_from_document(doc)
    except Problem as problem:
        line_number = _line_of(text, problem.path) if problem.path else None
        raise problem.invalid(source, line_number) from None


def read_text(path: Path) -> str | None:
    """The file's text; ``None`` when it does not exist."""
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PricingInvalid(f"cannot read {path}: {exc.strerror}", path=str(path)) from None
    except UnicodeDecodeError:
        raise PricingInvalid(f"{path}: not UTF-8 text", path=str(path)) from None


# Locating a key path in the source text is best effort: tomllib reports lines for syntax errors
# only, and a line number is what makes "tools.search.price is negative" quick to fix.
_HEADER = re.compile(r"\s*\[(?!\[)(?P<key>.+?)\]\s*(?:#.*)?")
_KEY_PART = re.compile(
    r"""\s*(?:"(?P<basic>(?:[^"\\]|\\.)*)"|'(?P<literal>[^']*)'|(?P<bare>[A-Za-z0-9_-]+))\s*"""
)


def _split_key(text: str) -> tuple[str, ...] | None:
    parts: list[str] = []
    position = 0
    while True:
        part = _KEY_PART.match(text, position)
        if part is None:
            return None
        quoted = part["basic"] if part["basic"] is not None else part["literal"]
        parts.append(quoted if quoted is not None else part["bare"])
        position = part.end()
        if position == len(text):
            return tuple(parts)
        if text[position] != ".":
            return None
        position += 1


def _line_of(text: str, path: tuple[str, ...]) -> int | None:
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.fullmatch(line)
        if header is not None:
            table = _split_key(header["key"]) or ()
            if table == path:
                return number
            continue
        left, equals, _ = line.partition("=")
        key = _split_key(left) if equals else None
        if key is not None and table + key == path:
            return number
    return None
