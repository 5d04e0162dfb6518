"""awq@autoawq: AutoAWQ's AWQ (archived upstream, so never in the core install), in an environment of
its own, with llm-awq's settings: activation-only scales (AutoAWQ defaults to duo scaling) and
the clipping search. Audits our AWQ."""

from __future__ import annotations

from dataclasses import dataclass

from ptq.backends.stage import Backend
from ptq.engine import Specs
from ptq.registry import register_method


@dataclass(frozen=True)
class AutoAwqParams:
    duo_scaling: bool = False  # AutoAWQ's default True; llm-awq's scales are the activations' only
    clip: bool = True  # apply_clip: llm-awq's auto_clip
    n_parallel_calib_samples: int | None = None  # sequences per forward in its searches (None: all at once)


@register_method("awq@autoawq", params=AutoAwqParams, tracks=("A",), role="quantizer", reads=("weight",),
                 calibrated=True)
class AwqAtAutoAwq(Backend):
    algorithm, library, env = "awq", "autoawq", "autoawq"

    @classmethod
    def check(cls, params: AutoAwqParams, specs: Specs) -> None:
        if specs.weight.granularity != "group" or specs.weight.symmetric:
            raise ValueError("AutoAWQ's GEMM format is asymmetric in groups (symmetric: false, granularity: group)")
