"""The pricing table as data (:class:`PricingTable`) and as a document, both ways.

``to_document()`` writes the normal form; :meth:`PricingTable.from_document` validates a parsed
document. Validation lives here, beside the class it builds, so that the class method needs no
import from a module that imports the class; :mod:`.parsing` adds the text, the file and lines.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from mcpbill_cli.durations import parse_duration
from mcpbill_cli.errors import InvalidInput, PricingInvalid
from mcpbill_cli.money import format_usd, parse_usd
from mcpbill_cli.names import MAX_LENGTH
from mcpbill_cli.names import name_problem as kept_name_problem
from mcpbill_cli.ratelimits import LIMIT_KEYS, LimitSet, limit_set
from mcpbill_cli.scope import MAX_NAME_LENGTH, matches, pattern_problem

CURRENCY = "USDC"
MAX_DEDUPE_WINDOW = 86400  # seconds; a retry comes within seconds, not days
MAX_VERSION = 2**31 - 1  # the ledger keeps versions in a 32-bit INTEGER column

# --- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolPrice:
    """One tool's price: fixed per call (``price``), or per unit capped at ``max_price``.

    ``dedupe_window`` is the tool's own dedupe window in seconds (``None``: the table's).
    """

    price: int | None = None
    per_unit: int | None = None
    max_price: int | None = None
    dedupe_window: int | None = None
    x402: bool | None = None  # offer x402 for this tool (None: as [x402] enabled says)

    def __post_init__(self) -> None:
        fixed = self.price is not None and self.per_unit is None and self.max_price is None
        metered = self.price is None and self.per_unit is not None and self.max_price is not None
        if not (fixed or metered):
            raise ValueError("a ToolPrice is either price, or per_unit with max_price")

    @property
    def list_amount(self) -> int:
        """The most one call costs before any discount: the price, or the per-unit maximum."""
        return self.price if self.price is not None else known(self.max_price)

    def describe(self) -> str:
        """``"0.002"`` or ``"0.00001/unit, max 0.50"``, for diffs and listings."""
        if self.price is not None:
            return format_usd(self.price)
        return f"{format_usd(known(self.per_unit))}/unit, max {format_usd(known(self.max_price))}"

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = dict(_price_document(self))
        if self.dedupe_window is not None:
            doc["dedupe_window"] = render_window(self.dedupe_window)
        if self.x402 is not None:
            doc["x402"] = self.x402
        return doc


def _price_document(entry: ToolPrice) -> dict[str, str]:
    if entry.price is not None:
        return {"price": format_usd(entry.price)}
    return {
        "price_per_unit": format_usd(known(entry.per_unit)),
        "max_price": format_usd(known(entry.max_price)),
    }


@dataclass(frozen=True)
class TenantPricing:
    """What one tenant pays differently: its own tool prices, a discount, its spend caps
    per UTC day and calendar month (the tenant's own, and each of its agents' alone), and rate
    limits that replace keys of the table's ``[limits]``."""

    discount_percent: int = 0
    daily_cap: int | None = None
    tools: Mapping[str, ToolPrice] = field(default_factory=dict)
    limits: LimitSet | None = None
    monthly_cap: int | None = None
    agent_daily_cap: int | None = None
    agent_monthly_cap: int | None = None

    @property
    def caps(self) -> dict[str, int | None]:
        """The caps by their pricing.toml key."""
        return {"daily_cap": self.daily_cap, "monthly_cap": self.monthly_cap,
                "agent_daily_cap": self.agent_daily_cap,
                "agent_monthly_cap": self.agent_monthly_cap}

    @property
    def empty(self) -> bool:
        return (self.discount_percent == 0 and not self.tools and self.limits is None
                and all(cap is None for cap in self.caps.values()))

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.discount_percent:
            doc["discount_percent"] = self.discount_percent
        for key, cap in self.caps.items():
            if cap is not None:
                doc[key] = format_usd(cap)
        if self.tools:
            doc["tools"] = _tools_document(self.tools)
        if self.limits is not None:
            doc["limits"] = self.limits.to_document()
        return doc


DEFAULT_X402_TIMEOUT = 60  # seconds: maxTimeoutSeconds of an x402 challenge
DEFAULT_X402_TENANT = "x402"


@dataclass(frozen=True)
class X402Terms:
    """``[x402]``: whether paid, fixed-price tools accept x402 payments, and on what terms.

    ``chain`` names a chain of config.toml (``None``: ``[wallet] chain``); ``max_timeout`` is the
    challenge's ``maxTimeoutSeconds``; ``tenant`` is the ledger tenant of payers who send no
    credit token.
    """

    enabled: bool = False
    chain: str | None = None
    max_timeout: int = DEFAULT_X402_TIMEOUT
    tenant: str = DEFAULT_X402_TENANT

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"enabled": self.enabled}
        if self.chain is not None:
            doc["chain"] = self.chain
        doc["max_timeout"] = render_window(self.max_timeout)
        doc["tenant"] = self.tenant
        return doc


@dataclass(frozen=True)
class PricingTable:
    """A validated pricing table. Treat it as immutable: edits return a new table.

    ``dedupe_window`` is the default dedupe window in seconds for every tool (``None``: not set,
    see :func:`~mcpbill_cli.pricing.dedupe_window`).
    """

    version: int
    default_price: int | None = None
    tools: Mapping[str, ToolPrice] = field(default_factory=dict)
    free_tiers: tuple[str, ...] = ()
    tenants: Mapping[str, TenantPricing] = field(default_factory=dict)
    currency: str = CURRENCY
    dedupe_window: int | None = None
    x402: X402Terms | None = None
    limits: LimitSet | None = None  # [limits]: rate limits of every token and agent

    @classmethod
    def from_document(cls, doc: Mapping[str, Any], *, source: str = "<memory>") -> PricingTable:
        """Validate a parsed TOML document; :class:`PricingInvalid` names the bad key path."""
        try:
            return table_from_document(doc)
        except Problem as problem:
            raise problem.invalid(source) from None

    def to_document(self) -> dict[str, Any]:
        """The table in normal form: sorted tools and tenants, amounts as decimal strings."""
        doc: dict[str, Any] = {"version": self.version, "currency": self.currency}
        if self.default_price is not None:
            doc["default_price"] = format_usd(self.default_price)
        if self.dedupe_window is not None:
            doc["dedupe_window"] = render_window(self.dedupe_window)
        if self.tools:
            doc["tools"] = _tools_document(self.tools)
        if self.free_tiers:
            doc["free_tiers"] = {"patterns": list(self.free_tiers)}
        if self.x402 is not None:
            doc["x402"] = self.x402.to_document()
        if self.limits is not None:
            doc["limits"] = self.limits.to_document()
        tenants = {name: self.tenants[name] for name in sorted(self.tenants)
                   if not self.tenants[name].empty}
        if tenants:
            doc["tenants"] = {name: terms.to_document() for name, terms in tenants.items()}
        return doc

    @property
    def digest(self) -> str:
        """What this table says, as a hash: see :func:`document_digest`."""
        return document_digest(self.to_document())

    def names(self, tool: str) -> bool:
        """Whether the table prices ``tool`` by name (for some tenant or all), not only by its
        default price or a free-tier pattern."""
        return tool in self.tools or tool in self.tenant_tools

    @cached_property
    def tenant_tools(self) -> frozenset[str]:
        """The tools some tenant prices on its own terms (``[tenants.NAME.tools.TOOL]``): only
        for these can a call's price, or whether it has one, depend on whose token pays."""
        return frozenset(tool for terms in self.tenants.values() for tool in terms.tools)

    def free_tier_for(self, tool: str) -> str | None:
        """The first free-tier pattern that covers ``tool``, if any."""
        return next((pattern for pattern in self.free_tiers if matches(pattern, tool)), None)


def document_digest(document: Mapping[str, Any]) -> str:
    """The sha256 (hex) of a table's normal form, its ``version`` included: two tables with one
    digest charge the same prices under the same version. Ledgers store it: never change it."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def render_window(seconds: int) -> str:
    """A dedupe window as the file writes it in normal form: whole seconds, ``"10s"``."""
    return f"{seconds}s"


def _tools_document(tools: Mapping[str, ToolPrice]) -> dict[str, dict[str, Any]]:
    return {name: tools[name].to_document() for name in sorted(tools)}


def known(value: int | None) -> int:
    # ToolPrice.__post_init__ guarantees the pairing; this only narrows the type.
    assert value is not None  # noqa: S101
    return value


# --- patterns --------------------------------------------------------------------------------


def name_problem(name: str, what: str) -> str | None:
    """Why ``name`` cannot name a ``what`` (a tool, a tenant) in the table, or None: the rule
    of :mod:`mcpbill_cli.names`, and a tool entry is an exact name."""
    problem = kept_name_problem(name, what, MAX_LENGTH.get(what, MAX_NAME_LENGTH))
    if problem is None and what == "tool" and "*" in name:
        return (f"tool name {name!r} contains '*': tool entries are exact names; "
                "put patterns under [free_tiers] patterns")
    return problem


# --- validating a document -------------------------------------------------------------------

_TOP_KEYS = ("version", "currency", "default_price", "dedupe_window", "tools", "free_tiers",
             "tenants", "x402", "limits")
_TENANT_TOOL_KEYS = ("price", "price_per_unit", "max_price")
_TOOL_KEYS = (*_TENANT_TOOL_KEYS, "dedupe_window", "x402")
_X402_KEYS = ("enabled", "chain", "max_timeout", "tenant")
_X402_TENANT = re.compile(r"[^\s/]{1,100}")
_TENANT_KEYS = ("discount_percent", "daily_cap", "monthly_cap", "agent_daily_cap",
                "agent_monthly_cap", "tools", "limits")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ZERO_DURATION = re.compile(r"0+[smhd]?")


class Problem(Exception):
    """A validation failure at a key path, turned into PricingInvalid with the source and line."""

    def __init__(self, path: tuple[str, ...], problem: str) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem

    def invalid(self, source: str, line: int | None = None) -> PricingInvalid:
        """The error to raise for this problem in ``source`` (at ``line``, where known)."""
        where = f"{source} line {line}" if line else source
        key = key_path(self.path)
        message = f"{where}: {key}: {self.problem}" if key else f"{where}: {self.problem}"
        return invalid(message, source, key=key, line=line)


def key_path(path: tuple[str, ...]) -> str:
    """A TOML key path: ``tools.search.price``, ``tools."db.write".price``."""
    return ".".join(part if _BARE_KEY.fullmatch(part) else f'"{part}"' for part in path)


def invalid(
    message: str, source: str, *, key: str = "", line: int | None = None
) -> PricingInvalid:
    details: dict[str, Any] = {"path": source}
    if key:
        details["key"] = key
    if line is not None:
        details["line"] = line
    return PricingInvalid(message, **details)


def table_from_document(doc: Mapping[str, Any]) -> PricingTable:
    """The table a parsed document describes; :class:`Problem` at the first bad key path."""
    _only(doc, (), _TOP_KEYS)
    if doc.get("currency", CURRENCY) != CURRENCY:
        raise Problem(("currency",), f"must be {CURRENCY!r}, the only asset mcpbill bills in")
    return PricingTable(
        version=_version(doc),
        default_price=_optional_amount(doc, ("default_price",)),
        tools=_tools(doc.get("tools", {}), ("tools",)),
        free_tiers=_free_tiers(doc.get("free_tiers", {}), ("free_tiers",)),
        tenants=_tenants(doc.get("tenants", {}), ("tenants",)),
        dedupe_window=_optional_window(doc, ("dedupe_window",)),
        x402=_x402_terms(doc["x402"], ("x402",)) if "x402" in doc else None,
        limits=_limits(doc["limits"], ("limits",)) if "limits" in doc else None,
    )


def _only(node: Mapping[str, Any], path: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    for key in node:
        if key not in allowed:
            raise Problem(path + (key,), f"unknown key; expected one of {', '.join(allowed)}")


def _toml_table(node: Any, path: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(node, dict):
        raise Problem(path, f"must be a table, not {_toml_type(node)}")
    return node


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
             dict: "a table", list: "an array"}
    return names.get(type(value), f"a {type(value).__name__}")


def _version(doc: Mapping[str, Any]) -> int:
    if "version" not in doc:
        raise Problem(("version",), "missing: add `version = 1` at the top of the file")
    value = doc["version"]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_VERSION:
        raise Problem(("version",), f"must be a whole number from 0 to {MAX_VERSION}, not "
                                    f"{value!r}: the ledger keeps it as a 32-bit integer, so "
                                    "count versions (1, 2, 3...) rather than write a date")
    return value


def _amount(value: Any, path: tuple[str, ...]) -> int:
    if isinstance(value, float):
        raise Problem(path, f"{value!r} is a float, which cannot hold money exactly: "
                            f'quote it, e.g. {path[-1]} = "{value}"')
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise Problem(path, f'must be a decimal string like "0.002", not {_toml_type(value)}')
    text = str(value)
    if text.strip().startswith("-"):
        raise Problem(path, f"{text!r} is negative; prices are 0 or more")
    try:
        return parse_usd(text, allow_zero=True, field=path[-1])
    except InvalidInput as exc:
        raise Problem(path, exc.message) from None


def _optional_amount(node: Mapping[str, Any], path: tuple[str, ...]) -> int | None:
    return _amount(node[path[-1]], path) if path[-1] in node else None


def _cap(value: Any, path: tuple[str, ...]) -> int:
    """A spend cap: an amount above zero (a cap of zero would refuse every paid call; leave the
    key out for no cap)."""
    amount = _amount(value, path)
    if amount == 0:
        raise Problem(path, f"{value!r} is zero; a cap is above 0 (leave {path[-1]} out for "
                            "no cap)")
    return amount


def _window(value: Any, path: tuple[str, ...]) -> int:
    if not isinstance(value, str):
        raise Problem(path, f'must be a duration string like "10s", or "0s" to treat every call '
                            f"as new, not {_toml_type(value)}")
    if _ZERO_DURATION.fullmatch(value.strip().lower()):
        return 0  # parse_duration refuses 0, which here means: no deduplication
    try:
        seconds = parse_duration(value, field=path[-1])
    except InvalidInput:
        raise Problem(path, f"{value!r} is not a duration: use a whole number and a unit, "
                            'like "10s" or "2m", or "0s" to treat every call as new') from None
    if seconds > MAX_DEDUPE_WINDOW:
        raise Problem(path, f"{value!r} is longer than a day, the longest dedupe window: "
                            "a retry comes within seconds")
    return seconds


def _optional_window(node: Mapping[str, Any], path: tuple[str, ...]) -> int | None:
    return _window(node[path[-1]], path) if path[-1] in node else None


def _tool_price(node: Any, path: tuple[str, ...], *, tenant: bool = False) -> ToolPrice:
    entry = _toml_table(node, path)
    if tenant and "dedupe_window" in entry:
        raise Problem(path + ("dedupe_window",),
                      "a dedupe window is the tool's, the same for every tenant: set it under "
                      f"[{key_path(('tools', path[-1]))}] instead")
    _only(entry, path, _TENANT_TOOL_KEYS if tenant else _TOOL_KEYS)
    window = _optional_window(entry, path + ("dedupe_window",))
    price = replace(_price(entry, path), dedupe_window=window)
    if "x402" not in entry:
        return price
    offered = _flag(entry["x402"], path + ("x402",))
    if offered and price.price is None:
        raise Problem(path + ("x402",), "a per-unit tool cannot be paid with x402's exact "
                                        "scheme (its price is known only after it ran)")
    return replace(price, x402=offered)


def _flag(value: Any, path: tuple[str, ...]) -> bool:
    if not isinstance(value, bool):
        raise Problem(path, f"must be true or false, not {_toml_type(value)}")
    return value


def _x402_terms(node: Any, path: tuple[str, ...]) -> X402Terms:
    terms = _toml_table(node, path)
    _only(terms, path, _X402_KEYS)
    chain = terms.get("chain")
    if chain is not None and (not isinstance(chain, str) or not chain.strip()):
        raise Problem(path + ("chain",), "must name a chain of config.toml, like \"base\"")
    tenant = terms.get("tenant", DEFAULT_X402_TENANT)
    if not isinstance(tenant, str) or not _X402_TENANT.fullmatch(tenant) or not (
            tenant.isprintable()):
        raise Problem(path + ("tenant",), "must be a tenant name: 1 to 100 characters without "
                                          "spaces or slashes")
    timeout = DEFAULT_X402_TIMEOUT
    if "max_timeout" in terms:
        timeout = _window(terms["max_timeout"], path + ("max_timeout",))
        if timeout < 1:
            raise Problem(path + ("max_timeout",), "must be at least 1s")
    return X402Terms(enabled=_flag(terms.get("enabled", False), path + ("enabled",)),
                     chain=chain, max_timeout=timeout, tenant=tenant)


def _price(entry: Mapping[str, Any], path: tuple[str, ...]) -> ToolPrice:
    if "price" in entry:
        if "price_per_unit" in entry:
            raise Problem(path, "has both price and price_per_unit: a tool is priced per call "
                                "or per unit, not both")
        if "max_price" in entry:
            raise Problem(path + ("max_price",), "only applies with price_per_unit: remove it, "
                                                 "or replace price with price_per_unit")
        return ToolPrice(price=_amount(entry["price"], path + ("price",)))
    if "price_per_unit" not in entry:
        raise Problem(path, 'has no price: set price = "0.01", or price_per_unit with max_price')
    if "max_price" not in entry:
        raise Problem(path, "has price_per_unit but no max_price: add max_price, the most one "
                            "call may cost (it is what a call holds before it runs)")
    return ToolPrice(per_unit=_amount(entry["price_per_unit"], path + ("price_per_unit",)),
                     max_price=_amount(entry["max_price"], path + ("max_price",)))


def _tools(node: Any, path: tuple[str, ...], *, tenant: bool = False) -> dict[str, ToolPrice]:
    tools = _toml_table(node, path)
    for name in tools:
        _check_name(name, "tool", path + (name,))
    return {name: _tool_price(entry, path + (name,), tenant=tenant)
            for name, entry in tools.items()}


def _check_name(name: str, what: str, path: tuple[str, ...]) -> None:
    problem = name_problem(name, what)
    if problem is not None:
        raise Problem(path, problem)


def _free_tiers(node: Any, path: tuple[str, ...]) -> tuple[str, ...]:
    tiers = _toml_table(node, path)
    _only(tiers, path, ("patterns",))
    path += ("patterns",)
    patterns = tiers.get("patterns", [])
    if not isinstance(patterns, list):
        raise Problem(path, f'must be an array of patterns like ["read.*"], '
                            f"not {_toml_type(patterns)}")
    for number, pattern in enumerate(patterns, start=1):
        if not isinstance(pattern, str):
            raise Problem(path, f"pattern {number} must be a string, not {_toml_type(pattern)}")
        problem = pattern_problem(pattern)
        if problem is not None:
            raise Problem(path, problem)
        if pattern in patterns[: number - 1]:
            raise Problem(path, f"pattern {pattern!r} is listed twice")
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
    caps = {key: _cap(terms[key], path + (key,)) if key in terms else None
            for key in _TENANT_KEYS[1:5]}
    for prefix in ("", "agent_"):
        daily, monthly = caps[f"{prefix}daily_cap"], caps[f"{prefix}monthly_cap"]
        if daily is not None and monthly is not None and monthly < daily:
            raise Problem(path + (f"{prefix}monthly_cap",),
                          f"is below {prefix}daily_cap; a month holds every day of it")
    return TenantPricing(
        discount_percent=_discount(terms.get("discount_percent", 0), path + ("discount_percent",)),
        tools=_tools(terms.get("tools", {}), path + ("tools",), tenant=True),
        limits=_limits(terms["limits"], path + ("limits",)) if "limits" in terms else None,
        **caps,
    )


def _discount(value: Any, path: tuple[str, ...]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise Problem(path, f"must be a whole number of percent from 0 to 100, not {value!r}")
    return value


def _limits(node: Any, path: tuple[str, ...]) -> LimitSet | None:
    """``[limits]``: rates like ``["10/s", "100/m"]`` (``None`` when the table is empty)."""
    terms = _toml_table(node, path)
    _only(terms, path, LIMIT_KEYS)
    for key, value in terms.items():
        if not isinstance(value, str | list):
            raise Problem(path + (key,), f'must be a rate like "10/s" or a list of rates, '
                                         f"not {_toml_type(value)}")
    try:
        limits = limit_set(dict(terms), path=key_path(path))
    except InvalidInput as exc:
        key = str(exc.details.get("field", "")).rpartition(".")[2]
        raise Problem(path + (key,), exc.message) from None
    return None if limits.empty else limits
