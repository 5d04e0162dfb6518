"""rtn@torchao: torchao's `quantize_` on the request's linears. 8 bits: `Int8WeightOnlyConfig`
(symmetric per output channel; track B's activations are then quantized by our pipeline, per
token, dynamic, symmetric int8, as torchao's `Int8DynamicActivationInt8WeightConfig` does);
fewer bits: `IntxWeightOnlyConfig` in groups (torchao's Int4WeightOnlyConfig needs a GPU kernel
package here)."""

from __future__ import annotations

from typing import Any

import torch

from ptq.backends.worker.common import Outcome, load_float_model, require_dividing_groups


def quantize(request: dict[str, Any], tokens: torch.Tensor | None) -> Outcome:
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    spec = request["weight"]
    model = load_float_model(request["model_dir"], request["device"])
    per_channel = spec["granularity"] == "channel"
    if spec["bits"] == 8 and spec["symmetric"] and per_channel:
        config = Int8WeightOnlyConfig()
        mapping = {"bits": "Int8WeightOnlyConfig()", "symmetric": "int8 symmetric per output channel"}
    else:
        require_dividing_groups(request, "torchao's IntxWeightOnlyConfig")
        dtype = getattr(torch, f"int{spec['bits']}")
        config = IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerAxis(0) if per_channel
                                      else PerGroup(spec["group_size"]),
                                      mapping_type=getattr(MappingType, "SYMMETRIC" if spec["symmetric"]
                                                           else "ASYMMETRIC"))
        mapping = {"bits": f"IntxWeightOnlyConfig(weight_dtype=torch.int{spec['bits']})",
                   "group_size": "PerAxis(0)" if per_channel else f"PerGroup({spec['group_size']})",
                   "symmetric": f"mapping_type={'SYMMETRIC' if spec['symmetric'] else 'ASYMMETRIC'}"}
    targets = set(request["linears"])
    quantize_(model, config, filter_fn=lambda module, name: name in targets)
    defaults = {} if spec["bits"] == 8 else {"zero point": "torchao's asymmetric mapping rounds the zero point to "
                                                           "an integer, as ours does"}
    return Outcome(model, mapping, defaults, [], packages=("torchao",))
