"""USDC on chain: chains, deposit verification and scanning, links, the operator's keystore.

web3 costs about a second to import, so nothing here imports it at module level except the
modules that talk to a chain (``rpc``, ``deposits``, ``scan``, ``balances``), and those load it
only inside functions. The CLI imports this package's modules inside wallet command bodies only.

- ``chains``: the chain registry (``resolve_chain``, ``Chain``)
- ``deposit_address``: ``get_deposit_address``, ``set_deposit_address``
- ``deposits``: ``verify_deposit``, ``fund_from_tx``
- ``scan``: ``sync``
- ``links``: ``link``
- ``balances``: ``onchain_balance``, ``chain_balance``
- ``keystore``: ``create_keystore``, ``load_account``
- ``rpc``: ``connect``, ``Rpc``, ``RetryPolicy``
- ``errors``: the wallet's ``BillingError`` codes
"""
