"""The worker's side of the exchange (see ptq.backends.stage): read the request, give the library
the model and the calibration tokens, and return the dense weights its modules apply.

A library module (one per library, beside this file) defines

    quantize(request: dict, tokens: Tensor | None) -> Outcome

mapping the request (our weight spec, its params, the seed) onto the library's configuration,
running it and returning the quantized model with the mapping as applied.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class Unavailable(Exception):
    """The library cannot run here; the message says why and what would run it."""


@dataclass
class Outcome:
    model: nn.Module  # whose module names are the HF model's (model.layers.0.self_attn.q_proj, ...)
    mapping: dict[str, Any]  # our setting -> the library's, as passed
    library_defaults: dict[str, Any] = field(default_factory=dict)  # library behaviour that differs from ours, kept
    notes: list[str] = field(default_factory=list)
    packages: tuple[str, ...] = ()  # distributions whose versions are recorded
    # the dense weight a quantized module applies; by default read off its forward (`dense_by_forward`)
    dense: Callable[[nn.Module, int], torch.Tensor] | None = None
    checkpoint: dict[str, Any] | None = None  # a library-format checkpoint written to disk: path, bytes
    # the spec (QuantSpec fields) each linear was actually rounded with, where the library chose
    # another than the request's (a group size it adapted to the row length)
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)


def versions(names: tuple[str, ...]) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in ("torch", "transformers", *names):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def load_float_model(model_dir: str, device: str) -> nn.Module:
    """The exchanged model as saved, float32, with our eager attention (the library sees what we see)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").to(device)


def reference_state(model_dir: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def require_dividing_groups(request: dict[str, Any], library: str) -> None:
    """Unavailable when the group size does not divide every linear's row (smollm2's 576 columns at
    128): libraries that store whole groups only refuse such layers or fail on them."""
    from safetensors import safe_open

    spec = request["weight"]
    if spec["granularity"] != "group":
        return
    columns = {}
    for file in Path(request["model_dir"]).glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for name in request["linears"]:
                if f"{name}.weight" in handle.keys():
                    columns[name.rsplit(".", 1)[-1]] = handle.get_slice(f"{name}.weight").get_shape()[1]
    ragged = sorted(f"{name} ({count})" for name, count in columns.items() if count % spec["group_size"])
    if ragged:
        raise Unavailable(f"{library} needs the group size to divide every row; {spec['group_size']} does not divide "
                          f"the columns of {', '.join(ragged)}; it runs with e.g. --override weight.group_size=64")


@torch.no_grad()
def dense_by_forward(module: nn.Module, in_features: int) -> torch.Tensor:
    """The weight a linear-like module applies, [out, in], read off its forward on the identity:
    whatever the library stores (packed codes, scales, zero points), this is what it computes. The
    input has the dtype of the module's floating tensors (a half-precision kernel computes in half;
    a row of the identity selects one weight, so the product is exact in any dtype)."""
    tensors = [*module.parameters(), *module.buffers()]
    floating = [t for t in tensors if t.is_floating_point()]
    dtype = floating[0].dtype if floating else torch.float32
    eye = torch.eye(in_features, dtype=dtype, device=tensors[0].device)
    return (module(eye) - module(torch.zeros_like(eye[:1]))).t().float().contiguous().cpu()


def changed_tensors(outcome: Outcome, linears: list[str],
                    reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each linear's dense weight, and every other parameter whose value the library changed."""
    modules = dict(outcome.model.named_modules())
    dense = outcome.dense or dense_by_forward
    tensors = {}
    for name in linears:
        key = f"{name}.weight"
        tensors[key] = dense(modules[name], reference[key].shape[1]).to(reference[key].dtype)
    params = dict(outcome.model.named_parameters())
    for key, original in reference.items():
        if key not in tensors and key in params and not torch.equal(params[key].detach().cpu().to(original.dtype),
                                                                    original):
            tensors[key] = params[key].detach().cpu().to(original.dtype).contiguous()
    return tensors


def write(out_dir: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "weights.safetensors"))
    (out_dir / "result.json").write_text(json.dumps(info, indent=2, default=str))


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
