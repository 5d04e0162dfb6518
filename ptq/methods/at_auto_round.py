"""autoround@auto-round: Intel's AutoRound (SignRound), a method we do not implement natively, in an
environment of its own. It runs on a CPU; its iterations per block are its cost."""

from __future__ import annotations

from dataclasses import dataclass

from ptq.backends.stage import Backend
from ptq.engine import Specs
from ptq.registry import register_method


@dataclass(frozen=True)
class AutoRoundParams:
    iters: int = 200  # signed-gradient steps per block (AutoRound's default; its "light" recipe: 50)
    lr: float | None = None  # None: 1 / iters (AutoRound's default)
    minmax_lr: float | None = None  # None: as lr
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError(f"iters and batch_size must be >= 1, got {self.iters}, {self.batch_size}")


@register_method("autoround@auto-round", params=AutoRoundParams, tracks=("A",), role="quantizer", reads=("weight",),
                 calibrated=True)
class AutoRoundAtAutoRound(Backend):
    algorithm, library, env = "autoround", "auto_round", "auto-round"

    @classmethod
    def check(cls, params: AutoRoundParams, specs: Specs) -> None:
        if specs.weight.granularity not in ("group", "channel"):
            raise ValueError(f"AutoRound quantizes per group or per channel, not {specs.weight.granularity}")
