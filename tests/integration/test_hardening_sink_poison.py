"""Issue 12, point 3 (sinks): no event of the log can stop the topic or the webhook sink.

A step output with a lone surrogate (JSON escapes it: ``"\\ud800"``) decodes to
text UTF-8 cannot hold; a log line of control characters grows six-fold as
JSON, past the producer's record limit. Each used to make its sink go back to
the same event forever. Now the first goes out with U+FFFD, the second to the
sink's dead-letter topic, and the events after them go out too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from connectors.testing import read_topic, running_connectors
from engine import ploy
from engine.testing import engine_config, running_engine, wait_for_status
from tests.integration.test_connectors_webhooks import SECRET, Receiver, receiver, until

__all__ = ["receiver"]  # the fixture, used by name

LOUD = "\x01" * 200_000  # 200 KB in the log; 1.2 MB as JSON


def worker() -> Any:
    app = ploy()

    @app.workflow("poison")
    async def poison(ctx: Any) -> dict[str, Any]:
        return await ctx.step.run("surrogate", lambda: {"x": "\ud800"})  # type: ignore[no-any-return]

    @app.workflow("loud")
    async def loud(ctx: Any) -> str:
        ctx.log(LOUD)
        return "said it"

    @app.workflow("hello")
    async def hello(ctx: Any) -> str:
        return "after"

    return app.build()


def cloudevents(kafka: str, topic: str) -> list[dict[str, Any]]:
    return [json.loads(r.value or b"null") for r in read_topic(kafka, topic)]


async def test_a_lone_surrogate_and_an_oversized_event_hold_no_sink_back(
    kafka: str, topic_prefix: str, state_dir: Path, receiver: Receiver
) -> None:
    lifecycle = f"{topic_prefix}.lifecycle"
    webhook_dlq = f"{topic_prefix}.webhooks.dlq"
    config = engine_config(kafka, topic_prefix, state_dir, partitions=2, workflow={
        "POISON": "poison", "LOUD": "loud", "HELLO": "hello"}, sinks=[
        {"kind": "topic", "topic": lifecycle},
        {"kind": "webhook", "url": f"{receiver.url}/good", "secret": SECRET,
         "types": ["workflow.completed", "step.completed"]},
        {"kind": "webhook", "url": f"{receiver.url}/always-fails", "secret": SECRET,
         "types": ["workflow.log"], "max_attempts": 1, "dead_letter_topic": webhook_dlq},
    ])
    async with running_engine(worker(), config) as engine:
        async with running_connectors(engine) as connectors:
            ids = {}
            for name in ("POISON", "LOUD", "HELLO"):
                ids[name] = (await engine.env[name].trigger({}))["execution_id"]
                await wait_for_status(engine, ids[name], "completed")
            await until(lambda: len(receiver.on("/good")) >= 4 and all(
                s.error is None for s in connectors.sinks), timeout_s=30)
            await until(lambda: any(ce.get("type") == "dev.ploy.workflow.completed"
                                    and ce["subject"] == ids["HELLO"]
                                    for ce in cloudevents(kafka, lifecycle)), timeout_s=30)
            await until(lambda: bool(read_topic(kafka, webhook_dlq)), timeout_s=30)

    published = cloudevents(kafka, lifecycle)
    done = {ce["subject"] for ce in published if ce["type"] == "dev.ploy.workflow.completed"}
    assert done == set(ids.values())
    (step,) = [ce for ce in published if ce["type"] == "dev.ploy.step.completed"
               and ce["subject"] == ids["POISON"]]
    assert step["data"]["output"] == {"x": "\ufffd"}

    (letter,) = read_topic(kafka, f"{lifecycle}.dlq")  # the log line, too large to publish
    assert letter.key == ids["LOUD"].encode()
    assert b"MSG_SIZE_TOO_LARGE" in letter.headers["ploy.error"] or b"too large" in \
        letter.headers["ploy.error"].lower()
    assert letter.value is None and "ploy.value.dropped" in letter.headers
    assert letter.headers["ploy.source.topic"] == f"{topic_prefix}.events".encode()

    bodies = [json.loads(r.body) for r in receiver.on("/good")]
    assert {b["subject"] for b in bodies if b["type"] == "dev.ploy.workflow.completed"} == \
        set(ids.values())
    (dead,) = read_topic(kafka, webhook_dlq)  # failed once (max_attempts 1), and too large
    assert dead.key == ids["LOUD"].encode() and dead.value is None
    assert dead.headers["ploy.attempts"] == b"1"
