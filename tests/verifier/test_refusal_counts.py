"""Refusals of input no known key signed (garbage, unknown keys, bad signatures) are counted
per UTC minute, code, reason and source, with one sample token hash, and written by the
verifier's background writer (or ``seal()``/``close()``): a flood of them writes a few rows a
minute, never an event each. A refusal of a token we signed stays one event of its own.
"""

from __future__ import annotations

import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client import Client
from sqlalchemy import Engine, func, select

from mcpbill_cli.errors import BillingError, InvalidCreditToken
from mcpbill_cli.keys import KeyRing, KeySource, init_keyring, rotate
from mcpbill_cli.ledger.audit import token_fingerprint
from mcpbill_cli.ledger.credit import IssuedToken, revoke
from mcpbill_cli.ledger.engine import make_engine, reading, writing
from mcpbill_cli.ledger.models import events, refusal_counts
from mcpbill_cli.ledger.refusals import Counter
from mcpbill_cli.ledger.seals import read_seals
from mcpbill_cli.mcp import TOKEN_META, Billing
from mcpbill_cli.pricing import PricingTable
from mcpbill_cli.tokens import Claims, encode_token, new_jti
from mcpbill_cli.verifier import Verifier
from tests.mcp.conftest import load_example, raw_session, reply, rpc, serve, tool_call

from .billing_support import USDC, FakeClock, b64url_json, jwt_parts, mint

rc = refusal_counts.c
CODE = "INVALID_CREDIT_TOKEN"


@pytest.fixture
def clock() -> FakeClock:
    """Ten seconds before a minute ends, so a test can cross into the next one: the last such
    moment, never a future one (a verifier on the real clock must accept tokens minted then)."""
    now = datetime.now(UTC).replace(microsecond=0)
    start = now.replace(second=50)
    return FakeClock(start if start <= now else start - timedelta(minutes=1))


def minute_of(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


# --- garbage -----------------------------------------------------------------------------------


def garbage(genuine: IssuedToken, other: IssuedToken, stranger: KeyRing, clock: FakeClock,
            count: int) -> dict[str, list[Any]]:
    """``count`` tokens of each kind no known key signed, by the reason they are refused for:
    random text (and values that are not text), well-formed tokens of a key ring the verifier
    never saw, and the genuine header with a payload its signature does not cover."""
    head, body, _ = genuine.token.split(".")
    payload = jwt_parts(genuine.token)[1]
    signature = other.token.split(".")[2]
    return {
        "malformed": [secrets.token_urlsafe(8 + n % 40) for n in range(count - 2)]
                     + [b"bytes-are-not-a-token", 12345],
        "unknown_key": [mint_offline(stranger, clock, n) for n in range(count)],
        "bad_signature": [f"{head}.{b64url_json({**payload, 'n': n})}.{signature}"
                          for n in range(count)],
    }


def mint_offline(ring: KeyRing, clock: FakeClock, n: int) -> str:
    """A well-formed token signed by a key ring this verifier has never seen."""
    info, key = ring.signing_key()
    now = clock()
    claims = Claims(jti=new_jti(), tenant="acme", agent=f"stranger-{n}", scope=("*",),
                    audience="mcpbill", issuer="mcpbill", issued_at=now, not_before=now,
                    expires_at=now + timedelta(hours=1), limit=USDC, kid=info.kid)
    return encode_token(claims, info.alg, key)


@pytest.fixture
def stranger(tmp_path: Path, clock: FakeClock) -> KeyRing:
    init_keyring(tmp_path / "stranger", "EdDSA", now=clock(), force=False).save()
    return KeyRing.load(tmp_path / "stranger")


ENTRIES: list[Callable[[Verifier, Any], Any]] = [
    lambda v, t: v.preflight(t, "search"),
    lambda v, t: v.hold(t, "search", args={"q": "x"}),
    lambda v, t: v.charge(t, "search", args={"q": "x"}),
    lambda v, t: v.begin(t, "search"),
]


def refuse(verifier: Verifier, token: Any, n: int = 0) -> BillingError:
    with pytest.raises(BillingError) as refused:
        ENTRIES[n % len(ENTRIES)](verifier, token)
    return refused.value


def refuse_across_a_minute(verifier: Verifier, clock: FakeClock, *, before: int,
                           after: int) -> datetime:
    """``before`` garbage tokens (``before-0``, ...) refused in the clock's minute, ``after``
    (``after-0``, ...) in the next one, then sealed; returns the first minute."""
    first = minute_of(clock())
    for n in range(before):
        refuse(verifier, f"before-{n}", n)
    clock.advance(20)
    for n in range(after):
        refuse(verifier, f"after-{n}", n)
    verifier.seal()
    return first


def event_count(engine: Engine) -> int:
    with reading(engine) as conn:
        return int(conn.execute(select(func.count()).select_from(events)).scalar_one())


def counts(engine: Engine) -> dict[tuple[datetime, str, str, str], int]:
    """refusal_counts as {(minute, code, reason, source): count}."""
    with reading(engine) as conn:
        rows = conn.execute(select(rc.minute, rc.code, rc.reason, rc.source, rc.count)).all()
    return {(_aware(m), code, reason, source): int(n) for m, code, reason, source, n in rows}


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# --- a flood of garbage ------------------------------------------------------------------------

FLOOD = 40  # of each kind


def test_a_flood_of_garbage_writes_no_event_and_is_counted_per_reason(
        verifier: Verifier, funded: Engine, new_token: Callable[..., IssuedToken],
        stranger: KeyRing, clock: FakeClock) -> None:
    genuine, other = new_token(), new_token(agent="agent-2")
    flood = garbage(genuine, other, stranger, clock, FLOOD)
    before = event_count(funded)
    n = 0
    for reason, tokens in flood.items():
        for token in tokens:
            refused = refuse(verifier, token, n)
            assert (refused.code, refused.details["reason"]) == (CODE, reason), token
            n += 1
    assert event_count(funded) == before  # not one event of its own
    assert counts(funded) == {}  # counted in memory until the writer's turn

    verifier.seal()

    minute = minute_of(clock())
    assert counts(funded) == {(minute, CODE, reason, ""): FLOOD for reason in flood}
    with reading(funded) as conn:
        rows = conn.execute(select(refusal_counts)).mappings().all()
    for row in rows:  # a hash of one of them, never a token
        assert row["sample"] in {token_fingerprint(t) for t in flood[row["reason"]]}
        stored = " ".join(str(value) for value in row.values())
        for token in (t for tokens in flood.values() for t in tokens if isinstance(t, str)):
            assert token[:16] not in stored
    assert event_count(funded) == before


def test_counting_from_many_threads_loses_no_refusal(verifier: Verifier, funded: Engine,
                                                     clock: FakeClock) -> None:
    threads, each = 8, 50

    def flood(index: int) -> None:
        for n in range(each):
            refuse(verifier, f"garbage-{index}-{n}", n)

    workers = [threading.Thread(target=flood, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    verifier.seal()
    assert counts(funded) == {(minute_of(clock()), CODE, "malformed", ""): threads * each}


def test_two_verifiers_add_their_counts_to_the_same_row(
        verifier: Verifier, funded: Engine, keys: KeySource, pricing: PricingTable,
        clock: FakeClock) -> None:
    replica = Verifier(keys=keys, pricing=pricing, engine=funded, clock=clock)
    for n in range(3):
        refuse(verifier, f"one-{n}", n)
    for n in range(5):
        refuse(replica, f"two-{n}", n)
    verifier.seal()
    replica.seal()
    for n in range(2):
        refuse(verifier, f"three-{n}", n)
    verifier.seal()
    assert counts(funded) == {(minute_of(clock()), CODE, "malformed", ""): 10}


def test_the_same_garbage_again_is_refused_again_and_counted_each_time(
        verifier: Verifier, funded: Engine, new_token: Callable[..., IssuedToken],
        stranger: KeyRing, clock: FakeClock) -> None:
    """A refusal that stays true (a bad signature, an unknown key, garbage) is remembered
    per token, so a flood of the same token costs little: it is still refused for the same
    reason, and still counted, every time."""
    genuine, other = new_token(), new_token(agent="agent-2")
    flood = garbage(genuine, other, stranger, clock, 5)
    for _ in range(3):
        for reason, tokens in flood.items():
            for n, token in enumerate(tokens):
                refused = refuse(verifier, token, n)
                assert (refused.code, refused.details["reason"]) == (CODE, reason), token
    verifier.seal()
    assert counts(funded) == {(minute_of(clock()), CODE, reason, ""): 15 for reason in flood}


def test_the_same_garbage_from_many_threads_is_counted_exactly(
        verifier: Verifier, funded: Engine, new_token: Callable[..., IssuedToken],
        stranger: KeyRing, clock: FakeClock) -> None:
    """A flood repeating a few tokens (their refusals remembered after the first) from many
    threads at once: every refusal counted, none twice, each for its own reason."""
    genuine, other = new_token(), new_token(agent="agent-2")
    flood = garbage(genuine, other, stranger, clock, 4)
    threads, rounds = 6, 10

    def send() -> None:
        for _ in range(rounds):
            for reason, tokens in flood.items():
                for n, token in enumerate(tokens):
                    assert refuse(verifier, token, n).details["reason"] == reason

    workers = [threading.Thread(target=send) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    verifier.seal()
    assert counts(funded) == {(minute_of(clock()), CODE, reason, ""): threads * rounds * 4
                              for reason in flood}


def test_the_sample_of_each_minute_is_the_hash_of_its_first_refusal(
        verifier: Verifier, funded: Engine, clock: FakeClock) -> None:
    """Only a key's first refusal in its minute is hashed (the rest of a flood is not): that
    one's hash is the sample, however many refusals follow."""
    first = refuse_across_a_minute(verifier, clock, before=5, after=5)
    with reading(funded) as conn:
        samples = {_aware(minute): sample
                   for minute, sample in conn.execute(select(rc.minute, rc.sample))}
    assert samples == {first: token_fingerprint("before-0"),
                       first + timedelta(minutes=1): token_fingerprint("after-0")}


def test_a_remembered_refusal_answers_for_its_own_token_text_only(
        verifier: Verifier, funded: Engine, new_token: Callable[..., IssuedToken],
        clock: FakeClock) -> None:
    """A forgery of a genuine token stays refused however often it comes (its refusal
    remembered), and the genuine token, sent after the forgeries and between them, is
    accepted every time: the memory of garbage never answers for a token we signed."""
    genuine = new_token()
    head, _, signature = genuine.token.split(".")
    richer = f"{head}.{b64url_json({**jwt_parts(genuine.token)[1], 'lim': 10**12})}.{signature}"
    middle = len(genuine.token) - 20  # inside the signature, whose last character has spare bits
    flipped = "A" if genuine.token[middle] != "A" else "B"
    near = genuine.token[:middle] + flipped + genuine.token[middle + 1:]
    for n in range(3):  # the forgeries first: their refusals are remembered before it is seen
        for forged in (richer, near):
            refused = refuse(verifier, forged, n)
            assert (refused.code, refused.details["reason"]) == (CODE, "bad_signature")
        assert verifier.preflight(genuine.token, "search").jti == genuine.claims.jti
    verifier.seal()
    assert counts(funded) == {(minute_of(clock()), CODE, "bad_signature", ""): 6}


def test_the_counter_says_when_a_passed_minute_is_waiting() -> None:
    """``add`` says whether counts of an earlier minute wait to be written (a verifier with
    no writer thread writes them then) and asks for a key's sample once."""
    counter = Counter()
    asked: list[str] = []

    def sample(name: str) -> Callable[[], str]:
        return lambda: asked.append(name) or name

    at = datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC)
    assert counter.add(at, CODE, "malformed", "", sample("a")) is False
    assert counter.add(at + timedelta(seconds=20), CODE, "malformed", "", sample("b")) is False
    assert counter.add(at + timedelta(seconds=40), CODE, "malformed", "", sample("c")) is True
    assert asked == ["a", "c"]
    taken = counter.take()
    assert {key[0].minute: (tally.count, tally.sample) for key, tally in taken.items()} == {
        0: (2, "a"), 1: (1, "c")}
    assert counter.add(at + timedelta(seconds=45), CODE, "malformed", "", sample("d")) is False
    counter.give_back(taken)  # the ledger was down: 12:00 waits again
    assert counter.add(at + timedelta(seconds=50), CODE, "malformed", "", sample("e")) is True
    assert {key[0].minute: tally.count for key, tally in counter.take().items()} == {0: 2, 1: 3}


def test_a_token_of_a_key_this_replica_lacked_verifies_once_its_ring_has_the_key(
        funded: Engine, keys_dir: Path, pricing: PricingTable, clock: FakeClock,
        tmp_path: Path) -> None:
    """A rotation made elsewhere: tokens of the new key are refused (unknown_key) until the
    replica's key ring has it, then accepted; a remembered refusal does not outlive the keys."""
    verifier = Verifier(keys=KeySource(directory=keys_dir, check_interval=0), pricing=pricing,
                        engine=funded, clock=clock)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(keys_dir, elsewhere)
    ring = KeyRing.load(elsewhere)
    rotate(ring, "EdDSA", now=clock(), last_expiry=clock() + timedelta(hours=1))
    ring.save()
    token = mint_offline(KeyRing.load(elsewhere), clock, 0)
    for _ in range(2):
        with pytest.raises(InvalidCreditToken) as refused:
            verifier.claims_of(token)
        assert refused.value.reason == "unknown_key"
    shutil.copytree(elsewhere, keys_dir, dirs_exist_ok=True)
    assert verifier.claims_of(token).kid == ring.active().kid


def test_a_token_not_valid_yet_is_accepted_once_its_time_comes(
        verifier: Verifier, ring: KeyRing, clock: FakeClock) -> None:
    """Refusals that depend on the time are never remembered."""
    token = mint_offline(ring, FakeClock(clock() + timedelta(minutes=10)), 0)
    with pytest.raises(InvalidCreditToken) as refused:
        verifier.claims_of(token)
    assert refused.value.reason == "not_yet_valid"
    clock.advance(600)
    assert verifier.claims_of(token).agent == "stranger-0"


# --- refusals of valid tokens stay events ------------------------------------------------------


def test_a_refusal_of_a_verified_token_is_still_one_event(
        verifier: Verifier, funded: Engine, new_token: Callable[..., IssuedToken],
        ring: KeyRing, clock: FakeClock) -> None:
    narrow = new_token(scope=["status"])
    poor = new_token(limit=5_000)  # search costs 10_000
    revoked = new_token()
    with writing(funded) as conn:
        revoke(conn, [revoked.claims.jti], reason="test", clock=clock)
    expired = mint(funded, ring, now=clock() - timedelta(hours=2), ttl=3600)
    before = event_count(funded)

    outcomes = [refuse(verifier, token.token, n) for n, token in
                enumerate((narrow, poor, revoked, expired))]

    assert [(r.code, r.details.get("reason")) for r in outcomes] == [
        ("SCOPE_DENIED", None), ("BUDGET_EXCEEDED", "token_limit"), ("TOKEN_REVOKED", None),
        (CODE, "expired")]
    with reading(funded) as conn:
        rows = conn.execute(select(events.c.kind, events.c.code, events.c.jti,
                                   events.c.token_hash).where(events.c.id > before)
                            .order_by(events.c.id)).all()
    assert [tuple(row) for row in rows] == [
        ("refusal", "SCOPE_DENIED", narrow.claims.jti, None),
        ("refusal", "BUDGET_EXCEEDED", poor.claims.jti, None),
        ("refusal", "TOKEN_REVOKED", revoked.claims.jti, None)]
    # An expired token names no token the verifier accepts (anyone can replay an old one as
    # fast as they like): it is counted like garbage, its hash the sample.
    verifier.seal()
    assert counts(funded) == {(minute_of(clock()), CODE, "expired", ""): 1}
    with reading(funded) as conn:
        assert conn.execute(select(refusal_counts.c.sample)).scalar_one() == (
            token_fingerprint(expired.token))


# --- minutes ------------------------------------------------------------------------------------


def test_counts_that_span_a_minute_boundary_land_in_two_rows(
        verifier: Verifier, funded: Engine, clock: FakeClock) -> None:
    first = refuse_across_a_minute(verifier, clock, before=3, after=2)
    assert counts(funded) == {(first, CODE, "malformed", ""): 3,
                              (first + timedelta(minutes=1), CODE, "malformed", ""): 2}


def test_without_a_thread_a_passed_minute_is_written_at_the_next_refusal(
        verifier: Verifier, funded: Engine, clock: FakeClock) -> None:
    first = minute_of(clock())
    second = first + timedelta(minutes=1)
    for n in range(4):
        refuse(verifier, f"early-{n}", n)
    assert counts(funded) == {}  # the minute is not over
    clock.advance(60)
    refuse(verifier, "late-0")
    assert counts(funded) == {(first, CODE, "malformed", ""): 4,
                              (second, CODE, "malformed", ""): 1}
    refuse(verifier, "late-1", 1)
    assert counts(funded) == {(first, CODE, "malformed", ""): 4,
                              (second, CODE, "malformed", ""): 1}  # a write a minute at most
    verifier.seal()
    assert counts(funded)[(second, CODE, "malformed", "")] == 2


def test_close_writes_what_was_counted(funded: Engine, keys: KeySource, pricing: PricingTable,
                                       clock: FakeClock) -> None:
    verifier = Verifier(keys=keys, pricing=pricing, engine=funded, clock=clock)
    for n in range(3):
        refuse(verifier, f"closing-{n}", n)
    verifier.close()
    assert counts(funded) == {(minute_of(clock()), CODE, "malformed", ""): 3}


def test_seal_seals_with_the_verifiers_own_key_and_says_how_many_events(
        verifier: Verifier, funded: Engine, new_token: Callable[..., IssuedToken],
        ring: KeyRing) -> None:
    token = new_token()
    verifier.charge(token.token, "search")
    with reading(funded) as conn:
        pending = conn.execute(select(func.count()).where(events.c.seal.is_(None))).scalar_one()
    assert pending > 0
    assert verifier.seal() == pending
    assert verifier.seal() == 0
    with reading(funded) as conn:
        [seal] = read_seals(conn)
    assert seal.kid == ring.active().kid and seal.count == pending


def test_a_verifier_without_a_signing_key_writes_counts_and_seals_nothing(
        funded: Engine, ring: KeyRing, pricing: PricingTable, clock: FakeClock,
        new_token: Callable[..., IssuedToken]) -> None:
    new_token()  # an event waiting to be sealed
    public = Verifier(keys=KeySource.from_jwks(ring.jwks()), pricing=pricing, engine=funded,
                      clock=clock)
    refuse(public, "no-key-here")
    assert public.seal() == 0
    assert counts(funded) == {(minute_of(clock()), CODE, "malformed", ""): 1}
    with reading(funded) as conn:
        assert conn.execute(select(func.count()).where(events.c.seal.is_(None))
                            ).scalar_one() > 0


@pytest.fixture
def served(db_url: str, funded: Engine, keys: KeySource, pricing: PricingTable
           ) -> Iterator[Verifier]:
    """A verifier built from the ledger's URL, as a server builds one: it writes by itself."""
    verifier = Verifier(keys=keys, pricing=pricing, db_url=db_url)
    yield verifier
    verifier.close()


def test_a_verifier_from_a_db_url_writes_counts_and_seals_from_its_own_thread(
        served: Verifier, funded: Engine, new_token: Callable[..., IssuedToken]) -> None:
    token = new_token()
    served.charge(token.token, "search")
    for n in range(3):
        refuse(served, f"background-{n}", n)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with reading(funded) as conn:
            unsealed = conn.execute(select(func.count()).where(events.c.seal.is_(None))
                                    ).scalar_one()
        written = sum(counts(funded).values())
        if written == 3 and unsealed == 0:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the writer thread wrote {written} counts, left {unsealed} unsealed")


# --- where refusals come from -------------------------------------------------------------------


@pytest.fixture
def example(verifier: Verifier) -> Any:
    return load_example().build_server(Billing(verifier))


def test_the_mcp_extension_counts_an_http_clients_address_as_the_source(
        example: Any, verifier: Verifier, funded: Engine, clock: FakeClock) -> None:
    with serve(example.streamable_http_app()) as url, \
            raw_session(url) as web:
        answer = reply(rpc(web, url, tool_call(2, "search", {"q": "free?"},
                                               "garbage-bearer-token")))
    result = answer["result"]
    assert result["isError"] is True
    assert result["structuredContent"]["code"] == CODE
    verifier.seal()
    assert counts(funded) == {(minute_of(clock()), CODE, "malformed", "127.0.0.1"): 1}
    with reading(funded) as conn:
        assert conn.execute(select(rc.sample)).scalar_one() == token_fingerprint(
            "garbage-bearer-token")


def test_an_in_process_mcp_call_has_no_source(example: Any, verifier: Verifier,
                                              funded: Engine, clock: FakeClock) -> None:
    async def call() -> Any:
        async with Client(example) as client:
            return await client.call_tool("search", {"q": "x"},
                                          meta={TOKEN_META: "garbage-in-meta"})  # type: ignore[arg-type]

    assert anyio.run(call).is_error
    verifier.seal()
    assert counts(funded) == {(minute_of(clock()), CODE, "malformed", ""): 1}


def test_counts_a_failed_write_took_are_counted_again(
        keys: KeySource, pricing: PricingTable, tmp_path: Path, clock: FakeClock) -> None:
    """The ledger down at a flush: nothing counted is lost, the next turn writes it."""
    down = Verifier(keys=keys, pricing=pricing, clock=clock,
                    engine=make_engine(f"sqlite:///{tmp_path}"))  # a directory: no database
    for n in range(3):
        refuse(down, f"garbage-{n}", n)
    with pytest.raises(BillingError):
        down.seal()
    taken = down._sealer.counts.take()  # type: ignore[union-attr]
    assert [tally.count for tally in taken.values()] == [3]
