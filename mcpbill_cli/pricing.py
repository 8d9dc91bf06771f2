"""The pricing table (a TOML file operators edit) and the price engine the verifier calls.

Resolution order for a call to ``tool`` by ``tenant`` (first match wins):

1. the tenant's own price for the tool (``[tenants.T.tools.X]``), exactly as written;
2. the tool's listed price (``[tools.X]``, fixed or per unit), less the tenant's discount;
3. a free tier whose pattern covers the tool (``[free_tiers] patterns``): the call is free;
4. ``default_price``, less the tenant's discount;
5. otherwise :class:`~mcpbill_cli.errors.PriceUnknown`.

Explicit tool entries beat free tiers, so an operator can carve a paid tool out of a free
``read.*`` tier by listing it; free tiers beat the default, which is what makes them tiers.

Discounts are whole percents (0..100). A discounted amount is computed in integers and
rounded half up to the micro-USDC: ``(amount * (100 - percent) + 50) // 100``. A per-unit
charge is ``min(units * price_per_unit, max_price)``, discounted afterwards; with no units
known yet (before the tool runs) the amount is the discounted ``max_price``, what a call holds.

Tool entries name exact tools; patterns (``*``, ``db.*``, or an exact name) appear only in
free tiers and token scopes. Every amount in the file is a decimal string (or a whole
number), never a float: ``price = 0.1`` is refused, ``price = "0.1"`` is right.

Edits rewrite the whole file in normal form (comments are not kept), atomically, under an
exclusive lock on ``pricing.toml.lock``, and bump ``version``; receipts carry the version.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import tomli_w

from mcpbill_cli.errors import InvalidInput, NotFound, NotInitialized, PriceUnknown, PricingInvalid
from mcpbill_cli.fsutil import write_atomic
from mcpbill_cli.money import format_usd, parse_usd
from mcpbill_cli.scope import MAX_NAME_LENGTH, in_scope, matches, overlap, pattern_problem

CURRENCY = "USDC"
RELOAD_INTERVAL = 0.5  # seconds between two stat() calls of a watched pricing file

logger = logging.getLogger("mcpbill")

# --- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolPrice:
    """One tool's price: fixed per call (``price``), or per unit capped at ``max_price``."""

    price: int | None = None
    per_unit: int | None = None
    max_price: int | None = None

    def __post_init__(self) -> None:
        fixed = self.price is not None and self.per_unit is None and self.max_price is None
        metered = self.price is None and self.per_unit is not None and self.max_price is not None
        if not (fixed or metered):
            raise ValueError("a ToolPrice is either price, or per_unit with max_price")

    @property
    def list_amount(self) -> int:
        """The most one call costs before any discount: the price, or the per-unit maximum."""
        return self.price if self.price is not None else _known(self.max_price)

    def describe(self) -> str:
        """``"0.002"`` or ``"0.00001/unit, max 0.50"``, for diffs and listings."""
        if self.price is not None:
            return format_usd(self.price)
        return f"{format_usd(_known(self.per_unit))}/unit, max {format_usd(_known(self.max_price))}"

    def to_document(self) -> dict[str, str]:
        if self.price is not None:
            return {"price": format_usd(self.price)}
        return {
            "price_per_unit": format_usd(_known(self.per_unit)),
            "max_price": format_usd(_known(self.max_price)),
        }


@dataclass(frozen=True)
class TenantPricing:
    """What one tenant pays differently: its own tool prices, a discount, a daily cap."""

    discount_percent: int = 0
    daily_cap: int | None = None
    tools: Mapping[str, ToolPrice] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.discount_percent == 0 and self.daily_cap is None and not self.tools

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.discount_percent:
            doc["discount_percent"] = self.discount_percent
        if self.daily_cap is not None:
            doc["daily_cap"] = format_usd(self.daily_cap)
        if self.tools:
            doc["tools"] = _tools_document(self.tools)
        return doc


@dataclass(frozen=True)
class PricingTable:
    """A validated pricing table. Treat it as immutable: edits return a new table."""

    version: int
    default_price: int | None = None
    tools: Mapping[str, ToolPrice] = field(default_factory=dict)
    free_tiers: tuple[str, ...] = ()
    tenants: Mapping[str, TenantPricing] = field(default_factory=dict)
    currency: str = CURRENCY

    @classmethod
    def from_document(cls, doc: Mapping[str, Any], *, source: str = "<memory>") -> PricingTable:
        """Validate a parsed TOML document; :class:`PricingInvalid` names the bad key path."""
        return _table_from_document(doc, source=source, text=None)

    def to_document(self) -> dict[str, Any]:
        """The table in normal form: sorted tools and tenants, amounts as decimal strings."""
        doc: dict[str, Any] = {"version": self.version, "currency": self.currency}
        if self.default_price is not None:
            doc["default_price"] = format_usd(self.default_price)
        if self.tools:
            doc["tools"] = _tools_document(self.tools)
        if self.free_tiers:
            doc["free_tiers"] = {"patterns": list(self.free_tiers)}
        tenants = {name: self.tenants[name] for name in sorted(self.tenants)
                   if not self.tenants[name].empty}
        if tenants:
            doc["tenants"] = {name: terms.to_document() for name, terms in tenants.items()}
        return doc

    @property
    def digest(self) -> str:
        """What this table says, as a hash: see :func:`document_digest`."""
        return document_digest(self.to_document())

    def free_tier_for(self, tool: str) -> str | None:
        """The first free-tier pattern that covers ``tool``, if any."""
        return next((pattern for pattern in self.free_tiers if matches(pattern, tool)), None)


def document_digest(document: Mapping[str, Any]) -> str:
    """The sha256 (hex) of a table's normal form, its ``version`` included: two tables with one
    digest charge the same prices under the same version. Ledgers store it: never change it."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _tools_document(tools: Mapping[str, ToolPrice]) -> dict[str, dict[str, str]]:
    return {name: tools[name].to_document() for name in sorted(tools)}


def _known(value: int | None) -> int:
    # ToolPrice.__post_init__ guarantees the pairing; this only narrows the type.
    assert value is not None  # noqa: S101
    return value


# --- patterns --------------------------------------------------------------------------------


def _name_problem(name: str, what: str) -> str | None:
    if not name or name != name.strip() or not name.isprintable():
        return f"{what} name {name!r} must be non-empty printable text without outer spaces"
    if len(name) > MAX_NAME_LENGTH:
        return f"{what} name {name[:20]!r}... is longer than {MAX_NAME_LENGTH} characters"
    if what == "tool" and "*" in name:
        return (f"tool name {name!r} contains '*': tool entries are exact names; "
                "put patterns under [free_tiers] patterns")
    return None


# --- the engine ------------------------------------------------------------------------------


def apply_discount(amount: int, percent: int) -> int:
    """``amount`` less ``percent`` %, rounded half up to the micro-USDC, in integers only."""
    return (amount * (100 - percent) + 50) // 100


@dataclass(frozen=True)
class Price:
    """What a call costs and why.

    ``amount`` is micro-USDC for the call; for a per-unit tool quoted without units it is the
    discounted maximum, i.e. what to hold. ``per_unit`` is the listed per-unit price before the
    discount, ``max_amount`` the discounted per-call maximum (``None`` for fixed prices).
    ``rule`` names the table entry that decided, ``version`` the table version.
    """

    amount: int
    rule: str
    version: int
    per_unit: int | None = None
    max_amount: int | None = None
    discount_percent: int = 0

    @property
    def free(self) -> bool:
        """True when the tool costs nothing whatever it reports (nothing to hold or capture)."""
        return self.amount == 0 and not self.max_amount

    def for_units(self, units: int) -> int:
        """The capture amount once the tool reported ``units``; a fixed price ignores units."""
        if self.per_unit is None or self.max_amount is None:
            return self.amount
        _check_units(units)
        return min(apply_discount(units * self.per_unit, self.discount_percent), self.max_amount)

    def describe(self) -> str:
        """``"0.002"``, ``"free"`` or ``"0.00001/unit less 20%, max 0.40"``, for people."""
        if self.free:
            return "free"
        if self.per_unit is None or self.max_amount is None:
            return format_usd(self.amount)
        discount = f" less {self.discount_percent}%" if self.discount_percent else ""
        return f"{format_usd(self.per_unit)}/unit{discount}, max {format_usd(self.max_amount)}"

    def to_dict(self) -> dict[str, Any]:
        """The price as JSON (camelCase, amounts as decimal strings), e.g. for ``_meta``."""
        doc: dict[str, Any] = {
            "amountUsd": format_usd(self.amount), "asset": CURRENCY, "rule": self.rule,
            "pricingVersion": self.version, "free": self.free,
            "discountPercent": self.discount_percent,
        }
        if self.per_unit is not None and self.max_amount is not None:
            doc["perUnitUsd"] = format_usd(self.per_unit)
            doc["maxUsd"] = format_usd(self.max_amount)
        return doc


def quote(
    table: PricingTable, tool: str, *, tenant: str | None = None, units: int | None = None
) -> Price:
    """The price of one call (pure). ``units`` is what a per-unit tool reported, if known."""
    if units is not None:
        _check_units(units)
    terms = table.tenants.get(tenant) if tenant is not None else None
    if terms is not None and tool in terms.tools:
        return _priced(terms.tools[tool], f"tenant.{tenant}.tools.{tool}", table.version, 0, units)
    discount = terms.discount_percent if terms is not None else 0
    if tool in table.tools:
        return _priced(table.tools[tool], f"tools.{tool}", table.version, discount, units)
    tier = table.free_tier_for(tool)
    if tier is not None:
        return Price(amount=0, rule=f"free_tiers:{tier}", version=table.version)
    if table.default_price is not None:
        default = ToolPrice(price=table.default_price)
        return _priced(default, "default_price", table.version, discount, units)
    raise PriceUnknown(
        f"tool {tool!r} has no price in pricing table version {table.version} and there is no "
        f"default_price; the operator can add one with `mcpbill pricing set {tool} PRICE`",
        tool=tool, pricingVersion=table.version,
    )


def _priced(entry: ToolPrice, rule: str, version: int, discount: int, units: int | None) -> Price:
    if discount and entry.list_amount:
        rule = f"{rule}-discount:{discount}%"
    else:
        discount = 0
    if entry.price is not None:
        amount = apply_discount(entry.price, discount)
        return Price(amount, rule, version, discount_percent=discount)
    cap = apply_discount(_known(entry.max_price), discount)
    price = Price(cap, rule, version, per_unit=entry.per_unit, max_amount=cap,
                  discount_percent=discount)
    return price if units is None else replace(price, amount=price.for_units(units))


def _check_units(units: int) -> None:
    if isinstance(units, bool) or not isinstance(units, int) or units < 0:
        raise InvalidInput(f"units must be a whole number, 0 or more, not {units!r}",
                           field="units")


def daily_cap(table: PricingTable, tenant: str | None) -> int | None:
    """The tenant's daily spend cap in micro-USDC per UTC day, ``None`` when uncapped."""
    terms = table.tenants.get(tenant) if tenant is not None else None
    return terms.daily_cap if terms is not None else None


def price_list(table: PricingTable, tenant: str | None = None) -> list[tuple[str, Price]]:
    """The effective price of every listed tool (the table's and the tenant's), by name."""
    terms = table.tenants.get(tenant) if tenant is not None else None
    names = set(table.tools) | set(terms.tools if terms is not None else ())
    return [(name, quote(table, name, tenant=tenant)) for name in sorted(names)]


def default_quote(table: PricingTable, tenant: str | None = None) -> Price | None:
    """What a tool that is neither listed nor in a free tier costs; ``None``: it is refused."""
    if table.default_price is None:
        return None
    terms = table.tenants.get(tenant) if tenant is not None else None
    discount = terms.discount_percent if terms is not None else 0
    default = ToolPrice(price=table.default_price)
    return _priced(default, "default_price", table.version, discount, None)


@dataclass(frozen=True)
class PriceSheet:
    """What a tenant (or anyone, with ``tenant=None``) pays: see :func:`price_sheet`."""

    version: int
    tenant: str | None
    tools: list[tuple[str, Price]]
    default: Price | None
    free_tiers: tuple[str, ...]
    daily_cap: int | None
    tenant_has_terms: bool = False  # False for a tenant the table does not mention (a typo?)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pricingVersion": self.version, "tenant": self.tenant,
            "tenantHasTerms": self.tenant_has_terms,
            "tools": [{"tool": name, **price.to_dict()} for name, price in self.tools],
            "default": None if self.default is None else self.default.to_dict(),
            "freeTiers": list(self.free_tiers),
            "dailyCapUsd": None if self.daily_cap is None else format_usd(self.daily_cap),
        }


def price_sheet(table: PricingTable, tenant: str | None = None) -> PriceSheet:
    """The effective price of every listed tool, the default, the free tiers and the daily cap."""
    return PriceSheet(
        version=table.version, tenant=tenant, tools=price_list(table, tenant),
        default=default_quote(table, tenant), free_tiers=table.free_tiers,
        daily_cap=daily_cap(table, tenant), tenant_has_terms=tenant in table.tenants,
    )


def fallback_tools(
    table: PricingTable, tenant: str | None, scope: list[str], remaining: int
) -> list[tuple[str, int]]:
    """Paid listed tools in ``scope`` whose price (maximum, if per unit) fits ``remaining``.

    Cheapest first, then by name. Free tools are left to :func:`free_tools`.
    """
    fits = [
        (name, price.amount) for name, price in price_list(table, tenant)
        if 0 < price.amount <= remaining and in_scope(scope, name)
    ]
    return sorted(fits, key=lambda item: (item[1], item[0]))


def free_tools(table: PricingTable, tenant: str | None, scope: list[str]) -> list[str]:
    """Free listed tools in ``scope``, then the free-tier patterns (narrowed to the scope).

    A tier pattern covers every matching tool except those listed with a price of their own.
    """
    listed = [name for name, price in price_list(table, tenant)
              if price.free and in_scope(scope, name)]
    tiers = [common for tier in table.free_tiers for pattern in scope
             if (common := overlap(tier, pattern)) is not None]
    return list(dict.fromkeys(listed + tiers))


# --- reading and validating ------------------------------------------------------------------

_TOP_KEYS = ("version", "currency", "default_price", "tools", "free_tiers", "tenants")
_TOOL_KEYS = ("price", "price_per_unit", "max_price")
_TENANT_KEYS = ("discount_percent", "daily_cap", "tools")
_TOML_LINE = re.compile(r"at line (\d+)")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class _Problem(Exception):
    """A validation failure at a key path, turned into PricingInvalid with the source and line."""

    def __init__(self, path: tuple[str, ...], problem: str) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem


def key_path(path: tuple[str, ...]) -> str:
    """A TOML key path: ``tools.search.price``, ``tools."db.write".price``."""
    return ".".join(part if _BARE_KEY.fullmatch(part) else f'"{part}"' for part in path)


def load_pricing(path: Path) -> PricingTable:
    """Read and validate a pricing file; any problem is :class:`PricingInvalid`."""
    text = _read_text(path)
    if text is None:
        raise PricingInvalid(
            f"no pricing table at {path}: run `mcpbill init` to write a sample, "
            "or `mcpbill pricing set TOOL PRICE` to start one", path=str(path))
    return parse_pricing(text, source=str(path))


def parse_pricing(text: str, *, source: str = "<memory>") -> PricingTable:
    """Parse and validate TOML text; errors name the key path and, where known, the line."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = _TOML_LINE.search(str(exc))
        raise _invalid(f"{source}: not valid TOML: {exc}", source,
                       line=int(line[1]) if line else None) from None
    return _table_from_document(doc, source=source, text=text)


def _read_text(path: Path) -> str | None:
    """The file's text; ``None`` when it does not exist."""
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PricingInvalid(f"cannot read {path}: {exc.strerror}", path=str(path)) from None
    except UnicodeDecodeError:
        raise PricingInvalid(f"{path}: not UTF-8 text", path=str(path)) from None


def _table_from_document(doc: Mapping[str, Any], *, source: str, text: str | None) -> PricingTable:
    try:
        return _table(doc)
    except _Problem as problem:
        line = _line_of(text, problem.path) if text is not None and problem.path else None
        where = f"{source} line {line}" if line else source
        key = key_path(problem.path)
        message = f"{where}: {key}: {problem.problem}" if key else f"{where}: {problem.problem}"
        raise _invalid(message, source, key=key, line=line) from None


def _invalid(
    message: str, source: str, *, key: str = "", line: int | None = None
) -> PricingInvalid:
    details: dict[str, Any] = {"path": source}
    if key:
        details["key"] = key
    if line is not None:
        details["line"] = line
    return PricingInvalid(message, **details)


def _table(doc: Mapping[str, Any]) -> PricingTable:
    _only(doc, (), _TOP_KEYS)
    if doc.get("currency", CURRENCY) != CURRENCY:
        raise _Problem(("currency",), f"must be {CURRENCY!r}, the only asset mcpbill bills in")
    return PricingTable(
        version=_version(doc),
        default_price=_optional_amount(doc, ("default_price",)),
        tools=_tools(doc.get("tools", {}), ("tools",)),
        free_tiers=_free_tiers(doc.get("free_tiers", {}), ("free_tiers",)),
        tenants=_tenants(doc.get("tenants", {}), ("tenants",)),
    )


def _only(node: Mapping[str, Any], path: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    for key in node:
        if key not in allowed:
            raise _Problem(path + (key,), f"unknown key; expected one of {', '.join(allowed)}")


def _toml_table(node: Any, path: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(node, dict):
        raise _Problem(path, f"must be a table, not {_toml_type(node)}")
    return node


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
             dict: "a table", list: "an array"}
    return names.get(type(value), f"a {type(value).__name__}")


def _version(doc: Mapping[str, Any]) -> int:
    if "version" not in doc:
        raise _Problem(("version",), "missing: add `version = 1` at the top of the file")
    value = doc["version"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Problem(("version",), f"must be a whole number, 0 or more, not {value!r}")
    return value


def _amount(value: Any, path: tuple[str, ...]) -> int:
    if isinstance(value, float):
        raise _Problem(path, f"{value!r} is a float, which cannot hold money exactly: "
                             f'quote it, e.g. {path[-1]} = "{value}"')
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Problem(path, f'must be a decimal string like "0.002", not {_toml_type(value)}')
    text = str(value)
    if text.strip().startswith("-"):
        raise _Problem(path, f"{text!r} is negative; prices are 0 or more")
    try:
        return parse_usd(text, allow_zero=True, field=path[-1])
    except InvalidInput as exc:
        raise _Problem(path, exc.message) from None


def _optional_amount(node: Mapping[str, Any], path: tuple[str, ...]) -> int | None:
    return _amount(node[path[-1]], path) if path[-1] in node else None


def _tool_price(node: Any, path: tuple[str, ...]) -> ToolPrice:
    entry = _toml_table(node, path)
    _only(entry, path, _TOOL_KEYS)
    if "price" in entry:
        if "price_per_unit" in entry:
            raise _Problem(path, "has both price and price_per_unit: a tool is priced per call "
                                 "or per unit, not both")
        if "max_price" in entry:
            raise _Problem(path + ("max_price",), "only applies with price_per_unit: remove it, "
                                                  "or replace price with price_per_unit")
        return ToolPrice(price=_amount(entry["price"], path + ("price",)))
    if "price_per_unit" not in entry:
        raise _Problem(path, 'has no price: set price = "0.01", or price_per_unit with max_price')
    if "max_price" not in entry:
        raise _Problem(path, "has price_per_unit but no max_price: add max_price, the most one "
                             "call may cost (it is what a call holds before it runs)")
    return ToolPrice(per_unit=_amount(entry["price_per_unit"], path + ("price_per_unit",)),
                     max_price=_amount(entry["max_price"], path + ("max_price",)))


def _tools(node: Any, path: tuple[str, ...]) -> dict[str, ToolPrice]:
    tools = _toml_table(node, path)
    for name in tools:
        _check_name(name, "tool", path + (name,))
    return {name: _tool_price(entry, path + (name,)) for name, entry in tools.items()}


def _check_name(name: str, what: str, path: tuple[str, ...]) -> None:
    problem = _name_problem(name, what)
    if problem is not None:
        raise _Problem(path, problem)


def _free_tiers(node: Any, path: tuple[str, ...]) -> tuple[str, ...]:
    tiers = _toml_table(node, path)
    _only(tiers, path, ("patterns",))
    path += ("patterns",)
    patterns = tiers.get("patterns", [])
    if not isinstance(patterns, list):
        raise _Problem(path, f'must be an array of patterns like ["read.*"], '
                             f"not {_toml_type(patterns)}")
    for number, pattern in enumerate(patterns, start=1):
        if not isinstance(pattern, str):
            raise _Problem(path, f"pattern {number} must be a string, not {_toml_type(pattern)}")
        problem = pattern_problem(pattern)
        if problem is not None:
            raise _Problem(path, problem)
        if pattern in patterns[: number - 1]:
            raise _Problem(path, f"pattern {pattern!r} is listed twice")
    return tuple(patterns)


def _tenants(node: Any, path: tuple[str, ...]) -> dict[str, TenantPricing]:
    tenants = _toml_table(node, path)
    for name in tenants:
        _check_name(name, "tenant", path + (name,))
    parsed = {name: _tenant(terms, path + (name,)) for name, terms in tenants.items()}
    # An empty [tenants.T] changes nothing; dropping it keeps one table per meaning.
    return {name: terms for name, terms in parsed.items() if not terms.empty}


def _tenant(node: Any, path: tuple[str, ...]) -> TenantPricing:
    terms = _toml_table(node, path)
    _only(terms, path, _TENANT_KEYS)
    return TenantPricing(
        discount_percent=_discount(terms.get("discount_percent", 0), path + ("discount_percent",)),
        daily_cap=_optional_amount(terms, path + ("daily_cap",)),
        tools=_tools(terms.get("tools", {}), path + ("tools",)),
    )


def _discount(value: Any, path: tuple[str, ...]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise _Problem(path, f"must be a whole number of percent from 0 to 100, not {value!r}")
    return value


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


# --- editing ---------------------------------------------------------------------------------


def set_price(
    table: PricingTable, tool: str, price: int, *, tenant: str | None = None,
    per_unit: bool = False, max_amount: int | None = None,
) -> PricingTable:
    """A new table (version + 1) where ``tool`` costs ``price`` (per unit, capped, if asked).

    With ``tenant``, the price is that tenant's own, which its discount does not touch.
    """
    entry = _new_entry(price, per_unit=per_unit, max_amount=max_amount)
    _require_name(tool, "tool")
    if tenant is None:
        return replace(table, version=table.version + 1, tools={**table.tools, tool: entry})
    _require_name(tenant, "tenant")
    terms = table.tenants.get(tenant, TenantPricing())
    terms = replace(terms, tools={**terms.tools, tool: entry})
    return replace(table, version=table.version + 1, tenants={**table.tenants, tenant: terms})


def unset_price(table: PricingTable, tool: str, *, tenant: str | None = None) -> PricingTable:
    """A new table (version + 1) without ``tool``'s own price; :class:`NotFound` if it had none.

    A tenant left with no overrides, discount or cap is dropped from the table.
    """
    if tenant is None:
        if tool not in table.tools:
            raise NotFound(f"tool {tool!r} has no price of its own; see `mcpbill pricing show`",
                           tool=tool)
        tools = {name: entry for name, entry in table.tools.items() if name != tool}
        return replace(table, version=table.version + 1, tools=tools)
    terms = table.tenants.get(tenant)
    if terms is None or tool not in terms.tools:
        raise NotFound(f"tenant {tenant!r} has no price of its own for {tool!r}; "
                       f"see `mcpbill pricing show --tenant {tenant}`", tool=tool, tenant=tenant)
    terms = replace(terms, tools={name: e for name, e in terms.tools.items() if name != tool})
    tenants = {name: t for name, t in table.tenants.items() if name != tenant}
    if not terms.empty:
        tenants[tenant] = terms
    return replace(table, version=table.version + 1, tenants=tenants)


def _new_entry(price: int, *, per_unit: bool, max_amount: int | None) -> ToolPrice:
    if price < 0 or (max_amount is not None and max_amount < 0):
        raise InvalidInput("prices are 0 or more", field="price")
    if per_unit and max_amount is None:
        raise InvalidInput("a per-unit price needs a maximum per call (--max): "
                           "it is what a call holds before the tool reports its units",
                           field="max")
    if max_amount is not None and not per_unit:
        raise InvalidInput("a maximum (--max) only applies to a per-unit price (--per-unit)",
                           field="max")
    if per_unit:
        return ToolPrice(per_unit=price, max_price=max_amount)
    return ToolPrice(price=price)


def _require_name(name: str, what: str) -> None:
    problem = _name_problem(name, what)
    if problem is not None:
        raise InvalidInput(problem, field=what)


# --- writing ---------------------------------------------------------------------------------

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


def lock_path(path: Path) -> Path:
    """The sibling lock file that serialises edits of ``path``."""
    return path.with_name(path.name + ".lock")


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    if not path.parent.is_dir():
        raise NotInitialized(f"{path.parent} does not exist: run `mcpbill init` first",
                             path=str(path))
    descriptor = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing the descriptor releases the lock


def edit_pricing(path: Path, edit: Callable[[PricingTable], PricingTable]) -> PricingEdit:
    """Read, ``edit`` and write the file under an exclusive lock, so no concurrent edit is lost.

    A missing file starts as an empty table at version 0. ``edit`` returns the new table
    (:func:`set_price` and :func:`unset_price` bump the version); it may raise to abort.
    """
    with _exclusive_lock(path):
        text = _read_text(path)
        before = PricingTable(version=0) if text is None else parse_pricing(text, source=str(path))
        after = edit(before)
        save_pricing(path, after)
    return PricingEdit(before, after)


# --- watching the file -----------------------------------------------------------------------


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class PricingSource:
    """The current table for a long-running verifier; picks up edits without a restart.

    ``current()`` costs one ``os.stat`` at most every ``check_interval`` seconds and re-reads
    the file only when its (mtime, size, inode) changed. A broken file keeps the last good
    table in force (rather than charging wrong prices or refusing every call), records the
    error in ``last_error`` and logs a warning; a broken file at construction raises.
    """

    def __init__(
        self, source: Path | str | PricingTable, *, check_interval: float = RELOAD_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.last_error: PricingInvalid | None = None
        self.path: Path | None = None if isinstance(source, PricingTable) else Path(source)
        self._interval = check_interval
        self._clock = clock
        self._reloading = threading.Lock()
        if isinstance(source, PricingTable):
            self._stamp, self._table = None, source
        else:
            # Stamp before reading: a change made while we read is then seen on the next check.
            self._stamp = _stamp(Path(source))
            self._table = load_pricing(Path(source))
        self._next_check = clock() + check_interval

    def current(self) -> PricingTable:
        """The table in force now."""
        if self.path is None or self._clock() < self._next_check:
            return self._table
        # One thread re-checks; the others keep serving the table they already have.
        if self._reloading.acquire(blocking=False):
            try:
                self._next_check = self._clock() + self._interval
                self._refresh(self.path)
            finally:
                self._reloading.release()
        return self._table

    def _refresh(self, path: Path) -> None:
        stamp = _stamp(path)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._table = load_pricing(path)
        except PricingInvalid as exc:
            self.last_error = exc
            logger.warning("pricing table %s is invalid; still charging version %d: %s",
                           path, self._table.version, exc.message)
        else:
            self.last_error = None


# --- comparing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One difference between two tables: a tool price, a tenant term, the default or a tier."""

    key: str
    kind: Literal["added", "removed", "changed"]
    before: str | None
    after: str | None
    tenant: str | None = None
    tool: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "before": self.before, "after": self.after,
                "tenant": self.tenant, "tool": self.tool}


@dataclass(frozen=True)
class _Fact:
    value: str
    tenant: str | None = None
    tool: str | None = None


def diff_tables(old: PricingTable, new: PricingTable) -> list[Change]:
    """What changes from ``old`` to ``new``, per tool and tenant, sorted by key path."""
    before, after = _facts(old), _facts(new)
    changes = []
    for key in sorted(before.keys() | after.keys()):
        was, now = before.get(key), after.get(key)
        if was == now:
            continue
        kind: Literal["added", "removed", "changed"] = (
            "added" if was is None else "removed" if now is None else "changed")
        either = now if now is not None else was
        assert either is not None  # noqa: S101 - a key comes from one side at least
        changes.append(Change(key, kind, None if was is None else was.value,
                              None if now is None else now.value,
                              tenant=either.tenant, tool=either.tool))
    return changes


def _facts(table: PricingTable) -> dict[str, _Fact]:
    facts = {f"free_tiers:{pattern}": _Fact("free") for pattern in table.free_tiers}
    if table.default_price is not None:
        facts["default_price"] = _Fact(format_usd(table.default_price))
    for name, entry in table.tools.items():
        facts[key_path(("tools", name))] = _Fact(entry.describe(), tool=name)
    for tenant, terms in table.tenants.items():
        facts.update(_tenant_facts(tenant, terms))
    return facts


def _tenant_facts(tenant: str, terms: TenantPricing) -> dict[str, _Fact]:
    facts = {}
    if terms.discount_percent:
        facts[key_path(("tenants", tenant, "discount_percent"))] = _Fact(
            f"{terms.discount_percent}%", tenant=tenant)
    if terms.daily_cap is not None:
        facts[key_path(("tenants", tenant, "daily_cap"))] = _Fact(
            format_usd(terms.daily_cap), tenant=tenant)
    for name, entry in terms.tools.items():
        facts[key_path(("tenants", tenant, "tools", name))] = _Fact(
            entry.describe(), tenant=tenant, tool=name)
    return facts


# --- the sample for `mcpbill init` -----------------------------------------------------------

SAMPLE_PRICING = '''\
# mcpbill pricing table. Amounts are USDC, written as quoted decimal strings ("0.002"), never
# floats. Edit it by hand and check it with `mcpbill pricing validate`, or with
# `mcpbill pricing set/unset`, which rewrite the file in normal form without these comments.
# A running verifier picks up a change within a second; every receipt carries `version`.

version = 1
currency = "USDC"

# Tools not listed below cost this much. Remove the line to refuse unknown tools (PRICE_UNKNOWN).
default_price = "0.01"

[tools.status]
price = "0"                  # free

[tools.search]
price = "0.002"              # per call

[tools.summarize]
price_per_unit = "0.00001"   # per unit the tool reports (e.g. tokens) ...
max_price = "0.50"           # ... and never more per call; a call holds this much while it runs

# Tools matching these patterns are free, unless listed above with a price of their own.
[free_tiers]
patterns = ["read.*"]

[tenants.acme]
discount_percent = 20        # off listed and default prices, not off acme's own prices below
daily_cap = "25.00"          # the most acme's agents may spend per UTC day

[tenants.acme.tools.search]
price = "0.001"              # acme's own price for search
'''
