"""CloudEvents 1.0 in and out: lifecycle events as JSON, inbound records as data.

Out (sinks): each lifecycle event of the log becomes one structured-mode
CloudEvent (``application/cloudevents+json``) that consumers read without our
Avro schemas:

    {"specversion": "1.0", "id": <the event's event_id>, "source": "ploy/<prefix>",
     "type": "dev.ploy.step.completed", "subject": <execution id>,
     "time": "2025-01-31T12:00:00.123Z", "datacontenttype": "application/json",
     "data": {"execution_id": ..., "workflow": ..., <the body's fields>}}

The ``id`` is the event id written in the log, so it is the same however
often the event is published: consumers deduplicate on it. JSON text fields
of the log (inputs, outputs, log data) are embedded as JSON values.

Encoding is total: JSON may escape a lone surrogate (``"\\ud800"``), which
decodes to a Python string that UTF-8 cannot hold; :func:`utf8` writes it as
U+FFFD, so no event of the log can stop a sink.

In (sources): a Kafka record is a CloudEvent in structured mode (content
type ``application/cloudevents+json``, the event is the value) or binary mode
(attributes in ``ce_*`` headers, the value is ``data``); see :func:`data_of`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from engine.config import CLOUDEVENTS_TYPE_PREFIX
from engine.events import Event, StepFailed

CONTENT_TYPE = "application/cloudevents+json"
SPECVERSION = "1.0"
REQUIRED = ("id", "source", "type")

# The log's body types -> lifecycle type (``None``: internal, never published).
_TYPES: dict[str, str | None] = {
    "WorkflowTriggered": "workflow.triggered",
    "WorkflowStarted": "workflow.started",
    "StepStarted": "step.started",
    "StepCompleted": "step.completed",
    "StepFailed": "step.failed",  # step.retrying when another attempt follows
    "SleepScheduled": "workflow.sleeping",
    "TimerFired": "timer.fired",
    "WorkflowLog": "workflow.log",
    "CancelRequested": "workflow.cancel_requested",
    "WorkflowCancelled": "workflow.cancelled",
    "WorkflowCompleted": "workflow.completed",
    "WorkflowFailed": "workflow.failed",
    "PartitionClaimed": None,
    "RecordSkipped": None,
    "PartitionReleased": None,
    "WaitStarted": "workflow.waiting",
    "EventSent": None,  # an event in; copies go to every partition, the waiters show it
    "Patched": "workflow.patched",
    "ScheduleUpdated": None,
    "StepResolved": "step.resolved",
    "SubjectErased": None,
}
# Body fields that hold JSON text in the log and JSON values in a CloudEvent.
_JSON_FIELDS = ("input", "output", "data")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class NotACloudEventError(ValueError):
    """A record that is not a CloudEvent this source can read (the reason is the message)."""


def lifecycle_type(event: Event) -> str | None:
    """The short lifecycle type of ``event`` (``step.completed``), None if internal."""
    body = event.body
    if isinstance(body, StepFailed) and not body.final:
        return "step.retrying"
    return _TYPES.get(body.NAME)


def to_cloudevent(event: Event, topic_prefix: str, type_name: str) -> dict[str, Any]:
    """The structured CloudEvent of one lifecycle event (see the module doc)."""
    data: dict[str, Any] = {"execution_id": event.execution_id, "workflow": event.workflow}
    for name, value in asdict(event.body).items():
        data[name] = _json_value(value) if name in _JSON_FIELDS else value
    return {
        "specversion": SPECVERSION,
        "id": event.event_id,
        "source": f"ploy/{topic_prefix}",
        "type": CLOUDEVENTS_TYPE_PREFIX + type_name,
        "subject": event.execution_id,
        "time": rfc3339(event.timestamp),
        "datacontenttype": "application/json",
        "data": data,
    }


def encode(cloudevent: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, the body of a record or a webhook request."""
    return utf8(json.dumps(cloudevent, separators=(",", ":"), ensure_ascii=False))


def utf8(text: str) -> bytes:
    """``text`` as UTF-8, whatever it holds: a lone surrogate becomes U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", text).encode()


def rfc3339(ms: int) -> str:
    """Epoch milliseconds as RFC 3339 UTC with milliseconds: ``2025-01-31T12:00:00.123Z``."""
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _json_value(text: object) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # kept as text: a sink publishes every event
        return text


# -- in: a Kafka record as a CloudEvent ---------------------------------------------------------


def header_map(headers: object) -> dict[str, str]:
    """Kafka headers (a list of ``(key, bytes)``) as text, keys lowercased.

    The last of a repeated header wins.
    """
    out: dict[str, str] = {}
    for key, value in headers if isinstance(headers, list) else []:
        raw = value.encode() if isinstance(value, str) else (value or b"")
        out[str(key).lower()] = raw.decode("utf-8", errors="replace")
    return out


def data_of(value: bytes | None, headers: dict[str, str]) -> Any:
    """The ``data`` of the CloudEvent in a Kafka record, as a JSON value (see :func:`event_of`)."""
    return event_of(value, headers)[1]


def event_of(value: bytes | None, headers: dict[str, str]) -> tuple[dict[str, Any], Any]:
    """The attributes (``id``, ``source``, ``type``, ...) and the ``data`` of the CloudEvent
    in a Kafka record, the data as a JSON value.

    Binary mode when a ``ce_specversion`` header is present; structured mode
    when the content type is ``application/cloudevents+json`` or the value is
    a JSON object with ``specversion``.

    Raises:
        NotACloudEventError: With the reason (missing attribute, data that is
            not JSON, wrong spec version).
    """
    if "ce_specversion" in headers:
        attributes = {k[3:]: v for k, v in headers.items() if k.startswith("ce_")}
        _check(attributes, "header ce_")
        content_type = headers.get("content-type", "application/json")
        if not _is_json(content_type):
            raise NotACloudEventError(f"binary-mode data of content type '{content_type}' "
                                      "is not JSON")
        return attributes, _parse(value, "binary-mode data")
    content_type = headers.get("content-type", "")
    event = _parse(value, "structured-mode CloudEvent")
    if not isinstance(event, dict) or (
            "specversion" not in event and not content_type.startswith(CONTENT_TYPE)):
        raise NotACloudEventError("not a CloudEvent: no ce_specversion header and no "
                                  "structured event (a JSON object with specversion)")
    _check(event, "attribute ")
    if "data_base64" in event:
        try:
            raw = base64.b64decode(str(event["data_base64"]), validate=True)
        except (binascii.Error, ValueError):
            raise NotACloudEventError("data_base64 is not base64") from None
        return event, _parse(raw, "data_base64")
    if not _is_json(str(event.get("datacontenttype", "application/json"))):
        raise NotACloudEventError(f"data of content type '{event['datacontenttype']}' "
                                  "is not JSON")
    return event, event.get("data")


def _check(attributes: dict[str, Any], what: str) -> None:
    if attributes.get("specversion") != SPECVERSION:
        raise NotACloudEventError(f"{what}specversion is {attributes.get('specversion')!r}, "
                                  f"not '{SPECVERSION}'")
    missing = [name for name in REQUIRED if not attributes.get(name)]
    if missing:
        raise NotACloudEventError(f"missing CloudEvents {what}{', '.join(missing)}")


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media in ("application/json", "text/json") or media.endswith("+json")


def _parse(value: bytes | None, what: str) -> Any:
    if value is None:
        raise NotACloudEventError(f"{what}: the record has no value")
    try:
        return json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise NotACloudEventError(f"{what} is not JSON: {exc}") from None
