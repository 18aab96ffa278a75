"""Print the lifecycle topic as another team would read it: a plain consumer, JSON values.

    python examples/connectors/consume.py BOOTSTRAP_SERVERS [TOPIC]

Each record is a CloudEvent (``application/cloudevents+json``) keyed by
execution id; ``id`` is stable, so a consumer deduplicates on it.
"""

from __future__ import annotations

import json
import sys
import uuid

from confluent_kafka import Consumer


def main() -> None:
    servers = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9092"
    topic = sys.argv[2] if len(sys.argv) > 2 else "ploy.lifecycle"
    consumer = Consumer({"bootstrap.servers": servers, "group.id": f"demo-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "session.timeout.ms": 6000,
                         "heartbeat.interval.ms": 500})
    consumer.subscribe([topic])
    seen: set[str] = set()
    try:
        while True:
            msg = consumer.poll(1.0)
            if msg is None or msg.error() is not None:
                continue
            event = json.loads(msg.value() or b"{}")
            if event["id"] in seen:  # at-least-once: skip a repeat
                continue
            seen.add(event["id"])
            print(f"{event['time']}  {event['subject'][:12]}  {event['type']}")
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


if __name__ == "__main__":
    main()
