"""Sink: execution lifecycle -> HTTP POSTs of signed CloudEvents JSON.

``sinks: [{kind: webhook, url: https://..., secret: ..., types: [workflow.completed]}]``

Each selected event is POSTed as one structured CloudEvent (body as in
:mod:`connectors.cloudevents`, ``Content-Type: application/cloudevents+json``)
with the headers:

    Ploy-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>
    Ploy-Delivery-Attempt: <1, 2, ...>

A receiver recomputes the HMAC over the timestamp and the raw body, compares
in constant time and refuses old timestamps (replay): :func:`verify_signature`
does all three. A 2xx answer is a delivery; anything else (an error status, a
refused connection, a timeout) is a failed attempt, retried after
``backoff.initial * multiplier**(n-1)`` capped at ``backoff.max``. After
``max_attempts`` the request goes to the dead-letter topic
(``<prefix>.webhooks.dlq`` unless ``dead_letter_topic`` is set): value = the
body, key = the execution id, headers ``ploy.error``, ``ploy.webhook.url``,
``ploy.attempts``. An event that cannot become a request body goes there at
once (attempts 0), and a body the dead-letter topic refuses (too large) goes
without its value (``ploy.value.dropped`` says why): no event holds the sink.

Pending deliveries (body, attempts, next attempt time) and the position in
the log are saved together in the state directory, so a restart during a
backoff keeps the schedule and the attempt count. Delivery is at least once
(the same CloudEvents ``id`` each time); deliveries of one sink run up to
``CONCURRENCY`` at a time, so a retried event may arrive after later ones.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from connectors.cloudevents import CONTENT_TYPE, encode, lifecycle_type, to_cloudevent, utf8
from connectors.kafka import DeadLetter, ensure_topic, make_producer, send_dead_letters
from connectors.lifecycle import load_position, position_doc
from connectors.sink import SinkThread
from connectors.state import StateFile, connectors_dir
from connectors.tail import EventTail
from engine.config import WebhookSink as WebhookSinkConfig

if TYPE_CHECKING:
    from engine.app import Engine

logger = logging.getLogger("ploy.connectors")

SIGNATURE_HEADER = "Ploy-Signature"
ATTEMPT_HEADER = "Ploy-Delivery-Attempt"
CONCURRENCY = 4
MAX_PENDING = 10_000  # stop reading the log while this many deliveries wait
USER_AGENT = "ploy-engine-webhooks/1"


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not a delivery: urllib would turn the POST into a GET."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``Ploy-Signature`` header value for ``body`` sent at ``timestamp`` (unix s)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(secret: str, header: str | None, body: bytes, *,
                     tolerance_s: int = 300, now: float | None = None) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` within ``tolerance_s`` of ``now``.

    For receivers: pass the raw request body, before any JSON parsing.
    """
    if not header:
        return False
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(parts.get("t", ""))
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


@dataclass
class Delivery:
    """One event for one URL, until the receiver accepts it or it is dead-lettered."""

    id: str
    execution_id: str
    body: str
    attempts: int = 0
    next_at: int = 0  # epoch ms
    last_error: str | None = None


class WebhookSink(SinkThread):
    """One ``kind: webhook`` sink. Each step:

    1. Unless ``MAX_PENDING`` deliveries wait, poll the events topic and add a
       delivery for each selected event (not fenced).
    2. Settle the requests that finished: a 2xx drops the delivery; a failure
       schedules the next attempt, or after the last one dead-letters it
       (produced and acknowledged first).
    3. Start the due deliveries, up to ``CONCURRENCY`` in flight.
    4. Save position and pending deliveries together, if anything changed.
    """

    def __init__(self, engine: Engine, sink: WebhookSinkConfig):
        super().__init__()
        self.sink = sink
        self.log = engine.runtime.log
        self.prefix = engine.config.kafka.topic_prefix
        digest = hashlib.sha256(sink.url.encode()).hexdigest()[:12]
        self.name = f"webhook sink {digest}"
        self.state = StateFile(connectors_dir(engine.config) / f"webhook-{digest}.json")
        saved = self.state.load()
        self.saved = load_position(self.state)
        self.pending = {d["id"]: Delivery(**d) for d in saved.get("pending", [])}
        self.dead_letter_topic = sink.dead_letter_topic or f"{self.prefix}.webhooks.dlq"
        self.delivered = 0
        self.dead_lettered = 0
        self._in_flight: dict[str, Future[str | None]] = {}
        self._dirty = False
        self._dlq_ready = False

    def setup(self) -> None:
        self.producer = make_producer(self.log)
        self.pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix=f"ploy-{self.name}")
        self.tail = EventTail(self.log, f"sink.webhook.{self.name.rsplit(' ', 1)[1]}",
                              self.saved)

    def step(self) -> None:
        # Step 1.
        if len(self.pending) < MAX_PENDING:
            self._read(self._poll_timeout())
        else:
            time.sleep(self._poll_timeout())
        # Step 2.
        for delivery_id, future in list(self._in_flight.items()):
            if future.done():
                del self._in_flight[delivery_id]
                self._settle(self.pending[delivery_id], future.result())
        # Step 3.
        now = _now_ms()
        for delivery in sorted(self.pending.values(), key=lambda d: d.next_at):
            if len(self._in_flight) >= CONCURRENCY or delivery.next_at > now:
                break
            if delivery.id not in self._in_flight:
                self._in_flight[delivery.id] = self.pool.submit(self._post, delivery)
        # Step 4.
        self._save()

    def _poll_timeout(self) -> float:
        if self._in_flight:
            return 0.02
        due = min((d.next_at for d in self.pending.values()), default=None)
        if due is None:
            return 0.2
        return min(max((due - _now_ms()) / 1000, 0.01), 0.2)

    def _read(self, timeout_s: float) -> None:
        for record in self.tail.poll(timeout_s):
            event = record.event
            type_name = None if record.fenced else lifecycle_type(event)
            if type_name is None or not self.sink.selects(event.workflow, type_name):
                continue
            if event.event_id in self.pending:
                continue
            try:
                body = encode(to_cloudevent(event, self.prefix, type_name)).decode()
            except Exception as exc:  # this event's own trouble: encode is total, a last guard
                self._dead_letter(Delivery(event.event_id, event.execution_id, "",
                                           last_error=f"{type(exc).__name__}: {exc}"))
                self.dead_lettered += 1
                continue
            self.pending[event.event_id] = Delivery(event.event_id, event.execution_id, body)
        if self.tail.position != self.saved:
            self._dirty = True

    def _post(self, delivery: Delivery) -> str | None:
        """One attempt; the error as text, or None when the receiver took it (2xx)."""
        body = utf8(delivery.body)
        request = urllib.request.Request(self.sink.url, data=body, method="POST", headers={  # noqa: S310 - http(s) only, checked by the config
            "Content-Type": CONTENT_TYPE,
            SIGNATURE_HEADER: sign(self.sink.secret, body, int(time.time())),
            ATTEMPT_HEADER: str(delivery.attempts + 1),
            "User-Agent": USER_AGENT,
        })
        try:
            with _OPENER.open(request, timeout=self.sink.timeout_s) as answer:
                status = int(answer.status)
                answer.read(65536)
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return f"{type(exc).__name__}: {reason}"
        return None if 200 <= status < 300 else f"HTTP {status}"

    def _settle(self, delivery: Delivery, error: str | None) -> None:
        self._dirty = True
        if error is None:
            del self.pending[delivery.id]
            self.delivered += 1
            return
        delivery.attempts += 1
        delivery.last_error = error
        if delivery.attempts >= self.sink.max_attempts:
            self._dead_letter(delivery)
            del self.pending[delivery.id]
            self.dead_lettered += 1
            return
        backoff = self.sink.backoff
        wait_ms = min(backoff.initial_ms * backoff.multiplier ** (delivery.attempts - 1),
                      backoff.max_ms)
        delivery.next_at = _now_ms() + int(wait_ms)
        logger.info("%s: attempt %d of event %s failed (%s); next in %d ms", self.name,
                    delivery.attempts, delivery.id, error, wait_ms)

    def _dead_letter(self, delivery: Delivery) -> None:
        if not self._dlq_ready:
            ensure_topic(self.log, self.dead_letter_topic, 1)
            self._dlq_ready = True
        send_dead_letters(self.producer, self.name, self.dead_letter_topic, [DeadLetter(
            delivery.execution_id.encode(), utf8(delivery.body) if delivery.body else None, [
                ("content-type", CONTENT_TYPE.encode()),
                ("ploy.error", utf8(delivery.last_error or "")),
                ("ploy.event_id", delivery.id.encode()),
                ("ploy.webhook.url", utf8(self.sink.url)),
                ("ploy.attempts", str(delivery.attempts).encode()),
            ])])
        logger.warning("%s: event %s dead-lettered to %s after %d attempts: %s", self.name,
                       delivery.id, self.dead_letter_topic, delivery.attempts,
                       delivery.last_error)

    def _save(self) -> None:
        if not self._dirty:
            return
        doc: dict[str, Any] = position_doc(self.tail.position)
        doc["url"] = self.sink.url
        doc["pending"] = [asdict(d) for d in self.pending.values()]
        self.state.save(doc)
        self.saved = self.tail.position.copy()
        self._dirty = False

    def recover(self) -> None:
        """Read again from the saved position (deliveries are keyed by event id: no doubles)."""
        self.tail.rewind(self.saved)

    def idle(self) -> bool:
        return not self._in_flight

    def finish(self) -> None:
        for delivery_id, future in list(self._in_flight.items()):
            try:
                error = future.result(timeout=self.sink.timeout_s + 1)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            self._settle(self.pending[delivery_id], error)
        self._in_flight.clear()
        self._save()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.producer.flush(10)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
