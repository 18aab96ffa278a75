"""Connectors: sources and sinks between the engine and other event-driven systems.

Configured in ploy.yaml and run inside the engine's process:

    sources:                       # topic -> trigger (connectors.source)
      - {topic: orders.created, binding: ORDER_FLOW, format: json}
    sinks:
      - {kind: topic, topic: ploy.lifecycle}            # connectors.lifecycle
      - {kind: webhook, url: https://..., secret: ...}  # connectors.webhooks
      - {kind: archive, dir: archive}                   # connectors.archive

Sources keep their positions in ``<state_dir>/<prefix>.connectors`` and are
exactly-once per record through their idempotency keys, however many
workers read a topic. Sinks follow the engine's ownership of partitions
(:mod:`connectors.sink`): each partition of ``<prefix>.events`` is published
by the process that owns it, from a position kept in Kafka
(:mod:`connectors.positions`), so a worker that takes a partition over goes
on where the last one stopped. The topic sink publishes each event exactly
once by CloudEvents id, webhooks deliver each once except a request in
flight when a worker dies, the archive writes each event into one file.

Lifecycle with the engine (``Engine.start`` / ``Engine.stop``):

1. ``connectors = await start_connectors(engine)`` once the runtime runs.
2. ``await connectors.stop_sources()`` before the runtime stops: nothing new
   is triggered while it winds down.
3. ``await connectors.stop()`` after the runtime stopped: the sinks read on
   to the end of the log (so the events of the last steps go out too), save
   their positions and close.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from connectors.archive import ArchiveSink, dev_archive_dir, dev_restore, restore
from connectors.lifecycle import LifecycleSink
from connectors.sink import SinkThread
from connectors.source import TopicSource
from connectors.webhooks import WebhookSink, verify_signature
from engine.config import FILENAME, Config, TopicSink
from engine.config import ArchiveSink as ArchiveSinkConfig
from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.app import Engine

__all__ = ["Connectors", "check_connectors", "dev_archive_dir", "dev_restore", "restore",
           "start_connectors", "verify_signature"]

logger = logging.getLogger("ploy.connectors")


class Connectors:
    """The running sources and sinks of one engine."""

    def __init__(self, sources: list[TopicSource], sinks: list[SinkThread]):
        self.sources, self.sinks = sources, sinks

    async def stop_sources(self) -> None:
        """Stop triggering: each source finishes its batch and saves its offsets."""
        sources, self.sources = self.sources, []
        await asyncio.gather(*(source.stop() for source in sources))

    async def stop(self) -> None:
        """Stop the sources (if still running), then drain and stop the sinks."""
        await self.stop_sources()
        sinks, self.sinks = self.sinks, []
        await asyncio.gather(*(sink.stop() for sink in sinks))

    def status(self) -> list[dict[str, Any]]:
        """One entry per running connector: its name and its last error (None when fine)."""
        running: list[TopicSource | SinkThread] = [*self.sources, *self.sinks]
        return [{"name": c.name, "error": c.error} for c in running]


def check_connectors(config: Config, workflow_names: Iterable[str]) -> None:
    """Fail start-up if a sink's ``workflows`` names a workflow the worker does not define.

    Raises:
        ConfigError: With the key and line of the first such name.
    """
    names = set(workflow_names)
    for i, sink in enumerate(config.sinks):
        for j, name in enumerate(getattr(sink, "workflows", None) or []):
            if name not in names:
                key = f"sinks.{i}.workflows.{j}"
                defined = ", ".join(sorted(names)) or "none"
                raise ConfigError(str(config.path or FILENAME), key,
                                  f"names workflow '{name}' which the worker does not define "
                                  f"(defines: {defined})", config.line_of(key))


def follow_ownership(engine: Engine, sink: SinkThread) -> None:
    """Have ``sink`` publish the partitions this process owns, as ownership changes."""
    runtime = engine.runtime
    if hasattr(runtime, "on_ownership"):
        runtime.on_ownership(sink.on_ownership)
    else:  # an engine that does not share partitions owns every one
        sink.on_ownership(frozenset(range(runtime.log.partitions)))


async def start_connectors(engine: Engine) -> Connectors:
    """Start every source and sink of ``engine.config`` on the running engine.

    Raises:
        ConfigError: A sink filters on a workflow the worker does not define.
        ConnectorError: A connector cannot start (e.g. an archive directory
            that holds another topic's archive); none is left running.
    """
    config = engine.config
    started = Connectors([], [])
    if not getattr(engine, "runs", True):
        return started  # a query-only engine triggers and publishes nothing
    check_connectors(config, engine.worker.workflows)
    try:
        for source in config.sources:
            running = TopicSource(engine, source)
            await running.start()
            started.sources.append(running)
        for sink in config.sinks:
            thread: SinkThread
            if isinstance(sink, TopicSink):
                thread = LifecycleSink(engine, sink)
            elif isinstance(sink, ArchiveSinkConfig):
                thread = ArchiveSink(engine, sink)
            else:
                thread = WebhookSink(engine, sink)
            follow_ownership(engine, thread)
            await thread.start()
            started.sinks.append(thread)
    except BaseException:
        await started.stop()
        raise
    if started.sources or started.sinks:
        logger.info("connectors: %s", ", ".join(c["name"] for c in started.status()))
    return started
