"""``ploy types``: the generated module, and what mypy makes of code that uses it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.app import load_app
from engine.cli import main
from engine.typegen import render_env_module

ROOT = Path(__file__).resolve().parents[2]

TYPED_APP = """\
from typing import Any, Literal

from pydantic import BaseModel, Field

from engine import ploy


class Item(BaseModel):
    sku: str
    quantity: int = 1


class Sender(BaseModel):
    address: str = Field(alias="from")


class OrderInput(BaseModel):
    order_id: str
    amount: float
    items: list[Item] = []
    speed: Literal["fast", "slow"] = "fast"
    sender: Sender | None = None


class OrderOutput(BaseModel):
    tracking_number: str


class Refund(BaseModel):
    order_id: str


async def order_processing(ctx: Any) -> dict[str, str]:
    return {"tracking_number": "T1"}


async def audit(ctx: Any) -> None:
    return None


worker = (
    ploy()
    .workflow("order_processing", {"input": OrderInput, "output": OrderOutput},
              order_processing)
    .workflow("audit", {}, audit)
    .build()
)
"""

GOOD = """\
from engine import Execution
from ploy_env import PloyEnv
from worker import Item, OrderInput


async def use(env: PloyEnv) -> str:
    result = await env.ORDER_FLOW.trigger(OrderInput(order_id="o1", amount=9.5))
    await env.ORDER_FLOW.trigger({"order_id": "o2", "amount": 1})
    await env.ORDER_FLOW.trigger({"order_id": "o3", "amount": 2.5, "speed": "slow",
                                  "items": [{"sku": "a"}, Item(sku="b", quantity=2)],
                                  "sender": {"from": "shop@example.com"}})
    await env.AUDIT.trigger(42)
    execution: Execution | None = await env.ORDER_FLOW.get_execution(result["execution_id"])
    return result["execution_id"]
"""

# Each line after the imports is one mistake mypy must flag (the line numbers are asserted).
BAD = """\
from ploy_env import PloyEnv
from worker import Refund


async def use(env: PloyEnv) -> None:
    await env.ORDER_FLOW.trigger(Refund(order_id="o1"))
    await env.ORDER_FLOW.trigger(42)
    await env.ORDER_FLOWS.trigger({})
    await env.ORDER_FLOW.trigger({"order_id": 7, "amount": 1.0})
    await env.ORDER_FLOW.trigger({"order_id": "o1"})
    await env.ORDER_FLOW.trigger({"order_id": "o1", "amount": 1, "speed": "warp"})
    await env.ORDER_FLOW.trigger({"order_id": "o1", "amount": 1, "items": [{"sku": 3}]})
"""
FLAGGED = list(range(6, 13))


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "ploy.yaml").write_text(
        "kind: worker\nworkflow:\n  ORDER_FLOW: order_processing\n  AUDIT: audit\n")
    (tmp_path / "worker.py").write_text(TYPED_APP)
    return tmp_path


def test_a_typed_dict_mirrors_each_input_model(app_dir: Path) -> None:
    text = render_env_module(*load_app(app_dir))
    assert "class PloyEnv(Protocol):" in text
    assert ("ORDER_FLOW: WorkflowBinding[worker.OrderInput | OrderInputDict, "
            "worker.OrderOutput]") in text
    assert "AUDIT: WorkflowBinding[Any, Any]" in text  # no input model: anything goes
    order = text[text.index("class OrderInputDict(TypedDict):"):]
    order = order[:order.index("\n\n\n") + 1]
    assert "    order_id: str\n    amount: float\n" in order
    assert "    items: NotRequired[Sequence[worker.Item | ItemDict]]\n" in order
    assert '    speed: NotRequired[Literal["fast", "slow"]]\n' in order
    assert "    sender: NotRequired[worker.Sender | SenderDict | None]\n" in order
    assert "class ItemDict(TypedDict):" in text
    # "from" is a keyword: the functional form, keyed by the alias pydantic validates.
    assert 'SenderDict = TypedDict("SenderDict", {\n    "from": "str",\n})' in text
    namespace: dict[str, object] = {}
    exec(compile(text, "ploy_env.py", "exec"), namespace)  # importable at run time
    assert {"PloyEnv", "OrderInputDict", "ItemDict", "SenderDict"} <= set(namespace)


def test_types_writes_the_module(app_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["types", str(app_dir)]) == 0
    generated = app_dir / "ploy_env.py"
    assert capsys.readouterr().out.strip() == f"wrote {generated} (2 bindings)"
    assert generated.read_text() == render_env_module(*load_app(app_dir))


def test_a_model_defined_in_a_function_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ploy.yaml").write_text("kind: worker\nworkflow:\n  F: f\n")
    (tmp_path / "worker.py").write_text(
        "from pydantic import BaseModel\nfrom engine import ploy\n\n"
        "def make():\n    class Local(BaseModel):\n        x: int\n    return Local\n\n"
        "worker = ploy().workflow('f', {'input': make()}, lambda ctx: None).build()\n")
    assert main(["types", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "a model defined inside a function cannot be imported" in err
    assert not (tmp_path / "ploy_env.py").exists()


def mypy(directory: Path, *files: str) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--hide-error-context",
         "--cache-dir", str(directory / ".mypy_cache"), *files],
        cwd=directory, capture_output=True, text=True, timeout=180,
        env={**os.environ, "MYPYPATH": os.pathsep.join([str(directory), str(ROOT)])},
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_flags_a_wrong_trigger_input(app_dir: Path) -> None:
    assert main(["types", str(app_dir)]) == 0
    (app_dir / "good.py").write_text(GOOD)
    (app_dir / "bad.py").write_text(BAD)
    code, report = mypy(app_dir, "good.py", "bad.py")
    assert code == 1, report
    assert "good.py" not in report, report
    flagged = sorted({int(m) for m in re.findall(r"^bad\.py:(\d+): error", report, re.M)})
    assert flagged == FLAGGED, report
    assert '"Refund"' in report and '"int"' in report and "ORDER_FLOWS" in report
