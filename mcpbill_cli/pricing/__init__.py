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

A call that carries no idempotency key is a retry of the same call (token, tool, arguments)
made within the tool's dedupe window: ``dedupe_window`` in ``[tools.X]``, else at the top of
the file, else :data:`DEFAULT_DEDUPE_WINDOW` seconds (see :func:`dedupe_window`). ``"0s"``
makes every call a new call. Tenants cannot change it.

Edits rewrite the whole file in normal form (comments are not kept), atomically, under an
exclusive lock on ``pricing.toml.lock``, and bump ``version``; receipts carry the version.

The modules, each importing only those above it: :mod:`.table` (the table and its document
form, validated), :mod:`.engine` (prices), :mod:`.parsing` (text and files), :mod:`.diff`,
:mod:`.editing` (edits in memory), :mod:`.storage` (writing, locking), :mod:`.source` (the
watched file) and :mod:`.sample`.
"""

from mcpbill_cli.pricing.diff import Change, diff_tables
from mcpbill_cli.pricing.editing import set_price, unset_price
from mcpbill_cli.pricing.engine import (
    DEFAULT_DEDUPE_WINDOW,
    Price,
    PriceSheet,
    apply_discount,
    budgets,
    daily_cap,
    dedupe_window,
    default_quote,
    fallback_tools,
    free_tools,
    price_list,
    price_sheet,
    quote,
    rate_limits,
    x402_offered,
)
from mcpbill_cli.pricing.parsing import load_pricing, parse_pricing
from mcpbill_cli.pricing.sample import SAMPLE_PRICING
from mcpbill_cli.pricing.source import RELOAD_INTERVAL, PricingSource
from mcpbill_cli.pricing.storage import (
    PricingEdit,
    edit_pricing,
    lock_path,
    render_pricing,
    save_pricing,
    save_pricing_text,
)
from mcpbill_cli.pricing.table import (
    CURRENCY,
    PricingTable,
    TenantPricing,
    ToolPrice,
    X402Terms,
    document_digest,
    key_path,
)
from mcpbill_cli.scope import matches

__all__ = [
    "CURRENCY",
    "DEFAULT_DEDUPE_WINDOW",
    "RELOAD_INTERVAL",
    "SAMPLE_PRICING",
    "Change",
    "Price",
    "PriceSheet",
    "PricingEdit",
    "PricingSource",
    "PricingTable",
    "TenantPricing",
    "ToolPrice",
    "X402Terms",
    "apply_discount",
    "budgets",
    "daily_cap",
    "dedupe_window",
    "default_quote",
    "diff_tables",
    "document_digest",
    "edit_pricing",
    "fallback_tools",
    "free_tools",
    "key_path",
    "load_pricing",
    "lock_path",
    "matches",
    "parse_pricing",
    "price_list",
    "price_sheet",
    "quote",
    "rate_limits",
    "render_pricing",
    "save_pricing",
    "save_pricing_text",
    "set_price",
    "unset_price",
    "x402_offered",
]
