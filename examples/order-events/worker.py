"""order-events: an order waits for its payment event, then ships through a child workflow.

``POST /orders`` starts ``order``, which reserves stock and waits (durably, up to
an hour) for a ``payment.settled`` event whose data has its ``order_id``: a
payment that arrives before the wait begins is not lost, it is found on the log.
``POST /payments`` sends that event (as ``ploy send-event`` or a Kafka topic
source with ``event:`` would). The order then invokes ``shipping`` as a child
execution and returns its tracking number; cancelling the order cancels the
shipment.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel

from engine import Context, RequestContext, ploy


class Order(BaseModel):
    order_id: str
    amount: float


class Payment(BaseModel):
    order_id: str
    amount: float


class Shipment(BaseModel):
    order_id: str


class OrderParams(BaseModel):
    id: str


app = ploy()


@app.post("/orders", body=Order)
async def create_order(ctx: RequestContext) -> dict[str, str]:
    result = await ctx.env.ORDER.trigger(ctx.body, idempotency_key=ctx.body.order_id)
    return {"execution_id": result["execution_id"]}


@app.post("/payments", body=Payment)
async def settle_payment(ctx: RequestContext) -> dict[str, Any]:
    event_id = await ctx.env.send_event("payment.settled", ctx.body.model_dump(),
                                        id=f"payment-{ctx.body.order_id}", source="payments")
    return {"event_id": event_id}


@app.get("/orders/:id", params=OrderParams)
async def order_status(ctx: RequestContext) -> dict[str, Any]:
    execution = await ctx.env.ORDER.get_execution(ctx.params.id)
    if execution is None:
        return {"status": "unknown"}
    return {"status": execution.status.value, "waiting_for": [
        w.model_dump() for w in execution.waiting_for], "result": execution.result}


@app.workflow("order", input=Order)
async def order(ctx: Context[Any, Order]) -> dict[str, Any]:
    await ctx.step.run("reserve", lambda: {"reserved": ctx.input.order_id})
    payment = await ctx.step.wait_for_event(
        "payment", type="payment.settled", match={"order_id": ctx.input.order_id},
        timeout="1h")
    if payment is None:
        await ctx.step.run("release", lambda: {"released": ctx.input.order_id})
        return {"status": "expired"}
    if payment.data["amount"] < ctx.input.amount:
        return {"status": "underpaid", "paid": payment.data["amount"]}
    shipment = await ctx.step.invoke("ship", binding="SHIPPING",
                                     input={"order_id": ctx.input.order_id}, timeout="10m")
    return {"status": "shipped", "payment": payment.id, "tracking": shipment["tracking"]}


@app.workflow("shipping", input=Shipment)
async def shipping(ctx: Context[Any, Shipment]) -> dict[str, str]:
    digest = hashlib.sha256(ctx.input.order_id.encode()).hexdigest()[:10].upper()
    label = await ctx.step.run("label", lambda: f"TRACK-{digest}")
    return {"tracking": label}


worker = app.build()
