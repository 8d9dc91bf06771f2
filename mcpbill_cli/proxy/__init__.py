"""``mcpbill proxy``: bill the tools of any MCP server, in any language, without changing it.

    proxy = Proxy(Verifier.from_settings(), Upstream(UpstreamTarget.parse(
        command="npx @modelcontextprotocol/server-everything", url=None)))
    uvicorn.run(build_app(proxy), host="127.0.0.1", port=8080)

The proxy is a streamable HTTP MCP endpoint that forwards every request to the upstream (a
stdio server it starts and supervises, or a streamable HTTP URL) and bills ``tools/call`` with
the same verifier, pricing table, ledger and wire as the embedded
:class:`~mcpbill_cli.mcp.Billing` extension. It imports the MCP SDK (extra ``mcpbill[proxy]``,
which also brings prometheus-client for ``--metrics``).
"""

from __future__ import annotations

from mcpbill_cli.proxy.billing import Limits, ProxyBilling
from mcpbill_cli.proxy.server import Proxy, build_app
from mcpbill_cli.proxy.upstream import Upstream, UpstreamTarget

__all__ = ["Limits", "Proxy", "ProxyBilling", "Upstream", "UpstreamTarget", "build_app"]
