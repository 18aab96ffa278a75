"""Produce example orders onto the source topics, as another team's service would.

    python examples/connectors/produce.py BOOTSTRAP_SERVERS [COUNT]

Plain confluent-kafka, no ploy import: COUNT JSON orders and one invalid
record onto ``orders.created``, one binary-mode CloudEvent onto
``orders.cloudevents``.
"""

from __future__ import annotations

import json
import sys
import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]


def main() -> None:
    servers = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9092"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    admin = AdminClient({"bootstrap.servers": servers})
    existing = admin.list_topics(timeout=10).topics
    new = [NewTopic(t, 3, 1) for t in ("orders.created", "orders.cloudevents")
           if t not in existing]
    for future in admin.create_topics(new).values() if new else []:
        future.result(10)
    producer = Producer({"bootstrap.servers": servers})
    for i in range(count):
        order = {"order_id": f"o-{uuid.uuid4().hex[:6]}", "sku": "sku-1", "amount": 10.0 + i}
        producer.produce("orders.created", key=order["order_id"], value=json.dumps(order))
    producer.produce("orders.created", value=json.dumps({"order_id": "missing-amount"}))
    producer.produce("orders.cloudevents", value=json.dumps(
        {"order_id": "ce-1", "sku": "sku-2", "amount": 42.0}), headers=[
        ("ce_specversion", b"1.0"), ("ce_id", uuid.uuid4().hex.encode()),
        ("ce_source", b"/shop/checkout"), ("ce_type", b"shop.order.created"),
        ("content-type", b"application/json")])
    producer.flush(10)
    print(f"produced {count} orders + 1 invalid to orders.created, 1 CloudEvent to "
          "orders.cloudevents")


if __name__ == "__main__":
    main()
