"""order-flow: the seed's Full Example in Python.

``POST /orders`` starts ``order_processing``: check and reserve stock, take the
payment (three tries, five seconds apart, then roll the reservation back),
ship, send a confirmation, sleep 24 hours durably, send a follow-up.
``GET /orders/:id/status`` reads the execution (``:id`` is the execution id).

Stock, payment, shipment and email are local, deterministic stand-ins, so the
example runs with nothing but ``ploy dev examples/order-flow``. The payment
provider declines any amount over 1000.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from engine import Context, RequestContext, ploy

# -- models ---------------------------------------------------------------------------


class Item(BaseModel):
    product_id: str
    quantity: int
    price: float


class NewOrder(BaseModel):
    user_id: str
    items: list[Item]


class OrderCreated(BaseModel):
    order_id: str
    execution_id: str


class StatusParams(BaseModel):
    id: str


class OrderStatus(BaseModel):
    status: str
    result: Any = None


class OrderInput(BaseModel):
    order_id: str
    user_id: str
    items: list[Item]
    amount: float


class OrderOutput(BaseModel):
    order_id: str
    payment_id: str
    tracking_number: str
    completed_at: str


# -- local stand-ins for the outside world ------------------------------------------------

STOCK: dict[str, int] = {"sku-1": 100, "sku-2": 25, "sku-3": 0}
DEFAULT_STOCK = 10
OUTBOX: list[dict[str, str]] = []  # emails "sent"
PAYMENT_LIMIT = 1000.0


def check_stock(product_id: str) -> int:
    return STOCK.get(product_id, DEFAULT_STOCK)


def reserve_stock(product_id: str, quantity: int) -> None:
    STOCK[product_id] = check_stock(product_id) - quantity


def release_stock(product_id: str, quantity: int) -> None:
    STOCK[product_id] = check_stock(product_id) + quantity


def process_payment(user_id: str, amount: float, order_id: str) -> dict[str, Any]:
    status = "succeeded" if amount <= PAYMENT_LIMIT else "declined"
    return {"id": f"pay_{order_id[:8]}", "status": status, "user_id": user_id, "amount": amount}


def create_shipment(order_id: str, items: list[Item]) -> dict[str, Any]:
    digest = hashlib.sha256(order_id.encode()).hexdigest()[:10].upper()
    return {"tracking_number": f"TRACK-{digest}", "parcels": len(items)}


def send_email(user_id: str, subject: str, body: str) -> dict[str, str]:
    message = {"to": user_id, "subject": subject, "body": body}
    OUTBOX.append(message)
    return message


# -- the app ----------------------------------------------------------------------------

app = ploy()


@app.post("/orders", body=NewOrder, response=OrderCreated)
async def create_order(ctx: RequestContext) -> dict[str, str]:
    order: NewOrder = ctx.body
    order_id = str(uuid.uuid4())
    amount = sum(item.price * item.quantity for item in order.items)
    result = await ctx.env.ORDER_FLOW.trigger({
        "order_id": order_id,
        "user_id": order.user_id,
        "items": [item.model_dump() for item in order.items],
        "amount": amount,
    })
    return {"order_id": order_id, "execution_id": result["execution_id"]}


@app.get("/orders/:id/status", params=StatusParams, response=OrderStatus)
async def order_status(ctx: RequestContext) -> dict[str, Any]:
    execution = await ctx.env.ORDER_FLOW.get_execution(ctx.params.id)
    if execution is None:
        return {"status": "unknown", "result": None}
    return {"status": execution.status.value, "result": execution.result}


@app.workflow("order_processing", input=OrderInput, output=OrderOutput)
async def order_processing(ctx: Context[Any, OrderInput]) -> dict[str, Any]:
    order = ctx.input
    ctx.log("Starting order processing", {"order_id": order.order_id})

    # Step 1: Validate inventory
    def check_inventory() -> dict[str, bool]:
        for item in order.items:
            if check_stock(item.product_id) < item.quantity:
                raise RuntimeError(f"Insufficient stock for {item.product_id}")
        return {"available": True}

    await ctx.step.run("check-inventory", check_inventory)

    # Step 2: Reserve inventory
    def reserve() -> None:
        for item in order.items:
            reserve_stock(item.product_id, item.quantity)

    await ctx.step.run("reserve-inventory", reserve)

    # Step 3: Process payment with retry
    payment: dict[str, Any] | None = None
    for attempt in range(3):
        payment = await ctx.step.run(
            f"payment-attempt-{attempt}",
            lambda: process_payment(order.user_id, order.amount, order.order_id),
        )
        if payment["status"] == "succeeded":
            break
        await ctx.step.sleep("5s")

    if payment is None or payment["status"] != "succeeded":
        # Roll the inventory reservation back
        def release() -> None:
            for item in order.items:
                release_stock(item.product_id, item.quantity)

        await ctx.step.run("rollback-inventory", release)
        raise RuntimeError("Payment failed")

    # Step 4: Create shipment
    shipment = await ctx.step.run(
        "create-shipment", lambda: create_shipment(order.order_id, order.items)
    )

    # Step 5: Send confirmation email
    await ctx.step.run("send-confirmation", lambda: send_email(
        order.user_id, "Order Confirmed", f"Your order {order.order_id} is on its way!"))

    # Step 6: Wait and send follow-up
    await ctx.step.sleep("24h")
    await ctx.step.run("send-followup", lambda: send_email(
        order.user_id, "How was your order?", "We hope you enjoyed your purchase!"))

    return {
        "order_id": order.order_id,
        "payment_id": payment["id"],
        "tracking_number": shipment["tracking_number"],
        "completed_at": datetime.now(UTC).isoformat(),
    }


worker = app.build()
