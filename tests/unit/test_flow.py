"""Concurrency limits: ploy.yaml, key values and the placement of ids (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import Concurrency, load_config
from engine.errors import ConfigError
from engine.flow import FlowControl, key_value
from engine.log import partition_for


def test_concurrency_in_ploy_yaml_and_its_mistakes(tmp_path: Path) -> None:
    (tmp_path / "ploy.yaml").write_text(
        "workflow:\n  BILL:\n    name: bill\n    concurrency: {limit: 2, key: input.customer_id}\n")
    limit = load_config(tmp_path, env={}).concurrency_for("bill")
    assert limit == Concurrency(limit=2, key="input.customer_id")
    for body, key, problem in [
        ("{limit: -1}", "workflow.BILL.concurrency.limit", "greater than or equal to 1"),
        ("{limit: 2, key: customer_id}", "workflow.BILL.concurrency.key", "should match"),
        ("{limit: 2, per: x}", "workflow.BILL.concurrency.per", "unknown key"),
    ]:
        (tmp_path / "ploy.yaml").write_text(
            f"workflow:\n  BILL:\n    name: bill\n    concurrency: {body}\n")
        with pytest.raises(ConfigError) as caught:
            load_config(tmp_path, env={})
        assert (caught.value.key, caught.value.line) == (key, 4), str(caught.value)
        assert problem in caught.value.problem


def test_key_values() -> None:
    limit = Concurrency(limit=1, key="input.customer.id")
    assert key_value(limit, '{"customer": {"id": "c1"}}') == "c1"
    assert key_value(limit, '{"customer": {"id": 7}}') == "7"
    assert key_value(limit, '{"customer": 3}') == ""  # missing: one shared group
    assert key_value(Concurrency(limit=1), '{"a": 1}') == ""


def test_ids_of_one_key_land_on_one_partition_and_stay_deterministic(tmp_path: Path) -> None:
    (tmp_path / "ploy.yaml").write_text(
        "workflow:\n  BILL: {name: bill, concurrency: {limit: 1, key: input.c}}\n")
    config = load_config(tmp_path, env={})
    flow = FlowControl(config, lambda eid: partition_for(eid, 6), lambda _: None,
                       lambda *_: None)
    placed = [flow.place("bill", '{"c": "x"}', f"{n:032x}") for n in range(50)]
    assert len({partition_for(eid, 6) for eid in placed}) == 1
    assert placed == [flow.place("bill", '{"c": "x"}', f"{n:032x}") for n in range(50)]
    assert flow.place("other", '{"c": "x"}', "abc") == "abc"  # not limited: as it was
