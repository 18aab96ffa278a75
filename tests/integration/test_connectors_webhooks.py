"""Webhook sink on a real broker, delivering to a local HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from connectors.testing import read_topic, running_connectors
from connectors.webhooks import ATTEMPT_HEADER, SIGNATURE_HEADER, WebhookSink, verify_signature
from engine import ploy
from engine.config import Config
from engine.testing import engine_config, running_engine, wait_for_status

SECRET = "whsec-test"


@dataclass
class Received:
    path: str
    body: bytes
    headers: dict[str, str]
    at: float
    status: int


@dataclass
class Receiver:
    """What the receiver does: fail the first N requests per path, check signatures."""

    url: str
    fail_first: dict[str, int] = field(default_factory=dict)
    requests: list[Received] = field(default_factory=list)

    def on(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            headers = {k.lower(): v for k, v in self.headers.items()}
            if not verify_signature(SECRET, headers.get(SIGNATURE_HEADER.lower()), body):
                status = 401
            elif self.path == "/always-fails" or len(state.on(self.path)) < state.fail_first.get(
                    self.path, 0):
                status = 500
            elif self.path == "/moved":
                status = 302
            else:
                status = 204
            state.requests.append(Received(self.path, body, headers, time.time(), status))
            self.send_response(status)
            if status == 302:
                self.send_header("Location", "/good")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def worker() -> Any:
    app = ploy()

    @app.workflow("hello")
    async def hello(ctx: Any) -> dict[str, str]:
        return {"hello": ctx.input["name"]}

    return app.build()


def config_for(kafka: str, prefix: str, state_dir: Path, *sinks: dict[str, Any]) -> Config:
    return engine_config(kafka, prefix, state_dir, partitions=2, workflow={"HELLO": "hello"},
                         sinks=[{"kind": "webhook", "secret": SECRET,
                                 "types": ["workflow.completed"], **sink} for sink in sinks])


async def until(condition: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_fails_twice_then_accepts_with_the_same_signed_event(
    kafka: str, topic_prefix: str, state_dir: Path, receiver: Receiver
) -> None:
    receiver.fail_first["/flaky"] = 2
    config = config_for(kafka, topic_prefix, state_dir, {
        "url": receiver.url + "/flaky", "backoff": {"initial_ms": 50, "max_ms": 1000}})
    async with running_engine(worker(), config) as engine:
        async with running_connectors(engine) as connectors:
            eid = (await engine.env.HELLO.trigger({"name": "ada"}))["execution_id"]
            await wait_for_status(engine, eid)
            sink = connectors.sinks[0]
            assert isinstance(sink, WebhookSink)
            await until(lambda: sink.delivered == 1)
    got = receiver.on("/flaky")
    assert [r.status for r in got] == [500, 500, 204]
    assert [r.headers[ATTEMPT_HEADER.lower()] for r in got] == ["1", "2", "3"]
    assert len({r.body for r in got}) == 1  # the same event, the same id, every attempt
    assert got[2].at - got[1].at >= 0.09  # the second wait is twice the first (50 ms, 100 ms)
    event = json.loads(got[0].body)
    assert (event["type"], event["subject"], event["data"]["output"]) == (
        "dev.ploy.workflow.completed", eid, {"hello": "ada"})
    assert got[0].headers["content-type"] == "application/cloudevents+json"


async def test_always_failing_receiver_gets_max_attempts_then_a_dead_letter(
    kafka: str, topic_prefix: str, state_dir: Path, receiver: Receiver
) -> None:
    url = receiver.url + "/always-fails"
    config = config_for(kafka, topic_prefix, state_dir, {
        "url": url, "max_attempts": 3, "backoff": {"initial_ms": 20, "max_ms": 100}})
    async with running_engine(worker(), config) as engine:
        async with running_connectors(engine) as connectors:
            eid = (await engine.env.HELLO.trigger({"name": "bob"}))["execution_id"]
            sink = connectors.sinks[0]
            assert isinstance(sink, WebhookSink)
            await until(lambda: sink.dead_lettered == 1)
            assert not sink.pending
    assert [r.status for r in receiver.on("/always-fails")] == [500, 500, 500]
    dead = read_topic(kafka, f"{topic_prefix}.webhooks.dlq")
    assert len(dead) == 1
    letter = dead[0]
    assert letter.key == eid.encode()
    assert letter.headers["ploy.error"] == b"HTTP 500 Internal Server Error"
    assert letter.headers["ploy.attempts"] == b"3"
    assert letter.headers["ploy.webhook.url"] == url.encode()
    assert json.loads(letter.value or b"")["subject"] == eid


async def test_receiver_checks_the_signature(
    kafka: str, topic_prefix: str, state_dir: Path, receiver: Receiver
) -> None:
    config = engine_config(kafka, topic_prefix, state_dir, partitions=2,
                           workflow={"HELLO": "hello"}, sinks=[
        {"kind": "webhook", "url": receiver.url + "/good", "secret": SECRET,
         "types": ["workflow.completed"]},
        {"kind": "webhook", "url": receiver.url + "/bad", "secret": "not-the-secret",
         "types": ["workflow.completed"], "max_attempts": 1},
        {"kind": "webhook", "url": receiver.url + "/moved", "secret": SECRET,
         "types": ["workflow.completed"], "max_attempts": 1},
    ])
    async with running_engine(worker(), config) as engine:
        async with running_connectors(engine) as connectors:
            await engine.env.HELLO.trigger({"name": "cy"})
            good, bad, moved = connectors.sinks
            assert isinstance(good, WebhookSink) and isinstance(bad, WebhookSink)
            assert isinstance(moved, WebhookSink)
            await until(lambda: good.delivered == 1 and bad.dead_lettered == 1
                        and moved.dead_lettered == 1)
    (accepted,) = receiver.on("/good")  # the redirect was not followed
    (refused,) = receiver.on("/bad")
    assert (accepted.status, refused.status) == (204, 401)
    letters = {r.headers["ploy.webhook.url"]: r for r in
               read_topic(kafka, f"{topic_prefix}.webhooks.dlq")}
    assert letters[(receiver.url + "/moved").encode()].headers["ploy.error"] == b"HTTP 302 Found"
    header = accepted.headers[SIGNATURE_HEADER.lower()]
    assert verify_signature(SECRET, header, accepted.body)
    assert not verify_signature(SECRET, header, accepted.body.replace(b"cy", b"cz"))
    assert not verify_signature(SECRET, header, accepted.body, now=time.time() + 3600)


async def test_a_restart_during_the_backoff_keeps_the_schedule_and_delivers(
    kafka: str, topic_prefix: str, state_dir: Path, receiver: Receiver
) -> None:
    receiver.fail_first["/later"] = 1
    config = config_for(kafka, topic_prefix, state_dir, {
        "url": receiver.url + "/later", "backoff": {"initial_ms": 1500, "max_ms": 5000}})
    hello = worker()
    async with running_engine(hello, config) as engine:
        async with running_connectors(engine) as connectors:
            await engine.env.HELLO.trigger({"name": "dee"})
            await until(lambda: len(receiver.on("/later")) == 1)
            await asyncio.sleep(0.1)  # the failure is settled and recorded
            (sink,) = connectors.sinks
            assert isinstance(sink, WebhookSink)
    (record,) = read_topic(kafka, sink.journal_topic)  # what the next process goes on from
    pending = json.loads(record.value or b"")
    assert pending["state"] == "failed"
    assert pending["attempts"] == 1 and pending["error"].startswith("HTTP 500")
    first = receiver.on("/later")[0].at
    assert pending["next_at"] / 1000 >= first + 1.4

    async with running_engine(hello, config) as engine:  # a new process would do the same
        async with running_connectors(engine) as connectors:
            sink = connectors.sinks[0]
            assert isinstance(sink, WebhookSink)
            await until(lambda: sink.delivered == 1)
    got = receiver.on("/later")
    assert [r.status for r in got] == [500, 204]
    assert got[1].headers[ATTEMPT_HEADER.lower()] == "2"  # the count survived the restart
    assert got[1].at >= pending["next_at"] / 1000 - 0.05  # and so did the schedule
    assert got[0].body == got[1].body
