"""Progress lines for long cell stages (loading, calibrating block i/N, evaluating window j/M).

The engine calls `report(stage, done, total)` wherever it makes progress; nothing is written
unless a cell is being tracked (`tracking`, entered by the pytest plugin around each cell).
Lines go to the real terminal in one write each, so lines of several xdist workers do not
interleave, and each says which worker and cell it is about:

    [gw1] smollm2-135m-gptq-c4-A: calibrating block 12/30

Per stage, at most one line per `interval` seconds is written; the first and the last
(done == total) always are.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

DEFAULT_INTERVAL = 5.0  # seconds between two lines of one stage


def terminal_write(line: str) -> None:
    """Write to the process's original stderr (not a capture replacement), flushed."""
    stream = sys.__stderr__
    if stream is not None:
        stream.write(line)
        stream.flush()


class Progress:
    """Throttled progress lines of one cell."""

    def __init__(self, cell_id: str, write: Callable[[str], None], interval: float = DEFAULT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.prefix = f"[{os.environ.get('PYTEST_XDIST_WORKER', 'main')}] {cell_id}"
        self.write = write
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}  # stage -> time its last line was written

    def report(self, stage: str, done: int | None = None, total: int | None = None) -> None:
        now = self.clock()
        last = self._last.get(stage)
        finished = done is not None and done == total
        if last is not None and now - last < self.interval and not finished:
            return
        self._last[stage] = now
        count = "" if done is None else f" {done}/{total}" if total is not None else f" {done}"
        self.write(f"{self.prefix}: {stage}{count}\n")


_active: Progress | None = None


@contextmanager
def tracking(cell_id: str, write: Callable[[str], None] = terminal_write,
             interval: float = DEFAULT_INTERVAL) -> Iterator[Progress]:
    """Report the progress of `cell_id` while inside the block."""
    global _active
    previous, _active = _active, Progress(cell_id, write, interval)
    try:
        yield _active
    finally:
        _active = previous


def report(stage: str, done: int | None = None, total: int | None = None) -> None:
    """A cell stage made progress: `done` of `total` steps (both optional). A no-op outside `tracking`."""
    if _active is not None:
        _active.report(stage, done, total)
