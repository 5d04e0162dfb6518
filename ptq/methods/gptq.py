"""GPTQ (Frantar et al., 2023): one-shot weight quantization with approximate second-order
error compensation, following the authors' reference (IST-DASLab/gptq).

`GPTQ` is the algorithm over one weight and its statistics: `add_batch` accumulates the
Hessian H = 2 X Xᵀ of the layer inputs, `quantize` quantizes column by column and spreads
each column's error over the columns not yet quantized (blocked lazy updates, dampening,
optional act-order and static groups). The registered stage feeds it block by block from the
calibration engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ptq.engine import BlockStep, ModelStep, Specs, Stage
from ptq.quant import QuantSpec, fake_quantize, fake_quantize_with, find_params
from ptq.registry import register_method

MAX_DAMP_RETRIES = 4  # dampening x10 each time, as far as 10^4 x percdamp
# A linear whose Hessian comes from fewer than this fraction of the block's calibration tokens (an MoE
# expert the router rarely picks) is rounded to nearest instead: GPTQModel's FailSafe default (strategy
# rtn, threshold 0.5%). With no tokens at all GPTQ would zero the weight (the reference's dead columns).
MIN_TOKEN_FRACTION = 0.005
# Rows of the Hessian per product in `add_gram_`: of 128-384, the fastest here for down_proj's 1,536
# columns at 4,096 tokens, where most of the time goes (0.68x the full product's; 0.76x at 576), one thread
GRAM_ROWS = 192
FEW_TOKENS_SHOWN = 10  # linears named in the record's fallback for too few calibration tokens


@dataclass(frozen=True)
class GptqParams:
    blocksize: int = 128  # columns per lazy batch update
    percdamp: float = 0.01  # dampening, as a fraction of the mean Hessian diagonal
    act_order: bool = False  # quantize columns in order of decreasing Hessian diagonal
    static_groups: bool = False  # with act_order: group parameters from the original column order
    true_sequential: bool = True  # inside a block, quantize layer groups in execution order

    def __post_init__(self) -> None:
        if self.blocksize <= 0:
            raise ValueError(f"blocksize must be > 0 columns, got {self.blocksize}")
        if self.percdamp <= 0:
            raise ValueError(f"percdamp must be > 0 (a fraction of the mean Hessian diagonal), got {self.percdamp}")


@dataclass(frozen=True)
class GptqResult:
    weight: torch.Tensor  # fake-quantized, in the input's dtype
    row_losses: torch.Tensor  # per row, the sum over columns of (w - q)^2 / d^2 / 2, the reference's loss
    damp_used: float  # the dampening that made H positive definite (> percdamp means a fallback)

    @property
    def loss(self) -> float:
        return self.row_losses.sum().item()


class GPTQ:
    """Hessian statistics of one linear layer's inputs, and the GPTQ solve over its weight."""

    def __init__(self, columns: int, device: torch.device | None = None) -> None:
        self.H = torch.zeros(columns, columns, device=device)
        self.nsamples = 0
        self.tokens = 0  # input vectors seen

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Accumulate H as the running mean of 2 x xᵀ over sequences ([batch, seq, columns] inputs;
        [tokens, columns] counts as one sequence, as in the reference)."""
        count = inputs.shape[0] if inputs.dim() > 2 else 1
        x = inputs.reshape(-1, inputs.shape[-1]).t().float()
        self.tokens += x.shape[1]
        self.H *= self.nsamples / (self.nsamples + count)
        self.nsamples += count
        x = (2 / self.nsamples) ** 0.5 * x
        add_gram_(self.H, x)

    def quantize(self, weight: torch.Tensor, spec: QuantSpec, params: GptqParams) -> GptqResult:
        if spec.granularity not in ("group", "channel"):
            raise ValueError(f"GPTQ quantizes weights per channel or per group, not per {spec.granularity}")
        W = weight.detach().clone().float()
        columns = W.shape[1]
        H = self.H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        groupsize = spec.group_sizes(columns)[0]  # the whole row when per channel
        channel = dataclasses.replace(spec, granularity="channel")

        def group_params(columns_slice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            return find_params(columns_slice, channel)  # [rows, 1] each

        static = [group_params(W[:, g:g + groupsize]) for g in range(0, columns, groupsize)] \
            if params.static_groups else None
        perm = None
        if params.act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
            W, H = W[:, perm], H[perm][:, perm]
        Hinv, damp_used = _inverse_cholesky(H, params.percdamp)

        Q = torch.zeros_like(W)
        losses = torch.zeros(W.shape[0], device=W.device)
        scale, zero = group_params(W)  # per channel when there are no groups
        for i1 in range(0, columns, params.blocksize):
            i2 = min(i1 + params.blocksize, columns)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                column = i1 + i
                if groupsize < columns:
                    if static is not None:
                        original = perm[column].item() if perm is not None else column
                        scale, zero = static[original // groupsize]
                    elif column % groupsize == 0:
                        scale, zero = group_params(W[:, column:column + groupsize])
                w = W1[:, i]
                d = Hinv1[i, i]
                q = fake_quantize_with(w.unsqueeze(1), scale, zero, spec).flatten()
                Q[:, column] = q
                err = (w - q) / d
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            losses += Err1.pow(2).sum(dim=1) / 2  # (w - q)^2 / d^2 / 2 per column, summed
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        if perm is not None:
            Q = Q[:, torch.argsort(perm)]
        return GptqResult(Q.to(weight.dtype), losses, damp_used)


def add_gram_(H: torch.Tensor, x: torch.Tensor) -> None:
    """H += x xᵀ for x [columns, tokens], computing only the blocks of `GRAM_ROWS` rows on and right
    of the diagonal and mirroring them below it (H is symmetric): for 1,536 columns (down_proj's
    input) about 56% of the multiply-adds of x @ x.t(). Each entry is the same dot product over
    the tokens; only how the BLAS splits the sum may differ (float rounding)."""
    columns = x.shape[0]
    for start in range(0, columns, GRAM_ROWS):
        end = min(start + GRAM_ROWS, columns)
        block = x[start:end] @ x[start:].t()
        H[start:end, start:] += block
        H[end:, start:end] += block[:, end - start:].t()


def _child_end(order: list[str], name: str) -> bool:
    """`name` is the last linear of its child of the block (in execution `order`)."""
    child = name.split(".")[0]
    return [other for other in order if other.split(".")[0] == child][-1] == name


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H⁻¹ after dampening; on failure retry with 10x the dampening."""
    diagonal = torch.arange(H.shape[0], device=H.device)
    mean_diag = torch.mean(torch.diag(H))
    damp = percdamp
    for _ in range(MAX_DAMP_RETRIES + 1):
        dampened = H.clone()
        dampened[diagonal, diagonal] += damp * mean_diag
        try:
            L = torch.linalg.cholesky(dampened)
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True), damp
        except torch.linalg.LinAlgError:
            damp *= 10
    raise torch.linalg.LinAlgError(f"Hessian not positive definite even with dampening {damp / 10}")


@register_method("gptq", params=GptqParams, tracks=("A", "B"), role="quantizer", reads=("weight",),
                 calibrated=True)
class Gptq(Stage):
    """Per block: Hessians of each sequential group's shared input, then the GPTQ solve of each
    linear. With true-sequential, a step's inputs come from the block with the earlier steps
    already quantized; without, every group's Hessian comes from the block as it was. An MoE
    expert's Hessian comes from the tokens routed to it; one reached by too few tokens is
    rounded to nearest (`MIN_TOKEN_FRACTION`), and the record's fallbacks say which."""

    @classmethod
    def check(cls, params: GptqParams, specs: Specs) -> None:
        if specs.weight.granularity not in ("group", "channel"):
            raise ValueError(f"GPTQ quantizes weights per channel or per group, not per {specs.weight.granularity}")

    def __init__(self, params: GptqParams, specs: Specs, final: bool) -> None:
        super().__init__(params, specs, final)
        self.losses: dict[str, float] = {}  # the reference's per-layer error, summed over blocks by layer name
        self.few_tokens: list[str] = []  # linears rounded to nearest: too few calibration tokens

    def before_blocks(self, step: ModelStep) -> None:
        if self.params.act_order and not self.params.static_groups and self.specs.weight.granularity == "group":
            step.result.notes.append("act_order without static_groups: groups follow the permuted column order "
                                     "(the reference's g_idx layout)")

    def on_block(self, step: BlockStep) -> None:
        linears = step.linears()
        steps = step.adapter.sequential
        # The linears of one group read the same input: one Hessian serves the group. The groups of a
        # step (one per MoE expert) are collected in the same forwards.
        rounds = list(steps) if self.params.true_sequential else [[group for s in steps for group in s]]
        total = sum(batch.hidden.shape[0] * batch.hidden.shape[1] for batch in step.runner.batches)
        order = list(linears)
        done: set[str] = set()
        for groups in rounds:
            firsts = {names[0]: linears[names[0]] for names in groups}
            stats = {first: GPTQ(linear.in_features, linear.weight.device) for first, linear in firsts.items()}
            # The input of a child's last linear, when every linear before it is quantized, is final:
            # the runner keeps it to compute the child's output from it (o_proj, down_proj).
            final = {first for first in firsts
                     if _child_end(order, first) and set(order[:order.index(first)]) <= done}
            step.runner.feed_inputs(firsts, lambda name, _i, x: stats[name].add_batch(x), keep=final)
            for names in groups:
                group = {name: linears[name] for name in names}
                if stats[names[0]].tokens < MIN_TOKEN_FRACTION * total:
                    self._round_to_nearest(step, group, stats[names[0]].tokens, total)
                else:
                    self._quantize(step, group, stats[names[0]])
                done.update(names)
            # In execution order, a child whose linears are all quantized has final weights and
            # final inputs: later passes (the next groups', the block's outputs) replay it.
            step.runner.freeze({child for child in {name.split(".")[0] for name in linears}
                                if all(name in done for name in linears if name.split(".")[0] == child)})

    def _round_to_nearest(self, step: BlockStep, linears: dict[str, nn.Linear], tokens: int,
                          total: int) -> None:
        """The fallback for linears (MoE experts) that too few calibration tokens reached."""
        self.few_tokens.append(f"block {step.index} {', '.join(linears)}: {tokens} of {total} tokens")
        for name, linear in linears.items():
            step.quantized(name, fake_quantize(linear.weight, self.specs.weight), self.specs.weight)

    def _quantize(self, step: BlockStep, linears: dict[str, nn.Linear], stats: GPTQ) -> None:
        """One solve for linears that share a Hessian: their rows stacked (rows are independent
        in GPTQ, so this is each layer's own solve, with one factorization and one column loop)."""
        solved = stats.quantize(torch.cat([linear.weight for linear in linears.values()]), self.specs.weight,
                                self.params)
        if solved.damp_used != self.params.percdamp:
            step.result.fallbacks.append(f"block {step.index} {', '.join(linears)}: Hessian not positive definite "
                                         f"at percdamp {self.params.percdamp}, quantized with {solved.damp_used}")
        start = 0
        for name, linear in linears.items():
            rows = slice(start, start + linear.out_features)
            short = name.rsplit(".", 1)[-1]
            self.losses[short] = self.losses.get(short, 0.0) + solved.row_losses[rows].sum().item()
            step.quantized(name, solved.weight[rows], self.specs.weight)
            start = rows.stop

    def after_blocks(self, step: ModelStep) -> None:
        step.result.notes.append("GPTQ loss summed over blocks: "
                                 + ", ".join(f"{k} {v:.4g}" for k, v in self.losses.items()))
        if self.few_tokens:
            shown = self.few_tokens[:FEW_TOKENS_SHOWN]
            hidden = len(self.few_tokens) - len(shown)
            more = f"; and {hidden} more" if hidden else ""
            step.result.fallbacks.append(
                f"GPTQ rounded {len(self.few_tokens)} groups of linears to nearest, reached by fewer than "
                f"{MIN_TOKEN_FRACTION:.2%} of the calibration tokens: {'; '.join(shown)}{more}")
