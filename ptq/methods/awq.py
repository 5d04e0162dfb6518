"""AWQ (Lin et al., 2024): activation-aware weight quantization, following the authors'
reference (mit-han-lab/llm-awq, auto_scale / auto_clip).

Per block: (1) for each group of linears sharing an input, search a per-input-channel
scale s = mean|x|^alpha (normalized) over a grid of alpha, minimizing the error of the
group's module output with weights quantized as Q(W·s)/s; fold 1/s into the operation that
produces the input (a norm, or the previous linear) and s into the weights; (2) search a
per-group clipping range that minimizes the layer-output error; (3) round to nearest with
the shared quantizer. Where the compared output is one linear's (down_proj's group, the
clipping), its error comes from the Gram matrix of the linear's inputs: the same error as the
reference's forwards up to float rounding, for a fraction of the multiply-adds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ptq.engine import BlockStep, ModelStep, Observer, Specs, Stage, first_tensor
from ptq.models.adapters import ScalingGroup
from ptq.quant import QuantSpec, expand_groups, fake_quantize
from ptq.registry import register_method
from ptq.transforms import fold_scales, scales_fold

# The reference skips clipping where it would distort attention scores; a fused qkv_proj holds q and k
# rows (AutoAWQ's list has "Wqkv" for the same reason).
NO_CLIP = ("q_proj", "k_proj", "query", "key", "qkv")


@dataclass(frozen=True)
class AwqParams:
    n_grid: int = 20  # alphas 0, 1/n, ..., (n-1)/n for the scale search and shrink steps for clipping
    max_shrink: float = 0.5  # clipping searches max|w| * (1 - i/n_grid) for i < max_shrink * n_grid
    clip_tokens: int = 512  # input tokens sampled for the clipping search
    clip: bool = True
    search_samples: int | None = None  # calibration sequences used by the searches (None: all)

    def __post_init__(self) -> None:
        if self.n_grid < 1 or self.clip_tokens < 1:
            raise ValueError(f"n_grid and clip_tokens must be >= 1, got {self.n_grid}, {self.clip_tokens}")
        if not 0 <= self.max_shrink < 1:
            raise ValueError(f"max_shrink must be in [0, 1), got {self.max_shrink}")
        if self.search_samples is not None and self.search_samples < 1:
            raise ValueError(f"search_samples must be >= 1 (or null for all), got {self.search_samples}")


def activation_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, normalized so that max(s)·min(s) = 1 (alpha = 0 gives s = 1: plain RTN)."""
    scales = x_mean.pow(alpha).clamp(min=1e-4)
    return scales / (scales.max() * scales.min()).sqrt()


def search_scales(weights: list[torch.Tensor], x_mean: torch.Tensor, spec: QuantSpec, n_grid: int,
                  output_error) -> tuple[torch.Tensor, float, float]:
    """Grid search of alpha: `output_error(quantized weights)` -> loss. Returns (scales, alpha, loss)."""
    best = (torch.ones_like(x_mean), 0.0, float("inf"))
    for step in range(n_grid):
        alpha = step / n_grid
        scales = activation_scales(x_mean, alpha)
        quantized = [fake_quantize(w * scales, spec) / scales for w in weights]
        loss = output_error(quantized)
        if loss < best[2]:
            best = (scales, alpha, loss)
    return best


def row_output_errors(delta: torch.Tensor, inputs_gram: torch.Tensor) -> torch.Tensor:
    """Per row r of a weight change Δ, ‖x Δ_rᵀ‖² summed over the inputs x, as Δ_r G Δ_rᵀ with G
    the Gram matrix of the inputs (Σ xᵀx): the same sum without a product over every input."""
    return ((delta @ inputs_gram) * delta).sum(dim=1)


def search_clip(weight: torch.Tensor, inputs: torch.Tensor, spec: QuantSpec, n_grid: int,
                max_shrink: float) -> torch.Tensor:
    """Per-group max|w| after the shrink that minimizes ‖x Wᵀ − x Q(clamp(W))ᵀ‖ per group;
    [rows, n_groups]."""
    rows, columns = weight.shape
    sizes = spec.group_sizes(columns)
    best_max = torch.empty(rows, len(sizes), device=weight.device)
    start = 0
    for index, size in enumerate(sizes):  # groups are independent: one search each
        w = weight[:, start:start + size].float()
        x = inputs[:, start:start + size].float()
        inputs_gram = x.t() @ x
        org_max = w.abs().amax(dim=1, keepdim=True)
        group_spec = dataclasses.replace(spec, granularity="channel")
        min_err = torch.full((rows,), float("inf"), device=w.device)
        chosen = org_max.clone()
        for step in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - step / n_grid)
            q = fake_quantize(torch.clamp(w, -max_val, max_val), group_spec)
            err = row_output_errors(q - w, inputs_gram) / x.shape[0]
            better = err < min_err
            min_err[better] = err[better]
            chosen[better] = max_val[better]
        best_max[:, index] = chosen.squeeze(1)
        start += size
    return best_max


OutputError = Callable[[list[torch.Tensor]], float]


def _plain_linear(module: nn.Module) -> bool:
    """An nn.Linear that nothing hooks: its output is x Wᵀ + b."""
    return isinstance(module, nn.Linear) and not (module._forward_hooks or module._forward_pre_hooks)


def _linear_output_error(weight: torch.Tensor, xs: list[torch.Tensor]) -> OutputError:
    """The mean squared output error of one linear with a candidate weight, from its inputs' Gram
    matrix (a group inspecting its own linear, down_proj: the same error as running it on every
    input, at about a third of the multiply-adds per candidate on the 1536-column input)."""
    x = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).float()
    inputs_gram = x.t() @ x
    outputs = x.shape[0] * weight.shape[0]

    def output_error(quantized: list[torch.Tensor]) -> float:
        return float(row_output_errors(quantized[0].float() - weight.float(), inputs_gram).sum()) / outputs

    return output_error


def _module_output_error(module: nn.Module, layers: list[nn.Linear], originals: list[torch.Tensor],
                         xs: list[torch.Tensor], kwargs: list[dict],
                         reference: list[torch.Tensor] | None = None) -> OutputError:
    """The mean squared error of the inspected module's output with the candidate weights in its
    linears, against its output as it is (`reference`, per input, when already known)."""
    if reference is None:
        with torch.no_grad():
            reference = [first_tensor(module(x, **kw)) for x, kw in zip(xs, kwargs)]

    def output_error(quantized: list[torch.Tensor]) -> float:
        with torch.no_grad():
            for linear, w in zip(layers, quantized):
                linear.weight.copy_(w)
            total = sum(float((first_tensor(module(x, **kw)) - ref).float().pow(2).sum())
                        for x, kw, ref in zip(xs, kwargs, reference))
            for linear, w in zip(layers, originals):
                linear.weight.copy_(w)
        return total / sum(ref.numel() for ref in reference)

    return output_error


@register_method("awq", params=AwqParams, tracks=("A",), role="quantizer", reads=("weight",), calibrated=True,
                 defers_rounding=True)
class Awq(Stage):
    """Per block: scale search and fold for each scaling group, clipping search, then round to
    nearest. Before a later quantizer (`awq+gptq`) it stops after the clipping: the weights stay
    in float, scaled and clipped, for that quantizer to round."""

    def __init__(self, params: AwqParams, specs: Specs, final: bool) -> None:
        super().__init__(params, specs, final)
        self.alphas: dict[str, list[float]] = {}
        self.unreached: set[str] = set()  # inspected modules without calibration inputs (unrouted experts)
        # this block's inputs of the linears and inspected modules, and the inspected modules' outputs,
        # per search batch reaching them, when the engine's float pass gathered them
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.references: dict[str, list[torch.Tensor]] = {}

    def samples_read(self) -> int | None:
        return self.params.search_samples

    def before_blocks(self, step: ModelStep) -> None:
        block = step.adapter.decoder_blocks(step.model)[0]
        skipped = [g.label for g in step.adapter.scaling_groups if not scales_fold(block, g)]
        if skipped:
            step.result.notes.append(f"AWQ scaling skipped where the previous op's outputs are not the inputs "
                                     f"(grouped-query attention): {'; '.join(skipped)}")
        if not self.final:
            step.result.notes.append("AWQ before another weight quantizer: scales and clipping only, the weights "
                                     "are rounded by the later stage")

    def _searched(self, step: BlockStep) -> tuple[dict[str, nn.Module], list[ScalingGroup]]:
        """The modules whose inputs the searches read (linears, inspected modules), and the scaling
        groups that fold."""
        groups = [group for group in step.adapter.scaling_groups if scales_fold(step.block, group)]
        modules = {**step.linears(), **{g.inspect: step.block.get_submodule(g.inspect) for g in groups}}
        return modules, groups

    def _gatherer(self, step: BlockStep, store: dict[str, list[torch.Tensor]], name: str) -> Observer:
        """Appends module `name`'s tensor to `store[name]` on the batches the searches read."""
        batches = len(step.runner.first(self.params.search_samples).batches)

        def observe(index: int, tensor: torch.Tensor) -> None:
            if index < batches:
                store.setdefault(name, []).append(tensor)
        return observe

    def float_observers(self, step: BlockStep) -> dict[str, Observer]:
        modules, _groups = self._searched(step)
        self.inputs = {name: [] for name in modules}
        return {name: self._gatherer(step, self.inputs, name) for name in modules}

    def float_output_observers(self, step: BlockStep) -> dict[str, Observer]:
        _modules, groups = self._searched(step)
        self.references = {}
        return {group.inspect: self._gatherer(step, self.references, group.inspect)
                for group in groups if not self._linear_error(step.block, group)}

    @staticmethod
    def _linear_error(block: nn.Module, group: ScalingGroup) -> bool:
        """The group's output error is one linear's, computed from its inputs' Gram matrix."""
        return group.linears == (group.inspect,) and _plain_linear(block.get_submodule(group.inspect))

    def on_block(self, step: BlockStep) -> None:
        spec, params, block = self.specs.weight, self.params, step.block
        linears = step.linears()
        modules, groups = self._searched(step)
        search = step.runner.first(params.search_samples)
        # A group's input is its inspected module's (all tokens for an MoE block, whose experts each
        # see only the tokens routed to them); a module no batch reached (an expert no token was
        # routed to) has no input, and keeps scale 1 and no clipping. When the engine's float pass
        # gathered them (the stage is the first), so were the inspected modules' outputs: the float
        # block's, which the earlier groups' folds do not change (but for rounding).
        inputs = self.inputs if step.float_observed else search.inputs_of(modules)
        references = self.references if step.float_observed else {}
        self.inputs, self.references = {}, {}
        for group in groups:
            xs = inputs[group.inspect]
            if not xs:
                self.unreached.add(f"block {step.index} {group.inspect}")
                continue
            module = block.get_submodule(group.inspect)
            x_mean = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).abs().float().mean(dim=0)
            layer_list = [linears[name] for name in group.linears]
            originals = [linear.weight.detach().clone() for linear in layer_list]
            if self._linear_error(block, group):
                output_error = _linear_output_error(originals[0], xs)
            else:
                kwargs = [b.kwargs if group.inspect_takes_block_kwargs else {} for b in search.batches]
                output_error = _module_output_error(module, layer_list, originals, xs, kwargs,
                                                    references.get(group.inspect))
            scales, alpha, _loss = search_scales(originals, x_mean, spec, params.n_grid, output_error)
            self.alphas.setdefault(group.label, []).append(alpha)
            fold_scales(block, group, scales.to(originals[0].dtype), step.adapter.norm_offset)
            for name in group.linears:  # these layers now see x / s
                inputs[name] = [x / scales.to(x.dtype) for x in inputs[name]]
        if params.clip:
            for name, linear in linears.items():
                if any(part in name for part in NO_CLIP) or not inputs[name]:
                    continue
                x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[name]])
                x = x[:: max(1, x.shape[0] // params.clip_tokens)]
                max_val = search_clip(linear.weight, x, spec, params.n_grid, params.max_shrink)
                bound = expand_groups(max_val, spec.group_sizes(linear.in_features))
                with torch.no_grad():
                    linear.weight.copy_(torch.clamp(linear.weight, -bound, bound))
        if self.final:
            for name, linear in linears.items():
                step.quantized(name, fake_quantize(linear.weight, spec), spec)

    def after_blocks(self, step: ModelStep) -> None:
        step.result.notes += [f"AWQ mean alpha over blocks, {group}: {sum(a) / len(a):.2f}"
                              for group, a in self.alphas.items()]
        if self.unreached:
            unreached = ", ".join(sorted(self.unreached))
            step.result.notes.append(f"AWQ: {len(self.unreached)} modules no calibration token reached (MoE "
                                     f"experts) kept scale 1 and no clipping: {unreached}")
