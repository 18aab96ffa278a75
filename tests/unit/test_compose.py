"""docker-compose.yml and Dockerfile agree with the engine, checked without Docker."""

from __future__ import annotations

import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from engine.config import ENV_VARS

ROOT = Path(__file__).resolve().parents[2]


def load_compose() -> dict[str, Any]:
    with (ROOT / "docker-compose.yml").open() as file:
        compose: dict[str, Any] = yaml.safe_load(file)
    return compose


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, from either compose form (mapping or KEY=VALUE list)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def listeners(value: str) -> dict[str, str]:
    """``NAME://host:port,...`` -> {NAME: "host:port"}."""
    pairs = (item.strip().split("://", 1) for item in value.split(",") if item.strip())
    return {name: address for name, address in pairs}


def port_of(address: str) -> str:
    return address.rsplit(":", 1)[1]


def worker_command() -> list[str]:
    command = load_compose()["services"]["worker"]["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    services: dict[str, Any] = load_compose()["services"]
    return services


def test_kafka_and_worker_services_exist(services: dict[str, Any]) -> None:
    assert {"kafka", "worker"} <= set(services)


def test_worker_reaches_a_listener_that_kafka_advertises(services: dict[str, Any]) -> None:
    kafka_env = environment(services["kafka"])
    advertised = set(listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"]).values())
    servers = environment(services["worker"])["KAFKA_BOOTSTRAP_SERVERS"].split(",")
    for server in servers:
        assert server.strip() in advertised, f"{server} is not advertised by kafka: {advertised}"


def test_every_advertised_listener_is_bound_and_the_external_one_published(
    services: dict[str, Any],
) -> None:
    kafka = services["kafka"]
    env = environment(kafka)
    bound = listeners(env["KAFKA_LISTENERS"])
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    for name, address in advertised.items():
        assert name in bound, f"advertised listener {name} is not in KAFKA_LISTENERS"
        assert port_of(bound[name]) == port_of(address)
    assert "EXTERNAL" in advertised
    published = {str(p).rsplit(":", 1)[-1] for p in kafka.get("ports", [])}
    assert port_of(advertised["EXTERNAL"]) in published


def test_worker_sets_only_variables_the_engine_reads(services: dict[str, Any]) -> None:
    env = environment(services["worker"])
    unknown = set(env) - set(ENV_VARS)
    assert not unknown, f"the engine does not read {sorted(unknown)}"


def test_worker_partitions_is_a_positive_int(services: dict[str, Any]) -> None:
    partitions = environment(services["worker"])["PLOY_PARTITIONS"]
    assert int(partitions) >= 1


def test_worker_scales_without_fixed_names_or_host_ports(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert worker["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "healthcheck" in services["kafka"]


def test_worker_runs_ploy_worker_on_an_example() -> None:
    command = worker_command()
    assert command[:2] == ["ploy", "worker"]
    app = PurePosixPath(command[2])
    assert not app.is_absolute() and ".." not in app.parts
    assert app.parts[0] == "examples" and len(app.parts) >= 2


def test_worker_example_directory_exists() -> None:
    app = ROOT / worker_command()[2]
    assert app.is_dir()
    assert (app / "ploy.yaml").is_file() and (app / "worker.py").is_file()


def test_dockerfile_installs_the_project() -> None:
    dockerfile = ROOT / "Dockerfile"
    assert dockerfile.is_file()
    text = dockerfile.read_text().replace("\\\n", " ")
    runs = [line for line in text.splitlines() if line.strip().upper().startswith("RUN ")]
    installs = re.compile(r"\bpip\s+install\b(?:\s+-{1,2}[\w-]+(?:=\S+)?)*\s+\.(?:\s|$|\[)")
    assert any(installs.search(line) for line in runs), "no `RUN pip install .` in Dockerfile"
    assert re.search(r"^FROM\s+python:3\.11", text, re.MULTILINE)
