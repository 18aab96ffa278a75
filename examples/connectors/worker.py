"""connectors: workflows started by Kafka records, their lifecycle published out.

``fulfil_order`` reserves stock, charges and ships an order. Nothing in this
file knows about Kafka: the ``sources:`` of ploy.yaml turn each record of
``orders.created`` (JSON) and ``orders.cloudevents`` (CloudEvents) into a
trigger of the ``FULFIL`` binding, validated against ``Order``; the ``sinks:``
publish what happens to the topic ``ploy.lifecycle``, to a webhook and to an
Avro archive. See ploy.yaml for how to run it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from engine import Context, ploy


class Order(BaseModel):
    order_id: str
    sku: str
    quantity: int = 1
    amount: float


class Fulfilled(BaseModel):
    order_id: str
    reservation: str
    payment: str
    tracking: str


app = ploy()


@app.workflow("fulfil_order", input=Order, output=Fulfilled)
async def fulfil_order(ctx: Context[Any, Order]) -> Fulfilled:
    order = ctx.input
    ctx.log("fulfilling", {"order_id": order.order_id, "sku": order.sku})
    reservation = await ctx.step.run("reserve", lambda: f"res-{order.order_id}")
    payment = await ctx.step.run("charge", lambda: f"pay-{order.order_id}-{order.amount:.2f}",
                                 retries=3)
    tracking = await ctx.step.run("ship", lambda: f"TRACK-{order.order_id.upper()}")
    return Fulfilled(order_id=order.order_id, reservation=reservation, payment=payment,
                     tracking=tracking)


worker = app.build()
