"""gptq@gptqmodel: GPTQModel's GPTQ (the maintained successor of AutoGPTQ), in an environment of
its own. The params are our GPTQ's, mapped onto GPTQModel's QuantizeConfig, plus the knobs
GPTQModel has and the reference does not, set to the reference's behaviour."""

from __future__ import annotations

from dataclasses import dataclass

from ptq.backends.stage import Backend
from ptq.engine import Specs
from ptq.registry import register_method


@dataclass(frozen=True)
class GptqmodelParams:
    percdamp: float = 0.01  # damp_percent (GPTQModel's default 0.05; the reference's 0.01)
    act_order: bool = False  # desc_act
    static_groups: bool = False
    true_sequential: bool = True
    act_group_aware: bool = False  # GPTQModel's own group-aware reordering (default on); not in the reference
    damp_auto_increment: float = 0.01  # added to the dampening while H is not positive definite
    mse: float = 0.0  # GPTQModel's optional MSE grid search of the scales (0: off, as the reference)
    batch_size: int = 1  # calibration sequences per forward
    # where to keep the GPTQ-format checkpoint it writes (None: a temporary folder); a model YAML's
    # pretrained_quant_models can then name it (gptq@checkpoint)
    save_checkpoint: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.percdamp < 1:
            raise ValueError(f"percdamp must be in (0, 1), got {self.percdamp}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@register_method("gptq@gptqmodel", params=GptqmodelParams, tracks=("A", "B"), role="quantizer", reads=("weight",),
                 calibrated=True)
class GptqAtGptqmodel(Backend):
    algorithm, library, env = "gptq", "gptqmodel", "gptqmodel"

    @classmethod
    def check(cls, params: GptqmodelParams, specs: Specs) -> None:
        if specs.weight.granularity not in ("group", "channel"):
            raise ValueError(f"GPTQ quantizes per channel or per group, not per {specs.weight.granularity}")
