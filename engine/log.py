"""The Kafka log: append events (acknowledged), read them back, manage the topic.

Every event of an execution goes to one partition, chosen here with Kafka's
own murmur2 partitioner over the execution id, so any process (and a Java or
Go client) computes the same partition for an id without asking anyone.

Producer settings that the engine controls: ``enable.idempotence`` and
``acks=all`` (an acknowledged event is durable and the order of one partition
is kept even for appends that nobody waits for), and ``linger.ms=0``: a step
waits on its completion's acknowledgement, so any linger is added to every
step; under load, records still batch while earlier requests are in flight.
By default (``kafka.config`` may change it) the producer's sockets send at once
(``socket.nagle.disable``): an append after an idle moment, alternating five
rounds of 40 each, 0.91-1.04 ms p50 against 0.96-1.12 ms with Nagle's algorithm.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from engine.codec import Codec, default_codec
from engine.errors import AppendError, BrokerUnavailableError
from engine.events import Event

logger = logging.getLogger("ploy.kafka")

# (partition, offset, value) of acknowledged appends, in the order of each partition.
Acks = list[tuple[int, int, bytes]]
# wake(loop, then): wake each event loop to resolve its appends; on ``loop``, run ``then``
# after them. ``on_acked(acks, wake)`` must call it once (or the poll calls it).
Wake = Callable[[asyncio.AbstractEventLoop | None, Callable[[], None] | None], None]

# Events of one execution appended together (send_all) up to this size each go as one
# produce_batch: one record batch, well under any broker's message and batch limits.
BATCH_RECORD_BYTES = 64 * 1024
PRODUCER_DEFAULTS = {"linger.ms": 0, "compression.type": "none", "socket.nagle.disable": True}
PRODUCER_FIXED = {"enable.idempotence": True, "acks": "all"}
CONSUMER_DEFAULTS = {"fetch.wait.max.ms": 10, "fetch.min.bytes": 1}
CONSUMER_FIXED = {"enable.auto.commit": False, "auto.offset.reset": "earliest"}


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (as in the Java client's default partitioner)."""
    length = len(data)
    m, r = 0x5BD1E995, 24
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = length & ~3
    extra = length % 4
    if extra >= 3:
        h ^= data[tail + 2] << 16
    if extra >= 2:
        h ^= data[tail + 1] << 8
    if extra >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


@functools.lru_cache(maxsize=1 << 16)
def partition_for(execution_id: str, partitions: int) -> int:
    """The partition of every event of ``execution_id`` (Kafka's default for a key).

    Memoized: murmur2 in Python costs ~7 us, and every append, epoch lookup
    and query asks again for the same few thousand live executions.
    """
    return (murmur2(execution_id.encode()) & 0x7FFFFFFF) % partitions


def client_config(bootstrap_servers: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Settings shared by every client: the servers, user extras, quiet logging."""
    return {"bootstrap.servers": bootstrap_servers, **(extra or {}), "logger": logger}


class EventLog:
    """Appends to and reads from ``<prefix>.events``.

    A background thread serves the producer's delivery callbacks. What one
    poll of the producer acknowledged is handed on together, with one wake-up of
    each event loop: the awaiting coroutines are resolved, and the appends go to
    ``on_acked`` (the fold of this process's own appends, ``engine.partitions``),
    which folds them on the loop without a fetch from the broker.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic_prefix: str = "ploy",
        partitions: int = 6,
        *,
        extra: Mapping[str, Any] | None = None,
        connect_timeout_s: float = 10.0,
        replication_factor: int = 1,
        codec: Codec | None = None,
    ):
        self.bootstrap_servers = bootstrap_servers
        self.topic = f"{topic_prefix}.events"
        self.extra = dict(extra or {})
        self.codec = codec or default_codec()
        self.connect_timeout_s = connect_timeout_s
        self.partitions = self.ensure_topic(partitions, replication_factor)
        self.high_acked: dict[int, int] = {}
        limit = int(self.extra.get("message.max.bytes", 1_000_000))
        self.batch_record_bytes = min(BATCH_RECORD_BYTES, limit // 2)
        self.on_acked: Callable[[Acks, Wake], None] | None = None  # called on the producer's thread
        self._acks: Acks = []  # of the poll under way, on the producer's thread
        # (loop, waiter, err, msg): a future (append) or a _Done (append_from_thread)
        self._settles: list[tuple[asyncio.AbstractEventLoop, Any, Any, Any]] = []
        self._poller_id: int | None = None  # set by the poller thread
        self._producer = Producer({
            **PRODUCER_DEFAULTS,
            **client_config(bootstrap_servers, self.extra),
            **PRODUCER_FIXED,
        })
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="ploy-producer", daemon=True)
        self._poller.start()

    # -- admin -----------------------------------------------------------

    def admin(self) -> AdminClient:
        return AdminClient(client_config(self.bootstrap_servers, self.extra))

    def ensure_topic(self, partitions: int, replication_factor: int = 1) -> int:
        """Create the topic with infinite retention if missing; return its partition count."""
        admin = self.admin()
        existing = self._describe(admin)
        if existing is None:
            config = {"retention.ms": "-1", "retention.bytes": "-1"}
            future = admin.create_topics(
                [NewTopic(self.topic, partitions, replication_factor, config=config)]
            )[self.topic]
            try:
                future.result(self.connect_timeout_s)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
            existing = self._describe(admin) or partitions
        return existing

    def _describe(self, admin: AdminClient) -> int | None:
        try:
            metadata = admin.list_topics(timeout=self.connect_timeout_s)
        except KafkaException as exc:
            raise BrokerUnavailableError(
                self.bootstrap_servers, self.connect_timeout_s, str(exc.args[0])
            ) from None
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            return None
        return len(topic.partitions)

    def partition_for(self, execution_id: str) -> int:
        return partition_for(execution_id, self.partitions)

    # -- append ----------------------------------------------------------

    def _poll(self) -> None:
        """Serve delivery callbacks until closed; a failing callback must not end it.

        The callbacks of one poll only collect (``_in_poll``). Then each event loop
        is woken once, to resolve its waiting appends and run what ``on_acked``
        hands it (the fold of the acknowledged appends). Once: every
        wake-up of another thread lets go of the interpreter lock, and getting it
        back behind a busy event loop costs up to a switch interval (5 ms).
        """
        self._poller_id = threading.get_ident()
        while not self._closed.is_set():
            try:
                self._producer.poll(0.05)
            except Exception:
                logger.exception("a delivery callback failed")
            settles, self._settles = self._settles, []
            acks, self._acks = self._acks, []
            try:
                self._hand_on(settles, acks)
            except Exception:  # never the end of the thread that serves every append
                logger.exception("handing on acknowledgements failed")

    def _hand_on(self, settles: list[Any], acks: Acks) -> None:
        """What one poll acknowledged: to ``on_acked``, then one wake-up per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for loop, *settle in settles:
            by_loop.setdefault(loop, []).append(settle)
        woken = False

        def wake(loop: asyncio.AbstractEventLoop | None,
                 then: Callable[[], None] | None) -> None:
            nonlocal woken
            if loop is not None and then is not None and loop not in by_loop:
                by_loop[loop] = []
            for each, items in by_loop.items():
                with contextlib.suppress(RuntimeError):  # a loop closed meanwhile
                    each.call_soon_threadsafe(_settle_all, items, self.topic,
                                              then if each is loop else None)
            woken = True

        on_acked = self.on_acked
        if acks and on_acked is not None:
            try:
                on_acked(acks, wake)
            except Exception:
                logger.exception("folding acknowledged appends failed (the fetch folds them)")
        if not woken:
            wake(None, None)

    def _in_poll(self) -> bool:
        """Whether this delivery callback runs in the poller thread's poll (not in a
        ``flush`` or a ``poll`` on a full queue elsewhere)."""
        return threading.get_ident() == self._poller_id

    def _produce(self, event: Event, on_delivery: Any, partition: int | None = None,
                 value: bytes | None = None) -> int:
        """Hand one event (``value``: encoded already) to the producer;
        ``on_delivery(err, msg)`` runs on its ack."""
        if partition is None:
            partition = self.partition_for(event.execution_id)
        delivered = self._delivered(on_delivery)
        if value is None:
            value = self.codec.encode(event)
        key = event.execution_id.encode()

        def produce() -> None:
            self._producer.produce(self.topic, value=value, key=key, partition=partition,
                                   on_delivery=delivered)

        try:
            try:
                produce()
            except BufferError:  # the local queue is full: serve acks, then once more
                self._producer.poll(0.1)
                produce()
        except KafkaException as exc:
            raise _refusal(self.topic, exc.args[0]) from None
        except BufferError as exc:
            raise AppendError(self.topic, f"the producer's queue is full: {exc}") from None
        return partition

    def _delivered(self, on_delivery: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        """The delivery callback of every append: the partition's mark, the acks for
        ``on_acked``, then ``on_delivery(err, msg)``."""

        def delivered(err: KafkaError | None, msg: Any) -> None:
            if err is None:
                self._acked(msg.partition(), msg.offset())
                if self.on_acked is not None and self._in_poll():
                    self._acks.append((msg.partition(), msg.offset(), msg.value()))
            on_delivery(err, msg)

        return delivered

    def _acked(self, partition: int, offset: int) -> None:
        """Every acknowledged offset raises the partition's mark (read-your-writes)."""
        if offset > self.high_acked.get(partition, -1):
            self.high_acked[partition] = offset

    async def append(self, event: Event, partition: int | None = None) -> tuple[int, int]:
        """Append and wait for the broker's acknowledgement: (partition, offset).

        ``partition`` is for events of no execution (a partition claim); every
        other event goes to its execution id's partition.
        """
        return await self.send(event, partition)

    def send(self, event: Event, partition: int | None = None) -> asyncio.Future[tuple[int, int]]:
        """Hand ``event`` to the producer now; the future resolves on the acknowledgement
        (to (partition, offset)) or the refusal (AppendError)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, int]] = loop.create_future()
        self._produce(event, self._resolved_on(loop, future), partition)
        return future

    def append_nowait(self, event: Event, partition: int | None = None) -> None:
        """Append without waiting; the partition's order is kept all the same."""
        self._produce(event, _logged(event.type), partition)

    def send_all(self, events: Sequence[tuple[Event, bool]]
                 ) -> list[asyncio.Future[tuple[int, int]] | None]:
        """Append several events of one execution together. For each ``(event, waited)``:
        a future of (partition, offset) or :class:`AppendError` (``waited``), or None (an
        append that nobody waits for: a refusal is logged). An event the producer does
        not take gets a failed future (and, handed over one by one, so does every one
        after it); only one that cannot be encoded raises UnencodableEventError, before
        any is handed over.

        Small events go to the producer in one call (``produce_batch``), one right
        after the other: they normally travel in one record batch, which the broker
        takes or refuses whole, and the idempotent producer keeps them in order and
        retries them together, so the log has a later one without an earlier one (a
        step's completion, say, and the end after it) only if the broker refuses the
        earlier one alone for good, or it expires alone. Larger ones are handed over one
        by one, stopping at the first refusal.
        """
        loop = asyncio.get_running_loop()
        values = [_encoded(self.codec, event) for event, _ in events]
        futures = [loop.create_future() if waited else None for _, waited in events]
        callbacks = [_logged(event.type) if future is None else self._resolved_on(loop, future)
                     for (event, _), future in zip(events, futures, strict=True)]
        partitions = {self.partition_for(event.execution_id) for event, _ in events}
        if len(partitions) == 1 and max(map(len, values)) <= self.batch_record_bytes:
            refused = self._produce_batch(events, values, callbacks, partitions.pop())
        else:
            refused = self._produce_each(events, values, callbacks)
        for i, error in refused:
            future = futures[i] = futures[i] or loop.create_future()
            future.set_exception(error)
        return futures

    def _produce_batch(self, events: Sequence[tuple[Event, bool]], values: list[bytes],
                       callbacks: list[Any], partition: int) -> list[tuple[int, AppendError]]:
        """One ``produce_batch`` call (once more for what a full queue refused, after
        serving acknowledgements); the events it did not take, and why."""
        messages = [{"value": value, "key": event.execution_id.encode(),
                     "callback": self._delivered(callback)}
                    for (event, _), value, callback in zip(events, values, callbacks,
                                                            strict=True)]
        try:
            taken = self._producer.produce_batch(self.topic, messages, partition=partition)
            if taken < len(messages) and _queue_full(messages):
                self._producer.poll(0.1)
                again = [m for m in messages if m.pop("_error", None) is not None]
                self._producer.produce_batch(self.topic, again, partition=partition)
        except KafkaException as exc:
            error = _refusal(self.topic, exc.args[0])
            return [(i, error) for i in range(len(messages))]
        return [(i, _refusal(self.topic, m["_error"]))
                for i, m in enumerate(messages) if m.get("_error") is not None]

    def _produce_each(self, events: Sequence[tuple[Event, bool]], values: list[bytes],
                      callbacks: list[Any]) -> list[tuple[int, AppendError]]:
        """One ``produce`` call each, up to the first refusal: that one and those after it
        (not handed over) are the ones refused."""
        for i, ((event, _), value, callback) in enumerate(
                zip(events, values, callbacks, strict=True)):
            try:
                self._produce(event, callback, None, value)
            except AppendError as exc:
                return [(j, exc) for j in range(i, len(events))]
        return []

    def append_from_thread(self, event: Event, loop: asyncio.AbstractEventLoop,
                           done: Callable[[AppendError | None, int], None]) -> None:
        """Append from any thread without waiting; ``done(error, offset)`` runs on
        ``loop`` once the broker acknowledged (error None) or refused the event, with
        the poll's other acknowledgements (one wake-up of the loop for all)."""
        self._produce(event, self._resolved_on(loop, _Done(done)))

    def _resolved_on(self, loop: asyncio.AbstractEventLoop,
                     waiter: asyncio.Future[tuple[int, int]] | _Done) -> Any:
        """The delivery callback that resolves ``waiter`` on ``loop``: after the poll,
        with its other acknowledgements, when the poller thread serves it."""

        def delivered(err: KafkaError | None, msg: Any) -> None:
            if self._in_poll():
                self._settles.append((loop, waiter, err, msg))
            else:
                with contextlib.suppress(RuntimeError):  # its loop closed meanwhile
                    loop.call_soon_threadsafe(_settle_all, [(waiter, err, msg)], self.topic,
                                              None)

        return delivered

    def append_sync(self, event: Event, timeout_s: float = 30.0,
                    partition: int | None = None) -> tuple[int, int]:
        """Append from synchronous code (CLI, benchmarks) and wait for the ack."""
        done = threading.Event()
        result: list[Any] = []

        def delivered(err: KafkaError | None, msg: Any) -> None:
            result.append((err, msg))
            done.set()

        self._produce(event, delivered, partition)
        if not done.wait(timeout_s):
            raise AppendError(self.topic, f"no acknowledgement within {timeout_s:g} s")
        err, msg = result[0]
        if err is not None:
            raise _refusal(self.topic, err)
        return msg.partition(), msg.offset()

    def flush(self, timeout_s: float = 30.0) -> None:
        self._producer.flush(timeout_s)

    # -- read ------------------------------------------------------------

    def consumer(self, group_id: str | None = None, *, defaults: Any = None,
                 **overrides: Any) -> Consumer:
        """A consumer of the events topic; the caller assigns or subscribes. ``defaults``
        replace ours and give way to the app's own Kafka settings; ``overrides`` do not."""
        return Consumer({
            **CONSUMER_DEFAULTS,
            **(defaults or {}),
            **client_config(self.bootstrap_servers, self.extra),
            "group.id": group_id or f"{self.topic}.reader",
            **overrides,
            **CONSUMER_FIXED,
        })

    def read_until_end(
        self, start: Mapping[int, int], *, stopped: set[int] | None = None, batch: int = 5000
    ) -> Iterator[dict[int, list[tuple[int, bytes]]]]:
        """Batches of ``(offset, value)`` per partition, from ``start`` to each partition's end.

        The end is where the broker's fetch says the partition ends (partition
        EOF), not a ListOffsets answer taken beforehand: the embedded broker
        answers ListOffsets late for batched writes. A partition the caller
        puts in ``stopped`` (a corrupt record) counts as done.
        """
        stopped = stopped if stopped is not None else set()
        consumer = self.consumer(None, **{"enable.partition.eof": True})
        consumer.assign([TopicPartition(self.topic, p, o) for p, o in start.items()])
        at_end: set[int] = set()
        try:
            while not set(start) <= at_end | stopped:
                by_partition: dict[int, list[tuple[int, bytes]]] = {}
                first = consumer.poll(0.2)  # consume(batch, 0.2) alone waits the whole 0.2 s
                for msg in [] if first is None else [first, *consumer.consume(batch - 1, 0)]:
                    err = msg.error()
                    partition = cast(int, msg.partition())
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:  # noqa: SLF001
                            at_end.add(partition)
                        else:
                            logger.warning("reading %s: %s", self.topic, err)
                        continue
                    at_end.discard(partition)
                    by_partition.setdefault(partition, []).append(
                        (cast(int, msg.offset()), cast(bytes, msg.value())))
                if by_partition:
                    yield by_partition
        finally:
            consumer.close()

    def committed(self, group_id: str) -> dict[int, int]:
        """The offsets a consumer group committed on the events topic, by partition."""
        admin = self.admin()  # kept alive until the answer is in
        futures = admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group_id)], request_timeout=self.connect_timeout_s)
        result = futures[group_id].result(self.connect_timeout_s)
        return {tp.partition: tp.offset for tp in result.topic_partitions or []
                if tp.topic == self.topic and tp.offset >= 0}

    def watermarks(self, partition: int) -> tuple[int, int]:
        """(low, high) offsets of a partition, as ListOffsets reports them.

        An estimate for progress and lag: the embedded broker reports the high
        watermark late for batched writes; use :meth:`read_until_end` to read
        everything there is.
        """
        consumer = self.consumer()
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(self.topic, partition), timeout=self.connect_timeout_s
            )
            return int(low), int(high)
        finally:
            consumer.close()

    def close(self) -> None:
        """Flush what is pending, then drop the connection (a broker stop need not wait)."""
        self._producer.flush(10)
        self._closed.set()
        self._poller.join(2)
        if hasattr(self._producer, "close"):  # confluent-kafka >= 2.13
            self._producer.close()


# Errors that refuse the record itself: sending it again gets the same answer.
_REFUSALS = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD,
             KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_MSG_SIZE}


class UnencodableEventError(ValueError):
    """An event with a value its schema cannot hold (a number beyond 64 bits): the
    callers check what users give, so this is a last guard."""

    def __init__(self, event: Event, cause: BaseException):
        self.event = event
        super().__init__(f"{event.type} of execution {event.execution_id} cannot be "
                         f"written to the log: {cause}")


def _encoded(codec: Codec, event: Event) -> bytes:
    try:
        return codec.encode(event)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UnencodableEventError(event, exc) from exc


def _permanent(err: Any) -> bool:
    return isinstance(err, KafkaError) and err.code() in _REFUSALS


def _refusal(topic: str, err: Any) -> AppendError:
    """The AppendError of a Kafka error: permanent if sending the record again cannot help."""
    return AppendError(topic, str(err), _permanent(err))


def _queue_full(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("_error") is not None
               and m["_error"].code() == KafkaError._QUEUE_FULL  # noqa: SLF001
               for m in messages)


def _logged(what: str) -> Callable[[Any, Any], None]:
    """The delivery callback of an append that nobody waits for."""

    def delivered(err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            logger.error("append of %s failed: %s", what, err)

    return delivered


class _Done:
    """A callback awaiting an append from another thread (``append_from_thread``)."""

    __slots__ = ("done",)

    def __init__(self, done: Callable[[AppendError | None, int], None]):
        self.done = done


def _settle_all(items: list[Any], topic: str, then: Callable[[], None] | None) -> None:
    """On the event loop: resolve the appends one poll acknowledged, then run ``then``."""
    for waiter, err, msg in items:
        if isinstance(waiter, _Done):
            try:
                if err is not None:
                    waiter.done(_refusal(topic, err), -1)
                else:
                    waiter.done(None, msg.offset())
            except Exception:
                logger.exception("an append's callback failed")
        else:
            _settle(waiter, err, msg, topic)
    if then is not None:
        then()


def _settle(future: asyncio.Future[tuple[int, int]], err: Any, msg: Any, topic: str) -> None:
    if future.done():
        return
    if err is not None:
        future.set_exception(_refusal(topic, err))
    else:
        future.set_result((msg.partition(), msg.offset()))
