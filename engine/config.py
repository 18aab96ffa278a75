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
from keyword import iskeyword
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from engine.durations import parse_duration
from engine.errors import ConfigError, DurationError

FILENAME = "ploy.yaml"
_MODEL = ConfigDict(frozen=True, extra="forbid", strict=True)
# Fields whose ploy.yaml key differs because the value is a duration.
_YAML_NAME = {"initial_ms": "initial", "max_ms": "max", "connect_timeout_s": "connect_timeout"}
_NOT_IN_YAML = ("path", "root")


class WorkflowBinding(BaseModel):
    """One ``workflow:`` entry: the workflow a binding name (``ctx.env.NAME``) calls."""

    model_config = _MODEL
    name: str = Field(min_length=1)
    retries: int | None = Field(default=None, ge=0)


class Backoff(BaseModel):
    """The wait between attempts of a step: ``initial_ms * multiplier**n``, capped."""

    model_config = _MODEL
    initial_ms: int = Field(default=1000, ge=0)
    max_ms: int = Field(default=60_000, ge=0)
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
    backoff: Backoff = Field(default_factory=Backoff)
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    state_dir: Path = Path(".ploy")
    max_payload_bytes: int = Field(default=900_000, ge=1)
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
        return data

    @model_validator(mode="after")
    def _keep_lines(self, info: ValidationInfo) -> Config:
        """Keep ploy.yaml's key -> line map, passed by load_config as validation context."""
        if isinstance(info.context, dict):
            self._lines.update(info.context.get("lines", {}))
        return self

    def binding_for(self, workflow_name: str) -> str | None:
        """Return the first binding name that calls ``workflow_name``, if any."""
        return next((b for b, w in self.workflow.items() if w.name == workflow_name), None)

    def retries_for(self, workflow_name: str) -> int:
        """Return the retries of ``workflow_name``: its binding's, else the global default."""
        binding = self.binding_for(workflow_name)
        retries = self.workflow[binding].retries if binding is not None else None
        return self.retries if retries is None else retries

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
    "PLOY_RETRIES": ("retries", True),
    "PLOY_MAIN": ("main", False),
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
        got = "" if err["type"] == "missing" else f" (got {err['input']!r})"
        key = ".".join(_YAML_NAME.get(str(p), str(p)) for p in err["loc"])
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

    def _translate(self, raw: dict[str, Any]) -> dict[str, Any]:
        data = self._mapping(raw, "", Config)
        for name, model in (("backoff", Backoff), ("kafka", KafkaConfig), ("http", HttpConfig)):
            if name in data:
                data[name] = self._mapping(data[name], name, model)
        self._duration(data, "backoff", "initial", "initial_ms", 1)
        self._duration(data, "backoff", "max", "max_ms", 1)
        self._duration(data, "kafka", "connect_timeout", "connect_timeout_s", 0.001)
        if "config" in data.get("kafka", {}):
            data["kafka"]["config"] = self._librdkafka(data["kafka"]["config"])
        if "workflow" in data:
            data["workflow"] = self._bindings(data["workflow"])
        return data

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
                problem = "must be a workflow name or a mapping with 'name' (and 'retries')"
                raise self.error(key, problem)
            bindings[binding] = self._mapping(target, key, WorkflowBinding)
        return bindings
