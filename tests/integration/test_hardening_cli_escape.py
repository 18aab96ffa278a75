"""Issue 12, point 12: the CLI prints no control character of user data raw.

``ploy dev`` runs a small app on its embedded broker whose executions carry
escape sequences in every place a user's text reaches (input, log message and
data, step error, workflow error, cancel reason); the client commands run as
subprocesses, as a user runs them, and their output is checked byte by byte.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from tests.integration.test_cli_e2e import DevServer, http, wait_until_ended

EVIL = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\r\nfake line\x9b1m\u202eevil\x7f"
LOG_LINES = 3000  # `ploy status` then prints far more than a pipe holds

APP = textwrap.dedent(f'''
    from engine import ploy

    app = ploy()
    EVIL = {EVIL!r}

    @app.workflow("noisy")
    async def noisy(ctx):
        ctx.log(EVIL, {{"data": EVIL}})
        for i in range({LOG_LINES}):
            ctx.log(f"line {{i}}")
        def fail():
            raise RuntimeError(EVIL)
        await ctx.step.run("boom", fail, retries=0)

    @app.workflow("nap")
    async def nap(ctx):
        await ctx.step.sleep("1h")

    worker = app.build()
''')
YAML = textwrap.dedent('''
    kind: worker
    main: worker.py
    workflow:
      NOISY: noisy
      NAP: nap
''')
# What a terminal acts on: C0 but the CLI's own newlines, DEL, C1, bidi controls.
UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    tmp = tmp_path_factory.mktemp("cli-escape")
    app = tmp / "app"
    app.mkdir()
    (app / "worker.py").write_text(APP)
    (app / "ploy.yaml").write_text(YAML)
    dev = DevServer(app, tmp / "state", tmp / "dev.out")
    try:
        yield dev
    finally:
        dev.stop()


def ploy(server: DevServer, *argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *argv, "--url", server.url],
                          capture_output=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def executions(server: DevServer) -> dict[str, str]:
    api = f"{server.url}/__ploy/api"
    status, body = http(f"{api}/trigger/NOISY", "POST", {"input": {"note": EVIL}})
    assert status in (200, 201), body
    noisy = body["execution_id"]
    status, body = http(f"{api}/trigger/NAP", "POST", {"input": {}})
    assert status in (200, 201), body
    nap = body["execution_id"]
    status, body = http(f"{api}/executions/{nap}/cancel", "POST", {"reason": EVIL})
    assert status == 200, body
    assert wait_until_ended(server.url, noisy)["status"] == "failed"
    assert wait_until_ended(server.url, nap)["status"] == "cancelled"
    return {"noisy": noisy, "nap": nap}


def assert_safe(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode("utf-8")
    found = sorted({hex(ord(c)) for c in UNSAFE.findall(text)})
    assert not found, f"raw control characters in the output: {found}"
    return text


@pytest.mark.parametrize("command", ["status", "history"])
def test_every_human_readable_output_escapes_user_text(
    server: DevServer, executions: dict[str, str], command: str
) -> None:
    escaped = "\\x1b]0;pwned\\x07" if command == "status" else "\\u001b]0;pwned\\u0007"
    for eid in executions.values():
        text = assert_safe(ploy(server, command, eid))
        assert escaped in text and "\\r\\nfake line" in text
    text = assert_safe(ploy(server, "status", executions["nap"]))
    assert "reason     \\x1b]0;pwned\\x07\\x1b[2J" in text
    assert_safe(ploy(server, "list"))
    assert_safe(ploy(server, "workers"))


@pytest.mark.parametrize("command", ["status", "history", "list", "workers"])
def test_json_output_is_valid_json_with_the_text_intact(
    server: DevServer, executions: dict[str, str], command: str
) -> None:
    argv = [command] if command in ("list", "workers") else [command, executions["noisy"]]
    result = ploy(server, *argv, "--json")
    payload = json.loads(assert_safe(result))
    if command == "status":
        assert payload["input"] == {"note": EVIL}
        assert payload["logs"][0]["message"] == EVIL


def test_a_reader_that_stops_early_gets_no_traceback(
    server: DevServer, executions: dict[str, str]
) -> None:
    command = (f"{sys.executable} -m engine.cli status {executions['noisy']} "
               f"--url {server.url} | head -n 3")
    result = subprocess.run(["bash", "-c", command], capture_output=True, timeout=60,
                            check=False)
    assert len(result.stdout.decode().splitlines()) == 3
    assert result.stderr == b"", result.stderr.decode()
