"""Which tenant a sending address belongs to: ``mcpbill wallet link``."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine, select, update

from mcpbill_cli.clock import utcnow
from mcpbill_cli.errors import AlreadyExists
from mcpbill_cli.ledger import audit, ops
from mcpbill_cli.ledger.engine import reading, writing
from mcpbill_cli.ledger.models import wallet_links
from mcpbill_cli.names import require_name
from mcpbill_cli.wallet.addresses import normalize_address
from mcpbill_cli.wallet.crediting import Credit, claim_unlinked

w = wallet_links.c


@dataclass(frozen=True)
class LinkResult:
    """The link as it stands, the tenant it replaced, and kept deposits it credited now."""

    address: str
    tenant: str
    previous: str | None = None
    credited: list[Credit] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.previous != self.tenant


def link(engine: Engine, tenant: str, address: str, *, replace: bool = False,
         at: datetime | None = None) -> LinkResult:
    """Deposits from ``address`` belong to ``tenant`` from now on.

    Deposits from that address that a sync kept as unlinked are credited to ``tenant`` in the
    same transaction. An address linked to another tenant is refused unless ``replace``;
    a replaced link changes only deposits not yet credited.
    """
    require_name(tenant, "tenant")
    sender = normalize_address(address)
    at = at or utcnow()
    with writing(engine) as conn:
        previous = conn.execute(select(w.tenant).where(w.address == sender)).scalar_one_or_none()
        if previous is None:
            ops.insert_ignore(conn, wallet_links,
                              {"address": sender, "tenant": tenant, "created_at": at})
        elif previous != tenant:
            if not replace:
                raise AlreadyExists(
                    f"{sender} is linked to tenant {previous}: pass --replace to link it to "
                    f"{tenant} instead", address=sender, tenant=previous,
                )
            conn.execute(update(wallet_links).where(w.address == sender)
                         .values(tenant=tenant, created_at=at))
        if previous != tenant:
            audit.record(conn, "wallet_link", at=at, tenant=tenant, ref=sender,
                         detail={"previous": previous} if previous else None)
        credited = claim_unlinked(conn, at, sender=sender)
    return LinkResult(address=sender, tenant=tenant, previous=previous, credited=credited)


def linked_addresses(engine: Engine, tenant: str | None = None) -> dict[str, str]:
    """``{address: tenant}`` of every link, or of one tenant's."""
    query = select(w.address, w.tenant).order_by(w.address)
    if tenant is not None:
        query = query.where(w.tenant == tenant)
    with reading(engine) as conn:
        return {address: owner for address, owner in conn.execute(query)}
