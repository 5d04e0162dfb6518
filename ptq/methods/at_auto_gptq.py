"""gptq@auto-gptq: AutoGPTQ's GPTQ (archived upstream). It quantizes only with CUDA and imports only
with transformers < 5 (its environment pins 4.x): on a CPU its cells are skipped with that reason
and the command that runs them on a CUDA machine."""

from __future__ import annotations

from dataclasses import dataclass

from ptq.backends.stage import Backend
from ptq.engine import Specs
from ptq.registry import register_method


@dataclass(frozen=True)
class AutoGptqParams:
    percdamp: float = 0.01  # damp_percent
    act_order: bool = False  # desc_act
    static_groups: bool = False
    true_sequential: bool = True


@register_method("gptq@auto-gptq", params=AutoGptqParams, tracks=("A", "B"), role="quantizer", reads=("weight",),
                 calibrated=True)
class GptqAtAutoGptq(Backend):
    algorithm, library, env = "gptq", "auto_gptq", "auto-gptq"
    needs_cuda = "AutoGPTQ 0.7.1 quantizes only with CUDA (and imports only with transformers < 5, pinned in its " \
                 "environment)"

    @classmethod
    def check(cls, params: AutoGptqParams, specs: Specs) -> None:
        if specs.weight.granularity not in ("group", "channel"):
            raise ValueError(f"GPTQ quantizes per channel or per group, not per {specs.weight.granularity}")
