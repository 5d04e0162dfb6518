"""Progress lines (ptq.progress): prefixed with worker and cell, throttled per stage, last always shown."""

from __future__ import annotations

import pytest

from ptq import progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_are_throttled_per_stage_and_the_last_one_always_written(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    lines: list[str] = []
    clock = FakeClock()
    tracker = progress.Progress("m-rtn-A", lines.append, interval=5.0, clock=clock)
    for window in range(1, 11):  # one window a second
        tracker.report("evaluating window", window, 10)
        clock.now += 1.0
    tracker.report("loading m")
    assert lines == [
        "[gw1] m-rtn-A: evaluating window 1/10\n",  # the first
        "[gw1] m-rtn-A: evaluating window 6/10\n",  # 5 s later
        "[gw1] m-rtn-A: evaluating window 10/10\n",  # the last, although within 5 s
        "[gw1] m-rtn-A: loading m\n",  # another stage has its own clock
    ]


def test_without_xdist_the_prefix_says_main(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    lines: list[str] = []
    with progress.tracking("m-gptq-A", lines.append):
        progress.report("calibrating block", 1, 30)
    assert lines == ["[main] m-gptq-A: calibrating block 1/30\n"]


def test_report_is_a_no_op_outside_tracking() -> None:
    lines: list[str] = []
    with progress.tracking("m-gptq-A", lines.append):
        pass
    progress.report("calibrating block", 1, 30)  # after the cell: nothing tracks it
    assert lines == []
