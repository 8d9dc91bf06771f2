"""What the operator allows mcpbill to pay, and the choice among a challenge's options.

An option is acceptable when its scheme is ``exact``, its network and asset are an
:class:`AllowedAsset` (whose decimals are known: six, so its on-chain units are micro-USDC), its
EIP-712 domain is known and agrees with the asset's, its amount is positive and at most the
per-call maximum. Of the acceptable options the cheapest wins (the first listed on a tie).

:func:`decide` never raises: it returns a :class:`Decision` with a verdict per option, which is
what ``mcpbill x402 fetch --dry-run`` shows. :func:`choose` turns "nothing acceptable" into the
refusal that says why, before anything is held or signed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from mcpbill_cli.errors import InvalidInput
from mcpbill_cli.money import DECIMALS, format_usd
from mcpbill_cli.x402.errors import X402NoAcceptableOption, X402OverMaximum
from mcpbill_cli.x402.wire import Challenge, Offer, Requirement

if TYPE_CHECKING:
    from mcpbill_cli.wallet.chains import Chain

T = TypeVar("T")

SCHEME = "exact"
OVER_MAXIMUM = "over_maximum"


@dataclass(frozen=True)
class AllowedAsset:
    """A token mcpbill may pay with: where it lives, its decimals and its EIP-712 domain.

    Only 6-decimal assets are accepted (USDC): their smallest unit is the micro-USDC the ledger
    counts in, so an amount on the wire is an amount on the ledger, with no conversion.
    """

    network: str  # CAIP-2
    address: str  # 0x address; kept lowercase
    eip712_name: str | None = None
    eip712_version: str | None = None
    decimals: int = DECIMALS
    symbol: str = "USDC"

    def __post_init__(self) -> None:
        if self.decimals != DECIMALS:
            raise InvalidInput(f"{self.symbol} at {self.address} has {self.decimals} decimals; "
                               f"mcpbill pays only {DECIMALS}-decimal assets (micro-USDC)")
        object.__setattr__(self, "address", self.address.lower())

    @classmethod
    def from_chain(cls, chain: Chain) -> AllowedAsset:
        """The chain's USDC, as the wallet's chain registry describes it."""
        return cls(network=chain.caip2, address=chain.usdc, eip712_name=chain.eip712_name,
                   eip712_version=chain.eip712_version)


@dataclass(frozen=True)
class PaymentPolicy:
    """The operator's rules for downstream payments: allowed assets and a per-call maximum."""

    assets: tuple[AllowedAsset, ...]
    max_amount: int  # micro-USDC per payment

    def __post_init__(self) -> None:
        if self.max_amount <= 0:
            raise InvalidInput("the per-call maximum must be more than 0")

    @classmethod
    def for_chains(cls, chains: Iterable[Chain], *, max_amount: int) -> PaymentPolicy:
        """Pay the USDC of these chains only, at most ``max_amount`` micro-USDC a call."""
        return cls(tuple(AllowedAsset.from_chain(chain) for chain in chains), max_amount)

    def asset(self, network: str, address: str) -> AllowedAsset | None:
        return next((a for a in self.assets
                     if a.network == network and a.address == address.lower()), None)


@dataclass(frozen=True)
class Verdict:
    """One option and what the policy says of it: ``reason`` is ``"ok"`` when acceptable."""

    offer: Offer
    reason: str
    explanation: str

    @property
    def acceptable(self) -> bool:
        return self.reason == "ok"

    def to_dict(self) -> dict[str, Any]:
        requirement = self.offer.requirement
        return {"index": self.offer.index, "acceptable": self.acceptable, "reason": self.reason,
                "why": self.explanation, "option": dict(self.offer.raw),
                "amountUsd": format_usd(requirement.amount) if requirement else None}


@dataclass(frozen=True)
class Choice:
    """The option to pay, with the EIP-712 domain to sign it under."""

    offer: Offer
    requirement: Requirement
    asset: AllowedAsset
    domain_name: str
    domain_version: str

    @property
    def amount(self) -> int:
        """Micro-USDC (the asset has six decimals)."""
        return self.requirement.amount


@dataclass(frozen=True)
class Decision:
    """The verdict on every option and the choice, if any option is acceptable."""

    verdicts: tuple[Verdict, ...]
    choice: Choice | None

    def to_dict(self) -> dict[str, Any]:
        chosen = self.choice.offer.index if self.choice else None
        return {"chosen": chosen, "options": [v.to_dict() for v in self.verdicts]}


def decide(challenge: Challenge, policy: PaymentPolicy) -> Decision:
    """Judge every option of ``challenge``; choose the cheapest acceptable one."""
    verdicts = tuple(_verdict(offer, policy) for offer in challenge.offers)
    acceptable = [v.offer for v in verdicts if v.acceptable]
    if not acceptable:
        return Decision(verdicts, None)
    cheapest = min(acceptable, key=lambda offer: _known(offer.requirement).amount)
    return Decision(verdicts, _choice(cheapest, policy))


def choose(challenge: Challenge, policy: PaymentPolicy) -> Choice:
    """The option to pay, or the refusal: over the maximum, or no acceptable option."""
    decision = decide(challenge, policy)
    if decision.choice is not None:
        return decision.choice
    over = [v.offer for v in decision.verdicts if v.reason == OVER_MAXIMUM]
    if over:
        cheapest = min(_known(offer.requirement).amount for offer in over)
        raise X402OverMaximum(
            f"the cheapest allowed option costs {format_usd(cheapest)} USDC, over the per-call "
            f"maximum of {format_usd(policy.max_amount)}; raise the maximum to pay it",
            amountUsd=format_usd(cheapest), maximumUsd=format_usd(policy.max_amount),
            options=[v.to_dict() for v in decision.verdicts])
    raise X402NoAcceptableOption(
        "none of the server's payment options is allowed: "
        + "; ".join(f"option {v.offer.index}: {v.explanation}" for v in decision.verdicts),
        options=[v.to_dict() for v in decision.verdicts])


def _verdict(offer: Offer, policy: PaymentPolicy) -> Verdict:
    req = offer.requirement
    if req is None:
        return Verdict(offer, "unreadable", f"cannot be read: {offer.problem}")
    if req.scheme != SCHEME:
        return Verdict(offer, "scheme", f"scheme {req.scheme!r} is not {SCHEME!r}")
    asset = policy.asset(req.network, req.asset)
    if asset is None:
        return Verdict(offer, "asset", f"{req.asset} on {req.network} is not an allowed asset "
                                       "(only allowed USDC contracts, whose decimals are known)")
    problem = _domain_problem(req, asset)
    if problem is not None:
        return Verdict(offer, "domain", problem)
    if req.amount <= 0:
        return Verdict(offer, "amount", "the amount is zero")
    if req.amount > policy.max_amount:
        return Verdict(offer, OVER_MAXIMUM,
                       f"{format_usd(req.amount)} USDC is over the per-call maximum of "
                       f"{format_usd(policy.max_amount)}")
    return Verdict(offer, "ok", f"{format_usd(req.amount)} USDC in {asset.symbol} on "
                                f"{req.network}")


def _domain(req: Requirement, asset: AllowedAsset) -> tuple[str | None, str | None]:
    name = req.extra.get("name", asset.eip712_name)
    version = req.extra.get("version", asset.eip712_version)
    return (name if isinstance(name, str) else None, version if isinstance(version, str) else None)


def _domain_problem(req: Requirement, asset: AllowedAsset) -> str | None:
    """A wrong EIP-712 name signs something that looks fine and fails on chain: refuse it."""
    name, version = _domain(req, asset)
    if not name or not version:
        return "the EIP-712 domain (extra.name, extra.version) is missing"
    for given, known, what in ((name, asset.eip712_name, "name"),
                               (version, asset.eip712_version, "version")):
        if known is not None and given != known:
            return f"EIP-712 {what} {given!r} is not the asset's {known!r}"
    return None


def _choice(offer: Offer, policy: PaymentPolicy) -> Choice:
    req = _known(offer.requirement)
    asset = policy.asset(req.network, req.asset)
    name, version = _domain(req, _known(asset))
    return Choice(offer, req, _known(asset), _known(name), _known(version))


def _known(value: T | None) -> T:
    # Only called on values an acceptable verdict has checked; this narrows the type.
    assert value is not None  # noqa: S101
    return value
