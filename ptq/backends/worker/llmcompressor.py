"""llm-compressor (vLLM's): `oneshot` on the saved model with a recipe mapped from the cell, fed
our calibration tokens as a pre-tokenized dataset (no shuffling, every sequence). Its
algorithms: gptq (GPTQModifier), awq (AWQModifier, a transform, then QuantizationModifier,
which rounds to nearest), smoothquant+gptq (SmoothQuantModifier, then GPTQModifier; W8A8).
After oneshot the modules hold their weights fake-quantized (compressed-tensors applies the
scheme in their forward); the dense weights are read off that forward."""

from __future__ import annotations

from typing import Any

import torch

from ptq.backends.worker.common import Outcome, Unavailable, require_dividing_groups


def _args(spec: dict[str, Any]) -> dict[str, Any]:
    """Our weight spec as compressed-tensors QuantizationArgs."""
    if spec["granularity"] not in ("group", "channel"):
        raise Unavailable(f"llm-compressor's int weights are per group or per channel here, not {spec['granularity']}")
    args = {"num_bits": spec["bits"], "type": "int", "symmetric": spec["symmetric"], "strategy": spec["granularity"]}
    if spec["granularity"] == "group":
        args["group_size"] = spec["group_size"]
    return args


def _scheme(request: dict[str, Any]) -> dict[str, Any]:
    group: dict[str, Any] = {"targets": ["Linear"], "weights": _args(request["weight"])}
    act = request["params"].get("activations")
    if act:  # W8A8: dynamic per-token int8 inputs, as our track B (the stage refuses cells that quantize others)
        group["input_activations"] = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                      "dynamic": True}
    return {"config_groups": {"group_0": group}, "ignore": ["lm_head"]}


def quantize(request: dict[str, Any], tokens: torch.Tensor | None) -> Outcome:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.pipelines import cache as pipeline_cache

    params, algorithm = request["params"], request["algorithm"]
    require_dividing_groups(request, "llm-compressor")
    defaults: dict[str, Any] = {}
    if not torch.accelerator.is_available():
        # AWQ pins its cached activations for faster host-to-device copies; pinning needs an accelerator
        pipeline_cache.IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
        defaults["pin_memory"] = "disabled (no accelerator: it only speeds host-to-device copies)"
    recipe, mapping = [], {"weights": _args(request["weight"]), "ignore": ["lm_head"],
                           "calibration": f"{tokens.shape[0]} x {tokens.shape[1]} tokens, ours, not shuffled",
                           "pipeline": params["pipeline"]}
    if algorithm == "smoothquant+gptq":
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        recipe.append(SmoothQuantModifier(smoothing_strength=params["alpha"]))
        mapping["alpha"] = f"smoothing_strength={params['alpha']}"
        defaults["smoothquant mappings"] = "llm-compressor's for Llama: input_layernorm -> q,k,v and " \
                                           "post_attention_layernorm -> gate,up (as the reference)"
    if algorithm in ("gptq", "smoothquant+gptq"):
        actorder = "static" if params["act_order"] else None
        recipe.append(GPTQModifier(**_scheme(request), block_size=params["blocksize"],
                                   dampening_frac=params["percdamp"], actorder=actorder))
        mapping.update(blocksize=f"block_size={params['blocksize']}", percdamp=f"dampening_frac={params['percdamp']}",
                       act_order=f"actorder={'static' if params['act_order'] else None}")
        defaults["actorder"] = "llm-compressor's default is 'static' (reorder columns, groups in the original " \
                               "order); the reference's default, no reordering, is set"
    elif algorithm == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        recipe += [AWQModifier(duo_scaling=params["duo_scaling"], n_grid=params["n_grid"]),
                   QuantizationModifier(**_scheme(request))]
        mapping.update(duo_scaling=f"duo_scaling={params['duo_scaling']}", n_grid=f"n_grid={params['n_grid']}")
        defaults.update(duo_scaling="llm-compressor's default True (scales from activations and weights); "
                                    "llm-awq's activation-only scales set",
                        grid=f"alpha = i / (n_grid - 1) for i < n_grid (0 to 1 inclusive); llm-awq: i / n_grid",
                        clipping="none: llm-compressor's AWQ has no weight-clipping search (llm-awq's auto_clip)")
    else:
        raise Unavailable(f"llm-compressor backend has no algorithm {algorithm!r}")
    dataset = Dataset.from_dict({"input_ids": tokens.tolist(),
                                 "attention_mask": torch.ones_like(tokens).tolist()})
    model = oneshot(model=request["model_dir"], dataset=dataset, recipe=recipe, num_calibration_samples=tokens.shape[0],
                    max_seq_length=tokens.shape[1], shuffle_calibration_samples=False, pipeline=params["pipeline"],
                    batch_size=1, precision="float32")
    return Outcome(model, mapping, defaults, [], packages=("llmcompressor", "compressed-tensors"))
