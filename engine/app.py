"""The Engine: a user's built worker running on the log, with its bindings.

It ties the pieces in the order an event travels: the Kafka log (append),
the runtime (fold, view, runners) and the timer service; ``engine.env`` holds
the bindings of ploy.yaml, exactly as ``ctx.env`` inside a workflow.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from engine.bindings import Env
from engine.builder import Worker, load_worker
from engine.clock import Clock
from engine.config import Config, check_bindings, load_config
from engine.errors import ConfigError, PloyError, StateLockedError
from engine.log import EventLog
from engine.runtime import Runtime
from engine.schedules import check_schedules

if TYPE_CHECKING:
    from connectors import Connectors
    from engine.listing import Page
    from engine.models import Execution, ExecutionSummary, HistoryEntry

logger = logging.getLogger("ploy")

SLOTS_DIR = "workers"  # <state_dir>/workers/<n>/: the state of the n-th worker on this host
SLOT_LOCK = "slot.lock"


class StateSlot:
    """A scaled-out worker's own state directory, ``<state_dir>/workers/<n>``.

    Why a slot per worker rather than one view per directory: the view is a
    cache of the log that each worker keeps for the partitions it owns, and one
    RocksDB can be open in one process only. So several ``ploy worker`` processes
    started in one directory (one per core, the usual way to use a host) each
    take the first free slot, and a restarted worker finds a slot whose state is
    warm, often its own. A slot is held with ``flock`` on its lock file, which
    the kernel releases however the process ends (a SIGKILL included), so a
    slot is never left locked by a dead worker.
    """

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    @classmethod
    def take(cls, state_dir: Path) -> StateSlot:
        """Lock and return the first free slot under ``state_dir``."""
        slots = state_dir / SLOTS_DIR
        n = 0
        while True:
            path = slots / str(n)
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / SLOT_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                n += 1
                continue
            except BaseException:
                os.close(fd)
                raise
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a curious operator
            return cls(path, fd)

    def release(self) -> None:
        """Unlock the slot (closing the file releases the flock). Idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _state_locked(exc: BaseException, state_dir: Path) -> StateLockedError | None:
    """RocksDB's lock error (a bare Exception naming the db's ``LOCK`` file) as one clear
    error."""
    if isinstance(exc, PloyError) or "/LOCK" not in str(exc):
        return None
    return StateLockedError(state_dir, str(exc))


class Engine:
    """Starts and stops everything a worker process runs."""

    def __init__(self, worker: Worker, config: Config, *, clock: Clock | None = None,
                 scale_out: bool = False, runs: bool = True, replica: bool = False):
        """Run every partition (``ploy dev``, tests); or with ``scale_out`` join the
        consumer group and run the partitions it assigns (``ploy worker``); or with
        ``runs=False`` run nothing and only answer queries, by asking each partition's
        owner, or from this process's own fold of every partition with ``replica``."""
        self.worker, self.config, self.clock = worker, config, clock
        self.scale_out, self.runs, self.replica = scale_out, runs, replica
        self._log: EventLog | None = None
        self._runtime: Runtime | None = None
        self._slot: StateSlot | None = None
        self._stopped = False
        self.connectors: Connectors | None = None

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("the engine is not started (use 'async with Engine(...)')")
        return self._runtime

    @property
    def env(self) -> Env:
        """The bindings of ploy.yaml, as ``ctx.env`` has them."""
        return self.runtime.env

    async def start(self) -> None:
        """Check bindings and connectors, take a state slot (``scale_out``), connect to
        Kafka (bounded wait), catch up, resume, then start the connectors of ploy.yaml.

        A start that fails has released what it took (producer, threads, RocksDB
        locks, the slot) when the error reaches the caller, and that error is the
        only one: a later :meth:`stop` does nothing more.
        """
        # Imported here: the connectors package imports the engine.
        from connectors import check_connectors, start_connectors

        config = self.config
        servers = config.kafka.bootstrap_servers
        if not servers:
            raise ConfigError(str(config.path or "ploy.yaml"), "kafka.bootstrap_servers",
                              "is not set (ploy dev starts an embedded broker; "
                              "ploy worker needs KAFKA_BOOTSTRAP_SERVERS)")
        check_bindings(config, self.worker.workflows)
        check_schedules(config, self.worker)
        check_connectors(config, self.worker.workflows)
        self._stopped = False
        try:
            if self.scale_out:  # each worker its own view, even with others in this directory
                self._slot = await asyncio.to_thread(StateSlot.take, config.state_dir)
                self.config = config = config.model_copy(update={"state_dir": self._slot.path})
            kafka = config.kafka
            self._log = await asyncio.to_thread(
                EventLog, servers, kafka.topic_prefix, kafka.partitions, extra=kafka.config,
                connect_timeout_s=kafka.connect_timeout_s,
                replication_factor=kafka.replication_factor,
            )
            instance = None
            if self._slot is not None and config.kafka.static_membership:
                instance = f"{socket.gethostname()}-{self._slot.path.name}"
            self._runtime = Runtime(self.worker, config, self._log, clock=self.clock,
                                    scale_out=self.scale_out, runs=self.runs,
                                    replica=self.replica, instance_id=instance)
            await self._runtime.start()
            self.connectors = await start_connectors(self)
        except BaseException as exc:
            await self._stop_after_failed_start()
            locked = _state_locked(exc, config.state_dir)
            if locked is not None:
                raise locked from None
            raise

    async def _stop_after_failed_start(self) -> None:
        """Release what a failed start took; what fails here is logged, never raised,
        so the caller sees the error that stopped the start and no second one."""
        try:
            await self.stop()
        except Exception:
            logger.debug("stopping after a failed start", exc_info=True)
        finally:
            self._stopped = True

    async def stop(self) -> None:
        """Graceful: sources stop triggering, running steps finish and nothing more
        starts, sinks drain the last events, the producer flushes. Idempotent: each
        part is stopped once, even when a part before it fails."""
        if self._stopped:
            return
        self._stopped = True
        connectors, self.connectors = self.connectors, None
        log, self._log = self._log, None
        slot, self._slot = self._slot, None
        try:
            if connectors is not None:
                await connectors.stop_sources()
            if self._runtime is not None:
                await self._runtime.stop()
            if connectors is not None:
                await connectors.stop()
        finally:
            try:
                if log is not None:
                    await asyncio.to_thread(log.close)
            finally:
                if slot is not None:
                    slot.release()

    # -- the facade: what the HTTP layer, the dashboard and embedding code call ----------

    async def trigger(self, workflow: str, input: Any, *, idempotency_key: str | None = None,
                      subject: str | None = None) -> str:
        """Start an execution of ``workflow`` (its name); its id. See ``Runtime.trigger``."""
        return await self.runtime.trigger(workflow, input, idempotency_key=idempotency_key,
                                          subject=subject)

    async def erase(self, subject: str, reason: str, actor: str) -> dict[str, Any]:
        """Destroy ``subject``'s key and record who and why. See ``Runtime.erase``."""
        return await self.runtime.erase(subject, reason, actor)

    async def get_execution(self, execution_id: str, *, local: bool = False,
                            min_offset: int | None = None) -> Execution | None:
        """The execution, from this process's view or its partition's owner; None if unknown."""
        return await self.runtime.get_execution(execution_id, local=local,
                                                min_offset=min_offset)

    async def history(self, execution_id: str, *, local: bool = False,
                      min_offset: int | None = None) -> list[HistoryEntry] | None:
        """Every event of the execution with its partition and offset (the audit trail)."""
        return await self.runtime.history(execution_id, local=local, min_offset=min_offset)

    async def cancel(self, execution_id: str, reason: str | None = None,
                     actor: str | None = None) -> bool:
        """Stop the execution (``actor``: who asked, for the audit); False if it had
        already finished."""
        return await self.runtime.cancel(execution_id, reason, actor)

    async def resolve_step(self, execution_id: str, step: str, action: str, *,
                           output: Any = None, reason: str, actor: str) -> bool:
        """An operator completes a stuck step with ``output`` (``"complete"``) or ends its
        backoff wait (``"retry-now"``), with who and why. See ``Runtime.resolve_step``."""
        return await self.runtime.resolve_step(execution_id, step, action, output=output,
                                               reason=reason, actor=actor)

    async def send_event(self, event_type: str, data: Any = None, *, id: str | None = None,
                         source: str | None = None,
                         execution_id: str | None = None) -> dict[str, Any]:
        """An event for waiting executions (``ctx.step.wait_for_event``): every matching
        waiter receives it once, or only ``execution_id``. See ``Runtime.send_event``."""
        return await self.runtime.send_event(event_type, data, id=id, source=source,
                                             execution_id=execution_id)

    async def list_page(self, **filters: Any) -> Page:
        """A page of executions newest first (``workflow``, ``status``, ``before``,
        ``limit``, ``offset``, ``partitions``, ``local``)."""
        return await self.runtime.list_page(**filters)

    async def list_executions(self, **filters: Any) -> list[ExecutionSummary]:
        """The executions of :meth:`list_page`, without its cursor."""
        return (await self.runtime.list_page(**filters)).executions

    async def skip(self, partition: int, offset: int, reason: str, actor: str) -> int:
        """Step over the corrupt record ``partition`` is stopped at (``ploy skip``)."""
        return await self.runtime.skip(partition, offset, reason, actor)

    def health(self) -> dict[str, Any]:
        """This process: its partitions, what is stopped or still being claimed, runners."""
        runtime = self.runtime
        stalled = runtime.stalled
        claiming = runtime.claiming()  # assigned here, claim not on the log yet
        return {
            "status": "degraded" if stalled or claiming else "ok",
            "worker": runtime.worker_id,
            "topic": runtime.log.topic,
            "partitions": {p: {"next_offset": v.next_offset,
                               "folded_here": runtime.partitions.folds(p)}
                           for p, v in sorted(runtime.views.items())},
            "stalled": {p: str(err) for p, err in sorted(stalled.items())},
            "stalled_offsets": {p: err.offset for p, err in sorted(stalled.items())},
            "claiming": claiming,
            "running": len(runtime.runners),
        }

    async def workers(self) -> dict[str, Any]:
        """Who runs each partition (its claim on the log) and how far behind it is."""
        return {"group": self.config.kafka.group_id, "topic": self.runtime.log.topic,
                "partitions": await self.runtime.partitions_report()}

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()


def load_app(directory: str | Path | None = None, **overrides: object) -> tuple[Worker, Config]:
    """ploy.yaml and the worker it names with ``main:``."""
    config = load_config(directory, **overrides)  # type: ignore[arg-type]
    worker = load_worker(config.root / config.main)
    check_bindings(config, worker.workflows)
    return worker, config


def http_server(engine: Engine, guard_host: str, **options: Any) -> Any:
    """A uvicorn server of ``engine``'s app that leaves the process's signals alone (its
    owner stops it, then the engine, in order) and cuts long-polls and event streams
    at stop rather than waiting for them. ``guard_host``: the address it listens on,
    which decides whether the engine API needs a token (see ``engine.http``)."""
    import uvicorn

    from engine.http import create_app

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = uvicorn.Config(create_app(engine, host=guard_host), log_level="warning",
                            timeout_graceful_shutdown=2, **options)
    return Server(config)


@asynccontextmanager
async def serving_api(engine: Engine, host: str = "127.0.0.1", port: int = 0
                      ) -> AsyncIterator[str]:
    """Serve ``engine``'s app (routes, engine API, dashboard) with uvicorn on ``host``:``port``
    (0: a free port) and advertise it, so other processes send their queries about
    this worker's partitions here. Yields the base URL."""
    server = http_server(engine, host, host=host, port=port, lifespan="off", ws="none")
    task = asyncio.create_task(server.serve(), name="ploy-api")
    while not server.started:
        if task.done():
            await task
            raise RuntimeError(f"the engine API on {host}:{port} did not start")
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{bound[1]}"  # noqa: S104
    engine.runtime.advertise(url)
    try:
        yield url
    finally:
        server.should_exit = True
        await asyncio.wait({task}, timeout=10)


async def serve_until_signalled(engine: Engine) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with engine:
        logger.info("worker %s running on %s", engine.runtime.worker_id, engine.runtime.log.topic)
        await stop.wait()
        logger.info("stopping: running steps finish, no new step starts")
