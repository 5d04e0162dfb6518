"""A published quantized checkpoint (a model YAML's `pretrained_quant_models`), loaded through the
library that provides its kernels: GPTQ through GPTQModel's torch kernel (the same loader as
gptq@gptqmodel, so a checkpoint that backend wrote scores exactly as its cell did), AWQ through
AutoAWQ. Its on-disk size is recorded next to the float model's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ptq.backends.worker.common import Outcome, Unavailable, folder_bytes


def quantize(request: dict[str, Any], tokens: torch.Tensor | None) -> Outcome:
    params = request["params"]
    location = params["location"]
    local = Path(location).expanduser()
    info = {"location": location, "format": params["format"],
            "bytes": folder_bytes(local) if local.is_dir() else None,
            "float_bytes": folder_bytes(Path(request["model_dir"]))}
    if params["format"] == "gptq":
        from ptq.backends.worker import gptqmodel

        return Outcome(gptqmodel.load(location), {"loader": "GPTQModel.load(backend=TORCH, dtype=float16)"}, {},
                       [], packages=("gptqmodel",), checkpoint=info, dense=gptqmodel.dense)
    if params["format"] == "awq":
        import awq.modules.linear.gemm as gemm
        from awq import AutoAWQForCausalLM

        if request["device"] != "cuda":
            gemm.TRITON_AVAILABLE = False
        model = AutoAWQForCausalLM.from_quantized(location, fuse_layers=False, device_map=request["device"])
        return Outcome(model.model, {"loader": "AutoAWQForCausalLM.from_quantized(fuse_layers=False)"}, {}, [],
                       packages=("autoawq",), checkpoint=info)
    raise Unavailable(f"no loader for checkpoint format {params['format']!r} (known: gptq, awq)")
