"""autoround@auto-round: Intel's AutoRound (SignRound: signed-gradient descent on the rounding
and the clipping range, block by block), a method we do not implement; on our calibration
tokens, with the cell's weight spec. The model keeps its weights fake-quantized after
`quantize()`; they are read off the modules' forward."""

from __future__ import annotations

from typing import Any

import torch

from ptq.backends.worker.common import Outcome, Unavailable, load_float_model


def quantize(request: dict[str, Any], tokens: torch.Tensor | None) -> Outcome:
    from auto_round import AutoRound
    from transformers import AutoTokenizer

    spec, params = request["weight"], request["params"]
    if spec["granularity"] not in ("group", "channel"):
        raise Unavailable(f"AutoRound quantizes per group or per channel, not {spec['granularity']}")
    group = -1 if spec["granularity"] == "channel" else spec["group_size"]
    model = load_float_model(request["model_dir"], request["device"])
    tokenizer = AutoTokenizer.from_pretrained(request["model_dir"])
    batches = [tokens[i:i + params["batch_size"]] for i in range(0, tokens.shape[0], params["batch_size"])]
    rounder = AutoRound(model, tokenizer, bits=spec["bits"], group_size=group, sym=spec["symmetric"], dataset=batches,
                        iters=params["iters"], lr=params["lr"], minmax_lr=params["minmax_lr"],
                        nsamples=tokens.shape[0], seqlen=tokens.shape[1], batch_size=params["batch_size"],
                        seed=request["seed"], device_map=request["device"], amp=False)
    rounder.quantize()
    mapping = {"bits": spec["bits"], "group_size": group, "sym": spec["symmetric"], "iters": params["iters"],
               "lr": params["lr"], "minmax_lr": params["minmax_lr"], "batch_size": params["batch_size"],
               "seed": request["seed"], "amp": "False (float32)",
               "calibration": f"{tokens.shape[0]} x {tokens.shape[1]} tokens, ours"}
    defaults = {"lr": "1 / iters when null (AutoRound's default)", "optimizer": "signed SGD (AutoRound's)"}
    return Outcome(rounder.model, mapping, defaults, [], packages=("auto-round",))
