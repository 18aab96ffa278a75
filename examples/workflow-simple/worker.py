"""workflow-simple: three steps, one of which can be made to fail for good.

    ploy dev examples/workflow-simple
    curl localhost:8787/trigger            # {"execution_id": ...}: completes
    curl localhost:8787/trigger-failing    # charge_payment fails on every attempt
    curl localhost:8787/status/<id>

Then open http://127.0.0.1:8787/__ploy/ to see the steps, attempts and errors.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from engine import Context, RequestContext, ploy


class PaymentInput(BaseModel):
    order_id: str
    amount: float
    card: str = "4242"


class PaymentOutput(BaseModel):
    order_id: str
    payment_id: str
    receipt: str


class StatusParams(BaseModel):
    id: str


app = ploy()


def charge(order_id: str, amount: float, card: str) -> dict[str, Any]:
    """A stand-in for a payment provider: card 0000 is always declined."""
    if card == "0000":
        raise RuntimeError(f"card {card} declined for {amount:.2f}")
    return {"payment_id": f"pay_{order_id}", "status": "paid"}


@app.workflow("simple_workflow", input=PaymentInput, output=PaymentOutput)
async def simple_workflow(ctx: Context[Any, PaymentInput]) -> dict[str, Any]:
    order = ctx.input
    ctx.log("starting", {"order_id": order.order_id})
    await ctx.step.run(
        "validate",
        lambda: {"valid": order.amount > 0, "order_id": order.order_id},
        input={"order_id": order.order_id, "amount": order.amount},
    )
    payment = await ctx.step.run(
        "charge_payment",
        lambda: charge(order.order_id, order.amount, order.card),
        input={"amount": order.amount},
    )
    receipt = await ctx.step.run(
        "send_receipt", lambda: {"receipt": f"receipt_{payment['payment_id']}"}
    )
    return {"order_id": order.order_id, "payment_id": payment["payment_id"],
            "receipt": receipt["receipt"]}


@app.get("/trigger")
async def trigger(ctx: RequestContext) -> dict[str, str]:
    result = await ctx.env.SIMPLE_FLOW.trigger({"order_id": "order-123", "amount": 99.99})
    return {"execution_id": result["execution_id"]}


@app.get("/trigger-failing")
async def trigger_failing(ctx: RequestContext) -> dict[str, str]:
    result = await ctx.env.SIMPLE_FLOW.trigger(
        {"order_id": "order-456", "amount": 12.5, "card": "0000"}
    )
    return {"execution_id": result["execution_id"]}


@app.get("/status/:id", params=StatusParams)
async def status(ctx: RequestContext) -> dict[str, Any]:
    execution = await ctx.env.SIMPLE_FLOW.get_execution(ctx.params.id)
    return {"execution": None if execution is None else execution.model_dump(mode="json")}


worker = app.build()
