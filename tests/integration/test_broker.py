"""The embedded broker: a real Kafka round trip, bounded waits, a clean stop."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

import engine.broker
from engine.broker import EmbeddedBroker, wait_for_kafka
from engine.errors import BrokerUnavailableError

QUIET = {"log_level": 0}


def closed_port() -> int:
    """A loopback port that nothing listens on (free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_produce_and_consume_round_trip(kafka: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}.events"
    admin = AdminClient({"bootstrap.servers": kafka, **QUIET})
    for future in admin.create_topics([NewTopic(topic, num_partitions=3)]).values():
        future.result(timeout=10)

    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    producer = Producer(
        {"bootstrap.servers": kafka, "acks": "all", "enable.idempotence": True, **QUIET}
    )
    sent = [(f"exec-{i % 4}".encode(), f"event-{i}".encode()) for i in range(20)]
    for key, value in sent:
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(10) == 0
    assert errors == []

    consumer = Consumer(
        {
            "bootstrap.servers": kafka,
            "group.id": topic_prefix,
            "enable.auto.commit": False,
            **QUIET,
        }
    )
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(3)])
        received: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + 15
        while len(received) < len(sent) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            got_key, got_value = msg.key(), msg.value()
            assert got_key is not None and got_value is not None
            received.append((got_key, got_value))
    finally:
        consumer.close()

    assert sorted(received) == sorted(sent)
    # One key lands on one partition, so each key's events come back in order.
    for key in {k for k, _ in sent}:
        assert [v for k, v in received if k == key] == [v for k, v in sent if k == key]


def test_wait_for_kafka_gives_up_in_bounded_time(capfd: pytest.CaptureFixture[str]) -> None:
    servers = f"127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError) as raised:
        wait_for_kafka(servers, timeout_s=2)
    elapsed = time.monotonic() - started

    assert 1.9 <= elapsed < 6
    assert servers in str(raised.value)
    assert raised.value.servers == servers
    # librdkafka's connection-refused lines would land on stderr if not silenced.
    assert "FAIL" not in capfd.readouterr().err


def test_wait_for_kafka_returns_when_broker_answers(kafka: str) -> None:
    wait_for_kafka(kafka, timeout_s=5)


def test_stop_kills_the_process_and_frees_the_port(tmp_path: Path) -> None:
    broker = EmbeddedBroker(log_dir=tmp_path)
    with broker:
        pid, port = broker.pid, broker.port
        assert broker.bootstrap_servers == f"127.0.0.1:{port}"
        assert broker.running

    assert not broker.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # would raise EADDRINUSE if still held
    broker.stop()  # idempotent
    assert broker.log_path is not None and "listening on" in broker.log_path.read_text()


def test_pinned_busy_port_fails_with_the_broker_log(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = EmbeddedBroker(port, log_dir=tmp_path, start_timeout_s=5)
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError) as raised:
            broker.start()

    assert time.monotonic() - started < 5
    assert f"127.0.0.1:{port}" in str(raised.value)
    assert "address in use" in str(raised.value).lower()
    assert not broker.running


def test_start_moves_to_another_port_when_the_picked_one_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        picks = iter([busy, closed_port()])
        monkeypatch.setattr(engine.broker, "_free_port", lambda: next(picks))
        with EmbeddedBroker() as broker:
            assert broker.port != busy
            wait_for_kafka(broker.bootstrap_servers, timeout_s=5)
