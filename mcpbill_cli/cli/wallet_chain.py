"""`mcpbill wallet address | create | link | sync`, `fund --tx`, `balance --onchain`: on chain.

Registered on the `wallet` group by ``cli/wallet.py``. web3 (about a second to import) loads only
inside these command bodies, through ``mcpbill_cli.wallet``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from mcpbill_cli.cli import complete
from mcpbill_cli.cli.output import (
    Column,
    JsonOption,
    Output,
    OutputOption,
    emit,
    emit_listing,
    handles_errors,
    out,
    output_format,
    progress_bar,
    say,
    show_listing,
    usd_column,
)
from mcpbill_cli.cli.state import State, state
from mcpbill_cli.money import format_usd
from mcpbill_cli.wallet.chains import ENV_RPC_URL

if TYPE_CHECKING:
    from mcpbill_cli.wallet.chains import Chain
    from mcpbill_cli.wallet.crediting import Credit, Deposit
    from mcpbill_cli.wallet.rpc import Rpc

ChainOption = Annotated[str | None, typer.Option(
    "--chain", help="base, base-sepolia, ethereum, sepolia, a \\[chains.NAME] from "
                    "config.toml, or a CAIP-2 id.",
    show_default="MCPBILL_CHAIN, else [wallet] chain in config.toml, else base",
    autocompletion=complete.chains)]
RpcUrlOption = Annotated[str | None, typer.Option(
    "--rpc-url", envvar=ENV_RPC_URL, show_default="rpc_url of the chain in config.toml",
    help="JSON-RPC endpoint of the chain.")]

BALANCE_COLUMNS = (
    Column("chain", lambda b: b.chain), Column("address", lambda b: b.address, ident=True),
    usd_column("on chain", "onchain"), usd_column("credited", "credited"),
    usd_column("unlinked", "unlinked"), usd_column("unaccounted", "unaccounted"),
)
DEPOSIT_COLUMNS = (
    Column("tx", lambda d: d.tx_hash, ident=True), Column("sender", lambda d: d.sender, ident=True),
    Column("amount", lambda d: format_usd(d.amount)), Column("block", lambda d: d.block_number),
)


@handles_errors
def address(
    ctx: typer.Context,
    new: Annotated[str | None, typer.Option(
        "--set", metavar="ADDRESS", help="Make ADDRESS the deposit address (watch-only).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show or set the deposit address tenants send USDC to.

    Example: mcpbill wallet address --set 0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913
    """
    from mcpbill_cli.wallet.addresses import checksum_address
    from mcpbill_cli.wallet.deposit_address import get_deposit_address, set_deposit_address

    settings = state(ctx).settings
    if new is None:
        current = get_deposit_address(settings.file)
    else:
        current = set_deposit_address(settings.config_path, new)
        say(f"deposit address set in {settings.config_path}")
    shown = checksum_address(current)
    emit({"address": shown, "changed": new is not None}, as_json=as_json,
         human=lambda: out.print(shown))


@handles_errors
def create(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing keystore (its key is lost unless you kept a "
                        "copy).")] = False,
    as_json: JsonOption = False,
) -> None:
    """Create the operator's own key in an encrypted keystore (keys/wallet.json, mode 0600).

    The password comes from MCPBILL_KEYSTORE_PASSWORD or a prompt, never from the command line.
    """
    from mcpbill_cli.wallet.keystore import create_keystore, keystore_path

    path = keystore_path(state(ctx).settings.keys_dir)
    created = create_keystore(path, _keystore_password(), force=force)
    say(f"wrote an encrypted keystore to {path}; keep its password safe")
    emit({"address": created, "path": str(path)}, as_json=as_json,
         human=lambda: out.print(created))


@handles_errors
def link(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option(
        "--tenant", "-t", help="The tenant the sender pays for.",
        autocompletion=complete.tenants)],
    sender: Annotated[str, typer.Option("--address", help="The sending address (0x...).")],
    replace: Annotated[bool, typer.Option(
        "--replace", help="Move an address linked to another tenant.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Credit USDC from a sending address to a tenant; kept deposits from it are credited now.

    Example: mcpbill wallet link --tenant acme --address 0xAbC...
    """
    from mcpbill_cli.wallet.links import link as link_address

    result = link_address(state(ctx).engine(), tenant, sender, replace=replace)
    credited = sum(c.deposit.amount for c in result.credited)
    data = {"address": result.address, "tenant": result.tenant, "previous": result.previous,
            "credited": [_credit_json(c) for c in result.credited]}
    emit(data, as_json=as_json, human=lambda: say(
        f"linked {result.address} to {tenant}"
        + (f" (was {result.previous})" if result.changed and result.previous else "")
        + (f"; credited {format_usd(credited)} USDC kept from earlier" if credited else "")))


@handles_errors
def sync(
    ctx: typer.Context,
    chain: ChainOption = None,
    from_block: Annotated[int | None, typer.Option(
        "--from-block", min=0, help="Scan from this block (needed once per chain; a rescan is "
                                    "harmless).", show_default="the stored checkpoint")] = None,
    rpc_url: RpcUrlOption = None,
    output: OutputOption = None,
    as_json: JsonOption = False,
) -> None:
    """Scan the chain for final USDC deposits: credit linked senders, keep and list the rest.

    Example: mcpbill wallet sync --chain base --from-block 23000000
    """
    from mcpbill_cli.wallet.deposit_address import get_deposit_address
    from mcpbill_cli.wallet.scan import sync as scan

    chosen = output_format(output, as_json)
    st = state(ctx)
    target, rpc = _connect(st, chain, rpc_url)
    with progress_bar(f"scanning {target.name}", unit="blocks",
                      shown=chosen is Output.table) as progress:
        result = scan(st.engine(), rpc, target, get_deposit_address(st.settings.file),
                      from_block=from_block, progress=progress)
    unlinked = [_deposit_json(d) for d in result.unlinked]
    data = {"chain": result.chain, "from_block": result.from_block, "to_block": result.to_block,
            "latest_block": result.latest_block,
            "credited": [_credit_json(c) for c in result.credited], "unlinked": unlinked}
    if chosen is Output.table:
        _render_sync(result)
    else:
        emit_listing(result.unlinked, DEPOSIT_COLUMNS, output=chosen, data=data, records=unlinked)


def fund_onchain(ctx: typer.Context, tenant: str, tx: str, chain: str | None,
                 rpc_url: str | None, as_json: bool) -> None:
    """`wallet fund --tx HASH`: verify the transaction on chain and credit it once."""
    from mcpbill_cli.wallet.deposit_address import get_deposit_address
    from mcpbill_cli.wallet.deposits import fund_from_tx

    st = state(ctx)
    target, rpc = _connect(st, chain, rpc_url)
    result = fund_from_tx(st.engine(), rpc, target, tenant, tx,
                          get_deposit_address(st.settings.file))
    data = {"tenant": result.tenant, "chain": result.chain, "tx": result.tx_hash,
            "amount_usd": format_usd(result.amount),
            "credited": [_deposit_json(d) for d in result.credited],
            "already_credited": [_deposit_json(d) for d in result.already]}
    emit(data, as_json=as_json, human=lambda: say(
        f"credited {format_usd(result.amount)} USDC to {tenant} from {result.tx_hash}"
        if result.credited else
        f"{result.tx_hash} was already credited to {tenant}: nothing to do"))


def balance_onchain(ctx: typer.Context, chain: str | None, rpc_url: str | None,
                    output: Output) -> None:
    """`wallet balance --onchain`: the deposit address's USDC beside the ledger's totals."""
    from mcpbill_cli.wallet.balances import chain_balance
    from mcpbill_cli.wallet.deposit_address import get_deposit_address

    st = state(ctx)
    target, rpc = _connect(st, chain, rpc_url)
    bal = chain_balance(st.engine(), rpc, target, get_deposit_address(st.settings.file))
    data = {"chain": bal.chain, "address": bal.address, "onchain_usd": format_usd(bal.onchain),
            "credited_usd": format_usd(bal.credited), "unlinked_usd": format_usd(bal.unlinked),
            "unaccounted_usd": format_usd(bal.unaccounted)}
    emit_listing([bal], BALANCE_COLUMNS, output=output, records=[data], data=data)


# --- helpers ------------------------------------------------------------------------------------


def _connect(st: State, chain: str | None, rpc_url: str | None) -> tuple[Chain, Rpc]:
    from mcpbill_cli.wallet import chains
    from mcpbill_cli.wallet.rpc import Rpc, connect

    target = chains.resolve_chain(chain, st.settings.file)
    return target, Rpc(connect(chains.rpc_url(target, rpc_url)))


def _keystore_password() -> str:
    from mcpbill_cli.cli.prompts import secret
    from mcpbill_cli.wallet.keystore import ENV_KEYSTORE_PASSWORD

    return secret(ENV_KEYSTORE_PASSWORD, "keystore password", confirm=True)


def _render_sync(result: Any) -> None:
    credited = sum(c.deposit.amount for c in result.credited)
    say(f"scanned blocks {result.from_block}..{result.to_block} of {result.chain} "
        f"(latest {result.latest_block}); credited {len(result.credited)} deposit(s), "
        f"{format_usd(credited)} USDC")
    if not result.unlinked:
        return
    show_listing(result.unlinked, DEPOSIT_COLUMNS)
    say(f"{len(result.unlinked)} deposit(s) from unlinked senders are kept: `mcpbill wallet "
        "link --tenant T --address SENDER` or `mcpbill wallet fund --tenant T --tx HASH`")


def _deposit_json(deposit: Deposit) -> dict[str, Any]:
    return {"id": deposit.id, "chain": deposit.chain, "tx": deposit.tx_hash,
            "log_index": deposit.log_index, "position": deposit.position,
            "block": deposit.block_number,
            "sender": deposit.sender, "amount_usd": format_usd(deposit.amount)}


def _credit_json(credit: Credit) -> dict[str, Any]:
    return {**_deposit_json(credit.deposit), "tenant": credit.tenant}
