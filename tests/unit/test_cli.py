"""The ``ploy`` command without a server or broker: help, and one-line errors with exit 2."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from engine.cli import build_parser, format_execution, main

COMMANDS = ["dev", "worker", "trigger", "status", "list", "history", "cancel", "workers",
            "rebuild", "types"]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ploy: error: "), err
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ploy {command}")


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["frobnicate"], ["trigger"], ["list", "--limit", "many"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", ["dev", "worker", "rebuild", "types"])
def test_missing_ploy_yaml(command: str, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, command, str(tmp_path))
    assert code == 2
    assert one_error_line(err) == f"ploy: error: no ploy.yaml in {tmp_path.resolve()}"
    assert out == ""


def test_invalid_ploy_yaml_names_file_and_line(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ploy.yaml").write_text("kind: worker\nretries: lots\n")
    code, _, err = run(capsys, "types", str(tmp_path))
    assert code == 2
    line = one_error_line(err)
    assert "ploy.yaml:2" in line and "retries" in line


def test_worker_without_kafka_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    (tmp_path / "ploy.yaml").write_text("kind: worker\n")
    (tmp_path / "worker.py").write_text("from engine import ploy\nworker = ploy().build()\n")
    code, _, err = run(capsys, "worker", str(tmp_path))
    assert code == 2
    assert "ploy worker needs Kafka" in one_error_line(err)


def test_rebuild_with_unreachable_kafka_fails_within_the_bounded_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{closed_port()}")
    (tmp_path / "ploy.yaml").write_text("kind: worker\nkafka: {connect_timeout: 1s}\n")
    started = time.monotonic()
    code, _, err = run(capsys, "rebuild", str(tmp_path))
    assert code == 2
    assert "is not reachable after 1 s" in one_error_line(err)
    assert time.monotonic() - started < 8


@pytest.mark.parametrize("text", ["{", "{'a': 1}", "order-1"])
def test_trigger_with_bad_json(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    # The input is checked before any network call: the URL is never reached.
    code, _, err = run(capsys, "trigger", "FLOW", "--input", text,
                       "--url", f"http://127.0.0.1:{closed_port()}")
    assert code == 2
    assert "--input is not valid JSON" in one_error_line(err)


def test_trigger_input_from_a_missing_file(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "trigger", "FLOW", "--input", f"@{tmp_path / 'nope.json'}")
    assert code == 2
    assert "cannot read" in one_error_line(err)


@pytest.mark.parametrize("argv", [
    ["trigger", "FLOW", "--input", "{}"],
    ["status", "abc"],
    ["list"],
    ["history", "abc"],
    ["cancel", "abc"],
    ["workers"],
])
def test_unreachable_server(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    code, out, err = run(capsys, *argv, "--url", url)
    assert code == 2
    line = one_error_line(err)
    assert f"cannot reach the ploy server at {url}" in line
    assert out == ""
    assert time.monotonic() - started < 3


def test_default_url_comes_from_ploy_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    monkeypatch.delenv("PLOY_PORT", raising=False)
    monkeypatch.delenv("PLOY_HOST", raising=False)
    (tmp_path / "ploy.yaml").write_text(f"kind: worker\nhttp: {{host: 0.0.0.0, port: {port}}}\n")
    code, _, err = run(capsys, "list", "--dir", str(tmp_path))
    assert code == 2
    assert f"http://127.0.0.1:{port}" in one_error_line(err)


def test_url_must_be_http(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "list", "--url", "file:///etc/passwd")
    assert code == 2
    assert "--url must be an http(s) URL" in one_error_line(err)


def test_parser_has_a_run_function_for_every_command() -> None:
    parser = build_parser()
    for command in COMMANDS:
        args = parser.parse_args([command, "x"] if command in ("trigger", "status", "history",
                                                               "cancel") else [command])
        assert callable(args.run)


def test_status_summary_shows_steps_attempts_and_error() -> None:
    execution: dict[str, Any] = {
        "execution_id": "e1", "workflow": "simple_workflow", "status": "failed",
        "created_at": 0, "duration_ms": 1500, "input": {"card": "0000"},
        "error": {"type": "StepFailedError", "message": "step 'charge_payment' failed"},
        "steps": [
            {"key": "validate", "kind": "step", "status": "completed", "duration_ms": 3,
             "attempts": [{"attempt": 1, "duration_ms": 3, "error": None}]},
            {"key": "charge_payment", "kind": "step", "status": "failed", "duration_ms": 700,
             "error": {"type": "RuntimeError", "message": "declined"},
             "attempts": [{"attempt": n, "duration_ms": 1,
                           "error": {"type": "RuntimeError", "message": "declined"}}
                          for n in (1, 2, 3, 4)]},
        ],
        "logs": [{"timestamp": 0, "level": "info", "message": "starting", "data": {"a": 1}}],
    }
    text = "\n".join(format_execution(execution))
    assert "status     failed" in text
    assert "duration   1.50 s" in text
    assert "StepFailedError: step 'charge_payment' failed" in text
    assert "charge_payment  failed     4" in text
    assert text.count("RuntimeError: declined") == 5  # the step and each of its attempts
    assert "attempt 4" in text
    assert 'starting  {"a": 1}' in text


def test_status_of_a_cancelled_execution_shows_the_reason() -> None:
    execution: dict[str, Any] = {
        "execution_id": "e2", "workflow": "nap", "status": "cancelled", "created_at": 0,
        "duration_ms": 5, "input": None, "cancel_reason": "changed my mind",
    }
    assert "reason     changed my mind" in format_execution(execution)
