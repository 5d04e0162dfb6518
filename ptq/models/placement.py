"""Where a model's weights live while it is evaluated. Models are loaded on the host and stay
there between cells; calibration moves one decoder block at a time to the compute device
(ptq.engine), and evaluation puts the model on the device only for as long as it runs: whole
when it fits in the device's free memory, else through accelerate's CPU offload, which moves
each module's weights to the device as it runs. So a model larger than one GPU's memory
benchmarks on it, slowly. (The GPU paths are not exercised on a CPU-only machine.)

On CPU, quantization runs on one torch thread (`one_cpu_thread`): see there why."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

HOST = torch.device("cpu")
FIT = 0.8  # of the device's free memory the whole model may take (activations need the rest)


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def free_bytes(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0]


@contextmanager
def on_device(model: nn.Module, device: torch.device,
              free: Callable[[torch.device], int] = free_bytes) -> Iterator[str]:
    """The model on `device` for the duration (on the host it stays where it is); yields how:
    "host", "whole" or "offload"."""
    if device.type == HOST.type:
        yield "host"
        return
    if model_bytes(model) <= FIT * free(device):
        model.to(device)
        try:
            yield "whole"
        finally:
            model.to(HOST)
            torch.cuda.empty_cache()
        return
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    cpu_offload(model, execution_device=device)
    try:
        yield "offload"
    finally:
        remove_hook_from_module(model, recurse=True)


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On CPU, one torch thread inside: GPTQ's and AWQ's roundings follow the float summation
    order, which the thread count changes, and a rounding that flips compounds through the later
    columns and blocks (GPTQ W4 g128 on smollm2: PPL 41.81 on one thread, 40.23 on two). A result
    must not depend on how many cores a run or an xdist worker got. No effect on other devices."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
