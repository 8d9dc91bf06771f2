"""A stdio MCP server written as raw JSON-RPC lines, for tests/proxy/test_endless.py: its tool
``fits`` answers; ``flood`` and ``resources/read`` are answered with a line that never ends (the
answer's id first, as the Python SDK writes it, or, given ``--id-last``, last, as a
JavaScript server's ``JSON.stringify`` of ``{result, jsonrpc, id}`` does)."""

import json
import sys

ID_LAST = "--id-last" in sys.argv
TOOLS = [{"name": name, "inputSchema": {"type": "object"}} for name in ("fits", "flood")]


def send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def flood(request_id: object) -> None:
    named = '{"jsonrpc": "2.0", "id": ' + json.dumps(request_id) + ', "result": {"text": "'
    start = '{"result": {"text": "' if ID_LAST else named
    sys.stdout.write(start)
    while True:  # until the proxy stops reading and kills this process
        sys.stdout.write("x" * 65536)


def answer(request: dict) -> dict | None:
    method, params = request.get("method"), request.get("params") or {}
    if method == "initialize":
        return {"protocolVersion": params["protocolVersion"], "serverInfo": {
            "name": "endless", "version": "1"}, "capabilities": {"tools": {}, "resources": {}}}
    if method == "tools/list":
        return {"tools": TOOLS}
    if method == "tools/call" and params["name"] == "fits":
        return {"content": [{"type": "text", "text": "fits"}]}
    if method in ("tools/call", "resources/read"):
        flood(request["id"])
    return None


for line in sys.stdin:
    request = json.loads(line)
    if "id" not in request or "method" not in request:
        continue  # a notification, or an answer
    result = answer(request)
    if result is None:
        send({"jsonrpc": "2.0", "id": request["id"],
              "error": {"code": -32601, "message": "Method not found"}})
    else:
        send({"jsonrpc": "2.0", "id": request["id"], "result": result})
