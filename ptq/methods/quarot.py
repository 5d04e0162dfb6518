"""QuaRot (Ashkboos et al., 2024): rotate the model so that the inputs of its linears have no
outlier channels, with the function unchanged in exact arithmetic, following the authors'
reference (spcl/QuaRot, fake_quant: rotation_utils.py, hadamard_utils.py, main.py).

All at model level, before the block walk, so that a later stage (`quarot+gptq`) calibrates on
the rotated model and any propagation of block outputs sees rotated blocks:

1. Untie the LM head from the token embedding when they share a weight (SmolLM2 does): the
   embedding is rotated on its output side, the head on its input side.
2. Fuse each norm's affine part into the linears that read it (the final norm into the LM
   head); the norms keep x / rms(x). LayerNorm models (OPT), as the reference: the embeddings
   and the output projections are centred so the residual stream has zero mean, and each
   LayerNorm becomes a weightless RMSNorm (a module change, declared in `runtime`).
3. Rotate the residual stream by an orthogonal Q (`rotate_mode` hadamard: diag(±1) H / √n,
   seeded; random: Haar-random): embeddings E Q, the linears reading the stream W Q, the ones
   writing into it (attention and MLP output projections) Qᵀ W, the LM head W Q.
4. `rotate_ov`: a Hadamard over each head's channels on the value projection's outputs and
   the attention output projection's inputs (exact offline: attention mixes tokens, not channels).
5. `online_down`, `online_o`: an online Hadamard on the input of the MLP's and the attention's
   output projections (W ← W H and x ↦ x H at run time, a forward pre-hook): what makes 4-bit
   activations work there.

Dimensions that are not powers of two use H_d ⊗ H_{2^k} (ptq.hadamard); a dimension with no
construction is refused before the model is touched, naming it. A fused qkv_proj (Phi-3) takes
the per-head Hadamard of step 4 on its value rows; Gemma's x̂·(1 + w) norms are fused as such.
Not applicable (the cell is skipped): mixture-of-experts MLPs, and norms on the attention's and
the MLP's outputs (Gemma 3), whose weights act on the rotated stream with no linear to take them.

Where this differs from the reference, and why:
- The reference subtracts the embeddings' mean for every model; under RMSNorm (Llama) that
  changes the model's function, so it is done here only for LayerNorm models.
- The reference's online rotation of o_proj's input is H_heads ⊗ I, which completes the
  per-head Hadamard of step 4 to a full one; a Hadamard matrix of order "number of heads"
  exists only for 1, 2 and multiples of 4 (SmolLM2 has 9 heads), so `online_o` here is the
  Hadamard of the whole input (heads × head_dim), which mixes every channel just as well, and
  is independent of `rotate_ov`.
- Hadamard matrices come from Sylvester's and Paley's constructions, not the reference's tables
  (any Hadamard matrix serves: only orthogonality and flat entries matter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ptq.engine import ModelStep, Stage
from ptq.errors import NotApplicable, UnsupportedModel
from ptq.hadamard import (
    NoHadamard,
    describe_order,
    hadamard_matrix,
    random_hadamard,
    random_orthogonal,
    split_order,
)
from ptq.kv import head_dim_of
from ptq.models.adapters import ArchAdapter, is_norm
from ptq.registry import register_method
from ptq.transforms import (
    fuse_norms,
    hadamard_input,
    norm_groups,
    own_parameters_outside,
    rotate_input,
    rotate_output,
    rotate_residual,
    untie_lm_head,
)

ROTATE_MODES = ("hadamard", "random")


@dataclass(frozen=True)
class QuarotParams:
    rotate_mode: Literal["hadamard", "random"] = "hadamard"  # the residual rotation Q
    seed: int = 0  # Q's random signs (hadamard) or Gaussian draw (random)
    online_down: bool = True  # online Hadamard on the MLP output projection's input
    online_o: bool = True  # online Hadamard on the attention output projection's input
    rotate_ov: bool = True  # per-head Hadamard on the value outputs / attention output inputs

    def __post_init__(self) -> None:
        if self.rotate_mode not in ROTATE_MODES:
            raise ValueError(f"rotate_mode must be one of {ROTATE_MODES}, got {self.rotate_mode!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@register_method("quarot", params=QuarotParams, tracks=("A", "B"), role="transform")
class Quarot(Stage):
    def before_blocks(self, step: ModelStep) -> None:
        model, adapter, params = step.model, step.adapter, self.params
        blocks = adapter.decoder_blocks(model)
        hidden = model.get_submodule(adapter.embeddings[0]).weight.shape[1]
        head_dim = head_dim_of(model.config)
        self._check(model, blocks[0], adapter, hidden, head_dim)
        notes, runtime = step.result.notes, step.result.runtime
        head, embedding = adapter.lm_head, adapter.embeddings[0]
        own_parameters_outside(model, blocks)
        if untie_lm_head(model, head, embedding):
            notes.append(f"QuaRot: {head} untied from {embedding} (they shared a weight): each is rotated on "
                         "its own side")
            runtime.append(f"{head} untied from {embedding}")
        if adapter.norm == "layer":
            if model.get_submodule(head).bias is None:
                runtime.append(f"{head} gets a bias (the final LayerNorm's, fused)")
            runtime.append("every LayerNorm replaced by a weightless RMSNorm (embeddings and output "
                           "projections centred, affine parts fused into the linears reading them)")
        fuse_norms(model, adapter)
        generator = torch.Generator().manual_seed(params.seed)
        if params.rotate_mode == "hadamard":
            rotate_residual(model, adapter, random_hadamard(hidden, generator))
            kind = f"randomized Hadamard matrix of order {describe_order(hidden)}"
        else:
            rotate_residual(model, adapter, random_orthogonal(hidden, generator))
            kind = f"random orthogonal matrix of order {hidden}"
        notes.append(f"QuaRot: norms fused into the linears reading them; residual stream rotated by a "
                     f"{kind} (seed {params.seed})")
        if params.rotate_ov:
            per_head = hadamard_matrix(head_dim) / head_dim**0.5
            for block in blocks:
                rotate_output(block.get_submodule(adapter.attn_value), per_head, adapter.value_rows())
                rotate_input(block.get_submodule(adapter.attn_out), per_head)
            notes.append(f"QuaRot: per-head Hadamard of order {describe_order(head_dim)} on "
                         f"{adapter.attn_value} outputs and {adapter.attn_out} inputs")
        for wanted, name in ((params.online_o, adapter.attn_out), (params.online_down, adapter.mlp_out)):
            if wanted:
                for block in blocks:
                    hadamard_input(block.get_submodule(name))
                order = describe_order(blocks[0].get_submodule(name).in_features)
                runtime.append(f"online Hadamard of order {order} on the input of every {name} (a forward "
                               "pre-hook, before its activation quantizer)")

    def _check(self, model: nn.Module, block: nn.Module, adapter: ArchAdapter, hidden: int,
               head_dim: int) -> None:
        """Refuse, before anything changes, a model the rotation cannot be exact on, or a dimension
        with no Hadamard construction (naming it, and the param that avoids it)."""
        params = self.params
        if not getattr(model.config, "do_layer_norm_before", True):
            raise UnsupportedModel("quarot: the blocks normalize after the residual add (post-norm): the "
                                   "residual stream is not rotation-invariant")
        widths = {name: model.get_submodule(name).weight.shape[1] for name in adapter.embeddings}
        if set(widths.values()) != {hidden}:
            raise UnsupportedModel(f"quarot: the embeddings' widths {widths} are not all the hidden size "
                                   f"{hidden} (a projection between embeddings and blocks is not supported)")
        if adapter.mlp_out is None:
            raise NotApplicable("quarot: a mixture-of-experts MLP (each expert's output projection writes into "
                                "the residual stream, the router reads it in float) is not supported")
        fused = {norm for norm, _ in norm_groups(block, adapter)}
        unfused = [name for name, child in block.named_children() if is_norm(child, hidden) and name not in fused]
        if unfused:
            raise NotApplicable(f"quarot: block norms {unfused} feed no linear (Gemma's norms of the attention's "
                                "and the MLP's outputs): their weights do not commute with a rotation of the "
                                "residual stream")
        readers = {name for _, names in norm_groups(block, adapter) for name in names}
        uncovered = sorted(set(adapter.block_linears(block)) - readers - {adapter.attn_out, adapter.mlp_out})
        if uncovered:
            raise UnsupportedModel(f"quarot: block linears {uncovered} neither read the residual stream "
                                   "through a norm nor write into it")
        out, down = block.get_submodule(adapter.attn_out), block.get_submodule(adapter.mlp_out)
        start, stop = adapter.value_rows() or (0, block.get_submodule(adapter.attn_value).out_features)
        if params.rotate_ov and ((stop - start) % head_dim or out.in_features % head_dim):
            raise UnsupportedModel(f"quarot: rotate_ov needs whole heads of {head_dim} channels; "
                                   f"{adapter.attn_value} has {stop - start} value outputs, "
                                   f"{adapter.attn_out} {out.in_features} inputs")
        dims = [(params.rotate_mode == "hadamard", hidden, "the hidden size (residual rotation)",
                 "rotate_mode: random"),
                (params.rotate_ov, head_dim, "the head size (rotate_ov)", "rotate_ov: false"),
                (params.online_o, out.in_features, f"the input of {adapter.attn_out} (online_o)",
                 "online_o: false"),
                (params.online_down, down.in_features, f"the input of {adapter.mlp_out} (online_down)",
                 "online_down: false")]
        for wanted, n, what, instead in dims:
            try:
                if wanted:
                    split_order(n)
            except NoHadamard as exc:
                raise UnsupportedModel(f"quarot: {what} is {n}: {exc}. Set {instead} to run without "
                                       "it") from None
