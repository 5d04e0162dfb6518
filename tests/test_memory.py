"""PeakMemory, the cell's memory figure: a pause between two entries is left out, and memory freed
before the start does not hide what the work allocates."""

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


def test_memory_freed_before_the_start_does_not_hide_what_the_work_allocates() -> None:
    """glibc keeps freed heap pages resident and reuses them: a cell allocating into what an earlier
    cell freed adds nothing to the resident set, but what it holds is counted all the same."""
    piece = 16 * 1024  # floats: 64 kB tensors, below glibc's mmap threshold, so from the heap
    freed = [torch.ones(piece) for _ in range(3200)]  # 200 MB
    pin = torch.ones(piece)  # above them: the heap's top cannot shrink back on its own
    del freed
    memory = PeakMemory(torch.device("cpu"), interval=0.01)
    with memory:
        held = [torch.ones(piece) for _ in range(1600)]  # 100 MB, the work's own
        time.sleep(0.1)
    assert memory.peak_bytes - memory.start_bytes >= 90 * MB
    del held, pin
