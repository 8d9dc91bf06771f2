"""How the proxy reads an HTTP upstream's answer to a request it posted on a session: accepted,
refused because the upstream does not know the session (it restarted: the request never ran
there, so it may be sent again on a new session), or left to the SDK. Real requests and
responses of the proxy's HTTP client, through its response hook."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx2
import pytest
from mcp.client.streamable_http import MCP_SESSION_ID

from mcpbill_cli.proxy.upstream import _SENDING, Sending, _noticing_lost_sessions

URL = "http://127.0.0.1:9/mcp"
CALL = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "echo"}}
CANCELLED = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 7}}
NO_SESSION = {"jsonrpc": "2.0", "id": None, "error": {
    "code": -32000, "message": "Bad Request: No valid session ID provided"}}
BAD_PARAMS = {"jsonrpc": "2.0", "id": 7, "error": {"code": -32602, "message": "Invalid params"}}


def answer(status: int, sent: Any = CALL, body: Any = None, *, method: str = "POST",
           session: bool = True) -> httpx2.Response:
    """The upstream's answer ``status`` (JSON ``body``) to ``sent`` posted on a session."""
    headers = {MCP_SESSION_ID: "a-session"} if session else {}
    content = json.dumps(sent).encode() if method == "POST" else None
    request = httpx2.Request(method, URL, headers=headers, content=content)
    return httpx2.Response(status, json=body, request=request)


def noticed(*responses: httpx2.Response) -> tuple[bool, bool]:
    """What the hook noted of ``responses`` to one request being sent: (session unknown,
    accepted)."""
    sending = Sending()
    token = _SENDING.set(sending)
    try:
        for response in responses:
            anyio.run(_noticing_lost_sessions, response)
    finally:
        _SENDING.reset(token)
    return sending.session_unknown, sending.accepted


@pytest.mark.parametrize(("response", "seen"), [
    (answer(200), (False, True)),
    (answer(404), (True, False)),
    (answer(400, body=NO_SESSION), (True, False)),
    (answer(400, body=BAD_PARAMS), (False, False)),  # the upstream's refusal: the agent's
    (answer(500), (False, False)),
    (answer(202, CANCELLED), (False, False)),  # a notification: not the request's answer
    (answer(404, CANCELLED), (False, False)),
    (answer(404, method="GET"), (False, False)),  # a resumed stream: its request may have run
    (answer(404, session=False), (False, False)),  # no session to lose
], ids=["accepted", "404", "400-session", "400-other", "500", "notification",
        "notification-404", "get", "no-session"])
def test_an_answer_is_read_as_accepted_session_unknown_or_neither(
        response: httpx2.Response, seen: tuple[bool, bool]) -> None:
    assert noticed(response) == seen


def test_once_accepted_a_later_refusal_of_the_same_request_is_not_a_lost_session() -> None:
    """The SDK's client may post more than one request for one call: once the upstream accepted
    one, that call may have run, and is never sent again."""
    assert noticed(answer(200), answer(404)) == (False, True)


def test_an_answer_outside_a_request_being_sent_is_left_alone() -> None:
    anyio.run(_noticing_lost_sessions, answer(404))  # nothing to note it on, and no error
