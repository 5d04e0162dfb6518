"""Peak memory of a stretch of work: on a GPU, CUDA's max allocated; on CPU, what malloc has
handed out and not taken back (glibc's mallinfo2), else the process's RSS."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
from types import TracebackType

import psutil
import torch

_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


if hasattr(_LIBC, "mallinfo2"):  # glibc 2.33+
    _LIBC.mallinfo2.restype = _Mallinfo2


def heap_in_use() -> int:
    """Bytes malloc has handed out and not taken back: heap blocks in use plus mmapped ones, over
    every arena (torch's CPU tensors are malloc'd). Unlike the RSS, it leaves out freed pages the
    allocator keeps for reuse, whose amount depends on what the process ran before: the CPU
    counterpart of CUDA's memory_allocated."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakMemory:
    """Context manager; `.peak_bytes`, `.start_bytes` and `.kind` are set on exit. The peak over
    the start is what the work itself added (the cell's model copy, activations, statistics).

    On CPU the reading (`heap_in_use`, or the resident set size without glibc) is sampled every
    `interval` seconds in a thread: neither has a per-stretch peak of its own (ru_maxrss covers
    the whole process life). Garbage is collected before the start.

    Entered again, it keeps the first start and the highest peak: what runs between the
    entries (work that is not the cell's) is left out.
    """

    def __init__(self, device: torch.device, interval: float = 0.05) -> None:
        self.device = device
        self.interval = interval
        self.kind = "cuda_max_allocated" if device.type == "cuda" else \
            "malloc_in_use" if hasattr(_LIBC, "mallinfo2") else "rss"
        self.peak_bytes = 0
        self.start_bytes = 0
        self._entered = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _reading(self) -> int:
        return heap_in_use() if self.kind == "malloc_in_use" else psutil.Process().memory_info().rss

    def _sample(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, self._reading())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            if not self._entered:
                self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            if not self._entered:
                gc.collect()
                self.start_bytes = self._reading()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._entered = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
