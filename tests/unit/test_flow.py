"""Flow control: ploy.yaml, key values, the placement of ids, rate windows and debounce
bursts (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import Concurrency, Debounce, Rate, load_config
from engine.debounce import Burst, Trigger
from engine.errors import ConfigError
from engine.flow import FlowControl, Rules, key_value
from engine.log import partition_for
from engine.ratelimit import Window


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


def test_rate_and_debounce_in_ploy_yaml(tmp_path: Path) -> None:
    (tmp_path / "ploy.yaml").write_text(
        "workflow:\n  BILL:\n    name: bill\n"
        "    concurrency: {limit: 3, key: input.c, priority: input.p}\n"
        "    rate: {limit: 2, period: 1m, key: input.c}\n"
        "    debounce: {period: 500ms, key: input.c}\n")
    binding = load_config(tmp_path, env={}).workflow["BILL"]
    assert binding.rate == Rate(limit=2, period_ms=60_000, key="input.c")
    assert binding.debounce == Debounce(period_ms=500, key="input.c")
    rules = Rules.of(binding)
    assert rules is not None
    assert (rules.key, rules.priority, rules.slots) == ("input.c", "input.p", 3)


@pytest.mark.parametrize(("body", "key", "problem"), [
    ("rate: {limit: 0, period: 1s}", "workflow.BILL.rate.limit", "greater than or equal to 1"),
    ("rate: {limit: -2, period: 1s}", "workflow.BILL.rate.limit", "greater than or equal to 1"),
    ("rate: {limit: 2, period: 1 minute}", "workflow.BILL.rate.period", "duration"),
    ("rate: {limit: 2, period: 0s}", "workflow.BILL.rate.period", "greater than or equal to 1"),
    ("rate: {limit: 2}", "workflow.BILL.rate.period", "Field required"),
    ("rate: {limit: 2, period: 1s, key: customer_id}", "workflow.BILL.rate.key",
     "should match"),
    ("rate: {limit: 2, period: 1s, burst: 3}", "workflow.BILL.rate.burst", "unknown key"),
    ("debounce: {period: -5s}", "workflow.BILL.debounce.period", "duration"),
    ("debounce: {period: 5s, key: input.}", "workflow.BILL.debounce.key", "should match"),
    ("debounce: 5s", "workflow.BILL.debounce", "must be a mapping"),
])
def test_rate_and_debounce_mistakes_name_the_key_and_line(
        tmp_path: Path, body: str, key: str, problem: str) -> None:
    (tmp_path / "ploy.yaml").write_text(f"workflow:\n  BILL:\n    name: bill\n    {body}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path, env={})
    assert (caught.value.key, caught.value.line) == (key, 4), str(caught.value)
    assert problem in caught.value.problem, str(caught.value)
    assert str(tmp_path / "ploy.yaml") in str(caught.value)


def test_flow_controls_of_one_binding_share_their_key(tmp_path: Path) -> None:
    (tmp_path / "ploy.yaml").write_text(
        "workflow:\n  BILL:\n    name: bill\n    concurrency: {limit: 1, key: input.a}\n"
        "    rate: {limit: 1, period: 1s, key: input.b}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path, env={})
    assert (caught.value.key, caught.value.line) == ("workflow.BILL.rate.key", 5)
    assert "must be the key of concurrency (input.a)" in caught.value.problem


def test_a_sliding_window_allows_limit_starts_per_period() -> None:
    window = Window(Rate(limit=2, period_ms=1000))
    assert window.wait_ms(0) == 0
    window.started("a", 0)
    window.started("b", 400)
    assert window.wait_ms(500) == 500  # a leaves the window at 1000
    assert window.wait_ms(1000) == 0  # (1000 - period, 1000] holds b only
    window.started("c", 1000)
    assert window.wait_ms(1100) == 300  # b leaves at 1400
    window.started("c", 1003)  # its WorkflowStarted, folded: the later time wins
    window.started("c", 1001)
    assert window.starts["c"] == 1003
    assert window.recent(2500) == []  # all forgotten


def test_a_burst_keeps_the_last_trigger_within_the_period() -> None:
    burst = Burst(Debounce(period_ms=500))
    for trigger in [Trigger(30, "c", 700), Trigger(10, "a", 0), Trigger(20, "b", 400),
                    Trigger(40, "d", 1300)]:
        burst.add(trigger)  # (out of order: a restart reads them in id order)
    assert [(it.id, by.id) for it, by in burst.superseded()] == [("a", "b"), ("b", "c")]
    assert [t.id for t in burst.triggers] == ["c", "d"]  # d came 600 ms after c: two runs
    assert burst.due_at("c") == 1200 and burst.due_at("d") == 1800
    assert "c" in burst and "a" not in burst
