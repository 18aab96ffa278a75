"""Erasure on an immutable log: payloads sealed with a per-subject key kept off the log.

An execution triggered with a data ``subject`` (a user id) has every payload
its events carry (input, outputs, step inputs, log lines, error messages and
tracebacks) sealed with that subject's key before it is appended:
AES-256-GCM, the execution id as associated data (a sealed value moved to
another execution does not open), written as text in the same string fields,

    ploy-enc:v1:<subject>:<base64 of nonce + ciphertext + tag>

so the Avro contract is unchanged, and the fold, the view, a rebuild, the
archive and an export only ever hold ciphertext. ``ploy erase SUBJECT``
destroys the key: every copy of those payloads, on the log and in every view
and backup of it, becomes unreadable at once, while the structure of the
history (types, offsets, times, step names, who and why) stays.

Keys live in a :class:`KeyStore`: one file per subject in a directory that
every worker must see (a shared volume). Reads open what they can and show
:data:`ERASED` for the rest; the runtime, which must not go on with a
placeholder, raises :class:`SubjectErasedError` instead.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine import payloads
from engine.errors import SubjectErasedError
from engine.events import (
    Body,
    StepCompleted,
    StepFailed,
    StepResolved,
    StepStarted,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowLog,
    WorkflowTriggered,
)
from engine.models import (
    ErrorInfo,
    Execution,
    ExecutionSummary,
    HistoryEntry,
    LogEntry,
    StepRecord,
    loads,
)

PREFIX = payloads.SEALED  # "ploy-enc:v1:"
ERASED = payloads.ERASED  # what a read shows for a payload whose key is gone
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12
MAX_SUBJECT_BYTES = 128  # its file name is its base64 (file names stop at 255 bytes)

# The fields of each event body that hold a subject's payloads; everything else
# (types, step names, times, attempts, who and why) stays readable.
SEALED_FIELDS: dict[type[Body], tuple[str, ...]] = {
    WorkflowTriggered: ("input",),
    StepStarted: ("input",),
    StepCompleted: ("input", "output"),
    StepFailed: ("input", "message", "traceback"),
    WorkflowLog: ("message", "data"),
    WorkflowCompleted: ("output",),
    WorkflowFailed: ("message", "traceback"),
    StepResolved: ("output",),
}
_SEALED_BY_NAME = {kind.NAME: fields for kind, fields in SEALED_FIELDS.items()}


def plaintext_limit(limit: int) -> int:
    """The largest payload (bytes) whose sealed text fits ``limit``: base64 takes 4 bytes
    for 3, plus the nonce, the tag and the prefix with the subject."""
    overhead = NONCE_BYTES + 16
    return max(0, (limit - len(PREFIX) - MAX_SUBJECT_BYTES - 1) // 4 * 3 - overhead)


def check_subject(subject: str) -> None:
    """A subject is an opaque id: non-empty, at most 128 bytes, no '/' (it is one segment
    of the API's path) and no control characters.

    It stays readable on the log after erasure (in sealed values and in
    ``SubjectErased``), so it should not itself be personal data (a user id,
    not an e-mail address).
    """
    if not isinstance(subject, str) or not subject:
        raise ValueError(f"a subject must be a non-empty string, got {subject!r}")
    if payloads.has_lone_surrogate(subject) or any(ord(c) < 32 or ord(c) == 127 or c == "/"
                                                   for c in subject):
        raise ValueError(f"subject {subject!r} contains a '/', a control character or a lone "
                         "surrogate")
    if len(subject.encode()) > MAX_SUBJECT_BYTES:
        raise ValueError(f"a subject is at most {MAX_SUBJECT_BYTES} bytes, got "
                         f"{len(subject.encode())}")


class KeyStore:
    """One 32-byte key file per subject in ``directory`` (mode 0600, the directory 0700).

    Keys are read from the file on every use, never cached: an erasure done by
    any process that shares the directory takes effect everywhere at once.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def path(self, subject: str) -> Path:
        """The key file of ``subject``: its UTF-8 in URL-safe base64, so any subject is a
        valid file name and none can climb out of the directory."""
        name = base64.urlsafe_b64encode(subject.encode()).decode().rstrip("=")
        return self.directory / f"{name}.key"

    def get(self, subject: str) -> bytes | None:
        """The subject's key, or None once erased (a key being overwritten reads as gone)."""
        try:
            key = self.path(subject).read_bytes()
        except FileNotFoundError:
            return None
        return key if len(key) == KEY_BYTES and any(key) else None

    def ensure(self, subject: str) -> bytes:
        """The subject's key, created first if it has none.

        A new key is written to a temporary file and hard-linked into place, which
        fails if another process got there first: every process then uses the one
        key that won, and no reader ever sees a half-written file.
        """
        check_subject(subject)
        key = self.get(subject)
        if key is not None:
            return key
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = self.path(subject)
        temp = self.directory / f".{uuid.uuid4().hex}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, AESGCM.generate_key(bit_length=KEY_BYTES * 8))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            with contextlib.suppress(FileExistsError):
                os.link(temp, target)
        finally:
            temp.unlink()
        self._sync_directory()
        key = self.get(subject)
        if key is None:  # erased between the link and this read: refuse, never reuse
            raise SubjectErasedError(subject)
        return key

    def destroy(self, subject: str) -> bool:
        """Overwrite the key file, unlink it and fsync the directory; False if it was gone.

        The overwrite matters on filesystems that write in place; on copy-on-write
        storage and in backups only the unlink counts (see the README on backups).
        """
        path = self.path(subject)
        try:
            fd = os.open(path, os.O_WRONLY)
        except FileNotFoundError:
            return False
        try:
            os.write(fd, bytes(os.fstat(fd).st_size))
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)
        self._sync_directory()
        return True

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- sealing (the writers) ---------------------------------------------------------------


def seal(key: bytes, subject: str, execution_id: str, text: str) -> str:
    """``text`` sealed with ``key``, bound to ``execution_id``."""
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(key).encrypt(nonce, payloads.utf8(text), execution_id.encode())
    return f"{PREFIX}{subject}:{base64.b64encode(nonce + sealed).decode()}"


def seal_text(store: KeyStore, subject: str, execution_id: str, text: str) -> str:
    """``text`` sealed with the subject's existing key; SubjectErasedError if it is gone."""
    key = store.get(subject)
    if key is None:
        raise SubjectErasedError(subject, execution_id)
    return seal(key, subject, execution_id, text)


def seal_body(store: KeyStore, subject: str | None, execution_id: str, body: Body) -> Body:
    """``body`` with its payload fields sealed, for an execution of ``subject``.

    Never raises and never lets plaintext through: once the key is gone the fields
    are written as :data:`ERASED` (the run fails at its next step boundary), except
    the message of the SubjectErasedError that ends it, which is the engine's own.
    """
    fields = SEALED_FIELDS.get(type(body)) if subject is not None else None
    if not fields:
        return body
    assert subject is not None
    key = store.get(subject)
    values: dict[str, Any] = {}
    for name in fields:
        value = getattr(body, name)
        if value is None or value.startswith(PREFIX):
            continue
        values[name] = ERASED if key is None else seal(key, subject, execution_id, value)
    if key is None and isinstance(body, WorkflowFailed) and (
            body.error_type == SubjectErasedError.__name__):
        values.pop("message", None)
    return replace(body, **values)


# -- opening (the readers) ---------------------------------------------------------------


def is_sealed(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def _parse(text: str) -> tuple[str, bytes]:
    """(subject, nonce + ciphertext) of a sealed value."""
    subject, _, encoded = text[len(PREFIX):].rpartition(":")
    try:
        return subject, base64.b64decode(encoded, validate=True)
    except binascii.Error:
        return subject, b""


class Opener:
    """Opens the sealed values of one execution, reading each subject's key once."""

    def __init__(self, store: KeyStore | None, execution_id: str):
        self.store, self.execution_id = store, execution_id
        self._keys: dict[str, bytes | None] = {}

    def open(self, text: str) -> str:
        """The plaintext of ``text`` (as is if not sealed); SubjectErasedError if its key
        is gone (or is not the key it was sealed with)."""
        if not text.startswith(PREFIX):
            return text
        subject, blob = _parse(text)
        if subject not in self._keys:
            self._keys[subject] = None if self.store is None else self.store.get(subject)
        key = self._keys[subject]
        if key is None or len(blob) <= NONCE_BYTES:
            raise SubjectErasedError(subject, self.execution_id)
        try:
            plain = AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                                        self.execution_id.encode())
        except InvalidTag:
            raise SubjectErasedError(subject, self.execution_id) from None
        return plain.decode()

    def text(self, value: str) -> str:
        """For a read: the plaintext, or :data:`ERASED`."""
        try:
            return self.open(value)
        except SubjectErasedError:
            return ERASED

    def json(self, value: Any) -> Any:
        """For a read of a JSON payload that ``models.loads`` left sealed: its value, or
        :data:`ERASED`."""
        if not is_sealed(value):
            return value
        try:
            return loads(self.open(value))
        except SubjectErasedError:
            return ERASED

    def notice(self, data: Any) -> Any:
        """A child's end notice (``engine.runtime.notify_parent``) with its sealed part
        merged back in: ``{"sealed": ...}`` holds its output and error."""
        if not isinstance(data, dict) or not is_sealed(data.get("sealed")):
            return data
        opened = dict(data)
        revealed = self.json(opened.pop("sealed"))
        if isinstance(revealed, dict):
            opened.update(revealed)
        else:
            opened["output"] = revealed  # ERASED
        return opened


def seal_notice(store: KeyStore, subject: str | None, parent_id: str,
                data: dict[str, Any]) -> dict[str, Any]:
    """A child's end notice to its parent with its output and error sealed for the parent
    (the ids and the status stay readable: the parent's wait matches on them)."""
    if subject is None:
        return data
    secret = {"output": data.get("output"), "error": data.get("error")}
    key = store.get(subject)
    text = json.dumps(secret, separators=(",", ":"))
    sealed = ERASED if key is None else seal(key, subject, parent_id, text)
    return {**data, "output": None, "error": None, "sealed": sealed}


# -- reads: the query models with their payloads opened ----------------------------------


def _error(opener: Opener, error: ErrorInfo | None) -> ErrorInfo | None:
    if error is None or not (is_sealed(error.message) or is_sealed(error.traceback)):
        return error
    return error.model_copy(update={"message": opener.text(error.message),
                                    "traceback": opener.text(error.traceback)})


def _step(opener: Opener, step: StepRecord) -> StepRecord:
    output = step.output
    if step.kind in ("wait", "invoke") and isinstance(output, dict):
        output = {**output, "data": opener.notice(output.get("data"))}
    else:
        output = opener.json(output)
    attempts = [a.model_copy(update={"error": _error(opener, a.error)}) for a in step.attempts]
    return step.model_copy(update={"input": opener.json(step.input), "output": output,
                                   "error": _error(opener, step.error), "attempts": attempts})


def _log(opener: Opener, entry: LogEntry) -> LogEntry:
    return entry.model_copy(update={"message": opener.text(entry.message),
                                    "data": opener.json(entry.data)})


def reveal_execution(store: KeyStore | None, execution: Execution | None) -> Execution | None:
    """``execution`` with its payloads opened (or :data:`ERASED`); as is without a subject."""
    if execution is None or execution.subject is None:
        return execution
    opener = Opener(store, execution.execution_id)
    output = opener.json(execution.output)
    return execution.model_copy(update={
        "input": opener.json(execution.input), "output": output, "result": output,
        "error": _error(opener, execution.error),
        "steps": [_step(opener, s) for s in execution.steps],
        "logs": [_log(opener, entry) for entry in execution.logs]})


def reveal_summary(store: KeyStore | None, summary: ExecutionSummary) -> ExecutionSummary:
    """A listing's row with its error message opened (or :data:`ERASED`)."""
    if not is_sealed(summary.error):
        return summary
    assert summary.error is not None
    return summary.model_copy(
        update={"error": Opener(store, summary.execution_id).text(summary.error)})


def reveal_fields(store: KeyStore | None, execution_id: str, event_type: str,
                  fields: dict[str, Any], opener: Opener | None = None) -> dict[str, Any]:
    """An event body's fields (as a history entry or an export row has them) with its
    sealed ones opened, as the text they are on the log, or :data:`ERASED`."""
    opener = opener or Opener(store, execution_id)
    names = _SEALED_BY_NAME.get(event_type, ())
    out = {k: opener.text(v) if k in names and is_sealed(v) else v for k, v in fields.items()}
    if event_type == "EventSent" and isinstance(out.get("data"), str) and PREFIX in out["data"]:
        out["data"] = json.dumps(opener.notice(json.loads(out["data"])),
                                 separators=(",", ":"))
    return out


def reveal_history(store: KeyStore | None, entries: list[HistoryEntry] | None,
                   execution_id: str) -> list[HistoryEntry] | None:
    """History entries with their payloads opened (one key read per subject)."""
    if entries is None:
        return None
    opener = Opener(store, execution_id)
    return [reveal_entry(store, entry, execution_id, opener) for entry in entries]


def reveal_entry(store: KeyStore | None, entry: HistoryEntry, execution_id: str,
                 opener: Opener | None = None) -> HistoryEntry:
    """One history entry with its payloads opened."""
    if not any(is_sealed(v) or (isinstance(v, str) and PREFIX in v)
               for v in entry.body.values()):
        return entry
    body = reveal_fields(store, execution_id, entry.type, entry.body, opener)
    return entry.model_copy(update={"body": body})
