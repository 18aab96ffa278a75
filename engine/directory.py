"""Where each partition's owner answers queries: worker cards on a compacted topic.

A worker keeps the state of the partitions it owns only, so a query about an
execution on another partition goes to that partition's owner. Each running
worker publishes a *card* to ``<prefix>.workers`` (compacted, keyed by worker
id): its engine API address and the partitions it folds with the claim epoch
its view holds (those it owns, one it is handing off until the release, one
it is taking over, every one on a standby). Every process reads the topic and
asks the cards that fold P, highest epoch first (a crashed worker's card
keeps its old epochs, so the worker that claimed over it comes first, and an
unreachable one is skipped). The claims on the events
log stay the authority for who may *write*; a card is only where to *ask*, and
an owner that no longer folds P answers 409, after which the asker looks again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import urllib.parse
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

from engine.errors import CommandError, OwnerUnavailableError
from engine.log import EventLog, client_config

logger = logging.getLogger("ploy.runtime")

RETRY_S = 10.0  # how long a query keeps looking for a partition's owner (a move)


class Directory:
    """Reads every worker's card; publishes this process's own."""

    def __init__(self, log: EventLog, worker_id: str, token: str | None = None):
        self.log, self.worker_id, self.token = log, worker_id, token
        self.topic = log.topic.removesuffix(".events") + ".workers"
        self.cards: dict[str, dict[str, Any]] = {}
        self.url: str | None = None
        self._producer: Producer | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._changed = threading.Condition()

    def start(self) -> None:
        """Create the topic if needed and follow it from its start."""
        admin = self.log.admin()
        config = {"cleanup.policy": "compact", "retention.ms": "-1"}
        future = admin.create_topics([NewTopic(self.topic, 1, 1, config=config)])[self.topic]
        try:
            future.result(self.log.connect_timeout_s)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        self._producer = Producer({**client_config(self.log.bootstrap_servers, self.log.extra),
                                   "linger.ms": 0})
        self._thread = threading.Thread(target=self._read, name="ploy-directory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._producer is not None:
            self._producer.flush(5)

    # -- this worker's card ------------------------------------------------------------

    def publish(self, folded: dict[int, int], *, alive: bool = True) -> None:
        """Say which partitions this process folds (partition -> claim epoch in its view)
        and where it answers queries about them."""
        if self._producer is None:
            return
        card = {"worker": self.worker_id, "url": self.url, "alive": alive,
                "partitions": {str(p): e for p, e in sorted(folded.items())},
                "at": int(time.time() * 1000)}
        self._producer.produce(self.topic, key=self.worker_id.encode(),
                               value=json.dumps(card).encode())
        self._producer.poll(0)  # sent in the background: the event loop never waits on it

    # -- everyone's cards ----------------------------------------------------------------

    def _read(self) -> None:
        consumer = self.log.consumer(None)
        consumer.assign([TopicPartition(self.topic, 0, 0)])
        try:
            while not self._stop.is_set():
                msg = consumer.poll(0.1)
                value = None if msg is None or msg.error() is not None else msg.value()
                if value is None:
                    continue
                try:
                    card = json.loads(value)
                except ValueError:
                    continue
                with self._changed:
                    self.cards[card["worker"]] = card
                    self._changed.notify_all()
        finally:
            consumer.close()

    def candidates(self, partition: int) -> list[dict[str, Any]]:
        """Cards of the live workers that fold ``partition``, highest claim epoch first
        (then the newest card): the owner, then a worker taking it over or a standby."""
        found = [c for c in list(self.cards.values())
                 if c.get("alive") and str(partition) in c["partitions"]]
        return sorted(found, key=lambda c: (c["partitions"][str(partition)], c["at"]),
                      reverse=True)

    def owner(self, partition: int) -> dict[str, Any] | None:
        """The card of the worker that holds ``partition`` at the highest epoch, if any."""
        found = self.candidates(partition)
        return found[0] if found else None

    def owners(self) -> dict[int, dict[str, Any]]:
        """Partition -> owner card, for every partition that has one."""
        found = {}
        for p in range(self.log.partitions):
            card = self.owner(p)
            if card is not None:
                found[p] = card
        return found

    # -- asking an owner ---------------------------------------------------------------

    async def ask(self, partition: int, path: str, params: dict[str, Any],
                  timeout_s: float = 10.0) -> tuple[int, Any]:
        """GET ``path`` of the engine API at the owner of ``partition``: (status, body).

        Keeps looking for the owner (a move in progress) for up to ``RETRY_S``;
        an owner that answers 409 ("not folded here") is a stale card.
        """
        from engine.client import ApiClient  # the CLI's stdlib client; imports engine.http

        deadline = time.monotonic() + RETRY_S
        query = "?" + urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        last = "no worker has claimed it"
        while True:
            for card in self.candidates(partition):
                if not card.get("url"):
                    last = f"its owner {card['worker']} serves no engine API"
                    continue
                client = ApiClient(card["url"], self.token, timeout_s=timeout_s)
                try:
                    status, payload = await asyncio.to_thread(client.call, "GET", path + query)
                except CommandError as exc:
                    last = str(exc)  # a crashed worker's card: try the next one
                    continue
                if status != 409:
                    return status, payload
                last = f"{card['worker']} no longer folds it"
            if time.monotonic() > deadline:
                raise OwnerUnavailableError(partition, last)
            await asyncio.sleep(0.1)
