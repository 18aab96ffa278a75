"""ploy.yaml ``sources:`` and ``sinks:``: accepted forms, and each error's file, key and line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from connectors import check_connectors
from engine.app import load_app
from engine.config import ArchiveSink, SourceConfig, TopicSink, WebhookSink, load_config
from engine.errors import ConfigError

HEAD = """\
kind: worker
workflow:
  ORDER_FLOW: order_processing
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ploy.yaml"
    path.write_text(HEAD + textwrap.dedent(text), encoding="utf-8")
    return path


def error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.file == str(path.resolve())
    return info.value


def test_every_connector_form(tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir()
    config = load_config(write(tmp_path, """\
        sources:
          - {topic: orders.created, binding: ORDER_FLOW}
          - topic: orders.avro
            binding: ORDER_FLOW
            format: avro
            schema_dir: schemas
            dead_letter_topic: bad.orders
        sinks:
          - {kind: topic, topic: ploy.lifecycle, workflows: [order_processing],
             types: [workflow.completed, dev.ploy.step.failed]}
          - kind: webhook
            url: https://hooks.example.com/ploy
            secret: s3cret
            max_attempts: 8
            timeout: 5s
            backoff: {initial: 500ms, max: 1m, multiplier: 3}
          - {kind: archive, dir: archive, roll_bytes: 1048576, roll_seconds: 60}
        """), env={})
    json_source, avro_source = config.sources
    assert json_source == SourceConfig(topic="orders.created", binding="ORDER_FLOW")
    assert (json_source.format, json_source.dead_letters) == ("json", "orders.created.dlq")
    assert avro_source.schema_dir == tmp_path.resolve() / "schemas"
    assert avro_source.dead_letters == "bad.orders"
    topic, webhook, archive = config.sinks
    assert isinstance(topic, TopicSink) and topic.types == ["workflow.completed", "step.failed"]
    assert topic.selects("order_processing", "step.failed")
    assert not topic.selects("order_processing", "step.completed")
    assert not topic.selects("other", "step.failed")
    assert isinstance(webhook, WebhookSink)
    assert (webhook.max_attempts, webhook.timeout_s) == (8, 5.0)
    assert (webhook.backoff.initial_ms, webhook.backoff.max_ms, webhook.backoff.multiplier) == (
        500, 60_000, 3.0)
    assert webhook.types is None and webhook.selects("any", "workflow.log")
    assert isinstance(archive, ArchiveSink) and archive.dir == tmp_path.resolve() / "archive"
    assert (archive.roll_bytes, archive.roll_seconds) == (1_048_576, 60.0)
    assert "s3cret" not in repr(config)
    assert config.line_of("sinks.1.url") == 15


def test_defaults_are_no_connectors(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""), env={})
    assert (config.sources, config.sinks) == ([], [])
    webhook = load_config(write(tmp_path, """\
        sinks: [{kind: webhook, url: "http://127.0.0.1:9/x", secret: k}]
        """), env={}).sinks[0]
    assert isinstance(webhook, WebhookSink)
    assert (webhook.max_attempts, webhook.backoff.initial_ms, webhook.backoff.max_ms) == (
        5, 1000, 300_000)


@pytest.mark.parametrize(("text", "key", "line", "problem"), [
    ("sinks:\n  - {kind: kafka, topic: x}\n", "sinks.0.kind", 5,
     "unknown connector kind 'kafka'; one of: topic, webhook, archive"),
    ("sinks:\n  - topic: x\n", "sinks.0", 5, "must be a mapping with 'kind'"),
    ("sinks:\n  - kind: topic\n", "sinks.0.topic", 5, "Field required"),
    ("sinks:\n  - {kind: archive}\n", "sinks.0.dir", 5, "Field required"),
    ("sinks:\n  - kind: topic\n    topic: ok\n  - kind: webhook\n    url: ftp://x/y\n"
     "    secret: k\n", "sinks.1.url", 8, "must be an http:// or https:// URL"),
    ("sinks:\n  - {kind: webhook, url: 'https://'}\n", "sinks.0.url", 5, "with a host"),
    ("sinks:\n  - kind: webhook\n    url: https://h/x\n", "sinks.0.secret", 5, "Field required"),
    ("sinks:\n  - {kind: webhook, url: 'https://h/x', secret: ''}\n", "sinks.0.secret", 5,
     "at least 1 character"),
    ("sinks:\n  - kind: webhook\n    url: https://h/x\n    secret: k\n    urll: y\n",
     "sinks.0.urll", 8, "unknown key; allowed here: workflows, types, kind, url, secret"),
    ("sinks:\n  - kind: webhook\n    url: https://h/x\n    secret: k\n    timeout: soon\n",
     "sinks.0.timeout", 8, "invalid duration 'soon'"),
    ("sinks:\n  - kind: webhook\n    url: https://h/x\n    secret: k\n    backoff: {first: 1}\n",
     "sinks.0.backoff.first", 8, "unknown key; allowed here: initial, max, multiplier"),
    ("sinks:\n  - {kind: topic, topic: x, types: [step.exploded]}\n", "sinks.0.types", 5,
     "unknown lifecycle type 'step.exploded'"),
    ("sinks:\n  - {kind: topic, topic: 'bad topic'}\n", "sinks.0.topic", 5,
     "should match pattern"),
    ("sinks:\n  - {kind: topic, topic: a}\n  - {kind: topic, topic: a}\n", "sinks.1", 6,
     "a second topic sink to a"),
    ("sinks:\n  - {kind: archive, dir: a, roll_bytes: 0}\n", "sinks.0.roll_bytes", 5,
     "greater than or equal to 1"),
    ("sinks: {kind: topic}\n", "sinks", 4, "must be a list"),
    ("sources:\n  - {binding: ORDER_FLOW}\n", "sources.0.topic", 5, "Field required"),
    ("sources:\n  - topic: t\n    binding: NOPE\n", "sources.0.binding", 6,
     "names binding 'NOPE' which 'workflow:' does not define (bound: ORDER_FLOW)"),
    ("sources:\n  - {topic: t, binding: ORDER_FLOW, format: xml}\n", "sources.0.format", 5,
     "Input should be 'json', 'cloudevents' or 'avro'"),
    ("sources:\n  - {topic: t, binding: ORDER_FLOW, format: avro}\n", "sources.0", 5,
     "format avro needs schema_dir"),
    ("sources:\n  - topic: t\n    binding: ORDER_FLOW\n    format: avro\n    schema_dir: none\n",
     "sources.0.schema_dir", 8, "is not a directory"),
    ("sources:\n  - {topic: t, binding: ORDER_FLOW}\n  - {topic: t, binding: ORDER_FLOW}\n",
     "sources.1.topic", 6, "topic 't' has two sources"),
    ("sources:\n  - t\n", "sources.0", 5, "must be a mapping with topic and binding"),
    ("sources:\n  - {topic: t, binding: ORDER_FLOW, group: g}\n", "sources.0.group", 5,
     "unknown key"),
])
def test_errors_name_file_key_and_line(tmp_path: Path, text: str, key: str, line: int,
                                       problem: str) -> None:
    err = error(tmp_path, text)
    assert (err.key, err.line) == (key, line), str(err)
    assert problem in err.problem, err.problem
    assert str(err).startswith(f"{err.file}:{line}: key '{key}':")


def test_a_bad_secret_is_not_echoed(tmp_path: Path) -> None:
    err = error(tmp_path, "sinks:\n  - {kind: webhook, url: 'https://h/x', secret: 12345}\n")
    assert err.key == "sinks.0.secret" and "12345" not in str(err)


def test_sink_workflows_must_be_defined_by_the_worker(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """\
        sinks:
          - kind: topic
            topic: out
            workflows: [order_processing, typo_flow]
        """), env={})
    check_connectors(config, ["order_processing", "typo_flow"])  # fine
    with pytest.raises(ConfigError) as info:
        check_connectors(config, ["order_processing", "other"])
    assert (info.value.key, info.value.line) == ("sinks.0.workflows.1", 7)
    assert "names workflow 'typo_flow' which the worker does not define" in str(info.value)


def test_the_example_app_loads() -> None:
    example = Path(__file__).parents[2] / "examples" / "connectors"
    worker, config = load_app(example, env={})
    check_connectors(config, worker.workflows)
    assert [s.topic for s in config.sources] == ["orders.created", "orders.cloudevents"]
    assert [s.kind for s in config.sinks] == ["topic", "webhook", "archive"]
