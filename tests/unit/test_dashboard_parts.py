"""The dashboard's pure parts: the timeline's scale, the trigger form, tracebacks, filters,
and the dashboard link on the `ploy dev` terminal."""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, Field

from engine import inputform, tracebacks
from engine.cli import _DashboardLinks
from engine.listing import Cursor, Page
from engine.models import ExecutionStatus, ExecutionSummary
from engine.search import Filters, find
from engine.timeline import Scale

# -- the timeline's scale ---------------------------------------------------------------


def test_a_scale_without_long_idle_stretches_is_linear() -> None:
    scale = Scale(0, 1000, [(0, 400), (500, 1000)])
    assert not scale.broken
    assert scale.pct(250) == 25.0 and scale.pct(1000) == 100.0


def test_a_24h_sleep_is_drawn_short_and_a_200ms_step_keeps_its_width() -> None:
    day = 86_400_000
    scale = Scale(0, 200 + day, [(0, 200)])
    assert scale.broken
    assert scale.pct(200) > 60  # the step: most of the track, not 1 px at zero
    [brk] = scale.breaks()
    assert brk["label"] == "1d" and 20 < brk["width"] < 40


def test_a_scale_maps_times_in_order_and_clamps() -> None:
    scale = Scale(0, 10_000_000, [(0, 100), (9_999_900, 10_000_000)])
    points = [scale.pct(t) for t in (-5, 0, 50, 100, 5_000_000, 9_999_950, 10_000_000, 10**9)]
    assert points == sorted(points) and points[0] == 0.0 and points[-1] == 100.0


# -- the trigger form ------------------------------------------------------------------


class Colour(Enum):
    RED = 1
    BLUE = 2


class Sub(BaseModel):
    a: int


class Form(BaseModel):
    name: str = Field(min_length=1, description="who")
    count: int
    ratio: float = 0.5
    urgent: bool = False
    kind: Literal["a", "b"] = "a"
    colour: Colour = Colour.RED
    sub: Sub | None = None


def test_fields_follow_the_schema() -> None:
    fields = {f.name: f for f in inputform.fields_of(Form.model_json_schema())}
    assert {n: f.kind for n, f in fields.items()} == {
        "name": "text", "count": "integer", "ratio": "number", "urgent": "checkbox",
        "kind": "select", "colour": "select", "sub": "json"}
    assert fields["name"].required and not fields["sub"].required
    assert fields["kind"].choices == ("a", "b") and fields["colour"].choices == ("1", "2")
    assert fields["name"].description == "who"


def test_a_submitted_form_is_read_as_typed_values() -> None:
    fields = inputform.fields_of(Form.model_json_schema())
    data, errors = inputform.read(fields, {"f.name": "x", "f.count": "3", "f.ratio": "",
                                           "f.urgent": "on", "f.colour": "2",
                                           "f.sub": '{"a": 1}'})
    assert errors == {}
    assert data == {"name": "x", "count": 3, "urgent": True, "colour": 2, "sub": {"a": 1}}
    assert Form.model_validate(data).colour is Colour.BLUE


def test_what_does_not_parse_is_passed_on_or_named() -> None:
    fields = inputform.fields_of(Form.model_json_schema())
    data, errors = inputform.read(fields, {"f.name": "x", "f.count": "many", "f.sub": "{"})
    assert data["count"] == "many"  # the model says why
    assert errors["sub"].startswith("not valid JSON")


def test_model_errors_come_back_by_field() -> None:
    fields = inputform.fields_of(Form.model_json_schema())
    errors = [{"loc": ("count",), "msg": "not an int"}, {"loc": ("sub", "a"), "msg": "bad"},
              {"loc": (), "msg": "whole"}]
    assert inputform.errors_by_field(errors, fields) == {
        "count": "not an int", "sub": "a: bad", inputform.FORM_ERROR: "whole"}


def test_a_workflow_without_a_model_gets_one_json_field() -> None:
    [field] = inputform.fields_of(None)
    assert inputform.read([field], {field.form_name: '[1, 2]'}) == ([1, 2], {})
    assert inputform.read([field], {field.form_name: ""}) == (None, {})


# -- tracebacks --------------------------------------------------------------------------


TRACE = f'''Traceback (most recent call last):
  File "{tracebacks._ENGINE}execution.py", line 330, in _attempt
    result = await self._call(fn)
             ^^^^^^^^^^^^^^^^^^^^
  File "/usr/lib/python3.11/concurrent/futures/thread.py", line 58, in run
    result = self.fn(*self.args, **self.kwargs)
  File "/srv/app/worker.py", line 12, in charge
    raise RuntimeError("declined")
RuntimeError: declined
'''


def test_a_traceback_splits_the_users_frames_from_the_engines() -> None:
    trace = tracebacks.parse(TRACE)
    assert [(f.file, f.line, f.func, f.code) for f in trace.mine] == [
        ("/srv/app/worker.py", 12, "charge", 'raise RuntimeError("declined")')]
    assert [f.func for f in trace.others] == ["_attempt", "run"]
    assert trace.exception == "RuntimeError: declined"


def test_the_same_failure_has_the_same_signature_whatever_its_message() -> None:
    again = tracebacks.parse(TRACE.replace("declined", "declined again"))
    assert again.signature == tracebacks.parse(TRACE).signature
    assert tracebacks.parse("not a traceback").frames == []


# -- filters ------------------------------------------------------------------------------


def summary(eid: str, created: int, error: str | None = None) -> ExecutionSummary:
    return ExecutionSummary(execution_id=eid, workflow="w", status=ExecutionStatus.FAILED,
                            created_at=created, error=error)


def test_filters_read_the_query_and_match_summaries() -> None:
    now = 1_800_000_000_000
    filters = Filters.from_query({"id": "ab", "error": "DECLINED", "last": "1h",
                                  "status": "nonsense"}, ["failed"], now)
    assert filters.status == "" and filters.since == now - 3_600_000
    assert filters.matches(summary("abc", now, "card declined"))
    assert not filters.matches(summary("xbc", now, "card declined"))
    assert not filters.matches(summary("abc", now, "timeout"))
    assert not filters.matches(summary("abc", now - 3_600_001, "card declined"))
    assert filters.query() == "id=ab&error=DECLINED&last=1h"


def test_a_to_time_takes_in_its_whole_minute() -> None:
    filters = Filters.from_query({"to": "2026-11-28T09:30"}, [], 0)
    assert filters.until == 1_795_858_200_000 + 59_999


# -- the ploy dev terminal --------------------------------------------------------------


def test_an_ended_execution_line_ends_with_its_dashboard_url() -> None:
    links = _DashboardLinks("http://127.0.0.1:3000")
    record = logging.LogRecord("ploy.workflow", logging.WARNING, __file__, 1,
                               "[%s %s] cancelled: %s", ("flow", "e/1", "ops"), None)
    record.ended_execution = "e/1"
    assert links.filter(record)
    assert record.getMessage() == ("[flow e/1] cancelled: ops  "
                                   "http://127.0.0.1:3000/__ploy/executions/e%2F1")


def fake_list_page(summaries: list[ExecutionSummary]) -> Any:
    """``Engine.list_page`` over ``summaries`` (newest first), as the indexes answer it."""
    ordered = sorted(summaries, key=lambda s: (-s.created_at, s.execution_id))

    async def list_page(*, workflow: str | None, status: str | None, before: Cursor | None,
                        limit: int) -> Page:
        after = [s for s in ordered if before is None or (-s.created_at, s.execution_id) > (
            -before.created_at, before.execution_id)]
        page = after[:limit]
        return Page(page, Cursor.of(page[-1]) if len(after) > limit else None)

    return list_page


async def test_find_counts_every_match_and_pages_by_cursor() -> None:
    rows = [summary(f"e{i:03d}", 1000 + i, "boom" if i % 2 else None) for i in range(1200)]
    list_page = fake_list_page(rows)
    filters = Filters(error="boom")
    first = await find(list_page, filters, workflow=None, before=None, limit=50)
    assert first.count == 600 and first.exact
    assert [s.execution_id for s in first.executions[:2]] == ["e1199", "e1197"]
    second = await find(list_page, filters, workflow=None, before=first.next, limit=50)
    assert second.count == 600  # the count does not change from page to page
    assert second.executions[0].execution_id == "e1099"
    assert {s.execution_id for s in first.executions}.isdisjoint(
        s.execution_id for s in second.executions)


async def test_find_stops_at_the_start_of_the_range_and_starts_at_its_end() -> None:
    rows = [summary(f"e{i:03d}", 1000 + i) for i in range(100)]
    found = await find(fake_list_page(rows), Filters(since=1010, until=1019), workflow=None,
                       before=None, limit=5)
    assert found.count == 10 and found.exact and found.next is not None
    assert [s.created_at for s in found.executions] == [1019, 1018, 1017, 1016, 1015]


async def test_a_page_older_than_the_count_could_read_is_read_on_its_own(
        monkeypatch: Any) -> None:
    monkeypatch.setattr("engine.search.SCAN_LIMIT", 100)
    monkeypatch.setattr("engine.search.BATCH", 40)
    rows = [summary(f"e{i:03d}", 1000 + i) for i in range(300)]
    found = await find(fake_list_page(rows), Filters(), workflow=None,
                       before=Cursor(1050, "e050"), limit=10)
    assert not found.exact and found.count >= 100
    assert [s.created_at for s in found.executions] == list(range(1049, 1039, -1))
    assert found.next == Cursor(1040, "e040")


async def test_a_page_that_straddles_the_end_of_the_count_is_whole(monkeypatch: Any) -> None:
    monkeypatch.setattr("engine.search.SCAN_LIMIT", 100)
    monkeypatch.setattr("engine.search.BATCH", 40)
    rows = [summary(f"e{i:03d}", 1000 + i) for i in range(300)]
    found = await find(fake_list_page(rows), Filters(), workflow=None,
                       before=Cursor(1185, "e185"), limit=10)
    assert [s.created_at for s in found.executions] == list(range(1184, 1174, -1))
