"""ploy.yaml + environment -> one frozen :class:`Config`.

Precedence: ``load_config`` keyword overrides > environment > ploy.yaml >
default. Reading happens once, at start-up, so every mistake is reported there,
naming the file (or the environment variable), the dotted key and the line,
instead of surfacing later as a broker or runtime error. The YAML is composed to
nodes first only to learn each key's line; the values then go through small
translations (short binding form, durations, librdkafka strings) and a strict
pydantic validation whose first error is turned into a :class:`ConfigError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from functools import cached_property
from keyword import iskeyword
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from engine.cron import Cron, Timing
from engine.durations import MAX_DURATION_MS, parse_duration
from engine.errors import ConfigError, DurationError

FILENAME = "ploy.yaml"
_MODEL = ConfigDict(frozen=True, extra="forbid", strict=True)
# Fields whose ploy.yaml key differs because the value is a duration.
_YAML_NAME = {
    "initial_ms": "initial",
    "max_ms": "max",
    "connect_timeout_s": "connect_timeout",
    "timeout_s": "timeout",
    "retention_ms": "retention",
    "every_ms": "every",
    "period_ms": "period",
}
_NOT_IN_YAML = ("path", "root")


_INPUT_PATH = r"^input(\.[A-Za-z0-9_-]+)+$"  # a dotted path into the trigger's input


class Concurrency(BaseModel):
    """``concurrency:`` of a workflow: at most ``limit`` executions hold a slot at once per
    value of ``key`` (a dotted path into the trigger, ``input.customer_id``; none: one
    group for the whole workflow), cluster-wide (``engine.flow``)."""

    model_config = _MODEL
    limit: int = Field(ge=1)
    key: str | None = Field(default=None, pattern=_INPUT_PATH)
    # A number in the input: among the queued, higher first (default 0), then trigger order.
    priority: str | None = Field(default=None, pattern=_INPUT_PATH)


class Rate(BaseModel):
    """``rate:`` of a workflow: at most ``limit`` executions per value of ``key`` start in
    any ``period_ms``-long window (a sliding window); the others stay queued, in order
    (``engine.ratelimit``)."""

    model_config = _MODEL
    limit: int = Field(ge=1)
    period_ms: int = Field(ge=1, le=MAX_DURATION_MS)
    key: str | None = Field(default=None, pattern=_INPUT_PATH)
    # As concurrency's: among the queued, a higher number first (default 0).
    priority: str | None = Field(default=None, pattern=_INPUT_PATH)


class Debounce(BaseModel):
    """``debounce:`` of a workflow: a trigger waits ``period_ms`` for a later trigger of the
    same ``key`` value; the last one of a burst runs, the earlier ones end cancelled
    (``engine.debounce``)."""

    model_config = _MODEL
    period_ms: int = Field(ge=1, le=MAX_DURATION_MS)
    key: str | None = Field(default=None, pattern=_INPUT_PATH)


class WorkflowBinding(BaseModel):
    """One ``workflow:`` entry: the workflow a binding name (``ctx.env.NAME``) calls."""

    model_config = _MODEL
    name: str = Field(min_length=1)
    retries: int | None = Field(default=None, ge=0)
    version: str | None = Field(default=None, min_length=1, max_length=200)
    concurrency: Concurrency | None = None
    rate: Rate | None = None
    debounce: Debounce | None = None

    def flow_keys(self) -> dict[str, str | None]:
        """The ``key`` of each flow control set on it (``concurrency``, ``rate``,
        ``debounce``), which must agree: all of one key value go to one partition."""
        return {name: control.key for name, control in (
            ("concurrency", self.concurrency), ("rate", self.rate),
            ("debounce", self.debounce)) if control is not None}


class Backoff(BaseModel):
    """The wait between attempts of a step: ``initial_ms * multiplier**n``, capped."""

    model_config = _MODEL
    initial_ms: int = Field(default=1000, ge=0, le=MAX_DURATION_MS)
    max_ms: int = Field(default=60_000, ge=0, le=MAX_DURATION_MS)
    multiplier: float = Field(default=2.0, ge=1)

    @model_validator(mode="after")
    def _max_covers_initial(self) -> Backoff:
        if self.max_ms < self.initial_ms:
            raise ValueError(f"max ({self.max_ms} ms) is below initial ({self.initial_ms} ms)")
        return self


class KafkaConfig(BaseModel):
    """Where the log lives; ``bootstrap_servers=None`` means the embedded broker."""

    model_config = _MODEL
    bootstrap_servers: str | None = Field(default=None, min_length=1)
    topic_prefix: str = Field(default="ploy", pattern=r"^[A-Za-z0-9._-]+$")
    partitions: int = Field(default=6, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    group_id: str = Field(default="ploy-workers", min_length=1)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # Static membership: each worker joins with group.instance.id <host>-<state slot>, so
    # a worker restarted within session.timeout.ms gets its partitions back with no
    # rebalance (Kafka >= 2.3). A stopped one holds them until the timeout, so it suits
    # rolling restarts, not scaling in. Ignored on the embedded broker (see README).
    static_membership: bool = False
    # librdkafka settings (security.protocol, sasl.* ...) passed through unchanged; they may
    # hold passwords, so they stay out of repr() and logs, like the admin token.
    config: dict[str, str] = Field(default_factory=dict, repr=False)


class HttpConfig(BaseModel):
    """The HTTP listener; port 0 asks the OS for a free port."""

    model_config = _MODEL
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8787, ge=0, le=65535)
    max_body_bytes: int = Field(default=1_048_576, ge=1)
    admin_token: str | None = Field(default=None, repr=False)
    # Where other workers reach this one's engine API (scale-out queries); default:
    # http://<host>:<port>, with this machine's hostname for a wildcard host.
    advertised_url: str | None = None


# -- connectors (the ``connectors`` package runs them) ------------------------------

_TOPIC = r"^[A-Za-z0-9._-]+$"
LIFECYCLE_TYPES = (
    "workflow.triggered",
    "workflow.started",
    "step.started",
    "step.completed",
    "step.retrying",
    "step.failed",
    "workflow.sleeping",
    "timer.fired",
    "workflow.log",
    "workflow.cancel_requested",
    "workflow.cancelled",
    "workflow.completed",
    "workflow.failed",
    "workflow.waiting",
    "workflow.patched",
    "step.resolved",
)
"""Lifecycle event types a sink can select (CloudEvents type ``dev.ploy.<name>``)."""
CLOUDEVENTS_TYPE_PREFIX = "dev.ploy."


class SourceConfig(BaseModel):
    """``sources:`` entry: records of ``topic`` trigger the workflow of ``binding``, or
    (with ``event:`` instead) are events for waiting executions (``wait_for_event``)."""

    model_config = _MODEL
    topic: str = Field(min_length=1, pattern=_TOPIC)
    binding: str | None = Field(default=None, min_length=1)
    event: str | None = Field(default=None, min_length=1, max_length=256)
    """The events' type; ``"*"``: each CloudEvent's own ``type`` (format cloudevents)."""
    format: Literal["json", "cloudevents", "avro"] = "json"
    schema_dir: Path | None = None
    dead_letter_topic: str | None = Field(default=None, min_length=1, pattern=_TOPIC)

    @model_validator(mode="after")
    def _avro_needs_schemas(self) -> SourceConfig:
        if self.format == "avro" and self.schema_dir is None:
            raise ValueError("format avro needs schema_dir (a directory of <schema id>.avsc)")
        if (self.binding is None) == (self.event is None):
            raise ValueError("a source has either binding: (records trigger executions) or "
                             "event: (records are events for waiting executions), not both")
        if self.event == "*" and self.format != "cloudevents":
            raise ValueError("event: '*' (each CloudEvent's own type) needs format cloudevents")
        return self

    @property
    def dead_letters(self) -> str:
        """The dead-letter topic: ``dead_letter_topic`` or ``<topic>.dlq``."""
        return self.dead_letter_topic or f"{self.topic}.dlq"


def _lifecycle_types(value: object) -> object:
    """Accept ``step.completed`` or ``dev.ploy.step.completed``; keep the short name."""
    if not isinstance(value, list):
        return value
    names = []
    for item in value:
        name = item.removeprefix(CLOUDEVENTS_TYPE_PREFIX) if isinstance(item, str) else item
        if name not in LIFECYCLE_TYPES:
            raise ValueError(f"unknown lifecycle type {item!r}; one of: "
                             + ", ".join(LIFECYCLE_TYPES))
        names.append(name)
    return names


class _Filtered(BaseModel):
    """A sink of lifecycle events; ``None`` selects every workflow / every type."""

    model_config = _MODEL
    workflows: list[str] | None = None
    types: list[str] | None = None

    @field_validator("types", mode="before")
    @classmethod
    def _known_types(cls, value: object) -> object:
        return _lifecycle_types(value)

    def selects(self, workflow: str, type_name: str) -> bool:
        """Whether an event of ``workflow`` with lifecycle type ``type_name`` goes out."""
        return (self.workflows is None or workflow in self.workflows) and (
            self.types is None or type_name in self.types)


class TopicSink(_Filtered):
    """``kind: topic``: lifecycle events as CloudEvents JSON on a Kafka topic."""

    kind: Literal["topic"]
    topic: str = Field(min_length=1, pattern=_TOPIC)


class WebhookSink(_Filtered):
    """``kind: webhook``: lifecycle events POSTed as signed CloudEvents JSON."""

    kind: Literal["webhook"]
    url: str
    secret: str = Field(min_length=1, repr=False)
    max_attempts: int = Field(default=5, ge=1)
    backoff: Backoff = Field(default_factory=lambda: Backoff(initial_ms=1000, max_ms=300_000))
    timeout_s: float = Field(default=10.0, gt=0)
    dead_letter_topic: str | None = Field(default=None, min_length=1, pattern=_TOPIC)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value


class ArchiveSink(BaseModel):
    """``kind: archive``: every event into Avro container files, rolled by size and time."""

    model_config = _MODEL
    kind: Literal["archive"]
    dir: Path
    roll_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    roll_seconds: float = Field(default=300.0, gt=0)


Sink = Annotated[TopicSink | WebhookSink | ArchiveSink, Field(discriminator="kind")]
SINK_KINDS: dict[str, type[BaseModel]] = {
    "topic": TopicSink, "webhook": WebhookSink, "archive": ArchiveSink,
}


class ErasureConfig(BaseModel):
    """Where the keys of data subjects live (``engine.erasure``): every worker must see
    the same directory (a shared volume). Default ``<state_dir>/keys``."""

    model_config = _MODEL
    key_dir: str | None = Field(default=None, min_length=1)
class ScheduleConfig(BaseModel):
    """``schedules:`` entry: start the workflow of ``binding`` on a cron or an interval.

    ``catchup`` decides what a firing that is late by more than ``LATE_MS`` (the
    engine was down, the schedule's partition was moving) does: ``skip`` it,
    run ``once`` for the latest missed fire time, or run ``all`` of them (the
    latest ``catchup_limit``). ``overlap: skip`` starts nothing while the
    schedule's previous execution has not ended.
    """

    model_config = _MODEL
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")
    binding: str = Field(min_length=1)
    cron: str | None = None
    every_ms: int | None = Field(default=None, ge=1000, le=MAX_DURATION_MS)
    input: Any = None
    timezone: str = "UTC"
    catchup: Literal["skip", "once", "all"] = "once"
    catchup_limit: int = Field(default=100, ge=1)
    overlap: Literal["skip", "allow"] = "skip"

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            Cron.parse(value)  # CronError is a ValueError: pydantic reports its message
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as "
                             "'Europe/Paris')") from None
        return value

    @model_validator(mode="after")
    def _one_timing(self) -> ScheduleConfig:
        if (self.cron is None) == (self.every_ms is None):
            raise ValueError("needs exactly one of 'cron' and 'every'")
        return self

    @cached_property
    def timing(self) -> Timing:
        """When it fires (parsed once: the scheduler asks at every look)."""
        cron = None if self.cron is None else Cron.parse(self.cron)
        return Timing(cron=cron, every_ms=self.every_ms, zone=self.timezone)


class Config(BaseModel):
    """Everything configurable, validated and frozen. Build it with :func:`load_config`."""

    model_config = _MODEL
    path: Path | None = None
    root: Path = Field(default_factory=Path.cwd)
    kind: str = "worker"
    main: str = "worker.py"
    build: str | None = None
    out: str | None = None
    workflow: dict[str, WorkflowBinding] = Field(default_factory=dict)
    retries: int = Field(default=3, ge=0)
    # The code version recorded on each execution a worker starts (WorkflowStarted.version);
    # a binding's own ``version`` wins.
    version: str | None = Field(default=None, min_length=1, max_length=200)
    backoff: Backoff = Field(default_factory=Backoff)
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    state_dir: Path = Path(".ploy")
    max_payload_bytes: int = Field(default=900_000, ge=1)
    # A standby folds every partition, not only those it owns: a failover then
    # starts from a warm view, and it answers any query without asking the owner.
    standby: bool = False
    # OpenTelemetry spans of triggers, step attempts and sleeps (engine.tracing); needs
    # the ``otel`` extra.
    otel: bool = False
    sources: list[SourceConfig] = Field(default_factory=list)
    sinks: list[Sink] = Field(default_factory=list)
    erasure: ErasureConfig = Field(default_factory=ErasureConfig)
    # engine.retention: finished executions leave the view this long after they end
    # (the log keeps them); None keeps every one.
    retention_ms: int | None = Field(default=None, ge=1, le=MAX_DURATION_MS)
    schedules: list[ScheduleConfig] = Field(default_factory=list)
    _lines: dict[str, int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _anchor_paths(cls, data: Any) -> Any:
        """Make ``root`` and ``state_dir`` Paths; a relative state_dir is under root."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key in ("path", "root", "state_dir"):
            if isinstance(data.get(key), str):
                data[key] = Path(data[key])
        root = data.setdefault("root", Path.cwd())
        state_dir = data.get("state_dir", Path(".ploy"))
        if isinstance(root, Path) and isinstance(state_dir, Path):
            data["state_dir"] = root / state_dir  # an absolute state_dir stays as is
        if isinstance(root, Path):
            data["sources"] = _anchor_items(data.get("sources"), "schema_dir", root)
            data["sinks"] = _anchor_items(data.get("sinks"), "dir", root)
        return data

    @model_validator(mode="after")
    def _keep_lines(self, info: ValidationInfo) -> Config:
        """Keep ploy.yaml's key -> line map, passed by load_config as validation context."""
        if isinstance(info.context, dict):
            self._lines.update(info.context.get("lines", {}))
        return self

    @model_validator(mode="after")
    def _check_connectors(self) -> Config:
        """Sources name a binding and a schema dir that exist; no connector is listed twice.

        Raises ConfigError itself (pydantic passes it through) to name the key and line.
        """
        topics: set[str] = set()
        for i, source in enumerate(self.sources):
            if source.binding is not None and source.binding not in self.workflow:
                bound = ", ".join(sorted(self.workflow)) or "none"
                raise self._error(f"sources.{i}.binding", f"names binding '{source.binding}' "
                                  f"which 'workflow:' does not define (bound: {bound})")
            if source.schema_dir is not None and not source.schema_dir.is_dir():
                raise self._error(f"sources.{i}.schema_dir",
                                  f"{source.schema_dir} is not a directory")
            if source.topic in topics:
                raise self._error(f"sources.{i}.topic", f"topic '{source.topic}' has two sources")
            topics.add(source.topic)
        seen: set[str] = set()
        for i, sink in enumerate(self.sinks):
            target = (sink.topic if isinstance(sink, TopicSink) else
                      sink.url if isinstance(sink, WebhookSink) else str(sink.dir))
            if f"{sink.kind}:{target}" in seen:
                raise self._error(f"sinks.{i}", f"a second {sink.kind} sink to {target}")
            seen.add(f"{sink.kind}:{target}")
        return self

    @model_validator(mode="after")
    def _check_flow(self) -> Config:
        """The flow controls of one binding share their key and priority: ``engine.flow``
        places every execution of one key value on one partition, whose owner decides
        alone, and keeps one queue per key value (ConfigError with the line)."""
        for binding, target in self.workflow.items():
            keys = target.flow_keys()
            names = list(keys)
            for other in names[1:]:
                first = names[0]
                if keys[other] != keys[first]:
                    raise self._error(f"workflow.{binding}.{other}.key", (
                        f"must be the key of {first} ({keys[first] or 'none'}), got "
                        f"{keys[other] or 'none'}: every execution of one key value is "
                        "placed on one partition"))
            rate, limit = target.rate, target.concurrency
            if (rate is not None and limit is not None and rate.priority is not None
                    and limit.priority is not None and rate.priority != limit.priority):
                raise self._error(f"workflow.{binding}.rate.priority", (
                    f"must be the priority of concurrency ({limit.priority}): "
                    "the queued executions of a key value wait in one queue"))
        return self

    @model_validator(mode="after")
    def _check_schedules(self) -> Config:
        """Schedules name a binding that exists, each name once (ConfigError with the line)."""
        names: set[str] = set()
        for i, schedule in enumerate(self.schedules):
            if schedule.binding not in self.workflow:
                bound = ", ".join(sorted(self.workflow)) or "none"
                raise self._error(f"schedules.{i}.binding", f"names binding "
                                  f"'{schedule.binding}' which 'workflow:' does not define "
                                  f"(bound: {bound})")
            if schedule.name in names:
                raise self._error(f"schedules.{i}.name", f"a second schedule '{schedule.name}'")
            names.add(schedule.name)
        return self

    def schedule(self, name: str) -> ScheduleConfig | None:
        """The schedule called ``name``, if ploy.yaml has one."""
        return next((s for s in self.schedules if s.name == name), None)

    def _error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(str(self.path or FILENAME), key, problem, self.line_of(key))

    def binding_for(self, workflow_name: str) -> str | None:
        """Return the first binding name that calls ``workflow_name``, if any."""
        return next((b for b, w in self.workflow.items() if w.name == workflow_name), None)

    def retries_for(self, workflow_name: str) -> int:
        """Return the retries of ``workflow_name``: its binding's, else the global default."""
        binding = self.binding_for(workflow_name)
        retries = self.workflow[binding].retries if binding is not None else None
        return self.retries if retries is None else retries

    @property
    def key_dir(self) -> Path:
        """The key store's directory (a relative ``erasure.key_dir`` is under root)."""
        if self.erasure.key_dir is None:
            return self.state_dir / "keys"
        return self.root / self.erasure.key_dir  # an absolute key_dir stays as is
    def concurrency_for(self, workflow_name: str) -> Concurrency | None:
        """Return the concurrency limit of ``workflow_name`` (its binding's), if any."""
        binding = self.binding_for(workflow_name)
        return self.workflow[binding].concurrency if binding is not None else None

    def version_for(self, workflow_name: str) -> str | None:
        """Return the code version of ``workflow_name``: its binding's, else the worker's."""
        binding = self.binding_for(workflow_name)
        version = self.workflow[binding].version if binding is not None else None
        return self.version if version is None else version

    def line_of(self, key: str) -> int | None:
        """Return the ploy.yaml line of a dotted key (or of its nearest parent), if known."""
        while key:
            if key in self._lines:
                return self._lines[key]
            key = key.rpartition(".")[0]
        return None


# Environment variable -> (field path, parse int?).
ENV_VARS: dict[str, tuple[str, bool]] = {
    "KAFKA_BOOTSTRAP_SERVERS": ("kafka.bootstrap_servers", False),
    "PLOY_TOPIC_PREFIX": ("kafka.topic_prefix", False),
    "PLOY_PARTITIONS": ("kafka.partitions", True),
    "PLOY_GROUP_ID": ("kafka.group_id", False),
    "PLOY_STATE_DIR": ("state_dir", False),
    "PLOY_HOST": ("http.host", False),
    "PLOY_PORT": ("http.port", True),
    "PLOY_ADMIN_TOKEN": ("http.admin_token", False),
    "PLOY_ADVERTISED_URL": ("http.advertised_url", False),
    "PLOY_RETRIES": ("retries", True),
    "PLOY_VERSION": ("version", False),
    "PLOY_MAIN": ("main", False),
    "PLOY_KEY_DIR": ("erasure.key_dir", False),
}


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    bootstrap_servers: str | None = None,
    topic_prefix: str | None = None,
    state_dir: str | Path | None = None,
    host: str | None = None,
    port: int | None = None,
) -> Config:
    """Read ploy.yaml, apply the environment and the keyword overrides, validate.

    Args:
        path: A ploy.yaml file or a directory holding one. ``None`` looks in the
            current directory and falls back to defaults when there is none.
        env: Environment variables (see ``ENV_VARS``); ``os.environ`` if None.
            An empty value counts as unset.
        bootstrap_servers: Overrides ``kafka.bootstrap_servers``.
        topic_prefix: Overrides ``kafka.topic_prefix``.
        state_dir: Overrides ``state_dir`` (a relative one is under the cwd, as
            is a relative ``PLOY_STATE_DIR``).
        host: Overrides ``http.host``.
        port: Overrides ``http.port``.

    Returns:
        The frozen config.

    Raises:
        ConfigError: Naming the file or variable, the key and the line.
    """
    file = _find(path)
    doc = _Doc(str(file) if file else FILENAME)
    data = doc.read(file) if file else {}
    sources: dict[str, str] = {}  # field path -> env var / "load_config" that set it
    for var, (key, is_int) in ENV_VARS.items():
        raw = (os.environ if env is None else env).get(var)
        if raw:
            _put(data, key, _env_value(var, key, raw, is_int))
            sources[key] = var
    overrides = {
        "kafka.bootstrap_servers": bootstrap_servers,
        "kafka.topic_prefix": topic_prefix,
        "state_dir": state_dir,
        "http.host": host,
        "http.port": port,
    }
    for key, value in overrides.items():
        if value is not None:
            _put(data, key, value)
            sources[key] = "load_config"
    if "state_dir" in sources:
        data["state_dir"] = Path.cwd() / data["state_dir"]
    root = file.parent if file else Path.cwd()
    try:
        return Config.model_validate(
            {**data, "path": file, "root": root}, context={"lines": doc.lines}
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        got = "" if err["type"] == "missing" or _is_secret(err["loc"]) else (
            f" (got {err['input']!r})")
        key = ".".join(_YAML_NAME.get(str(p), str(p)) for p in _yaml_loc(err["loc"]))
        if loc in sources:
            raise ConfigError(sources[loc], key, err["msg"] + got) from None
        raise doc.error(key, err["msg"] + got) from None


def check_bindings(config: Config, workflow_names: Iterable[str]) -> None:
    """Fail start-up if a binding names a workflow the worker does not define.

    Raises:
        ConfigError: For the first such binding, with its key and line.
    """
    names = set(workflow_names)
    for binding, target in config.workflow.items():
        if target.name not in names:
            key = f"workflow.{binding}"
            defined = ", ".join(sorted(names)) or "none"
            problem = f"names workflow '{target.name}' which the worker does not define"
            file = str(config.path or FILENAME)
            raise ConfigError(file, key, f"{problem} (defines: {defined})", config.line_of(key))


def _anchor_items(items: object, field: str, root: Path) -> object:
    """Connector entries with ``field`` (a path) made a Path under ``root`` if relative."""
    if not isinstance(items, list):
        return items if items is not None else []
    out: list[object] = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get(field), str | Path):
            item = {**item, field: root / Path(item[field])}
        out.append(item)
    return out


def _yaml_loc(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """A pydantic error location without the union tag pydantic puts after ``sinks.N``."""
    if len(loc) >= 3 and loc[0] == "sinks" and loc[2] in SINK_KINDS:
        return loc[:2] + loc[3:]
    return loc


def _is_secret(loc: tuple[int | str, ...]) -> bool:
    return bool(loc) and loc[-1] == "secret"


def _find(path: str | Path | None) -> Path | None:
    if path is None:
        default = Path.cwd() / FILENAME
        return default.resolve() if default.is_file() else None
    file = Path(path) / FILENAME if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ConfigError(str(file), None, "not found")
    return file.resolve()


def _env_value(var: str, key: str, raw: str, is_int: bool) -> str | int:
    if not is_int:
        return raw
    if not re.fullmatch(r"-?[0-9]+", raw.strip()):
        raise ConfigError(var, key, f"must be an integer, got {raw!r}")
    return int(raw)


def _put(data: dict[str, Any], key: str, value: object) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value


def _allowed(model: type[BaseModel]) -> list[str]:
    return [_YAML_NAME.get(f, f) for f in model.model_fields if f not in _NOT_IN_YAML]


class _Doc:
    """One ploy.yaml: its label for messages, each dotted key's line, and the translation."""

    def __init__(self, file: str) -> None:
        self.file, self.lines = file, dict[str, int]()

    def error(self, key: str | None, problem: str) -> ConfigError:
        probe = key or ""
        while probe and probe not in self.lines:  # a key from a default: use its parent's line
            probe = probe.rpartition(".")[0]
        return ConfigError(self.file, key, problem, self.lines.get(probe))

    def read(self, file: Path) -> dict[str, Any]:
        """Parse the file and translate it to field names; ploy.yaml's checks happen here."""
        try:
            loader = yaml.SafeLoader(file.read_text(encoding="utf-8"))
            try:
                node = loader.get_single_node()
                raw = loader.construct_document(node) if node is not None else None
            finally:
                loader.dispose()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = mark.line + 1 if mark is not None else None
            raise ConfigError(self.file, None, f"invalid YAML: {exc.problem}", where) from None
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
            raise ConfigError(self.file, None, f"cannot read: {exc}") from None
        if node is not None:
            self._index(node, "")
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise ConfigError(self.file, None, "the top level must be a mapping of keys", 1)
        return self._translate(raw)

    def _index(self, node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.SequenceNode):  # connector lists: key "sinks.0.url"
            for i, item in enumerate(node.value):
                self.lines[f"{prefix}{i}"] = item.start_mark.line + 1
                self._index(item, f"{prefix}{i}.")
            return
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            if key in self.lines:
                raise ConfigError(self.file, key, "duplicate key", key_node.start_mark.line + 1)
            self.lines[key] = key_node.start_mark.line + 1
            self._index(value_node, key + ".")

    def _mapping(self, value: object, key: str, model: type[BaseModel]) -> dict[str, Any]:
        if value is None:
            return {}
        allowed = _allowed(model)
        if not isinstance(value, dict):
            raise self.error(key or None, f"must be a mapping of keys ({', '.join(allowed)})")
        for name in value:
            if name not in allowed:
                where = f"{key}.{name}" if key else str(name)
                raise self.error(where, f"unknown key; allowed here: {', '.join(allowed)}")
        return dict(value)

    def _duration(self, data: dict[str, Any], at: str, key: str, field: str, scale: float) -> None:
        section = data.get(at, {})
        if key in section:
            try:
                section[field] = parse_duration(section.pop(key)) * scale
            except DurationError as exc:
                raise self.error(f"{at}.{key}", str(exc)) from None

    def _durations_of(self, section: dict[str, Any], at: str) -> None:
        """Nested durations of one connector entry (``timeout``, ``backoff.initial/max``)."""
        holder = {at: section}
        self._duration(holder, at, "timeout", "timeout_s", 0.001)
        if "backoff" in section:
            section["backoff"] = self._mapping(section["backoff"], f"{at}.backoff", Backoff)
            holder = {f"{at}.backoff": section["backoff"]}
            self._duration(holder, f"{at}.backoff", "initial", "initial_ms", 1)
            self._duration(holder, f"{at}.backoff", "max", "max_ms", 1)

    def _sources(self, value: object) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error("sources", "must be a list of {topic, binding, format, ...}")
        sources = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.error(f"sources.{i}", "must be a mapping with topic and binding")
            sources.append(self._mapping(item, f"sources.{i}", SourceConfig))
        return sources

    def _sinks(self, value: object) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error("sinks", "must be a list of {kind: topic|webhook|archive, ...}")
        kinds = ", ".join(SINK_KINDS)
        sinks = []
        for i, item in enumerate(value):
            key = f"sinks.{i}"
            if not isinstance(item, dict) or "kind" not in item:
                raise self.error(key, f"must be a mapping with 'kind' (one of: {kinds})")
            model = SINK_KINDS.get(item["kind"]) if isinstance(item["kind"], str) else None
            if model is None:
                raise self.error(f"{key}.kind", f"unknown connector kind {item['kind']!r}; "
                                 f"one of: {kinds}")
            sink = self._mapping(item, key, model)
            self._durations_of(sink, key)
            sinks.append(sink)
        return sinks

    def _translate(self, raw: dict[str, Any]) -> dict[str, Any]:
        data = self._mapping(raw, "", Config)
        for name, model in (("backoff", Backoff), ("kafka", KafkaConfig), ("http", HttpConfig)):
            if name in data:
                data[name] = self._mapping(data[name], name, model)
        self._duration(data, "backoff", "initial", "initial_ms", 1)
        self._duration(data, "backoff", "max", "max_ms", 1)
        self._duration(data, "kafka", "connect_timeout", "connect_timeout_s", 0.001)
        if "retention" in data:
            try:
                data["retention_ms"] = parse_duration(data.pop("retention"))
            except DurationError as exc:
                raise self.error("retention", str(exc)) from None
        if "config" in data.get("kafka", {}):
            data["kafka"]["config"] = self._librdkafka(data["kafka"]["config"])
        if "workflow" in data:
            data["workflow"] = self._bindings(data["workflow"])
        if "sources" in data:
            data["sources"] = self._sources(data["sources"])
        if "sinks" in data:
            data["sinks"] = self._sinks(data["sinks"])
        if "schedules" in data:
            data["schedules"] = self._schedules(data["schedules"])
        return data

    def _schedules(self, value: object) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error("schedules", "must be a list of {name, binding, cron or every, ...}")
        schedules = []
        for i, item in enumerate(value):
            key = f"schedules.{i}"
            if not isinstance(item, dict):
                raise self.error(key, "must be a mapping with name, binding and cron or every")
            schedule = self._mapping(item, key, ScheduleConfig)
            self._duration({key: schedule}, key, "every", "every_ms", 1)
            schedules.append(schedule)
        return schedules

    def _librdkafka(self, value: object) -> dict[str, str]:
        if not isinstance(value, dict):
            raise self.error("kafka.config", "must be a mapping of librdkafka settings")
        out = {}
        for name, setting in value.items():
            if not isinstance(setting, str | int | float | bool):
                raise self.error(f"kafka.config.{name}", "must be a string, number or boolean")
            out[str(name)] = str(setting).lower() if isinstance(setting, bool) else str(setting)
        return out

    def _bindings(self, value: object) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error("workflow", "must map binding names to workflow names")
        bindings: dict[str, Any] = {}
        for binding, target in value.items():
            key = f"workflow.{binding}"
            if not isinstance(binding, str) or not binding.isidentifier() or iskeyword(binding):
                raise self.error(key, "a binding name must be a Python identifier (ctx.env.NAME)")
            if isinstance(target, str):
                target = {"name": target}
            elif not isinstance(target, dict) or "name" not in target:
                problem = ("must be a workflow name or a mapping with 'name' (and 'retries', "
                           "'version')")
                raise self.error(key, problem)
            bindings[binding] = self._mapping(target, key, WorkflowBinding)
            for name, model in (("concurrency", Concurrency), ("rate", Rate),
                                ("debounce", Debounce)):
                if name in bindings[binding]:
                    section = bindings[binding][name] = self._mapping(
                        bindings[binding][name], f"{key}.{name}", model)
                    self._duration({f"{key}.{name}": section}, f"{key}.{name}", "period",
                                   "period_ms", 1)
        return bindings
