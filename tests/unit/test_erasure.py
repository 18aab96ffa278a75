"""engine.erasure without a broker: the key store, sealing and what reads show."""

from __future__ import annotations

import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engine import erasure
from engine.config import load_config
from engine.erasure import ERASED, KeyStore, Opener, seal_body
from engine.errors import SubjectErasedError
from engine.events import StepCompleted, StepFailed, WorkflowFailed, WorkflowLog, WorkflowStarted
from engine.models import ErrorInfo, Execution, ExecutionStatus, HistoryEntry, LogEntry, StepRecord


def test_a_key_is_one_0600_file_per_subject_created_once(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    key = store.ensure("user-7")
    assert store.ensure("user-7") == key and store.get("user-7") == key
    path = store.path("user-7")
    assert path.parent == tmp_path / "keys" and path.read_bytes() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert store.ensure("user-8") != key
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_destroy_overwrites_and_unlinks_and_is_idempotent(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.ensure("u")
    assert store.destroy("u") is True
    assert not store.path("u").exists() and store.get("u") is None
    assert store.destroy("u") is False


def test_a_zeroed_key_file_reads_as_gone(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.ensure("u")
    store.path("u").write_bytes(bytes(32))  # half-way through a destroy
    assert store.get("u") is None


@pytest.mark.parametrize("subject", ["", "a/b", "tab\there", "x" * 129, "\ud800"])
def test_bad_subjects_are_refused(subject: str) -> None:
    with pytest.raises(ValueError):
        erasure.check_subject(subject)


def test_sealed_text_opens_only_for_its_execution_and_key(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    sealed = erasure.seal(store.ensure("u:1"), "u:1", "exec-1", '{"email":"a@b.c"}')
    assert sealed.startswith("ploy-enc:v1:u:1:") and "a@b.c" not in sealed
    assert Opener(store, "exec-1").open(sealed) == '{"email":"a@b.c"}'
    assert Opener(store, "exec-1").json(sealed) == {"email": "a@b.c"}
    with pytest.raises(SubjectErasedError):
        Opener(store, "exec-2").open(sealed)  # the execution id is the associated data
    assert Opener(store, "exec-1").open("plain") == "plain"
    store.destroy("u:1")
    with pytest.raises(SubjectErasedError, match="u:1"):
        Opener(store, "exec-1").open(sealed)
    assert Opener(store, "exec-1").text(sealed) == ERASED
    store.ensure("u:1")  # a new key for the same subject does not open the old values
    assert Opener(store, "exec-1").json(sealed) == ERASED


def test_seal_body_seals_payloads_and_keeps_the_structure(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.ensure("u")
    body = StepFailed("charge", 2, '{"card":"4111"}', "ValueError", "card 4111 refused",
                      "Traceback: 4111", 10, 20, False)
    sealed = seal_body(store, "u", "e", body)
    assert isinstance(sealed, StepFailed)
    assert (sealed.step, sealed.attempt, sealed.error_type, sealed.retry_at) == (
        "charge", 2, "ValueError", 20)
    assert "4111" not in repr(sealed)
    opener = Opener(store, "e")
    assert opener.open(sealed.message) == "card 4111 refused"
    assert seal_body(store, "u", "e", sealed) == sealed  # never sealed twice
    assert seal_body(store, None, "e", body) is body
    started = WorkflowStarted("w")
    assert seal_body(store, "u", "e", started) is started
    log = seal_body(store, "u", "e", WorkflowLog("info", "hi", None, "w0.0"))
    assert isinstance(log, WorkflowLog) and log.data is None and log.position == "w0.0"


def test_seal_body_without_a_key_writes_placeholders_never_plaintext(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    done = seal_body(store, "gone", "e", StepCompleted("s", 1, None, '"secret"', 1))
    assert isinstance(done, StepCompleted) and done.output == ERASED
    failed = seal_body(store, "gone", "e", WorkflowFailed(
        "SubjectErasedError", "the key of data subject 'gone' was erased", "tb secret"))
    assert isinstance(failed, WorkflowFailed)
    assert failed.message.startswith("the key of") and failed.traceback == ERASED


def _execution(store: KeyStore, eid: str) -> Execution:
    key = store.ensure("u")

    def s(text: str) -> str:
        return erasure.seal(key, "u", eid, text)

    error = ErrorInfo(type="ValueError", message=s("bad 4111"), traceback=s("tb 4111"))
    return Execution(
        execution_id=eid, workflow="w", status=ExecutionStatus.FAILED, input=s('{"n":4111}'),
        output=None, error=error, partition=0, events=5, created_at=1, updated_at=2,
        subject="u",
        steps=[StepRecord(key="a", name="a", seq=0, status="completed", input=None,
                          output=s('"4111"'), error=error)],
        logs=[LogEntry(seq=0, timestamp=1, level="info", message=s("saw 4111"),
                       data=s('{"card":"4111"}'))])


def test_reveal_execution_opens_every_payload_or_shows_erased(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    sealed = _execution(store, "e")
    assert "4111" not in sealed.model_dump_json()
    shown = erasure.reveal_execution(store, sealed)
    assert shown is not None
    assert shown.input == {"n": 4111} and shown.steps[0].output == "4111"
    assert shown.error is not None and shown.error.message == "bad 4111"
    assert shown.logs[0].message == "saw 4111" and shown.logs[0].data == {"card": "4111"}
    store.destroy("u")
    gone = erasure.reveal_execution(store, sealed)
    assert gone is not None and "4111" not in gone.model_dump_json()
    assert gone.input == ERASED and gone.steps[0].key == "a" and gone.status.value == "failed"


def test_reveal_history_opens_the_sealed_fields_of_each_event(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    key = store.ensure("u")
    entry = HistoryEntry(partition=0, offset=3, event_id="x", timestamp=1, epoch=0,
                         type="StepCompleted",
                         body={"step": "a", "attempt": 1, "input": None, "started_at": 1,
                               "output": erasure.seal(key, "u", "e", '"4111"')})
    [shown] = erasure.reveal_history(store, [entry], "e") or []
    assert shown.body["output"] == '"4111"' and shown.body["step"] == "a"
    store.destroy("u")
    [gone] = erasure.reveal_history(store, [entry], "e") or []
    assert gone.body["output"] == ERASED and gone.offset == 3


@pytest.mark.parametrize("limit", [1000, 900_000, 1_048_576])
def test_a_payload_under_the_plaintext_limit_fits_the_limit_once_sealed(
        tmp_path: Path, limit: int) -> None:
    key = KeyStore(tmp_path).ensure("s" * 128)
    text = "é" * (erasure.plaintext_limit(limit) // 2)
    sealed = erasure.seal(key, "s" * 128, "e", text)
    assert len(sealed.encode()) <= limit < len(sealed.encode()) + 8


def test_the_key_dir_defaults_to_the_state_dir_and_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "ploy.yaml"
    path.write_text("state_dir: st\n")
    assert load_config(path, env={}).key_dir == tmp_path / "st" / "keys"
    path.write_text("erasure: {key_dir: shared/keys}\n")
    assert load_config(path, env={}).key_dir == tmp_path / "shared" / "keys"
    assert load_config(path, env={"PLOY_KEY_DIR": "/mnt/keys"}).key_dir == Path("/mnt/keys")


def test_concurrent_first_triggers_agree_on_one_key(tmp_path: Path) -> None:
    stores = [KeyStore(tmp_path) for _ in range(8)]  # as if 8 processes
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda store: store.ensure("u"), stores))
    assert len(set(found)) == 1 and found[0] == stores[0].get("u")
    assert sorted(p.name for p in tmp_path.iterdir()) == [stores[0].path("u").name]
