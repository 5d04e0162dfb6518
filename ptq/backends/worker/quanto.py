"""rtn@quanto: optimum-quanto's weight quantization (`quantize(model, weights=qintN)`, `freeze`),
the linears of the request only."""

from __future__ import annotations

from typing import Any

import torch

from ptq.backends.worker.common import Outcome, Unavailable, load_float_model

QTYPES = {2: "qint2", 4: "qint4", 8: "qint8"}


def quantize(request: dict[str, Any], tokens: torch.Tensor | None) -> Outcome:
    from optimum import quanto

    spec = request["weight"]
    if spec["bits"] not in QTYPES:
        raise Unavailable(f"quanto has weight types of {sorted(QTYPES)} bits, not {spec['bits']}")
    model = load_float_model(request["model_dir"], request["device"])
    qtype = getattr(quanto, QTYPES[spec["bits"]])
    quanto.quantize(model, weights=qtype, include=request["linears"])
    quanto.freeze(model)
    modules = dict(model.named_modules())
    specs = {}  # qint4/qint2: the group quanto chose for the row length (qint8: per channel, as asked)
    for name in request["linears"]:
        group = modules[name].weight_group_size
        if spec["bits"] < 8:
            specs[name] = {**spec, "granularity": "group" if group else "channel",
                           "group_size": group if group else -1}
    groups = sorted({s["group_size"] for s in specs.values()})
    mapping = {"bits": f"weights={QTYPES[spec['bits']]}", "linears": "include=<the cell's linears>"}
    defaults = {"symmetric": "qint8 symmetric per output channel; qint4/qint2 asymmetric (float shift) in groups",
                "group_size": f"not configurable: 128, lowered by 32 until it divides the row (used: {groups}; "
                              "-1 = per channel)",
                "scale search": "qint4/qint2: min/max (MaxOptimizer); qint8: absmax"}
    notes = [] if spec["bits"] == 8 or groups == [spec["group_size"]] else [
        f"groups of {groups} where the cell asks for {spec['group_size']}: quanto adapts the group to the row"]
    return Outcome(model, mapping, defaults, notes, packages=("optimum-quanto",), specs=specs)
