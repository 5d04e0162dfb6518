"""awq@autoawq: AutoAWQ (archived upstream), `AutoAWQForCausalLM.quantize` on our calibration
tokens with llm-awq's settings (activation-only scales, clipping search), GEMM packing, the
packed modules' dense weights read off their forward. On a CPU its triton kernels are switched
off (`TRITON_AVAILABLE = False`): the GEMM module then dequantizes and multiplies in torch."""

from __future__ import annotations

from typing import Any

import torch

from ptq.backends.worker.common import Outcome, Unavailable, require_dividing_groups


def quantize(request: dict[str, Any], tokens: torch.Tensor | None) -> Outcome:
    import awq.modules.linear.gemm as gemm
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    spec, params = request["weight"], request["params"]
    if spec["granularity"] != "group" or spec["symmetric"]:
        raise Unavailable(f"AutoAWQ's GEMM format is asymmetric in groups, not {spec}")
    require_dividing_groups(request, "AutoAWQ")
    notes = []
    if request["device"] != "cuda":
        gemm.TRITON_AVAILABLE = False
        notes.append("triton kernels off (CPU): the GEMM modules dequantize and multiply in torch")
    model = AutoAWQForCausalLM.from_pretrained(request["model_dir"], torch_dtype=torch.float32, device_map="cpu")
    tokenizer = AutoTokenizer.from_pretrained(request["model_dir"])
    config = {"zero_point": True, "q_group_size": spec["group_size"], "w_bit": spec["bits"], "version": "GEMM"}
    model.quantize(tokenizer, quant_config=config, calib_data=tokens.tolist(), duo_scaling=params["duo_scaling"],
                   apply_clip=params["clip"], n_parallel_calib_samples=params["n_parallel_calib_samples"],
                   max_calib_samples=tokens.shape[0], max_calib_seq_len=tokens.shape[1])
    mapping = {"bits": f"w_bit={spec['bits']}", "group_size": f"q_group_size={spec['group_size']}",
               "symmetric": "zero_point=True", "format": "version=GEMM", "duo_scaling": params["duo_scaling"],
               "clip": f"apply_clip={params['clip']}",
               "calibration": f"{tokens.shape[0]} x {tokens.shape[1]} tokens, ours (calib_data as token lists)"}
    defaults = {"duo_scaling": "AutoAWQ's default True (scales from activations and weights); llm-awq's "
                               "activation-only scales set",
                "grid": "n_grid 20, max_shrink 0.5, 512 clipping tokens (fixed, as llm-awq)",
                "scales": "stored in float16 by the GEMM format"}
    return Outcome(model.model, mapping, defaults, notes, packages=("autoawq",))
