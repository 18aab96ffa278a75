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

    Ploy-Event-Id: <the CloudEvents id, also the body's "id">

Each partition of ``<prefix>.events`` is delivered by the worker that owns
it (:mod:`connectors.sink`). Every outcome is recorded on the sink's journal
topic ``<prefix>.sink.webhook.<hash>.deliveries`` (one partition per events
partition): ``delivered``, ``dead`` (dead-lettered), or ``failed`` with the
attempt count and the next attempt's time. The position committed in Kafka
(:mod:`connectors.positions`) is the partition's first event not settled
yet, with where its journal records begin; the worker that delivers the
partition next reads them and neither repeats a settled event nor forgets
an attempt count or a backoff schedule.

What holds: each event is delivered (a 2xx) once, except a request in
flight when its worker dies or loses the partition before the outcome is
recorded (at most ``CONCURRENCY`` per sink and worker), which is sent again;
a receiver deduplicates by ``Ploy-Event-Id`` (the CloudEvents ``id``), as
Stripe- and Svix-style receivers do. A dead letter repeats only if the
worker dies between its acknowledgement and its record. Deliveries of one
sink run up to ``CONCURRENCY`` at a time, so a retried event may arrive
after later ones.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from connectors.cloudevents import CONTENT_TYPE, encode, lifecycle_type, to_cloudevent, utf8
from connectors.kafka import (
    Batch,
    DeadLetter,
    ensure_topic,
    make_producer,
    read_to_end,
    send_dead_letters,
)
from connectors.lifecycle import H_OFFSET, H_PARTITION, mirror_file
from connectors.positions import Mark, SinkPositions
from connectors.sink import SinkThread
from connectors.tail import EventTail
from engine.config import WebhookSink as WebhookSinkConfig

if TYPE_CHECKING:
    from engine.app import Engine

logger = logging.getLogger("ploy.connectors")

SIGNATURE_HEADER = "Ploy-Signature"
EVENT_ID_HEADER = "Ploy-Event-Id"
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
    partition: int = 0  # the event's place in <prefix>.events
    offset: int = 0


DELIVERED, FAILED, DEAD = "delivered", "failed", "dead"


@dataclass
class _Partition:
    """What the sink knows about one events partition it delivers."""

    mark: Mark
    outcomes: dict[int, dict[str, Any]] = field(default_factory=dict)  # offset -> last record
    recorded_at: dict[int, int] = field(default_factory=dict)  # offset -> its journal offset
    journal_end: int = 0  # the journal offset after this partition's last record
    pending: set[int] = field(default_factory=set)  # offsets with a delivery not settled


class WebhookSink(SinkThread):
    """One ``kind: webhook`` sink. Starting a partition:

    1. Load its committed position (first unsettled offset, claim epoch,
       journal mark) and read its journal records from the mark on.
    2. Follow the events partition from the committed offset.

    Each step:

    1. Unless ``MAX_PENDING`` deliveries wait, poll the events topic and add a
       delivery for each selected event (not fenced) that the journal does not
       show settled, with the attempts and schedule it shows.
    2. Settle the requests that finished: a 2xx is ``delivered``; a failure
       schedules the next attempt (``failed``), or after the last one
       dead-letters it (produced and acknowledged first; ``dead``). Record
       the outcomes on the journal and wait for the acknowledgement.
    3. Start the due deliveries, up to ``CONCURRENCY`` in flight.
    4. Commit each partition whose position moved.
    """

    def __init__(self, engine: Engine, sink: WebhookSinkConfig):
        super().__init__()
        self.sink = sink
        self.log = engine.runtime.log
        self.prefix = engine.config.kafka.topic_prefix
        digest = hashlib.sha256(sink.url.encode()).hexdigest()[:12]
        self.name = f"webhook sink {digest}"
        self.positions = SinkPositions(self.log, self.prefix, f"webhook.{digest}",
                                       mirror_file(engine, f"webhook-{digest}.json"))
        self.journal_topic = f"{self.prefix}.sink.webhook.{digest}.deliveries"
        self.pending: dict[str, Delivery] = {}
        self.parts: dict[int, _Partition] = {}
        self.dead_letter_topic = sink.dead_letter_topic or f"{self.prefix}.webhooks.dlq"
        self.delivered = 0
        self.dead_lettered = 0
        self._in_flight: dict[str, Future[str | None]] = {}
        self._dlq_ready = False

    def setup(self) -> None:
        self.journal_partitions = ensure_topic(self.log, self.journal_topic, self.log.partitions)
        self.positions.setup()
        self.producer = make_producer(self.log)
        self.pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix=f"ploy-{self.name}")
        self.tail = EventTail(self.log, f"sink.webhook.{self.name.rsplit(' ', 1)[1]}")

    # -- partitions ----------------------------------------------------------------------------

    def start_partition(self, partition: int) -> None:
        # Step 1.
        mark = self.positions.load(partition)
        part = _Partition(mark, journal_end=mark.scan)
        for at, headers, value in read_to_end(self.log, self.journal_topic,
                                              partition % self.journal_partitions, mark.scan):
            part.journal_end = at + 1
            if headers.get(H_PARTITION) != str(partition).encode() or value is None:
                continue
            try:
                outcome = json.loads(value)
                offset = int(outcome["offset"])
            except (ValueError, KeyError, TypeError):
                continue
            if offset >= mark.offset:
                part.outcomes[offset], part.recorded_at[offset] = outcome, at
        # Step 2.
        self.parts[partition] = part
        self.tail.add(partition, mark.offset, mark.epoch)

    def stop_partition(self, partition: int) -> None:
        """Let the partition's requests finish and record them; forget the rest (the
        journal and the committed position have it)."""
        outcomes = []
        for delivery_id, future in list(self._in_flight.items()):
            delivery = self.pending[delivery_id]
            if delivery.partition == partition:
                del self._in_flight[delivery_id]
                outcomes.append((delivery, _result(future, self.sink.timeout_s + 1)))
        self._settle(outcomes)
        self._commit(partition)
        for delivery in [d for d in self.pending.values() if d.partition == partition]:
            del self.pending[delivery.id]
        self.parts.pop(partition, None)
        self.tail.remove(partition)

    # -- the step ------------------------------------------------------------------------------

    def step(self) -> None:
        # Step 1.
        if len(self.pending) < MAX_PENDING:
            self._read(self._poll_timeout())
        else:
            time.sleep(self._poll_timeout())
        # Step 2.
        finished = []
        for delivery_id, future in list(self._in_flight.items()):
            if future.done():
                del self._in_flight[delivery_id]
                finished.append((self.pending[delivery_id], future.result()))
        self._settle(finished)
        # Step 3.
        now = _now_ms()
        for delivery in sorted(self.pending.values(), key=lambda d: d.next_at):
            if len(self._in_flight) >= CONCURRENCY or delivery.next_at > now:
                break
            if delivery.id not in self._in_flight:
                self._in_flight[delivery.id] = self.pool.submit(self._post, delivery)
        # Step 4.
        for partition in list(self.parts):
            self._commit(partition)

    def _poll_timeout(self) -> float:
        if self._in_flight:
            return 0.02
        due = min((d.next_at for d in self.pending.values()), default=None)
        if due is None:
            return 0.2
        return min(max((due - _now_ms()) / 1000, 0.01), 0.2)

    def _read(self, timeout_s: float) -> None:
        dead: list[tuple[Delivery, str | None]] = []
        for record in self.tail.poll(timeout_s):
            event = record.event
            type_name = None if record.fenced else lifecycle_type(event)
            if type_name is None or not self.sink.selects(event.workflow, type_name):
                continue
            part = self.parts[record.partition]
            outcome = part.outcomes.get(record.offset, {})
            if event.event_id in self.pending or outcome.get("state") in (DELIVERED, DEAD):
                continue
            delivery = Delivery(event.event_id, event.execution_id, "",
                                attempts=int(outcome.get("attempts", 0)),
                                next_at=int(outcome.get("next_at", 0)),
                                last_error=outcome.get("error"),
                                partition=record.partition, offset=record.offset)
            try:
                delivery.body = encode(to_cloudevent(event, self.prefix, type_name)).decode()
            except Exception as exc:  # this event's own trouble: encode is total, a last guard
                dead.append((delivery, f"{type(exc).__name__}: {exc}"))
            self.pending[delivery.id] = delivery
            part.pending.add(delivery.offset)
        self._settle(dead, give_up=True)

    def _post(self, delivery: Delivery) -> str | None:
        """One attempt; the error as text, or None when the receiver took it (2xx)."""
        body = utf8(delivery.body)
        request = urllib.request.Request(self.sink.url, data=body, method="POST", headers={  # noqa: S310 - http(s) only, checked by the config
            "Content-Type": CONTENT_TYPE,
            SIGNATURE_HEADER: sign(self.sink.secret, body, int(time.time())),
            ATTEMPT_HEADER: str(delivery.attempts + 1),
            EVENT_ID_HEADER: delivery.id,
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

    def _settle(self, finished: list[tuple[Delivery, str | None]], *,
                give_up: bool = False) -> None:
        """Record the outcome of finished attempts, then act on them once recorded.

        1. Decide each outcome: delivered, failed (next attempt scheduled), or
           dead (after the last attempt, or at once with ``give_up``).
        2. Dead-letter the dead ones (acknowledged).
        3. Record every outcome on the journal (acknowledged).
        4. Drop the settled deliveries; keep the attempt count of the others.
        A failure before 4 changes nothing here: the step fails, the sink
        starts its partitions afresh from what is committed and recorded.
        """
        if not finished:
            return
        # Step 1.
        outcomes = [(delivery, self._outcome(delivery, error, give_up))
                    for delivery, error in finished]
        # Step 2.
        for delivery, outcome in outcomes:
            if outcome["state"] == DEAD:
                self._dead_letter(delivery, outcome["attempts"], outcome["error"])
        # Step 3.
        batch = Batch(self.producer, self.name)
        for delivery, outcome in outcomes:
            batch.produce(self.journal_topic, json.dumps(outcome).encode(),
                          delivery.id.encode(), tag=(delivery, outcome),
                          partition=delivery.partition % self.journal_partitions,
                          headers=[(H_PARTITION, str(delivery.partition).encode()),
                                   (H_OFFSET, str(delivery.offset).encode())])
        batch.wait()
        # Step 4.
        for (delivery, outcome), _, at in batch.acked:
            part = self.parts.get(delivery.partition)
            if part is not None:
                part.outcomes[delivery.offset], part.recorded_at[delivery.offset] = outcome, at
                part.journal_end = max(part.journal_end, at + 1)
            if outcome["state"] == FAILED:
                delivery.attempts, delivery.next_at = outcome["attempts"], outcome["next_at"]
                delivery.last_error = outcome["error"]
                continue
            self.pending.pop(delivery.id, None)
            if part is not None:
                part.pending.discard(delivery.offset)
            if outcome["state"] == DELIVERED:
                self.delivered += 1
            else:
                self.dead_lettered += 1

    def _outcome(self, delivery: Delivery, error: str | None, give_up: bool) -> dict[str, Any]:
        attempts = delivery.attempts + (0 if give_up else 1)
        outcome: dict[str, Any] = {"id": delivery.id, "offset": delivery.offset,
                                   "attempts": attempts, "error": error}
        if error is None:
            outcome["state"] = DELIVERED
        elif give_up or attempts >= self.sink.max_attempts:
            outcome["state"] = DEAD
        else:
            backoff = self.sink.backoff
            wait_ms = min(backoff.initial_ms * backoff.multiplier ** (attempts - 1),
                          backoff.max_ms)
            outcome.update(state=FAILED, next_at=_now_ms() + int(wait_ms))
            logger.info("%s: attempt %d of event %s failed (%s); next in %d ms", self.name,
                        attempts, delivery.id, error, wait_ms)
        return outcome

    def _commit(self, partition: int) -> None:
        """Commit the partition's first unsettled offset and where its journal records begin."""
        part = self.parts.get(partition)
        if part is None:
            return
        offset = min(part.pending, default=self.tail.position.offsets.get(partition, 0))
        needed = [at for o, at in part.recorded_at.items() if o >= offset]
        mark = Mark(offset, self.tail.epoch_at(partition, offset),
                    min(needed, default=part.journal_end))
        if mark == part.mark:
            return
        self.positions.commit(partition, mark)
        part.mark = mark
        for o in [o for o in part.outcomes if o < offset]:
            del part.outcomes[o]
            part.recorded_at.pop(o, None)
        self.tail.forget_before(partition, offset)

    def _dead_letter(self, delivery: Delivery, attempts: int, error: str | None) -> None:
        if not self._dlq_ready:
            ensure_topic(self.log, self.dead_letter_topic, 1)
            self._dlq_ready = True
        send_dead_letters(self.producer, self.name, self.dead_letter_topic, [DeadLetter(
            delivery.execution_id.encode(), utf8(delivery.body) if delivery.body else None, [
                ("content-type", CONTENT_TYPE.encode()),
                ("ploy.error", utf8(error or "")),
                ("ploy.event_id", delivery.id.encode()),
                ("ploy.webhook.url", utf8(self.sink.url)),
                ("ploy.attempts", str(attempts).encode()),
                (H_PARTITION, str(delivery.partition).encode()),
                (H_OFFSET, str(delivery.offset).encode()),
            ])])
        logger.warning("%s: event %s dead-lettered to %s after %d attempts: %s", self.name,
                       delivery.id, self.dead_letter_topic, attempts, error)

    def recover(self) -> None:
        """Start every partition afresh from what is committed and recorded; requests in
        flight finish first (unrecorded, they are sent again)."""
        for future in self._in_flight.values():
            _result(future, self.sink.timeout_s + 1)
        self._in_flight.clear()
        self.pending.clear()
        for partition in list(self.parts):
            self.tail.remove(partition)
        self.parts.clear()
        self.started.clear()

    def idle(self) -> bool:
        return not self._in_flight

    def finish(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.producer.flush(10)
        self.positions.close()


def _result(future: Future[str | None], timeout_s: float) -> str | None:
    try:
        return future.result(timeout=timeout_s)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
