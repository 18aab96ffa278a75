"""``ploy()``: both forms of the builder, and their types as a user's type checker sees them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from engine import ploy

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "examples").iterdir() if (p / "worker.py").is_file())


class Order(BaseModel):
    order_id: str


async def handler(ctx: Any) -> None:
    return None


def test_a_decorator_returns_the_function_and_a_handler_chains() -> None:
    app = ploy()

    @app.workflow("decorated", input=Order)
    async def decorated(ctx: Any) -> int:
        return 1

    @app.post("/orders", body=Order)
    def create(ctx: Any) -> str:
        return "created"

    assert decorated.__name__ == "decorated" and create(None) == "created"
    chained = app.workflow("chained", {"input": Order}, handler).get("/a", {}, handler)
    assert chained is app
    assert app.put("/b", handler=handler).delete("/c", None, handler) is app
    worker = app.build()
    assert worker.workflows["decorated"].handler is decorated
    assert worker.workflows["decorated"].input is Order
    assert worker.workflows["chained"].input is Order
    assert [(r.method, r.path) for r in worker.routes] == [
        ("POST", "/orders"), ("GET", "/a"), ("PUT", "/b"), ("DELETE", "/c")]
    assert worker.routes[0].body is Order and worker.routes[0].handler is create


def test_mistakes_in_a_declaration_fail_at_once() -> None:
    app = ploy().workflow("w", {}, handler)
    with pytest.raises(ValueError, match="defined twice"):
        app.workflow("w", {}, handler)
    with pytest.raises(TypeError, match=r"unknown spec keys \['inptu'\]"):
        app.workflow("v", {"inptu": Order}, handler)
    with pytest.raises(TypeError, match=r"unknown spec keys \['bdy'\]"):
        app.post("/x", {"bdy": Order}, handler)
    with pytest.raises(ValueError, match="unsupported HTTP method TRACE"):
        app.route("trace", "/x", None, handler)


TYPED_USE = """\
from typing import Any

from engine import Ploy, ploy

app = ploy()


@app.workflow("w")
async def w(ctx: Any) -> int:
    return 1


@app.get("/a")
def a(ctx: Any) -> str:
    return "a"


async def h(ctx: Any) -> None: ...


chained: Ploy[Any] = app.workflow("v", {}, h).post("/b", {}, h).put("/c", handler=h)
number: int = a(None)
"""


def mypy_strict(directory: Path, file: str, cache: Path) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--hide-error-context",
         "--cache-dir", str(cache), file],
        cwd=directory, capture_output=True, text=True, timeout=180,
        env={**os.environ, "MYPYPATH": str(ROOT)},  # engine, installed or not
    )
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mypy-cache")


@pytest.mark.slow
def test_decorators_keep_the_function_type(tmp_path: Path, mypy_cache: Path) -> None:
    (tmp_path / "use.py").write_text(TYPED_USE)
    code, report = mypy_strict(tmp_path, "use.py", mypy_cache)
    assert code == 1, report
    # Only the deliberate mistake: a() returns str, so it is no int. Without the
    # overloads every decorated function would be "untyped" and this would pass.
    assert report.strip().splitlines() == [
        'use.py:22: error: Incompatible types in assignment (expression has type "str", '
        'variable has type "int")  [assignment]'], report


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_mypy_strict(example: Path, mypy_cache: Path) -> None:
    code, report = mypy_strict(example, "worker.py", mypy_cache)
    assert code == 0, report
