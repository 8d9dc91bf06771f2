"""The sample pricing table `mcpbill init` writes."""

SAMPLE_PRICING = '''\
# mcpbill pricing table. Amounts are USDC, written as quoted decimal strings ("0.002"), never
# floats. Edit it by hand and check it with `mcpbill pricing validate`, or with
# `mcpbill pricing set/unset`, which rewrite the file in normal form without these comments.
# A running verifier picks up a change within a second; every receipt carries `version`.

version = 1
currency = "USDC"

# Tools not listed below cost this much. Remove the line to refuse unknown tools (PRICE_UNKNOWN).
default_price = "0.01"

# The same call (token, tool and arguments) repeated within this window is taken for a retry of
# the first and billed once. 10s when not set; a tool may set its own under [tools.NAME], and
# "0s" makes every call a new call (for tools meant to be called again and again).
# dedupe_window = "10s"

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

# Loop protection: at most this many calls, and this much USDC held, per token (and per agent,
# with agent_calls and agent_spend) per second (/s) or minute (/m); past it, RATE_LIMITED.
# [limits]
# token_calls = ["10/s", "300/m"]
# token_spend = "1.00/m"
'''
