"""What a user payload may be: the bounds checked before anything is appended.

Every value a user hands the engine (a trigger's input, a step's input and
result, a workflow's output, log data, an idempotency key) becomes JSON text
inside one Kafka record, and later a page, an API answer and a sink's message.
So each is checked where it enters, with a clear error and nothing appended:

- size in encoded bytes, the unit the broker counts (600,000 "é" are 1.2 MB);
- nesting depth, since readers (pydantic, browsers, other consumers) refuse
  deep documents long before Python's JSON does;
- valid Unicode for inputs: a lone surrogate (``"\\ud800"``) is valid JSON
  text but no UTF-8 encoder takes it, so it is refused at the edge (422).

On the way out the opposite holds: every encoder is total (see :func:`scrub`
and the codec), so a value already on the log can never stop a reader.
"""

from __future__ import annotations

import json
import re
from typing import Any

from engine.errors import InvalidKeyError, PayloadTooDeepError, PayloadTooLargeError

MAX_DEPTH = 100  # arrays and objects inside each other
MAX_KEY_BYTES = 1024  # an idempotency key is an id, not a payload
SEALED = "ploy-enc:v1:"  # a payload sealed with a data subject's key (engine.erasure)
ERASED = "[erased]"  # ... or written after that key was gone (never valid JSON)

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


def byte_size(text: str) -> int:
    """The UTF-8 size of ``text`` (lone surrogates count as the 3 bytes they escape to)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def depth(text: str) -> int:
    """How deeply arrays and objects nest in the JSON ``text``."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return 0  # cannot be deeper than the limit: skip the scan (the usual case)
    deepest = level = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub('""', text)):
        level += 1 if bracket in "[{" else -1
        deepest = max(deepest, level)
    return deepest


def check(text: str, what: str, limit: int) -> None:
    """Raise if the JSON ``text`` of ``what`` is over ``limit`` bytes or nests too deep."""
    size = byte_size(text)
    if size > limit:
        raise PayloadTooLargeError(what, size, limit)
    if depth(text) > MAX_DEPTH:
        raise PayloadTooDeepError(what, MAX_DEPTH)


def check_key(key: str) -> None:
    """An idempotency key: bounded in bytes and valid Unicode."""
    if has_lone_surrogate(key):
        raise InvalidKeyError("idempotency key", "it contains a lone surrogate (not valid Unicode)")
    size = byte_size(key)
    if size > MAX_KEY_BYTES:
        raise PayloadTooLargeError("idempotency key", size, MAX_KEY_BYTES)


def lone_surrogate(text: str) -> str | None:
    """The first lone surrogate in JSON ``text`` (as ``\\udXXX``), or None if there is none."""
    try:
        if "\\ud" not in text and "\\uD" not in text:
            text.encode()  # no escaped surrogate: only a raw one can be there
        else:
            json.dumps(json.loads(text), ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        return f"\\u{ord(exc.object[exc.start]):04x}"
    return None


def has_lone_surrogate(value: str) -> bool:
    """Whether the string ``value`` holds a surrogate no UTF-8 encoder takes."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return True
    return False


def scrub(value: Any) -> Any:
    """``value`` with every lone surrogate in its strings replaced by U+FFFD.

    For reads of recorded JSON: a step may have returned such a string (its
    JSON text escapes it, so the log holds it fine), but a UTF-8 answer cannot.
    """
    if isinstance(value, str):
        if not has_lone_surrogate(value):
            return value
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    return value


def utf8(text: str) -> bytes:
    """``text`` as UTF-8, a lone surrogate written as its escape (``\\ud800``): never raises."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")
