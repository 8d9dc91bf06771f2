"""The x402 peer the tests pay: an ASGI app behind the official ``x402`` payment middleware.

v2 routes are protected by ``PaymentMiddlewareASGI`` (``x402ResourceServer`` with the official
facilitator passed in as its facilitator client, no HTTP hop). The official resource server only
speaks v2, so ``/v1/report`` is a minimal v1 endpoint written here: it sends a v1 challenge in
the JSON body and verifies and settles ``X-PAYMENT`` through the same facilitator object.
The facilitator settles on the test's anvil node with ``FacilitatorWeb3Signer``.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from x402 import x402Facilitator, x402ResourceServer
from x402.http.middleware.fastapi import PaymentMiddlewareASGI
from x402.http.types import PaymentOption, RouteConfig
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.exact import ExactEvmFacilitatorScheme, ExactEvmServerScheme
from x402.mechanisms.evm.exact.v1 import ExactEvmSchemeV1Facilitator
from x402.schemas.v1 import PaymentPayloadV1, PaymentRequirementsV1

V1_NETWORK = "avalanche-fuji"  # a legacy v1 name the SDK maps to chain id 43113
CHAIN_ID = 43113
NETWORK = f"eip155:{CHAIN_ID}"


@dataclass(frozen=True)
class PeerConfig:
    """What the peer charges, in micro-USDC of the test token, and who it pays."""

    asset: str  # checksummed token address
    pay_to: str  # checksummed
    price: int
    pricey: int  # the price of /v2/pricey, above the tests' per-call maximum
    eip712_name: str = "USD Coin"
    eip712_version: str = "2"


def official_facilitator(private_key: str, rpc_url: str) -> x402Facilitator:
    """The official facilitator, v2 and v1 exact EVM, settling through ``rpc_url``."""
    signer = FacilitatorWeb3Signer(private_key=private_key, rpc_url=rpc_url)
    facilitator = x402Facilitator()
    facilitator.register([NETWORK], ExactEvmFacilitatorScheme(signer))
    facilitator.register_v1([V1_NETWORK], ExactEvmSchemeV1Facilitator(signer))
    return facilitator


def build_app(config: PeerConfig, facilitator: x402Facilitator) -> FastAPI:
    server = x402ResourceServer(facilitator)
    server.register(NETWORK, ExactEvmServerScheme())
    app = FastAPI()
    app.add_middleware(PaymentMiddlewareASGI, routes=_routes(config), server=server)

    @app.get("/v2/report")
    async def report() -> dict[str, Any]:
        return {"report": "paid content", "version": 2}

    @app.get("/v2/pricey")
    async def pricey() -> dict[str, Any]:
        return {"report": "expensive content"}

    @app.get("/free")
    async def free() -> dict[str, Any]:
        return {"free": True}

    @app.get("/plain402")
    async def plain402() -> Response:
        return JSONResponse({"error": "pay us somehow"}, status_code=402)

    @app.get("/v1/report")
    async def report_v1(request: Request) -> Response:
        return await _v1_report(request, config, facilitator)

    return app


def _routes(config: PeerConfig) -> dict[str, RouteConfig]:
    def option(amount: int) -> PaymentOption:
        price = {"amount": str(amount), "asset": config.asset,
                 "extra": {"name": config.eip712_name, "version": config.eip712_version}}
        return PaymentOption(scheme="exact", pay_to=config.pay_to, price=price,
                             network=NETWORK, max_timeout_seconds=120)

    return {
        "GET /v2/report": RouteConfig(accepts=option(config.price), description="a report"),
        "GET /v2/pricey": RouteConfig(accepts=option(config.pricey), description="pricey"),
    }


def v1_requirements(config: PeerConfig, resource: str) -> PaymentRequirementsV1:
    return PaymentRequirementsV1(
        scheme="exact", network=V1_NETWORK, max_amount_required=str(config.price),
        resource=resource, description="a report (v1)", mime_type="application/json",
        pay_to=config.pay_to, max_timeout_seconds=120, asset=config.asset,
        extra={"name": config.eip712_name, "version": config.eip712_version})


async def _v1_report(request: Request, config: PeerConfig,
                     facilitator: x402Facilitator) -> Response:
    requirements = v1_requirements(config, str(request.url))
    header = request.headers.get("x-payment")
    if not header:
        return _v1_challenge(requirements, "X-PAYMENT header is required")
    try:
        payload = PaymentPayloadV1.model_validate(json.loads(base64.b64decode(header)))
    except ValueError:
        return _v1_challenge(requirements, "X-PAYMENT is not a v1 payment payload")
    verified = await facilitator.verify(payload, requirements)
    if not verified.is_valid:
        return _v1_challenge(requirements, verified.invalid_reason or "invalid payment")
    settled = await facilitator.settle(payload, requirements)
    encoded = base64.b64encode(json.dumps(settled.model_dump(
        by_alias=True, exclude_none=True)).encode()).decode()
    if not settled.success:
        return _v1_challenge(requirements, settled.error_reason or "settlement failed",
                             headers={"X-PAYMENT-RESPONSE": encoded})
    return JSONResponse({"report": "paid content", "version": 1},
                        headers={"X-PAYMENT-RESPONSE": encoded})


def _v1_challenge(requirements: PaymentRequirementsV1, error: str,
                  headers: dict[str, str] | None = None) -> Response:
    body = {"x402Version": 1, "error": error,
            "accepts": [requirements.model_dump(by_alias=True, exclude_none=True)]}
    return JSONResponse(body, status_code=402, headers=headers)


class ServedApp:
    """uvicorn serving an app on 127.0.0.1, an ephemeral port, in a thread; ``stop()`` joins."""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="x402-peer", daemon=True)

    def start(self, timeout: float = 10.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the x402 peer did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def facilitator_app(facilitator: x402Facilitator) -> FastAPI:
    """The official facilitator over HTTP, as the x402 facilitator API names it: ``POST /verify``
    and ``POST /settle`` with ``{x402Version, paymentPayload, paymentRequirements}``. (The
    package ships the facilitator object and an HTTP client for it, not a server.)"""
    from x402.schemas.helpers import parse_payment_payload, parse_payment_requirements

    app = FastAPI()

    async def parsed(request: Request) -> tuple[Any, Any]:
        body = await request.json()
        version = body["x402Version"]
        return (parse_payment_payload(body["paymentPayload"]),
                parse_payment_requirements(version, body["paymentRequirements"]))

    @app.post("/verify")
    async def verify(request: Request) -> dict[str, Any]:
        payload, requirements = await parsed(request)
        answer = await facilitator.verify(payload, requirements)
        return answer.model_dump(by_alias=True, exclude_none=True)

    @app.post("/settle")
    async def settle(request: Request) -> dict[str, Any]:
        payload, requirements = await parsed(request)
        answer = await facilitator.settle(payload, requirements)
        return answer.model_dump(by_alias=True, exclude_none=True)

    return app
