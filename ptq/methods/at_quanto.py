"""rtn@quanto: optimum-quanto's weight quantization (a core dependency), round-to-nearest on its own
grid: qint8 symmetric per channel (track B, whose activations our pipeline quantizes per token),
qint4/qint2 asymmetric in groups it sizes itself (track A)."""

from __future__ import annotations

from dataclasses import dataclass

from ptq.backends.envs import CORE
from ptq.backends.stage import Backend
from ptq.engine import Specs
from ptq.registry import register_method


@dataclass(frozen=True)
class QuantoParams:
    """quanto's weight types take no settings beyond the bits (recorded by the worker)."""


@register_method("rtn@quanto", params=QuantoParams, tracks=("A", "B"), role="quantizer", reads=("weight",))
class RtnAtQuanto(Backend):
    algorithm, library, env = "rtn", "quanto", CORE

    @classmethod
    def check(cls, params: QuantoParams, specs: Specs) -> None:
        if specs.weight.bits not in (2, 4, 8):
            raise ValueError(f"quanto has 2-, 4- and 8-bit weights, not {specs.weight.bits}")
        if specs.weight.bits == 8 and not (specs.weight.symmetric and specs.weight.granularity == "channel"):
            raise ValueError("quanto's qint8 weights are symmetric per channel")
        if specs.weight.bits < 8 and specs.weight.symmetric:
            raise ValueError("quanto's qint4 and qint2 weights are asymmetric")
