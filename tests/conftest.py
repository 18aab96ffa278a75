"""Fixtures shared by every test: one broker per session, isolation per test.

Tests share the session's broker (starting one per test would cost more than
most tests) and keep apart by a unique topic prefix and state directory each.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.testing import embedded_kafka, unique_prefix


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    """Bootstrap servers of the session's Kafka: ``KAFKA_BOOTSTRAP_SERVERS`` or an embedded broker.

    The embedded broker is stopped when the session ends, also after a Ctrl-C
    (pytest tears session fixtures down on KeyboardInterrupt); if teardown
    never runs, ``engine.broker`` stops it at interpreter exit.
    """
    with embedded_kafka() as servers:
        yield servers


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    """A topic prefix no other test uses, readable from the test's name."""
    return unique_prefix(request.node.name)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """An empty state directory (``tmp_path / "state"``) for this test's view."""
    path = tmp_path / "state"
    path.mkdir()
    return path
