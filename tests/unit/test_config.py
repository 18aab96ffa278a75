"""ploy.yaml + environment -> Config: every accepted form and every error's file/key/line."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.config import Config, check_bindings, load_config
from engine.errors import ConfigError

FULL = """\
kind: worker
main: worker.py
build: pnpm build
out: dist
workflow:
  ORDER_FLOW: order_processing
  OTHER: {name: other_flow, retries: 5}
retries: 2
backoff: {initial: 500ms, max: 30s, multiplier: 3}
state_dir: data/state
max_payload_bytes: 500000
kafka:
  bootstrap_servers: "host:9092"
  topic_prefix: shop
  partitions: 12
  replication_factor: 3
  group_id: shop-workers
  connect_timeout: 2500ms
  config:
    security.protocol: SASL_SSL
    sasl.password: hunter2
    enable.idempotence: true
    linger.ms: 5
http: {host: 0.0.0.0, port: 9000, max_body_bytes: 2048, admin_token: s3cret}
"""

Write = Callable[[str], Path]


@pytest.fixture
def write(tmp_path: Path) -> Write:
    """Write a ploy.yaml (dedented) into tmp_path and return its path."""

    def _write(text: str) -> Path:
        path = tmp_path / "ploy.yaml"
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return _write


def config_error(path: Path, env: dict[str, str] | None = None, **kw: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {}, **kw)  # type: ignore[arg-type]
    return info.value


def assert_names(err: ConfigError, file: str, key: str | None, line: int | None) -> None:
    assert (err.file, err.key, err.line) == (file, key, line)
    where = file + (f":{line}" if line is not None else "")
    assert str(err).startswith(where + ":" + (f" key '{key}':" if key else ""))


# --- accepted forms ---------------------------------------------------------------------------


def test_full_file(write: Write) -> None:
    path = write(FULL)
    c = load_config(path, env={})
    assert c.path == path.resolve() and c.root == path.parent.resolve()
    assert (c.kind, c.main, c.build, c.out) == ("worker", "worker.py", "pnpm build", "dist")
    assert c.workflow["ORDER_FLOW"].name == "order_processing"
    assert c.workflow["ORDER_FLOW"].retries is None
    assert (c.workflow["OTHER"].name, c.workflow["OTHER"].retries) == ("other_flow", 5)
    assert c.retries == 2
    assert (c.backoff.initial_ms, c.backoff.max_ms, c.backoff.multiplier) == (500, 30_000, 3.0)
    assert c.state_dir == path.parent.resolve() / "data" / "state"
    assert c.max_payload_bytes == 500_000
    k = c.kafka
    assert (k.bootstrap_servers, k.topic_prefix, k.partitions) == ("host:9092", "shop", 12)
    assert (k.replication_factor, k.group_id, k.connect_timeout_s) == (3, "shop-workers", 2.5)
    assert k.config == {
        "security.protocol": "SASL_SSL",
        "sasl.password": "hunter2",
        "enable.idempotence": "true",
        "linger.ms": "5",
    }
    h = c.http
    assert (h.host, h.port, h.max_body_bytes, h.admin_token) == ("0.0.0.0", 9000, 2048, "s3cret")


def test_retries_and_binding_lookup(write: Write) -> None:
    c = load_config(write(FULL), env={})
    assert c.retries_for("other_flow") == 5
    assert c.retries_for("order_processing") == 2  # short form: the global default
    assert c.retries_for("not_bound") == 2
    assert c.binding_for("other_flow") == "OTHER"
    assert c.binding_for("order_processing") == "ORDER_FLOW"
    assert c.binding_for("not_bound") is None


def test_line_of_keys(write: Write) -> None:
    c = load_config(write(FULL), env={})
    assert c.line_of("workflow.OTHER.retries") == 7
    assert c.line_of("kafka.partitions") == 15
    assert c.line_of("kafka.config.linger.ms") == 23
    assert c.line_of("http.admin_token") == 24  # flow mappings: the parent's line
    assert c.line_of("no.such.key") is None


def test_seed_short_and_expanded_forms(write: Write) -> None:
    path = write(
        """\
        kind: worker
        build: pnpm build
        out: dist
        workflow:
          ORDER_FLOW:
            name: order_processing
            retries: 0
        """
    )
    c = load_config(path, env={})
    assert c.workflow["ORDER_FLOW"].retries == 0
    assert c.retries_for("order_processing") == 0  # 0 is a value, not "unset"


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    c = load_config(env={})
    assert c.path is None and c.root == tmp_path
    assert c.state_dir == tmp_path / ".ploy"
    assert (c.kind, c.main, c.workflow, c.retries) == ("worker", "worker.py", {}, 3)
    assert (c.backoff.initial_ms, c.backoff.max_ms, c.backoff.multiplier) == (1000, 60_000, 2.0)
    assert c.kafka.bootstrap_servers is None  # the embedded broker
    assert (c.kafka.topic_prefix, c.kafka.partitions, c.kafka.group_id) == (
        "ploy",
        6,
        "ploy-workers",
    )
    assert (c.kafka.connect_timeout_s, c.kafka.config) == (10.0, {})
    assert (c.http.host, c.http.port, c.http.max_body_bytes) == ("127.0.0.1", 8787, 1_048_576)
    assert c.http.admin_token is None and c.max_payload_bytes == 900_000


def test_cwd_file_is_found(write: Write, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write("retries: 7\n")
    monkeypatch.chdir(tmp_path)
    c = load_config(env={})
    assert c.retries == 7 and c.path == tmp_path / "ploy.yaml"


def test_directory_path(write: Write, tmp_path: Path) -> None:
    write("retries: 1\n")
    assert load_config(tmp_path, env={}).retries == 1
    assert load_config(str(tmp_path), env={}).retries == 1


def test_empty_file_and_empty_sections_are_defaults(write: Write) -> None:
    assert load_config(write(""), env={}).retries == 3
    c = load_config(write("workflow:\nkafka:\nbackoff:\n"), env={})
    assert c.workflow == {} and c.kafka.partitions == 6 and c.backoff.initial_ms == 1000


def test_int_durations_are_milliseconds(write: Write) -> None:
    c = load_config(
        write("backoff: {initial: 250, max: 1m}\nkafka: {connect_timeout: 1500}\n"), env={}
    )
    assert (c.backoff.initial_ms, c.backoff.max_ms, c.kafka.connect_timeout_s) == (250, 60_000, 1.5)


def test_absolute_state_dir_stays(write: Write, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    assert load_config(write(f"state_dir: {target}\n"), env={}).state_dir == target


def test_config_is_frozen(write: Write) -> None:
    c = load_config(write(FULL), env={})
    with pytest.raises(ValidationError):
        c.retries = 9
    with pytest.raises(ValidationError):
        c.kafka.partitions = 1


def test_secrets_stay_out_of_repr(write: Write) -> None:
    text = repr(load_config(write(FULL), env={}))
    assert "s3cret" not in text and "hunter2" not in text
    assert "shop-workers" in text


# --- environment and overrides -----------------------------------------------------------------

ENV = {
    "KAFKA_BOOTSTRAP_SERVERS": "kafka:29092",
    "PLOY_TOPIC_PREFIX": "envp",
    "PLOY_PARTITIONS": "3",
    "PLOY_GROUP_ID": "env-group",
    "PLOY_HOST": "10.0.0.1",
    "PLOY_PORT": "9100",
    "PLOY_ADMIN_TOKEN": "envtoken",
    "PLOY_RETRIES": "9",
    "PLOY_MAIN": "app.py",
}


def test_environment_beats_the_file(write: Write) -> None:
    c = load_config(write(FULL), env=ENV)
    assert (c.kafka.bootstrap_servers, c.kafka.topic_prefix) == ("kafka:29092", "envp")
    assert (c.kafka.partitions, c.kafka.group_id) == (3, "env-group")
    assert (c.http.host, c.http.port, c.http.admin_token) == ("10.0.0.1", 9100, "envtoken")
    assert (c.retries, c.main) == (9, "app.py")
    assert c.kafka.replication_factor == 3  # keys without a variable keep the file's value
    assert c.retries_for("other_flow") == 5  # a binding's own retries still win


def test_environment_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(env={"PLOY_PORT": "0"}).http.port == 0


def test_os_environ_is_the_default(write: Write, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLOY_RETRIES", "6")
    assert load_config(write(FULL)).retries == 6


def test_empty_variable_is_unset(write: Write) -> None:
    c = load_config(write(FULL), env={"KAFKA_BOOTSTRAP_SERVERS": "", "PLOY_PORT": ""})
    assert (c.kafka.bootstrap_servers, c.http.port) == ("host:9092", 9000)


def test_state_dir_from_env_is_relative_to_cwd(
    write: Write, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(FULL)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert load_config(path, env={"PLOY_STATE_DIR": "st"}).state_dir == cwd / "st"


def test_overrides_beat_the_environment(write: Write, tmp_path: Path) -> None:
    c = load_config(
        write(FULL),
        env=ENV,
        bootstrap_servers="b:1",
        topic_prefix="t",
        state_dir=tmp_path / "s",
        host="::1",
        port=1234,
    )
    assert (c.kafka.bootstrap_servers, c.kafka.topic_prefix) == ("b:1", "t")
    assert (c.state_dir, c.http.host, c.http.port) == (tmp_path / "s", "::1", 1234)


@pytest.mark.parametrize(
    ("var", "value", "key", "fragment"),
    [
        ("PLOY_PORT", "abc", "http.port", "must be an integer, got 'abc'"),
        ("PLOY_PORT", "70000", "http.port", "less than or equal to 65535"),
        ("PLOY_PARTITIONS", "0", "kafka.partitions", "greater than or equal to 1"),
        ("PLOY_PARTITIONS", "1.5", "kafka.partitions", "must be an integer"),
        ("PLOY_RETRIES", "-1", "retries", "greater than or equal to 0"),
        ("PLOY_TOPIC_PREFIX", "has space", "kafka.topic_prefix", "should match pattern"),
    ],
)
def test_bad_environment_value_names_the_variable(
    write: Write, var: str, value: str, key: str, fragment: str
) -> None:
    err = config_error(write(FULL), env={var: value})
    assert_names(err, var, key, None)
    assert fragment in str(err)


def test_bad_override_names_load_config(write: Write) -> None:
    err = config_error(write(FULL), port=70000)
    assert_names(err, "load_config", "http.port", None)


# --- errors in the file -----------------------------------------------------------------------


def test_explicit_missing_file(tmp_path: Path) -> None:
    err = config_error(tmp_path / "nope.yaml")
    assert_names(err, str(tmp_path / "nope.yaml"), None, None)
    assert "not found" in str(err)


def test_directory_without_ploy_yaml(tmp_path: Path) -> None:
    err = config_error(tmp_path)
    assert_names(err, str(tmp_path / "ploy.yaml"), None, None)
    assert "not found" in str(err)


def test_yaml_syntax_error(write: Write) -> None:
    path = write("kind: worker\nworkflow:\n  A: b\n  B: [unclosed\nretries: 3\n")
    err = config_error(path)
    assert err.file == str(path) and err.key is None
    assert err.line is not None and err.line >= 4
    assert "invalid YAML" in str(err)


def test_yaml_syntax_error_line(write: Write) -> None:
    err = config_error(write("kind: worker\nretries: 3\n  bad: indent\n"))
    assert err.line == 3 and "invalid YAML" in str(err)


def test_top_level_not_a_mapping(write: Write) -> None:
    path = write("- kind\n- worker\n")
    err = config_error(path)
    assert_names(err, str(path), None, 1)
    assert "top level must be a mapping" in str(err)


@pytest.mark.parametrize(
    ("text", "key", "line", "allowed"),
    [
        ("kind: worker\nretry: 3\n", "retry", 2, "retries"),
        ("path: /x\n", "path", 1, "state_dir"),
        ("kafka:\n  partitions: 2\n  bogus: 1\n", "kafka.bogus", 3, "topic_prefix"),
        ("backoff:\n  initial_ms: 5\n", "backoff.initial_ms", 2, "initial, max, multiplier"),
        ("http:\n  hots: x\n", "http.hots", 2, "max_body_bytes"),
        ("workflow:\n  A:\n    name: a\n    retry: 1\n", "workflow.A.retry", 4, "name, retries"),
    ],
)
def test_unknown_key(write: Write, text: str, key: str, line: int, allowed: str) -> None:
    path = write(text)
    err = config_error(path)
    assert_names(err, str(path), key, line)
    assert "unknown key" in str(err) and allowed in str(err)


@pytest.mark.parametrize(
    ("text", "key", "line", "fragment"),
    [
        ("kind: worker\nretries: three\n", "retries", 2, "valid integer"),
        ("retries: 2.5\n", "retries", 1, "valid integer"),
        ("retries: true\n", "retries", 1, "valid integer"),
        ("retries: -1\n", "retries", 1, "greater than or equal to 0"),
        ("main: 5\n", "main", 1, "valid string"),
        ("kafka:\n  topic_prefix: ploy\n  partitions: 0\n", "kafka.partitions", 3, ">= 1"),
        ("http:\n  port: 70000\n", "http.port", 2, "less than or equal to 65535"),
        ("http:\n  port: -1\n", "http.port", 2, "greater than or equal to 0"),
        ("http: {admin_token: 123}\n", "http.admin_token", 1, "valid string"),
        ("backoff:\n  multiplier: 0.5\n", "backoff.multiplier", 2, "greater than or equal to 1"),
        ("backoff:\n  initial: 2m\n  max: 1m\n", "backoff", 1, "below initial"),
        ("kafka:\n  topic_prefix: a/b\n", "kafka.topic_prefix", 2, "pattern"),
    ],
)
def test_invalid_value(write: Write, text: str, key: str, line: int, fragment: str) -> None:
    path = write(text)
    err = config_error(path)
    assert_names(err, str(path), key, line)
    assert fragment.replace(">= 1", "greater than or equal to 1") in str(err)


def test_negative_binding_retries_names_its_line(write: Write) -> None:
    path = write(FULL.replace("{name: other_flow, retries: 5}", "\n    name: x\n    retries: -2"))
    err = config_error(path)
    assert_names(err, str(path), "workflow.OTHER.retries", 9)
    assert "greater than or equal to 0" in str(err) and "-2" in str(err)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("[a, b]", "a workflow name or a mapping with 'name'"),
        ("{retries: 2}", "a workflow name or a mapping with 'name'"),
        ("42", "a workflow name or a mapping with 'name'"),
        ("", "a workflow name or a mapping with 'name'"),
        ("{name: 7}", "valid string"),
        ("{name: ''}", "at least 1 character"),
    ],
)
def test_bad_binding_value(write: Write, value: str, fragment: str) -> None:
    path = write(f"kind: worker\nworkflow:\n  GOOD: fine\n  FLOW: {value}\n")
    err = config_error(path)
    assert err.file == str(path) and err.key is not None
    assert err.key.startswith("workflow.FLOW") and err.line == 4
    assert fragment in str(err)


@pytest.mark.parametrize("name", ["order-flow", "1FLOW", "class"])
def test_binding_name_must_be_an_identifier(write: Write, name: str) -> None:
    path = write(f"workflow:\n  OK: a\n  {name}: b\n")
    err = config_error(path)
    assert_names(err, str(path), f"workflow.{name}", 3)
    assert "Python identifier" in str(err)


def test_workflow_not_a_mapping(write: Write) -> None:
    path = write("kind: worker\nworkflow: [a]\n")
    assert_names(config_error(path), str(path), "workflow", 2)


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("backoff: {initial: 5 parsecs}\n", "backoff.initial", 1),
        ("backoff:\n  initial: 1s\n  max: 1s1h\n", "backoff.max", 3),
        ("kafka:\n  connect_timeout: -5s\n", "kafka.connect_timeout", 2),
        ("kafka:\n  connect_timeout: 1.5\n", "kafka.connect_timeout", 2),
    ],
)
def test_bad_duration(write: Write, text: str, key: str, line: int) -> None:
    path = write(text)
    err = config_error(path)
    assert_names(err, str(path), key, line)
    assert "invalid duration" in str(err)


def test_zero_connect_timeout(write: Write) -> None:
    path = write("kafka:\n  connect_timeout: 0s\n")
    assert_names(config_error(path), str(path), "kafka.connect_timeout", 2)


def test_section_not_a_mapping(write: Write) -> None:
    path = write("kind: worker\nkafka: 5\n")
    err = config_error(path)
    assert_names(err, str(path), "kafka", 2)
    assert "must be a mapping" in str(err) and "bootstrap_servers" in str(err)


def test_librdkafka_setting_must_be_scalar(write: Write) -> None:
    path = write("kafka:\n  config:\n    sasl.mechanism: [PLAIN]\n")
    assert_names(config_error(path), str(path), "kafka.config.sasl.mechanism", 3)


def test_duplicate_key(write: Write) -> None:
    path = write("retries: 1\nkind: worker\nretries: 2\n")
    err = config_error(path)
    assert_names(err, str(path), "retries", 3)
    assert "duplicate key" in str(err)


# --- bindings against the worker --------------------------------------------------------------


def test_check_bindings_accepts_defined_workflows(write: Write) -> None:
    config = load_config(write(FULL), env={})
    check_bindings(config, ["order_processing", "other_flow", "unused"])


def test_check_bindings_names_binding_line_and_known(write: Write) -> None:
    path = write(FULL)
    config = load_config(path, env={})
    with pytest.raises(ConfigError) as info:
        check_bindings(config, iter(["order_processing", "beta", "alpha"]))
    assert_names(info.value, str(path.resolve()), "workflow.OTHER", 7)
    assert "names workflow 'other_flow' which the worker does not define" in str(info.value)
    assert "(defines: alpha, beta, order_processing)" in str(info.value)


def test_check_bindings_without_workflows(write: Write) -> None:
    config = load_config(write(FULL), env={})
    with pytest.raises(ConfigError, match=r"\(defines: none\)"):
        check_bindings(config, [])


def test_config_built_in_code_anchors_state_dir(tmp_path: Path) -> None:
    c = Config(root=tmp_path, state_dir=Path("s"))
    assert c.state_dir == tmp_path / "s" and c.retries_for("x") == 3 and c.line_of("x") is None
