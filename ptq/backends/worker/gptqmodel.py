"""gptq@gptqmodel: GPTQModel (the maintained successor of AutoGPTQ), `GPTQModel.load` with a
`QuantizeConfig` mapped from the cell, `quantize` on the calibration tokens, `save` in the GPTQ
format, and the saved checkpoint loaded back with its torch kernel: the weights returned are
what that checkpoint computes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ptq.backends.worker.common import Outcome, Unavailable, folder_bytes


def quantize(request: dict[str, Any], tokens: torch.Tensor | None) -> Outcome:
    # GPTQModel's CPU thread pool defaults to half the cores; it stalls with fewer than two workers
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, request["threads"])))
    from gptqmodel import GPTQModel, QuantizeConfig

    spec, params = request["weight"], request["params"]
    if spec["granularity"] not in ("group", "channel"):
        raise Unavailable(f"GPTQModel quantizes per group or per channel, not per {spec['granularity']}")
    group = -1 if spec["granularity"] == "channel" else spec["group_size"]
    config = QuantizeConfig(bits=spec["bits"], group_size=group, sym=spec["symmetric"], desc_act=params["act_order"],
                            static_groups=params["static_groups"], true_sequential=params["true_sequential"],
                            damp_percent=params["percdamp"], damp_auto_increment=params["damp_auto_increment"],
                            act_group_aware=params["act_group_aware"], mse=params["mse"])
    model = GPTQModel.load(request["model_dir"], config, dtype=torch.float32)
    calibration = [{"input_ids": row.unsqueeze(0), "attention_mask": torch.ones(1, row.shape[0], dtype=torch.long)}
                   for row in tokens]
    # calibration_sort=None: keep our order (the default sorts by length, a no-op on equal lengths)
    model.quantize(calibration, batch_size=params["batch_size"], calibration_sort=None)
    checkpoint = Path(params["save_checkpoint"] or Path(request["out_dir"]) / "checkpoint")
    model.save(str(checkpoint))
    del model
    loaded = load(checkpoint)
    mapping = {"bits": spec["bits"], "group_size": group, "symmetric": f"sym={spec['symmetric']}",
               "percdamp": f"damp_percent={params['percdamp']}", "act_order": f"desc_act={params['act_order']}",
               "static_groups": params["static_groups"], "true_sequential": params["true_sequential"],
               "calibration": f"{tokens.shape[0]} x {tokens.shape[1]} tokens, ours, batch_size={params['batch_size']}",
               "dtype": "quantized in float32 (GPTQModel's CPU default is bfloat16), checkpoint in float16"}
    defaults = {"act_group_aware": f"{params['act_group_aware']} (GPTQModel's default True: its group-aware "
                                   "reordering, not in the reference)",
                "damp_auto_increment": f"{params['damp_auto_increment']} (added to damp_percent until H is positive "
                                       "definite; ours multiplies by 10)",
                "blocksize": "128 (fixed)", "damp_percent default": "0.05 in GPTQModel, 0.01 in the reference (set)"}
    info = {"path": str(checkpoint), "bytes": folder_bytes(checkpoint), "format": "gptq", "kernel": "torch",
            "float_bytes": folder_bytes(Path(request["model_dir"]))}
    notes = ["weights as the saved GPTQ checkpoint computes them: float16 scales (the format's), the torch kernel"]
    return Outcome(loaded, mapping, defaults, notes, packages=("gptqmodel",), checkpoint=info, dense=dense)


def load(checkpoint: Path | str) -> torch.nn.Module:
    """A GPTQ-format checkpoint through GPTQModel's torch kernel (the same path for a checkpoint this
    backend wrote and for a published one). The format stores scales in float16; the kernel
    computes in float16 or bfloat16."""
    from gptqmodel import BACKEND, GPTQModel

    return GPTQModel.load(str(checkpoint), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16).model


def dense(module: torch.nn.Module, in_features: int) -> torch.Tensor:
    """The torch kernel's own dequantization ([in, out], what its forward multiplies by), called
    eagerly: the instance's copy is wrapped in torch.compile, whose first call takes minutes on a CPU."""
    return type(module).dequantize_weight(module).t().float().contiguous().cpu()
