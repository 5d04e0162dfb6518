"""Peak memory of a stretch of work: CUDA max allocated on a GPU, else the process's peak RSS."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
from types import TracebackType

import psutil
import torch

_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))


def release_freed_memory() -> None:
    """Return to the system what earlier work freed: glibc keeps freed heap pages resident and
    hands them out again, so work that reuses them would add nothing to the resident set, and a
    cell's figure would depend on what its process ran before. A no-op beyond garbage
    collection where the C library has no malloc_trim (not glibc)."""
    gc.collect()
    if hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


class PeakMemory:
    """Context manager; `.peak_bytes`, `.start_bytes` and `.kind` are set on exit. The peak over
    the start is what the work itself added (the cell's model copy, activations, statistics).

    On CPU the resident set size is sampled every `interval` seconds in a thread (the
    kernel's own peak, ru_maxrss, covers the whole process life and not one cell), from a start
    at which the memory earlier work freed has been returned (`release_freed_memory`).

    Entered again, it keeps the first start and the highest peak: what runs between the
    entries (work that is not the cell's) is left out.
    """

    def __init__(self, device: torch.device, interval: float = 0.05) -> None:
        self.device = device
        self.interval = interval
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss"
        self.peak_bytes = 0
        self.start_bytes = 0
        self._entered = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        process = psutil.Process()
        while True:
            self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            if not self._entered:
                self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            if not self._entered:
                release_freed_memory()
                self.start_bytes = psutil.Process().memory_info().rss
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
