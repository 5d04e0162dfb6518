"""rtn@torchao: torchao's weight quantization in an environment of its own (torchao is not a core
dependency): Int8WeightOnlyConfig on track B (our pipeline quantizes the activations per token,
dynamically, as torchao's int8 dynamic-activation config does), IntxWeightOnlyConfig on track A."""

from __future__ import annotations

from dataclasses import dataclass

from ptq.backends.stage import Backend
from ptq.engine import Specs
from ptq.registry import register_method


@dataclass(frozen=True)
class TorchaoParams:
    """torchao's configs take the bits, the grouping and the symmetry from the weight spec."""


@register_method("rtn@torchao", params=TorchaoParams, tracks=("A", "B"), role="quantizer", reads=("weight",))
class RtnAtTorchao(Backend):
    algorithm, library, env = "rtn", "torchao", "torchao"

    @classmethod
    def check(cls, params: TorchaoParams, specs: Specs) -> None:
        if specs.weight.granularity not in ("group", "channel"):
            raise ValueError(f"torchao's weight configs are per channel or per group, not {specs.weight.granularity}")
