"""Changing a workflow's code while executions of it are running: patches and replay checks.

A replay runs the handler from the top against the execution's history. New
code that calls its steps differently would then run a step the execution
never ran in a place the history says something else happened. Two tools:

- ``ctx.patched("name")`` (Temporal's model). An execution that reaches the
  call fresh takes the new branch: True, and a ``Patched`` event records it.
  An execution replaying a history that went past this point without the
  marker ran the old code there: False, so it goes on on the old branch. One
  that has the marker gets True again. "Replaying" means: the history holds
  steps or sleeps this run of the handler has not met yet.
- The replay check. Each step, parallel, sleep, wait or invoke call is met against the
  history in order: a call the history does not have, while the history
  still holds calls this run has not met, is a divergence. The execution
  fails with ``NonDeterminismError`` ("expected step 'X' at position N, found
  step 'Y'") before anything runs; the wrong step never starts. The check
  compares what was called, not the exact order, so steps the handler starts
  concurrently (``asyncio.gather`` of ``ctx.step.run``) may land in either order.
"""

from __future__ import annotations

import re
from typing import Any

from engine.errors import NonDeterminismError

_BRANCH = re.compile(r"\[\d+\]$")  # a branch of ctx.step.parallel: name[0]


class Diverged(BaseException):  # noqa: N818 - a signal, not an error
    """The handler diverged from the history: end the execution as failed with
    ``error``. A BaseException, so user code's ``except Exception`` cannot swallow it."""

    def __init__(self, error: NonDeterminismError):
        super().__init__(str(error))
        self.error = error


class Replay:
    """What the history of one execution says its handler called, and what this run met."""

    def __init__(self, steps: list[dict[str, Any]], patches: list[str]):
        ordered = sorted((s for s in steps if s["kind"] in ("step", "sleep", "wait", "invoke")),
                         key=lambda s: s["seq"])
        # The calls of the history in order: a parallel's branches are one call.
        self._unmet: dict[str, str] = {_BRANCH.sub("", s["key"]): s["kind"] for s in ordered}
        self.patches = set(patches)
        self.position = 0  # step, parallel and sleep calls this run has made

    @property
    def replaying(self) -> bool:
        """Whether the history went further than this run has come."""
        return bool(self._unmet)

    def meet(self, key: str, kind: str = "step") -> None:
        """The handler calls ``key`` next: go on, or raise Diverged."""
        self.position += 1
        if key in self._unmet:
            del self._unmet[key]
        elif self._unmet:
            raise Diverged(NonDeterminismError(*self.expected(), self.position, key, kind))

    def end(self) -> None:
        """The handler returned: raise Diverged if the history holds calls it did not make."""
        if self._unmet:
            raise Diverged(NonDeterminismError(*self.expected(), self.position + 1))

    def expected(self) -> tuple[str, str]:
        """(kind, key) of the first call of the history this run has not met."""
        key = next(iter(self._unmet))
        return self._unmet[key], key

    def patched(self, name: str) -> bool | None:
        """True: take the new branch (recorded already); False: the old one (a replay
        past this point without the marker); None: new here, record the marker."""
        if name in self.patches:
            return True
        if self.replaying:
            return False
        return None
