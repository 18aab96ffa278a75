"""The execution timeline's geometry: where each step, attempt and wait is drawn; pure.

Drawn to scale while that shows something: a 24 h sleep beside a 200 ms step
would leave the step one pixel wide at zero. So the scale is linear, except
that an idle stretch (no attempt running: a sleep, a retry wait, a wait for an
event) much longer than all the work is drawn short, as a *break* with its real
length written on it. Positions are percentages of the track.

A running execution's scale ends at the later of now and a sleep's wake time,
with a "now" line; an ended one's at its end. A step or sleep that never
ended in an ended execution takes the execution's status (cancelled, failed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.durations import format_duration
from engine.models import Execution, StepRecord

__all__ = ["MIN_BAR_PCT", "Scale", "timeline"]

MIN_BAR_PCT = 0.6
LONG_IDLE_MS = 2000  # an idle stretch shorter than this is never broken
LONG_IDLE_RATIO = 4  # ... nor one shorter than this many times all the work
BREAKS_SHARE = 0.4  # the breaks together: this share of the linear time's width


@dataclass(frozen=True)
class Piece:
    """A stretch of the scale: real times ``start``..``end`` drawn ``weight`` long."""

    start: int
    end: int
    weight: float
    broken: bool


class Scale:
    """Maps times in ``origin``..``end`` to percentages of the track (see the module doc)."""

    def __init__(self, origin: int, end: int, busy: list[tuple[int, int]]):
        self.origin, self.end = origin, max(end, origin + 1)
        cuts = sorted({self.origin, self.end} | {min(max(t, self.origin), self.end)
                                                  for span in busy for t in span})
        spans = [(a, b, any(s < b and e > a for s, e in busy)) for a, b in zip(cuts, cuts[1:],
                                                                              strict=False)]
        work = sum(b - a for a, b, is_busy in spans if is_busy)
        longest = max(LONG_IDLE_MS, LONG_IDLE_RATIO * work)
        long = [(a, b) for a, b, is_busy in spans if not is_busy and b - a > longest]
        linear = (self.end - self.origin) - sum(b - a for a, b in long)
        drawn = linear * BREAKS_SHARE / len(long) if long and linear > 0 else None
        self.pieces = [Piece(a, b, float(b - a), False) if drawn is None or (a, b) not in long
                       else Piece(a, b, drawn, True) for a, b, _ in spans]
        self.total = sum(p.weight for p in self.pieces) or 1.0

    @property
    def broken(self) -> bool:
        return any(p.broken for p in self.pieces)

    def pct(self, t: int) -> float:
        """Where time ``t`` is drawn, in percent of the track."""
        t = min(max(t, self.origin), self.end)
        before = 0.0
        for piece in self.pieces:
            if t <= piece.end:
                inside = (t - piece.start) / max(piece.end - piece.start, 1) * piece.weight
                return (before + inside) / self.total * 100
            before += piece.weight
        return 100.0

    def breaks(self) -> list[dict[str, Any]]:
        """The stretches drawn short, with the length they stand for."""
        return [{"left": round(self.pct(p.start), 3),
                 "width": round(self.pct(p.end) - self.pct(p.start), 3),
                 "label": format_duration(p.end - p.start)}
                for p in self.pieces if p.broken]

    def ticks(self) -> list[dict[str, Any]]:
        """Labels of elapsed time: quarters when linear, else the ends of each piece."""
        if not self.broken:
            span = self.end - self.origin
            return [{"pct": pct, "label": format_duration(round(span * pct / 100))}
                    for pct in (0, 25, 50, 75, 100)]
        ticks: list[dict[str, Any]] = []
        for t in sorted({p.start for p in self.pieces} | {self.end}):
            pct = round(self.pct(t), 3)
            if not ticks or pct - ticks[-1]["pct"] >= 9:
                ticks.append({"pct": pct, "label": format_duration(t - self.origin)})
        return ticks


def timeline(execution: Execution, now: int) -> dict[str, Any]:
    """Bars of the steps and sleeps, their attempts, the breaks, the ticks and the now line.

    A bar runs from a step's first attempt to its end (now, while it runs; a
    sleep's wake time, while it sleeps); its attempts are segments inside it,
    placed relative to the bar, so retries and the backoff waits between them
    are visible.
    """
    origin = execution.started_at or execution.created_at
    spans = [(s, start, end) for s in execution.steps
             for start, end in [_span(s, execution, now)] if start is not None]
    running = not execution.status.terminal
    last = execution.ended_at or (now if running else origin)
    end_all = max([last, origin] + [end for _, _, end in spans])
    busy = [(a.started_at, a.ended_at if a.ended_at is not None else (now if running else last))
            for s, _, _ in spans for a in s.attempts if a.started_at is not None]
    scale = Scale(origin, end_all, busy)
    bars = [_bar(step, start, end, scale, execution, now) for step, start, end in spans]
    return {"bars": bars, "total_ms": scale.end - origin, "ticks": scale.ticks(),
            "breaks": scale.breaks(), "broken": scale.broken,
            "now": round(scale.pct(now), 3) if running else None,
            "elapsed_ms": max(min(now, scale.end) - origin, 0) if running else None}


def _bar(step: StepRecord, start: int, end: int, scale: Scale, execution: Execution,
         now: int) -> dict[str, Any]:
    left = scale.pct(start)
    width = max(scale.pct(end) - left, MIN_BAR_PCT)
    left = min(left, 100 - width)
    status = step.status
    if step.ended_at is None and execution.status.terminal:
        status = execution.status.value  # it ended with the execution, not by itself
    return {
        "key": step.key, "name": step.name, "kind": step.kind, "status": status,
        "left": round(left, 3), "width": round(width, 3), "duration_ms": end - start,
        "running": step.ended_at is None and not execution.status.terminal,
        "wake_at": step.wake_at,
        "attempts": _segments(step, left, width, scale, end, now),
    }


def _span(step: StepRecord, execution: Execution, now: int) -> tuple[int | None, int]:
    start = step.started_at
    if step.attempts and step.attempts[0].started_at is not None:
        start = min(start or step.attempts[0].started_at, step.attempts[0].started_at)
    if start is None:
        return None, 0
    if step.ended_at is not None:
        end = step.ended_at
    elif execution.status.terminal:  # ended by a cancel or a crash while the step waited
        ends = [a.ended_at for a in step.attempts if a.ended_at is not None]
        end = execution.ended_at or max(ends, default=start)
    elif step.kind == "sleep" and step.wake_at is not None:
        end = max(step.wake_at, now)
    else:
        end = now
    return start, max(end, start)


def _segments(step: StepRecord, left: float, width: float, scale: Scale, end: int,
              now: int) -> list[dict[str, Any]]:
    """The attempts inside a bar, in percent of the bar (the scale may be broken inside it)."""
    segments = []
    for attempt in step.attempts:
        if attempt.started_at is None:
            continue
        a_end = min(attempt.ended_at if attempt.ended_at is not None else now, end)
        a_left = (scale.pct(attempt.started_at) - left) / width * 100
        a_width = max((scale.pct(a_end) - scale.pct(attempt.started_at)) / width * 100, 1.0)
        a_left = min(max(a_left, 0.0), 100 - a_width)
        outcome = ("failed" if attempt.error else
                   "running" if attempt.ended_at is None else "completed")
        segments.append({"attempt": attempt.attempt, "left": round(a_left, 3),
                         "width": round(a_width, 3), "status": outcome,
                         "duration_ms": a_end - attempt.started_at})
    return segments
