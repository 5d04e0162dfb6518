"""gptq@auto-gptq: AutoGPTQ (archived upstream). It imports only with transformers < 5 and its
quantization needs CUDA, so its cells are skipped on a CPU before the environment is built (the
stage says so); on a CUDA machine this maps the cell onto its BaseQuantizeConfig."""

from __future__ import annotations

from typing import Any

import torch

from ptq.backends.worker.common import Outcome, Unavailable


def quantize(request: dict[str, Any], tokens: torch.Tensor | None) -> Outcome:
    from auto_gptq import AutoGPTQForCausalLM, BaseQuantizeConfig

    spec, params = request["weight"], request["params"]
    if request["device"] != "cuda":
        raise Unavailable("AutoGPTQ quantizes only on CUDA")
    config = BaseQuantizeConfig(bits=spec["bits"], group_size=-1 if spec["granularity"] == "channel"
                                else spec["group_size"], sym=spec["symmetric"], desc_act=params["act_order"],
                                static_groups=params["static_groups"], true_sequential=params["true_sequential"],
                                damp_percent=params["percdamp"])
    model = AutoGPTQForCausalLM.from_pretrained(request["model_dir"], config, torch_dtype=torch.float16)
    model.quantize([{"input_ids": row.unsqueeze(0), "attention_mask": torch.ones(1, row.shape[0], dtype=torch.long)}
                    for row in tokens], batch_size=1)
    mapping = {"bits": spec["bits"], "group_size": config.group_size, "sym": spec["symmetric"],
               "desc_act": params["act_order"], "static_groups": params["static_groups"],
               "true_sequential": params["true_sequential"], "damp_percent": params["percdamp"]}
    return Outcome(model.model, mapping, {"dtype": "float16 (AutoGPTQ's CUDA kernels)"}, [], packages=("auto-gptq",))
