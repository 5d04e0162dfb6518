"""PeakMemory, the cell's memory figure: a pause between two entries is left out."""

from __future__ import annotations

import time

import torch

from ptq.eval.memory import PeakMemory

MB = 2**20


def hold(megabytes: int) -> torch.Tensor:
    """A tensor of that size, written (so resident), held while the sampler sees it."""
    tensor = torch.ones(megabytes * MB // 4)
    time.sleep(0.1)
    return tensor


def test_entered_twice_it_keeps_the_first_start_and_leaves_out_what_ran_between() -> None:
    memory = PeakMemory(torch.device("cpu"), interval=0.01)
    with memory:
        kept = hold(64)  # the cell's own: still held in the second entry
    start, first_peak = memory.start_bytes, memory.peak_bytes
    assert first_peak - start >= 60 * MB
    between = hold(512)  # not the cell's: freed before the second entry
    del between
    with memory:
        hold(16)
    assert memory.start_bytes == start
    assert first_peak <= memory.peak_bytes < start + 64 * MB + 300 * MB
    del kept
