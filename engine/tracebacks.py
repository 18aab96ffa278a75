"""Recorded tracebacks made readable: the user's own frames first; pure.

A step's traceback as recorded runs through the engine and the standard
library (``engine/execution.py``, ``concurrent/futures/thread.py``) before it
reaches the user's code. :func:`parse` splits the frames into the user's and
the others, and gives each traceback a signature (its frames without the
message) so that the same failure repeated on every attempt is shown once.
"""

from __future__ import annotations

import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Frame", "Trace", "parse"]

_FRAME = re.compile(r'^\s*File "(?P<file>[^"]*)", line (?P<line>\d+), in (?P<func>.*)$')
_ENGINE = str(Path(__file__).resolve().parent) + "/"
# A standard library or packages directory of any Python (the worker's may not be this one's).
_LIBRARY_DIR = re.compile(r"/lib/python\d+\.\d+/|/site-packages/|/dist-packages/")
_LIBRARIES = tuple({str(Path(p).resolve()) + "/" for key in ("stdlib", "platstdlib", "purelib",
                                                             "platlib")
                    if (p := sysconfig.get_paths().get(key))})


@dataclass(frozen=True)
class Frame:
    """One frame of a traceback: where, and the source line Python printed."""

    file: str
    line: int
    func: str
    code: str
    mine: bool
    """True for the user's code; False for the engine's, the standard library's, packages'."""


@dataclass(frozen=True)
class Trace:
    """A traceback split for reading."""

    frames: list[Frame]
    exception: str
    """The lines after the last frame: the exception's type and message."""
    text: str

    @property
    def mine(self) -> list[Frame]:
        return [f for f in self.frames if f.mine]

    @property
    def others(self) -> list[Frame]:
        return [f for f in self.frames if not f.mine]

    @property
    def signature(self) -> tuple[tuple[str, int, str], ...]:
        """Equal for two failures at the same place by the same path (messages aside)."""
        return tuple((f.file, f.line, f.func) for f in self.frames)


def parse(text: str) -> Trace:
    """The frames and the exception of a formatted Python traceback (any text works)."""
    frames: list[Frame] = []
    tail: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        found = _FRAME.match(lines[i])
        if found is None:
            tail.append(lines[i])
            i += 1
            continue
        code = ""
        if i + 1 < len(lines) and not _FRAME.match(lines[i + 1]) and lines[i + 1].startswith(
                "    "):
            code = lines[i + 1].strip()
            i += 1
            while i + 1 < len(lines) and set(lines[i + 1].strip()) <= set("^~ ") and lines[
                    i + 1].strip():
                i += 1  # the carets under the code
        file = found["file"]
        frames.append(Frame(file, int(found["line"]), found["func"], code, _is_mine(file)))
        tail = []
        i += 1
    return Trace(frames, "\n".join(tail).strip(), text)


def _is_mine(file: str) -> bool:
    if file.startswith("<"):  # <string>, <frozen ...>: not the user's file
        return False
    path = str(Path(file).resolve()) if file.startswith("/") else file
    return not (path.startswith(_ENGINE) or path.startswith(_LIBRARIES)
                or _LIBRARY_DIR.search(path) is not None)
