"""Erasure on the immutable log (engine.erasure), on the real broker.

Acceptance: after ``ploy erase``, no API answer, CLI output, dashboard page,
rebuild, export or record of the topic holds the subject's payloads, while the
structure of its histories and other subjects' executions stay readable.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import fastavro
import httpx
import pytest

from connectors.testing import running_connectors
from engine import ploy
from engine.app import serving_api
from engine.cli import main
from engine.erasure import KeyStore
from engine.log import EventLog
from engine.rebuild import rebuild
from engine.replaycheck import replay_check
from engine.testing import engine_config, running_engine, wait_for_status
from engine.view import PartitionView

PARTITIONS = 2
ALICE = "alice-secret@example.com"
BOB = "bob-secret@example.com"


def worker(gate: threading.Event | None = None) -> Any:
    app = ploy()
    failed_once: set[str] = set()

    @app.workflow("profile")
    async def profile(ctx: Any) -> dict[str, Any]:
        email = ctx.input["email"]
        greeting = await ctx.step.run("greet", lambda: f"hello {email}", input={"to": email})
        ctx.log(f"greeted {email}", {"email": email})

        def flaky() -> str:
            if ctx.execution_id not in failed_once:
                failed_once.add(ctx.execution_id)
                raise ValueError(f"mailbox {email} busy")
            return "sent"

        await ctx.step.run("send", flaky, retries=2)
        child = await ctx.step.invoke("card", binding="CARD", input={"email": email})
        return {"greeting": greeting, "card": child}

    @app.workflow("card")
    async def card(ctx: Any) -> str:
        return str(await ctx.step.run("draw", lambda: f"card for {ctx.input['email']}"))

    @app.workflow("slow")
    async def slow(ctx: Any) -> str:
        email = ctx.input["email"]
        await ctx.step.run("first", lambda: email)
        if ctx.input.get("sleep"):
            await ctx.step.sleep(2000)
        else:
            await ctx.step.run("blocked", lambda: gate.wait(10) if gate else None)
        return str(await ctx.step.run("last", lambda: f"done {email}"))

    return app.build()


def config_for(kafka: str, prefix: str, state_dir: Path, keys: Path, **fields: Any) -> Any:
    return engine_config(kafka, prefix, state_dir, partitions=PARTITIONS,
                         workflow={"PROFILE": "profile", "CARD": "card", "SLOW": "slow"},
                         backoff={"initial_ms": 10}, erasure={"key_dir": str(keys)}, **fields)


def app_dir(tmp_path: Path, kafka: str, prefix: str, keys: Path) -> Path:
    app = tmp_path / "app"
    app.mkdir(parents=True)
    (app / "ploy.yaml").write_text(
        f"kafka: {{bootstrap_servers: '{kafka}', topic_prefix: {prefix}, "
        f"partitions: {PARTITIONS}}}\nworkflow: {{PROFILE: profile}}\n"
        f"erasure: {{key_dir: '{keys}'}}\n")
    return app


async def ploy_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def topic_bytes(kafka: str, prefix: str) -> bytes:
    log = EventLog(kafka, prefix, PARTITIONS)
    try:
        return b"".join(raw for batch in log.read_until_end(dict.fromkeys(range(PARTITIONS), 0))
                        for records in batch.values() for _, raw in records)
    finally:
        log.close()


def files_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def avro_bytes(directory: Path) -> bytes:
    """What the Avro files under ``directory`` hold, decoded (their blocks are deflated)."""
    out = []
    for path in sorted(directory.rglob("*.avro")):
        with path.open("rb") as fo:
            out += [json.dumps(record, ensure_ascii=False) for record in fastavro.reader(fo)]
    return "\n".join(out).encode()


def view_bytes(state_path: Path, topic: str) -> bytes:
    """Every key and value of the view, as stored (table files may be compressed)."""
    return b"".join(k + v for rows in dump(state_path / topic, topic).values() for k, v in rows)


def dump(state_path: Path, topic: str) -> dict[str, list[tuple[bytes, bytes]]]:
    views = {}
    for db in sorted(state_path.iterdir()):
        view = PartitionView(db, topic, int(db.name[1:]))
        try:
            views[db.name] = list(view.dump())
        finally:
            view.close()
    return views


def secret_parts(email: str) -> list[bytes]:
    """The plaintext as it could appear: whole, its local part, JSON-escaped."""
    return [email.encode(), email.split("@")[0].encode(), json.dumps(email).encode()]


def assert_absent(email: str, blob: bytes, where: str) -> None:
    for part in secret_parts(email):
        assert part not in blob, f"{part!r} found in {where}"


async def api_bytes(client: httpx.AsyncClient, eid: str) -> bytes:
    """Every answer that shows one execution: API, history, SSE stream, page, as-of."""
    answers = [await client.get(f"/__ploy/api/executions/{eid}"),
               await client.get(f"/__ploy/api/executions/{eid}/history"),
               await client.get(f"/__ploy/api/executions/{eid}/events"),
               await client.get(f"/__ploy/executions/{eid}"),
               await client.get("/__ploy/api/executions", params={"limit": 100}),
               await client.get("/__ploy/"),
               await client.get("/__ploy/api/as-of", params={"at": "p0:999999,p1:999999",
                                                              "id": eid})]
    for answer in answers:
        assert answer.status_code == 200, (answer.url, answer.text)
    return b"".join(a.content for a in answers)


async def test_erase_makes_a_subjects_payloads_unreadable_everywhere(
        kafka: str, topic_prefix: str, state_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    keys, archive = tmp_path / "keys", tmp_path / "archive"
    config = config_for(kafka, topic_prefix, state_dir, keys,
                        sinks=[{"kind": "archive", "dir": str(archive)}])
    app = app_dir(tmp_path, kafka, topic_prefix, keys)
    async with running_engine(worker(), config) as engine, running_connectors(engine), \
            serving_api(engine) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        alice = (await engine.env.PROFILE.trigger({"email": ALICE}, subject="user-alice")
                 )["execution_id"]
        answer = await client.post("/__ploy/api/trigger/PROFILE",
                                   json={"input": {"email": BOB}, "subject": "user-bob"})
        assert answer.status_code == 201, answer.text
        bob = answer.json()["execution_id"]
        plain = (await engine.env.PROFILE.trigger({"email": "nobody@example.com"})
                 )["execution_id"]
        for eid in (alice, bob, plain):
            done = await wait_for_status(engine, eid, "completed", timeout_s=30)
            assert done.output["greeting"].startswith("hello ")
        child = (await engine.runtime.get_execution(alice)).steps[-1].child_id  # type: ignore

        # Before: readable through the engine, ciphertext only on the log and in the view.
        shown = await engine.runtime.get_execution(alice)
        assert shown is not None and shown.subject == "user-alice"
        assert shown.input == {"email": ALICE}
        assert shown.output == {"greeting": f"hello {ALICE}", "card": f"card for {ALICE}"}
        assert shown.logs[0].message == f"greeted {ALICE}"
        assert shown.steps[1].attempts[0].error.message == f"mailbox {ALICE} busy"  # type: ignore
        assert ALICE.encode() in await api_bytes(client, alice)
        assert_absent(ALICE, topic_bytes(kafka, topic_prefix), "the topic")
        assert_absent(ALICE, files_bytes(state_dir), "the RocksDB files")
        assert b"nobody@example.com" in topic_bytes(kafka, topic_prefix)  # no subject: as is
        assert oct(keys.stat().st_mode & 0o777) == "0o700"
        # A rerun's copies are sealed anew for the new id (a sealed value is bound to its id).
        answer = await client.post(f"/__ploy/api/executions/{bob}/rerun",
                                   json={"from_step": "send"})
        assert answer.status_code == 201, answer.text
        rerun = await wait_for_status(engine, answer.json()["execution_id"], "completed")
        assert rerun.output["greeting"] == f"hello {BOB}" and rerun.subject == "user-bob"

        code, out, err = await ploy_cli(capsys, "erase", "user-alice", "--reason",
                                        "GDPR art. 17 request 12", "--url", url)
        assert code == 0, err
        assert out.startswith("erased subject user-alice: its key destroyed")

        # After: no answer holds Alice's payloads; the structure is there, Bob is intact.
        for eid in (alice, child):
            assert_absent(ALICE, await api_bytes(client, eid), f"the answers about {eid}")
        gone = await engine.runtime.get_execution(alice)
        assert gone is not None and gone.input == "[erased]" and gone.output == "[erased]"
        assert [s.key for s in gone.steps] == ["greet", "send", "card"]
        assert [len(s.attempts) for s in gone.steps[:2]] == [1, 2]
        history = await engine.runtime.history(alice) or []
        assert [e.type for e in history][:3] == ["WorkflowTriggered", "WorkflowStarted",
                                                 "StepStarted"]
        assert history[0].body["input"] == "[erased]" and history[0].body["subject"]
        bob_shown = await api_bytes(client, bob)
        assert BOB.encode() in bob_shown
        bob_ex = await engine.runtime.get_execution(bob)
        assert bob_ex is not None and bob_ex.input == {"email": BOB}
        for argv in (("status", alice), ("history", alice), ("list", "--limit", "50"),
                     ("status", alice, "--json"), ("history", alice, "--json")):
            code, out, err = await ploy_cli(capsys, *argv, "--url", url)
            assert code == 0, err
            assert_absent(ALICE, out.encode(), f"ploy {' '.join(argv)}")
        code, out, _ = await ploy_cli(capsys, "status", bob, "--url", url)
        assert BOB in out

        # The log: sealed bytes only, and the audit record of the erasure.
        records = topic_bytes(kafka, topic_prefix)
        assert_absent(ALICE, records, "the topic")
        assert_absent(BOB, records, "the topic")  # Bob's are sealed too, not erased
        answer = await client.post(f"/__ploy/api/executions/{alice}/rerun", json={})
        assert answer.status_code == 409 and "was erased" in answer.text
        assert b"GDPR art. 17 request 12" in records and b"user-alice" in records

    # The archive sink's files (closed when the engine stopped), exports and a rebuild.
    archived = avro_bytes(archive)
    assert b"nobody@example.com" in archived  # decoded: a payload without a subject
    assert b"GDPR art. 17 request 12" in archived
    assert_absent(ALICE, archived + files_bytes(archive), "the archive")
    for fmt, extra in (("jsonl", ["--readable"]), ("avro", [])):
        out_dir = tmp_path / f"export-{fmt}"
        code, _, err = await ploy_cli(capsys, "export", "--format", fmt, "--out",
                                      str(out_dir), "--dir", str(app), *extra)
        assert code == 0, err
        exported = files_bytes(out_dir) + avro_bytes(out_dir)
        assert_absent(ALICE, exported, f"the {fmt} export")
        assert b"greet" in exported  # the structure: step names
        if extra:
            assert BOB.encode() in exported  # readable: Bob's key is still there
            rows = [json.loads(line) for f in sorted(out_dir.glob("p*.jsonl"))
                    for line in f.read_text().splitlines()]
            erased = [r for r in rows if r["type"] == "SubjectErased"]
            assert [(r["body"]["subject"], r["body"]["reason"]) for r in erased] == [
                ("user-alice", "GDPR art. 17 request 12")]
            assert erased[0]["body"]["actor"].startswith("local:")
            fresh = app_dir(tmp_path / "fresh", kafka, f"{topic_prefix}-i", keys)
            code, _, err = await ploy_cli(capsys, "import", str(out_dir), "--dir", str(fresh))
            assert code == 2 and "readable export" in err
    log = EventLog(kafka, topic_prefix, PARTITIONS)
    try:
        rebuild(log, tmp_path / "rebuilt", workers=1)
    finally:
        log.close()
    topic = f"{topic_prefix}.events"
    assert dump(tmp_path / "rebuilt", topic) == dump(state_dir / topic, topic)
    assert_absent(ALICE, files_bytes(tmp_path / "rebuilt"), "the rebuilt view's files")
    assert_absent(ALICE, files_bytes(state_dir), "the RocksDB files")
    assert_absent(ALICE, view_bytes(state_dir, topic), "the view's keys and values")
    assert_absent(BOB, view_bytes(state_dir, topic), "the view's keys and values")


async def test_an_execution_whose_key_is_erased_fails_at_its_next_step(
        kafka: str, topic_prefix: str, state_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    gate = threading.Event()
    config = config_for(kafka, topic_prefix, state_dir, keys)
    async with running_engine(worker(gate), config) as engine:
        live = (await engine.env.SLOW.trigger({"email": ALICE}, subject="u1"))["execution_id"]
        asleep = (await engine.env.SLOW.trigger({"email": ALICE, "sleep": True}, subject="u2")
                  )["execution_id"]
        kept = (await engine.env.SLOW.trigger({"email": BOB, "sleep": True}, subject="u3")
                )["execution_id"]
        await wait_for_status(engine, asleep, "sleeping")
        for subject in ("u1", "u2"):
            await engine.runtime.erase(subject, "test", "tester")
        gate.set()  # the live one goes on to its next step: it must not run it
        for eid in (live, asleep):
            ended = await wait_for_status(engine, eid, "failed", timeout_s=30)
            assert ended.error is not None and ended.error.type == "SubjectErasedError"
            assert "was erased" in ended.error.message
            assert "last" not in [s.key for s in ended.steps]
            assert ended.input == "[erased]"
        # Not erased: resumed by replay after its sleep, with its input and step opened.
        resumed = await wait_for_status(engine, kept, "completed", timeout_s=30)
        assert resumed.output == f"done {BOB}" and resumed.steps[0].output == BOB
        assert_absent(ALICE, topic_bytes(kafka, topic_prefix), "the topic")

    # ploy replay-check opens what it replays; an erased execution is not replayed.
    topic = f"{topic_prefix}.events"
    views = [PartitionView(db, topic, int(db.name[1:]))
             for db in sorted((state_dir / topic).iterdir())]
    try:
        verdicts = await replay_check(views, worker(gate), keys=KeyStore(keys))
    finally:
        for view in views:
            view.close()
    assert {v.execution_id: v.outcome for v in verdicts} == {
        live: "erased", asleep: "erased", kept: "ok"}


async def test_bad_subjects_are_refused_with_nothing_appended(
        kafka: str, topic_prefix: str, state_dir: Path, tmp_path: Path) -> None:
    config = config_for(kafka, topic_prefix, state_dir, tmp_path / "keys")
    async with running_engine(worker(), config) as engine, serving_api(engine) as url, \
            httpx.AsyncClient(base_url=f"{url}/__ploy/api") as client:
        for body in ({"input": {"email": "x"}, "subject": "a/b"},
                     {"input": {"email": "x"}, "subject": ""}):
            answer = await client.post("/trigger/PROFILE", json=body)
            assert answer.status_code == 422, answer.text
        # Sealed, a payload grows by a third: the limit for a subject's payloads is lower.
        big = {"input": {"email": "x" * 700_000}, "subject": "u"}
        answer = await client.post("/trigger/PROFILE", json=big)
        assert answer.status_code == 413 and "workflow input" in answer.text
        answer = await client.post("/subjects/nobody/erase", json={"reason": " "})
        assert answer.status_code == 422
        answer = await client.post("/subjects/nobody/erase", json={"reason": "asked"})
        assert answer.status_code == 200 and answer.json()["key_destroyed"] is False
    assert topic_bytes(kafka, topic_prefix).count(b"asked") == 1
