"""AWQ (Lin et al., 2024): activation-aware weight quantization, following the authors'
reference (mit-han-lab/llm-awq, auto_scale / auto_clip).

Per block: (1) for each group of linears sharing an input, search a per-input-channel
scale s = mean|x|^alpha (normalized) over a grid of alpha, minimizing the error of the
group's module output with weights quantized as Q(W·s)/s; fold 1/s into the operation that
produces the input (a norm, or the previous linear) and s into the weights; (2) search a
per-group clipping range that minimizes the layer-output error; (3) round to nearest with
the shared quantizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ptq.calib import BlockRunner, first_tensor, walk_blocks
from ptq.config import CellConfig
from ptq.models.adapters import ScalingGroup
from ptq.quant import QuantSpec, expand_groups, fake_quantize
from ptq.registry import QuantContext, QuantizedModel, parse_params, register_method
from ptq.transforms import group_notes, replace_weights

NO_CLIP = ("q_proj", "k_proj", "query", "key")  # the reference skips clipping where it would distort attention scores


@dataclass(frozen=True)
class AwqParams:
    n_grid: int = 20  # alphas 0, 1/n, ..., (n-1)/n for the scale search and shrink steps for clipping
    max_shrink: float = 0.5  # clipping searches max|w| * (1 - i/n_grid) for i < max_shrink * n_grid
    clip_tokens: int = 512  # input tokens sampled for the clipping search
    clip: bool = True
    search_samples: int | None = None  # calibration sequences used by the searches (None: all)



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


def search_clip(weight: torch.Tensor, inputs: torch.Tensor, spec: QuantSpec, n_grid: int,
                max_shrink: float) -> torch.Tensor:
    """Per-group max|w| after the shrink that minimizes ‖x Wᵀ − x Q(clamp(W))ᵀ‖ per group; [rows, n_groups]."""
    rows, columns = weight.shape
    sizes = spec.group_sizes(columns)
    best_max = torch.empty(rows, len(sizes), device=weight.device)
    start = 0
    for index, size in enumerate(sizes):  # groups are independent: one search each
        w = weight[:, start:start + size].float()
        x = inputs[:, start:start + size].float()
        reference = x @ w.t()
        org_max = w.abs().amax(dim=1, keepdim=True)
        group_spec = dataclasses.replace(spec, granularity="channel")
        min_err = torch.full((rows,), float("inf"), device=w.device)
        chosen = org_max.clone()
        for step in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - step / n_grid)
            q = fake_quantize(torch.clamp(w, -max_val, max_val), group_spec)
            err = (x @ q.t() - reference).pow(2).mean(dim=0)
            better = err < min_err
            min_err[better] = err[better]
            chosen[better] = max_val[better]
        best_max[:, index] = chosen.squeeze(1)
        start += size
    return best_max


def _fold_scales(block: nn.Module, group: ScalingGroup, scales: torch.Tensor) -> None:
    """y = prev(x) / s feeds W·s: the block computes the same function before quantization."""
    prev = block.get_submodule(group.prev)
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            prev.weight.div_(scales.view(-1, 1))
        else:  # a norm: scale its affine weight
            prev.weight.div_(scales)
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(scales)
        for name in group.linears:
            block.get_submodule(name).weight.mul_(scales.view(1, -1))


def _applies(block: nn.Module, group: ScalingGroup) -> bool:
    """A linear `prev` can absorb the scales only if its outputs are exactly the group's inputs
    (not so for v_proj -> o_proj under grouped-query attention)."""
    prev = block.get_submodule(group.prev)
    first = block.get_submodule(group.linears[0])
    return not isinstance(prev, nn.Linear) or prev.out_features == first.in_features


@register_method("awq", tracks=("A",), uses=("weight",), calibrated=True)
def awq(model: nn.Module, config: CellConfig, ctx: QuantContext) -> QuantizedModel:
    params = parse_params(AwqParams, config)
    spec = config.weight
    adapter = ctx.adapter
    result = QuantizedModel(model)
    result.notes += group_notes(adapter.quantizable_linears(model), spec)
    skipped = sorted({f"{g.prev} -> {', '.join(g.linears)}" for g in adapter.scaling_groups
                      if not _applies(adapter.decoder_blocks(model)[0], g)})
    if skipped:
        result.notes.append(f"AWQ scaling skipped where the previous op's outputs are not the inputs "
                            f"(grouped-query attention): {'; '.join(skipped)}")
    tokens = ctx.calibration.tokens
    search_tokens = tokens if params.search_samples is None else tokens[:params.search_samples]
    alphas: dict[str, list[float]] = {}

    def quantize_block(index: int, block: nn.Module, runner: BlockRunner) -> None:
        linears = adapter.block_linears(block)
        search = BlockRunner(block, runner.batches[: _batches_for(runner, len(search_tokens))])
        inputs = search.inputs_of(linears)
        for group in adapter.scaling_groups:
            if not _applies(block, group):
                continue
            module = block.get_submodule(group.inspect)
            xs = inputs[group.linears[0]]
            kwargs = [b.kwargs if group.inspect_takes_block_kwargs else {} for b in search.batches]
            with torch.no_grad():
                reference = [first_tensor(module(x, **kw)) for x, kw in zip(xs, kwargs)]
            x_mean = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).abs().float().mean(dim=0)
            layer_list = [linears[name] for name in group.linears]
            originals = [linear.weight.detach().clone() for linear in layer_list]

            def output_error(quantized: list[torch.Tensor]) -> float:
                with torch.no_grad():
                    for linear, w in zip(layer_list, quantized):
                        linear.weight.copy_(w)
                    total = sum(float((first_tensor(module(x, **kw)) - ref).float().pow(2).sum())
                                for x, kw, ref in zip(xs, kwargs, reference))
                    for linear, w in zip(layer_list, originals):
                        linear.weight.copy_(w)
                return total / sum(ref.numel() for ref in reference)

            scales, alpha, _loss = search_scales(originals, x_mean, spec, params.n_grid, output_error)
            alphas.setdefault(f"{group.prev} -> {', '.join(group.linears)}", []).append(alpha)
            _fold_scales(block, group, scales.to(originals[0].dtype))
            for name in group.linears:  # these layers now see x / s
                inputs[name] = [x / scales.to(x.dtype) for x in inputs[name]]
        if params.clip:
            for name, linear in linears.items():
                if any(part in name for part in NO_CLIP):
                    continue
                x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[name]])
                x = x[:: max(1, x.shape[0] // params.clip_tokens)]
                max_val = search_clip(linear.weight, x, spec, params.n_grid, params.max_shrink)
                bound = expand_groups(max_val, spec.group_sizes(linear.in_features))
                with torch.no_grad():
                    linear.weight.copy_(torch.clamp(linear.weight, -bound, bound))
        replace_weights(linears, lambda w: fake_quantize(w, spec))

    walk_blocks(model, adapter, tokens, batch_size=config.calib.batch_size, device=ctx.device,
                propagate=config.calib.propagate, quantize_block=quantize_block)
    result.notes += [f"AWQ mean alpha over blocks, {group}: {sum(a) / len(a):.2f}" for group, a in alphas.items()]
    return result


def _batches_for(runner: BlockRunner, samples: int) -> int:
    """How many of the runner's batches hold the first `samples` sequences."""
    count, total = 0, 0
    for batch in runner.batches:
        if total >= samples:
            break
        total += batch.hidden.shape[0]
        count += 1
    return count

