"""Accepting x402 payments, the core without MCP: the official x402 client signs payments from
the shop's challenges; the shop verifies, reserves, settles on the session's anvil (itself,
paying gas from its own account) and records the call in the ledger."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import Engine

from mcpbill_cli.clock import utcnow
from mcpbill_cli.errors import BillingError, CallInProgress
from mcpbill_cli.keys import KeySource
from mcpbill_cli.ledger import credit
from mcpbill_cli.ledger.credit import tenant_balance
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.reconcile import ReconcileOptions, Window, reconcile
from mcpbill_cli.verifier import Verifier
from mcpbill_cli.wallet.addresses import checksum_address
from mcpbill_cli.wallet.links import link
from mcpbill_cli.wallet.rpc import Rpc
from mcpbill_cli.wallet.scan import sync
from mcpbill_cli.x402.accept import Acceptor, Replayed, Reserved, Unavailable

from .accepting import (
    ACCEPT_PRICING,
    SEARCH_PRICE,
    Shop,
    balance,
    new_payer,
    official_client,
    official_payment,
    rate_limited,
    signed_payment,
)
from .peer import NETWORK, V1_NETWORK

REDIS = "redis://127.0.0.1:6379/0"  # as tests/verifier/test_rate_limits_redis.py


def pay_and_run(shop: Shop, payment: dict[str, Any] | str, tool: str = "search",
                args: Any = None, result: str = '{"ok": true}') -> Any:
    """One paid call the way a server makes it: verify, reserve, run, settle, record."""
    verified = shop.acceptor.verify(payment, tool, args=args)
    opened = shop.acceptor.reserve(verified)
    if isinstance(opened, Replayed):
        return opened
    settlement = shop.acceptor.settle(opened)
    return settlement, shop.acceptor.record(opened, settlement, result=result)


def refusal(call: Any) -> BillingError:
    with pytest.raises(BillingError) as caught:
        call()
    return caught.value


# --- the challenge -------------------------------------------------------------------------


def test_the_challenge_asks_exactly_the_price_in_usdc_to_the_deposit_address(shop: Shop) -> None:
    challenge = shop.acceptor.payment_required("search")

    assert challenge == {
        "x402Version": 2,
        "resource": {"url": "mcp://tool/search", "mimeType": "application/json",
                     "description": "search (one call)"},
        "accepts": [{"scheme": "exact", "network": NETWORK, "amount": str(SEARCH_PRICE),
                     "asset": checksum_address(shop.devnet.chain.usdc),
                     "payTo": checksum_address(shop.pay_to),
                     "maxTimeoutSeconds": 60, "extra": {"name": "USD Coin", "version": "2"}}],
    }


def test_a_tenant_pays_its_own_price_and_v1_names_the_network_and_resource(shop: Shop) -> None:
    tenant = shop.acceptor.payment_required("search", "acme")
    legacy = shop.acceptor.payment_required("search", version=1,
                                            resource="https://api.example/search")

    assert tenant is not None and tenant["accepts"][0]["amount"] == str(SEARCH_PRICE // 2)
    assert legacy is not None and legacy["x402Version"] == 1 and "resource" not in legacy
    option = legacy["accepts"][0]
    assert option["network"] == V1_NETWORK and option["maxAmountRequired"] == str(SEARCH_PRICE)
    assert option["resource"] == "https://api.example/search"


def test_no_challenge_for_free_per_unit_opted_out_or_unknown_tools(shop: Shop) -> None:
    for tool in ("status", "summarize", "premium", "nosuchtool"):
        assert shop.acceptor.payment_required(tool) is None, tool


def test_demo_mode_and_a_table_without_x402_offer_nothing(engine: Engine,
                                                          keys_dir: Path) -> None:
    from mcpbill_cli.config import Settings

    plain = {key: value for key, value in ACCEPT_PRICING.items() if key != "x402"}
    for document, demo in ((ACCEPT_PRICING, True), (plain, False)):
        verifier = Verifier(keys=KeySource(directory=keys_dir), engine=engine, demo=demo,
                            pricing=PricingTable.from_document(document))
        settings = Settings(home=keys_dir.parent, db_url="", mode="demo" if demo else "live")
        assert isinstance(Acceptor.from_settings(verifier, settings), Unavailable)


# --- paying --------------------------------------------------------------------------------


def test_the_official_client_pays_once_and_the_books_agree(shop: Shop) -> None:
    payer = new_payer(shop.devnet)
    challenge = shop.acceptor.payment_required("search")
    assert challenge is not None
    payment = official_payment(official_client(payer, shop.devnet.chain.usdc), challenge)

    settlement, receipt = pay_and_run(shop, payment, args={"q": "usdc"})

    assert settlement.success and settlement.network == NETWORK
    assert settlement.payer == payer.address.lower()
    assert shop.received() == SEARCH_PRICE
    assert balance(shop.devnet, payer.address) == 1_000_000 - SEARCH_PRICE
    verified = shop.verifier.verify_receipt(receipt.jws)
    assert verified.amount == SEARCH_PRICE and verified.claims["tool"] == "search"
    assert verified.claims["transaction"] == settlement.transaction
    assert verified.claims["tenant"] == "x402"
    assert verified.claims["payer"] == payer.address.lower()
    assert verified.claims["settlement"] == settlement.to_dict()
    [row] = shop.payment_rows()
    assert (row.status, row.call_id, row.tx_hash) == ("settled", receipt.receipt_id,
                                                      settlement.transaction)
    assert len(shop.captured_calls("search")) == 1 and shop.deposit_count() == 1
    shop.assert_books_clean()


def test_a_retry_of_a_settled_payment_replays_and_moves_nothing(shop: Shop) -> None:
    payer = new_payer(shop.devnet)
    payment = official_payment(official_client(payer, shop.devnet.chain.usdc),
                               shop.acceptor.payment_required("search") or {})
    _, receipt = pay_and_run(shop, payment, args={"q": "a"}, result='{"first": 1}')

    replay = pay_and_run(shop, payment, args={"q": "a"}, result='{"second": 2}')

    assert isinstance(replay, Replayed)
    assert replay.receipt.receipt_id == receipt.receipt_id and replay.result == '{"first": 1}'
    assert shop.received() == SEARCH_PRICE and len(shop.captured_calls()) == 1
    used = refusal(lambda: pay_and_run(shop, payment, args={"q": "other call"}))
    assert used.code == "X402_NONCE_USED"
    shop.assert_books_clean()


def test_a_v1_payment_is_accepted_and_answered_in_v1_names(shop: Shop) -> None:
    payer = new_payer(shop.devnet)
    challenge = shop.acceptor.payment_required("search", version=1,
                                               resource="mcp://tool/search")
    payment = official_payment(official_client(payer, shop.devnet.chain.usdc), challenge or {})
    assert payment["x402Version"] == 1

    settlement, receipt = pay_and_run(shop, payment)

    assert settlement.network == V1_NETWORK and shop.received() == SEARCH_PRICE
    assert shop.verifier.verify_receipt(receipt.jws).amount == SEARCH_PRICE


def test_a_payment_header_is_read_as_base64_json(shop: Shop) -> None:
    import base64

    payer = new_payer(shop.devnet)
    payment = signed_payment(payer, shop.terms, amount=SEARCH_PRICE)
    header = base64.b64encode(json.dumps(payment).encode()).decode()

    settlement, _ = pay_and_run(shop, header)

    assert settlement.success and shop.received() == SEARCH_PRICE


# --- refusals before the tool runs ---------------------------------------------------------


@pytest.mark.parametrize(("change", "reason"), [
    ({"amount": SEARCH_PRICE - 1}, "amount"),
    ({"amount": SEARCH_PRICE + 1}, "amount"),
    ({"to": "0x" + "11" * 20}, "recipient"),
    ({"network": "eip155:8453"}, "network"),
    ({"valid_before": 1_000}, "expired"),
    ({"valid_before": "soon"}, "expired"),
    ({"valid_after": 4_000_000_000, "valid_before": 4_000_000_100}, "not_yet_valid"),
])
def test_a_payment_that_does_not_pay_this_call_is_refused_before_anything_moves(
        shop: Shop, change: dict[str, Any], reason: str) -> None:
    payer = new_payer(shop.devnet)
    if change.get("valid_before") == "soon":  # valid, but not long enough to settle
        change = {"valid_before": int(time.time()) + 3}
    options = {"amount": SEARCH_PRICE, **change}
    payment = signed_payment(payer, shop.terms, **options)

    error = refusal(lambda: shop.acceptor.verify(payment, "search"))

    assert (error.code, error.details["reason"]) == ("X402_PAYMENT_INVALID", reason)
    assert shop.payment_rows() == [] and shop.received() == 0


def test_a_signature_by_someone_else_is_refused(shop: Shop) -> None:
    payer, thief = new_payer(shop.devnet), Account.create()
    payment = signed_payment(thief, shop.terms, amount=SEARCH_PRICE)
    payment["payload"]["authorization"]["from"] = payer.address  # spend the payer's USDC

    error = refusal(lambda: shop.acceptor.verify(payment, "search"))

    assert (error.code, error.details["reason"]) == ("X402_PAYMENT_INVALID", "signature")


@pytest.mark.parametrize(("names", "field"), [
    ({"tenant": "acme\x1b[2J"}, "tenant"), ({"tenant": " acme"}, "tenant"),
    ({"tenant": "t" * 101}, "tenant"), ({"agent": "bot\n"}, "agent"), ({"agent": ""}, "agent"),
])
def test_a_tenant_or_agent_the_ledger_cannot_keep_is_refused_before_the_payment_settles(
        shop: Shop, names: dict[str, str], field: str) -> None:
    payer = new_payer(shop.devnet)
    payment = signed_payment(payer, shop.terms, amount=SEARCH_PRICE)

    error = refusal(lambda: shop.acceptor.verify(payment, "search", **names))

    assert (error.code, error.details["field"]) == ("INVALID_INPUT", field)
    assert shop.payment_rows() == [] and shop.received() == 0
    assert balance(shop.devnet, payer.address) == 1_000_000
    settlement, receipt = pay_and_run(shop, payment)  # the same payment, for a good name
    assert settlement.success and shop.received() == SEARCH_PRICE
    shop.assert_books_clean()


@pytest.mark.parametrize("payment", [
    {}, {"x402Version": 3}, {"x402Version": 2, "accepted": {"scheme": "upto"}},
    {"x402Version": 2, "accepted": {"scheme": "exact", "network": "eip155:43113"},
     "payload": {"signature": "0x00", "authorization": {}}},
    "not base64 at all!", [],
])
def test_malformed_payments_are_refused_with_a_reason(shop: Shop, payment: Any) -> None:
    error = refusal(lambda: shop.acceptor.verify(payment, "search"))

    assert error.code == "X402_PAYMENT_INVALID"
    assert error.details["reason"] in ("malformed", "version", "scheme")


def test_a_tool_without_x402_refuses_payments(shop: Shop) -> None:
    payment = signed_payment(new_payer(shop.devnet), shop.terms, amount=50_000)

    error = refusal(lambda: shop.acceptor.verify(payment, "premium"))

    assert error.details["reason"] == "not_offered"


def test_a_payer_without_funds_is_refused(shop: Shop) -> None:
    payer = new_payer(shop.devnet, amount=SEARCH_PRICE - 1)
    payment = signed_payment(payer, shop.terms, amount=SEARCH_PRICE)

    error = refusal(lambda: shop.acceptor.verify(payment, "search"))

    assert error.code == "X402_INSUFFICIENT_FUNDS"
    assert error.details == {"balance": str(SEARCH_PRICE - 1), "amount": str(SEARCH_PRICE)}


def test_a_nonce_used_on_chain_elsewhere_is_refused(shop: Shop, gas_account: LocalAccount
                                                    ) -> None:
    payer = new_payer(shop.devnet)
    payment = signed_payment(payer, shop.terms, amount=SEARCH_PRICE)
    pay_and_run(shop, payment)
    with shop.engine.begin() as conn:  # forget it here: only the chain remembers
        from mcpbill_cli.ledger.models import x402_payments

        conn.execute(x402_payments.delete())

    error = refusal(lambda: shop.acceptor.verify(payment, "search"))

    assert error.code == "X402_NONCE_USED"


def test_a_payment_for_a_call_still_running_is_in_progress_and_a_failed_tool_releases_it(
        shop: Shop) -> None:
    payment = signed_payment(new_payer(shop.devnet), shop.terms, amount=SEARCH_PRICE)
    opened = shop.acceptor.reserve(shop.acceptor.verify(payment, "boom"))
    assert isinstance(opened, Reserved)

    again = refusal(lambda: shop.acceptor.reserve(shop.acceptor.verify(payment, "boom")))
    assert isinstance(again, CallInProgress)

    shop.acceptor.release(opened)  # the tool failed: nothing settles
    assert [row.status for row in shop.payment_rows()] == ["released"]
    settlement, _ = pay_and_run(shop, payment, tool="boom")  # the agent may pay again
    assert settlement.success and shop.received() == SEARCH_PRICE
    assert [row.status for row in shop.payment_rows()] == ["settled"]


@pytest.mark.parametrize("storage", ["ledger", "redis"])
def test_a_payer_calling_in_a_loop_is_rate_limited_as_its_agent_until_the_window_ends(
        shop: Shop, storage: str) -> None:
    """``[limits] agent_calls`` of the ``[x402] tenant`` count each new call paid with x402,
    its payer being its agent, in the ledger or in Redis as the verifier counts them: over the
    limit it is RATE_LIMITED with no challenge to pay again, nothing is reserved, and the same
    payment pays once the window has ended. Another payer, and a retry of a call made already,
    are not counted."""
    pinned = [utcnow().replace(microsecond=100_000)]  # the ledger's windows: the clock's second
    payer, someone_else = new_payer(shop.devnet), new_payer(shop.devnet)
    with rate_limited(shop, "2/s", clock=(lambda: pinned[0]) if storage == "ledger" else None,
                      limits_storage=REDIS if storage == "redis" else None) as books:
        acceptor = books.acceptor
        verified = [acceptor.verify(signed_payment(who, books.terms, amount=SEARCH_PRICE),
                                    "search", args={"q": n})
                    for n, who in enumerate([payer] * 4 + [someone_else])]
        other = verified.pop()

        first, second = (acceptor.reserve(v) for v in verified[:2])
        limited = refusal(lambda: acceptor.reserve(verified[2]))
        again = refusal(lambda: acceptor.reserve(verified[3]))
        retried = refusal(lambda: acceptor.reserve(verified[0]))  # a retry: not counted
        elsewhere = acceptor.reserve(other)

        assert isinstance(first, Reserved) and isinstance(second, Reserved)
        assert limited.code == again.code == "RATE_LIMITED"
        assert payer.address.lower() in limited.message
        details = limited.to_dict()
        assert (details["scope"], details["limit"], details["window"], details["kind"]) == (
            "agent", "2/s", "second", "calls")
        assert 0 < details["retryAfterMs"] <= 1000 and "jti" not in details
        assert isinstance(retried, CallInProgress)
        assert isinstance(elsewhere, Reserved)  # another agent
        assert sorted(row.payer for row in books.payment_rows()) == sorted(
            [payer.address.lower()] * 2 + [someone_else.address.lower()])
        assert books.received() == 0

        if storage == "ledger":  # the window ends
            pinned[0] += timedelta(seconds=1)
        else:
            time.sleep(1.1)
        third = acceptor.reserve(verified[2])  # the same payment, refused before

        assert isinstance(third, Reserved)
        settlement = acceptor.settle(third)
        receipt = acceptor.record(third, settlement, result='{"ok": true}')
        assert receipt.amount == SEARCH_PRICE and books.received() == SEARCH_PRICE
        for opened in (first, second, elsewhere):
            acceptor.release(opened)
        assert sorted(row.status for row in books.payment_rows()) == [
            "released", "released", "released", "settled"]
        books.assert_books_clean()


# --- after settlement ----------------------------------------------------------------------


def test_wallet_sync_after_a_payment_credits_nothing_again(shop: Shop) -> None:
    start = shop.devnet.w3.eth.block_number
    payer = new_payer(shop.devnet)
    pay_and_run(shop, signed_payment(payer, shop.terms, amount=SEARCH_PRICE))
    shop.devnet.mine(2)

    result = sync(shop.engine, Rpc(shop.devnet.w3), shop.devnet.chain, shop.pay_to,
                  from_block=start)

    assert result.to_block >= start + 2 and result.credited == [] and result.new_unlinked == []
    assert shop.deposit_count() == 1
    shop.assert_books_clean()


def test_a_crash_between_settlement_and_record_is_recovered_from_the_chain(shop: Shop) -> None:
    payer = new_payer(shop.devnet)
    payment = signed_payment(payer, shop.terms, amount=SEARCH_PRICE)
    opened = shop.acceptor.reserve(shop.acceptor.verify(payment, "search"))
    assert isinstance(opened, Reserved)
    settlement = shop.acceptor.settle(opened)  # ... and the server dies here
    later = utcnow() + timedelta(minutes=5)
    report = reconcile(shop.engine, ReconcileOptions(
        window=Window(later - timedelta(hours=1), later), chain="off", now=later))
    assert [(f.name, [r.key for r in f.rows]) for f in report.findings] == [
        ("x402_payment_stale", [opened.verified.payment_id])]

    assert shop.acceptor.recover(older_than=3600) == []  # not stale yet: left alone
    [recovered] = shop.acceptor.recover(older_than=0)

    assert recovered.id == opened.verified.payment_id
    [row] = shop.payment_rows()
    assert row.status == "settled" and row.tx_hash == settlement.transaction
    assert shop.received() == SEARCH_PRICE and len(shop.captured_calls("search")) == 1
    assert shop.acceptor.recover(older_than=0) == []
    shop.assert_books_clean()


def _settled_then_synced(shop: Shop, payer: LocalAccount) -> tuple[Reserved, Any]:
    """A payment of ``payer`` (linked to tenant acme) settled, and a ``wallet sync`` that
    credited its Transfer to acme before the server recorded the call (the payer put its
    own authorization on chain, or the server died and the operator synced)."""
    start = shop.devnet.w3.eth.block_number
    link(shop.engine, "acme", payer.address)
    opened = shop.acceptor.reserve(shop.acceptor.verify(
        signed_payment(payer, shop.terms, amount=SEARCH_PRICE), "search"))
    assert isinstance(opened, Reserved)
    settlement = shop.acceptor.settle(opened)
    shop.devnet.mine(2)
    synced = sync(shop.engine, Rpc(shop.devnet.w3), shop.devnet.chain, shop.pay_to,
                  from_block=start)
    assert [credit.tenant for credit in synced.credited] == ["acme"]
    return opened, settlement


def acme(shop: Shop) -> tuple[int, int, int]:
    """acme's (funded, spent, available)."""
    with reading(shop.engine) as conn:
        view = tenant_balance(conn, "acme")
    return view.funded, view.spent, view.available


def test_a_payment_a_wallet_sync_credited_first_pays_its_call_from_that_credit(
        shop: Shop) -> None:
    payer = new_payer(shop.devnet)
    opened, settlement = _settled_then_synced(shop, payer)

    receipt = shop.acceptor.record(opened, settlement, result='{"ok": true}')

    assert receipt.amount == SEARCH_PRICE and receipt.claims["tenant"] == "acme"
    assert acme(shop) == (SEARCH_PRICE, SEARCH_PRICE, 0)  # paid once, not spendable besides
    assert [row.status for row in shop.payment_rows()] == ["settled"]
    assert shop.received() == SEARCH_PRICE and shop.deposit_count() == 1
    shop.assert_books_clean()


def test_a_payment_recovery_cannot_record_now_does_not_hold_back_the_others(
        shop: Shop) -> None:
    """The oldest stale payment was synced to acme, which spent the credit since: it cannot
    be recorded (INSUFFICIENT_FUNDS) and stays reserved; the next one is recovered."""
    first, _ = _settled_then_synced(shop, new_payer(shop.devnet))
    with writing(shop.engine) as conn:  # acme spends what the sync credited it
        credit.issue(conn, credit.IssueRequest(
            tenant="acme", agent="other", limit=SEARCH_PRICE, ttl=600, scope=None,
            audience="mcpbill", issuer="mcpbill", demo=False),
            signer=shop.verifier.keys.signer(), ttl_cap=600, now=utcnow())  # type: ignore[arg-type]
    second = shop.acceptor.reserve(shop.acceptor.verify(
        signed_payment(new_payer(shop.devnet), shop.terms, amount=SEARCH_PRICE), "search"))
    assert isinstance(second, Reserved)
    shop.acceptor.settle(second)  # ... and the server dies here too

    recovered = shop.acceptor.recover(older_than=0)

    assert [row.id for row in recovered] == [second.verified.payment_id]
    statuses = {row.id: row.status for row in shop.payment_rows()}
    assert statuses == {first.verified.payment_id: "reserved",
                        second.verified.payment_id: "settled"}


def test_a_reserved_payment_that_can_no_longer_settle_is_released(shop: Shop) -> None:
    payer = new_payer(shop.devnet)
    payment = signed_payment(payer, shop.terms, amount=SEARCH_PRICE,
                             valid_before=int(time.time()) + 12)
    opened = shop.acceptor.reserve(shop.acceptor.verify(payment, "search"))
    assert isinstance(opened, Reserved)  # ... and the server dies before it settles
    a = shop.acceptor
    a_minute_later = Acceptor(a.verifier, chain=a.chain, pay_to=a.pay_to, rpc=a.rpc,
                              settler=a.settler, clock=lambda: utcnow() + timedelta(minutes=1))

    [released] = a_minute_later.recover(older_than=0)

    assert released.id == opened.verified.payment_id
    assert [row.status for row in shop.payment_rows()] == ["released"]
    assert shop.received() == 0 and shop.captured_calls() == []
