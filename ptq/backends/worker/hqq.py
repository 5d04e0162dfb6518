"""hqq@hqq: the authors' library (mobiusml/hqq), each linear replaced by its `HQQLinear` with
`BaseQuantizeConfig` (= hqq_base_quant_config) for the cell's bits and group size."""

from __future__ import annotations

from typing import Any

import torch

from ptq.backends.worker.common import Outcome, Unavailable, load_float_model


def quantize(request: dict[str, Any], tokens: torch.Tensor | None) -> Outcome:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    spec = request["weight"]
    if spec["symmetric"] or spec["granularity"] not in ("group", "channel"):
        raise Unavailable(f"hqq quantizes asymmetric groups or channels, not {spec}")
    model = load_float_model(request["model_dir"], request["device"])
    modules = dict(model.named_modules())
    notes, uneven = [], []
    for name in request["linears"]:
        linear = modules[name]
        group = linear.in_features if spec["granularity"] == "channel" else spec["group_size"]
        if linear.in_features % group:
            uneven.append(name.rsplit(".", 1)[-1])
        config = BaseQuantizeConfig(nbits=spec["bits"], group_size=group)
        parent, child = name.rsplit(".", 1)
        setattr(modules[parent], child, HQQLinear(linear, config, compute_dtype=torch.float32,
                                                  device=request["device"], del_orig=True))
    if uneven:
        notes.append(f"rows not a multiple of the group ({', '.join(sorted(set(uneven)))}): hqq groups the "
                     "flattened weight, so some groups span two rows (ours ends each row with a smaller group)")
    mapping = {"bits": f"nbits={spec['bits']}", "group_size": f"group_size={spec['group_size']}",
               "granularity": "channel_wise=True, axis=1 (groups along the input dimension)",
               "symmetric": "false (hqq optimizes a zero point)", "compute_dtype": "float32"}
    defaults = {"optimizer": "optimize_weights_proximal_legacy with its own defaults (lp_norm 0.7, beta 10, "
                             "kappa 1.01, iters 20; the same as ours)",
                "round_zero": "at 4 bits only (hqq_base_quant_config's rule, also our default)"}
    return Outcome(model, mapping, defaults, notes, packages=("hqq",))
