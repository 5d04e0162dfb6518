"""Mixture-of-experts MLPs as one `nn.Linear` per expert projection.

transformers 5 keeps the experts of Mixtral, Qwen3-MoE and most MoE models as fused 3-D
parameters (`gate_up_proj` [experts, 2·intermediate, hidden], `down_proj` [experts, hidden,
intermediate]) run by a grouped kernel, so no hook sees one expert's inputs and no method
can round one expert's weight as a layer. `unfuse_experts` replaces each such module, in
place, by `ExpertList`: the same weights as per-expert linears, with the eager forward of
transformers (each expert runs on the tokens routed to it, weighted by the router and
summed). The model computes the same function; every method then quantizes experts as
linears, and a hook on an expert's linear sees exactly the tokens routed to it. This is
what llm-compressor (`LinearExperts`) and GPTQModel do before calibrating MoE models. The
router stays as transformers built it, in float.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import _default_apply_gate

from ptq.errors import UnsupportedModel


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) · up(x))."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate, up, down, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertList(nn.ModuleList):
    """The experts of one MoE block; called as transformers calls its fused experts module."""

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self):
            token, position = torch.where(top_k_index == index)
            if token.numel() == 0:  # no token routed: the expert does not run (its hooks see nothing)
                continue
            y = expert(hidden_states[token]) * top_k_weights[token, position, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module with 3-D weights (decorated with `use_experts_implementation`)."""
    return (
        isinstance(getattr(module, "gate_up_proj", None), nn.Parameter)
        and module.gate_up_proj.dim() == 3
        and hasattr(module, "is_transposed")
    )


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return linear


def expert_list(fused: nn.Module) -> ExpertList:
    """The experts of a fused module as per-expert linears (weights copied)."""
    unsupported = [
        what
        for what, bad in (
            ("no gate projection", not fused.has_gate),
            ("gate and up interleaved rather than concatenated", not fused.is_concatenated),
            ("a norm after each expert", getattr(fused, "has_post_expert_norm", False)),
            ("its own gating function", type(fused)._apply_gate is not _default_apply_gate),
        )
        if bad
    ]
    if unsupported:
        raise UnsupportedModel(
            f"{type(fused).__name__}: experts with {', '.join(unsupported)} cannot be split into "
            "gate/up/down linears (ptq.models.moe handles act(gate(x)) * up(x) experts)"
        )
    intermediate = fused.down_proj.shape[-1] if not fused.is_transposed else fused.down_proj.shape[-2]
    experts = []
    for index in range(fused.gate_up_proj.shape[0]):
        gate_up, down = fused.gate_up_proj[index], fused.down_proj[index]
        if fused.is_transposed:  # stored [in, out]
            gate_up, down = gate_up.t(), down.t()
        gate_up_bias = fused.gate_up_proj_bias[index] if fused.has_bias else None
        down_bias = fused.down_proj_bias[index] if fused.has_bias else None
        experts.append(
            ExpertMLP(
                _linear(
                    gate_up[:intermediate], None if gate_up_bias is None else gate_up_bias[:intermediate]
                ),
                _linear(
                    gate_up[intermediate:], None if gate_up_bias is None else gate_up_bias[intermediate:]
                ),
                _linear(down, down_bias),
                fused.act_fn,
            )
        )
    return ExpertList(experts)


@torch.no_grad()
def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of `model` by an `ExpertList`, in place; returns how many."""
    fused = [name for name, module in model.named_modules() if is_fused_experts(module)]
    for name in fused:  # one at a time: the copy of one block's experts at most is held twice
        model.set_submodule(name, expert_list(model.get_submodule(name)))
    return len(fused)
