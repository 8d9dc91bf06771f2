# pragma version ~=0.4.3
"""
@title A test USDC: six decimals, EIP-20 and EIP-3009 transferWithAuthorization (v, r, s)
@notice Deployed by the wallet tests as the chain's USDC (name "USD Coin", version "2") and,
        with the same name at another address, as a lookalike that must never be credited.
        `mint` is open to the deployer only; the real USDC has no such thing.
"""

event Transfer:
    sender: indexed(address)
    receiver: indexed(address)
    value: uint256

event Approval:
    owner: indexed(address)
    spender: indexed(address)
    value: uint256

event AuthorizationUsed:
    authorizer: indexed(address)
    nonce: indexed(bytes32)

DOMAIN_TYPEHASH: constant(bytes32) = keccak256(
    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
TRANSFER_WITH_AUTHORIZATION_TYPEHASH: constant(bytes32) = keccak256(
    "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
)
# Signatures with a high s are malleable copies of a low-s one (EIP-2); USDC refuses them too.
SECP256K1_HALF_N: constant(uint256) = (
    57896044618658097711785492504343953926418782139537452191302581570759080747168
)

name: public(String[64])
symbol: public(String[32])
version: public(String[8])
decimals: public(constant(uint8)) = 6
totalSupply: public(uint256)
balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
authorizationState: public(HashMap[address, HashMap[bytes32, bool]])
minter: public(address)


@deploy
def __init__(name_: String[64], symbol_: String[32], version_: String[8]):
    self.name = name_
    self.symbol = symbol_
    self.version = version_
    self.minter = msg.sender


@external
def mint(receiver: address, amount: uint256):
    assert msg.sender == self.minter, "not the minter"
    self.totalSupply += amount
    self.balanceOf[receiver] += amount
    log Transfer(sender=empty(address), receiver=receiver, value=amount)


@external
def transfer(receiver: address, amount: uint256) -> bool:
    self._transfer(msg.sender, receiver, amount)
    return True


@external
def transferFrom(owner: address, receiver: address, amount: uint256) -> bool:
    self.allowance[owner][msg.sender] -= amount
    self._transfer(owner, receiver, amount)
    return True


@external
def approve(spender: address, amount: uint256) -> bool:
    self.allowance[msg.sender][spender] = amount
    log Approval(owner=msg.sender, spender=spender, value=amount)
    return True


@view
@external
def DOMAIN_SEPARATOR() -> bytes32:
    return self._domain_separator()


@external
def transferWithAuthorization(
    owner: address,
    receiver: address,
    amount: uint256,
    valid_after: uint256,
    valid_before: uint256,
    nonce: bytes32,
    v: uint8,
    r: bytes32,
    s: bytes32,
):
    """@notice EIP-3009: move `amount` from `owner`, who signed the authorization off chain."""
    assert block.timestamp > valid_after, "authorization is not yet valid"
    assert block.timestamp < valid_before, "authorization is expired"
    assert not self.authorizationState[owner][nonce], "authorization is used or canceled"
    struct_hash: bytes32 = keccak256(abi_encode(
        TRANSFER_WITH_AUTHORIZATION_TYPEHASH, owner, receiver, amount, valid_after,
        valid_before, nonce
    ))
    digest: bytes32 = keccak256(concat(b"\x19\x01", self._domain_separator(), struct_hash))
    assert convert(s, uint256) <= SECP256K1_HALF_N, "invalid signature"
    signer: address = ecrecover(digest, v, r, s)
    assert signer != empty(address) and signer == owner, "invalid signature"
    self.authorizationState[owner][nonce] = True
    log AuthorizationUsed(authorizer=owner, nonce=nonce)
    self._transfer(owner, receiver, amount)


@view
@internal
def _domain_separator() -> bytes32:
    # Computed on every call, not cached, so a fork with another chain id gets its own domain.
    return keccak256(abi_encode(
        DOMAIN_TYPEHASH, keccak256(self.name), keccak256(self.version), chain.id, self
    ))


@internal
def _transfer(owner: address, receiver: address, amount: uint256):
    assert receiver != empty(address), "transfer to the zero address"
    self.balanceOf[owner] -= amount
    self.balanceOf[receiver] += amount
    log Transfer(sender=owner, receiver=receiver, value=amount)
