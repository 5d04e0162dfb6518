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
construction is refused before the model is touched, naming it.

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
from ptq.errors import UnsupportedModel
from ptq.hadamard import NoHadamard, describe_order, hadamard_matrix, random_hadamard, random_orthogonal, split_order
from ptq.kv import head_dim_of
from ptq.registry import register_method
from ptq.transforms import (
    RMSNorm,
    center_embedding,
    center_output,
    fuse_norm,
    hadamard_input,
    rotate_embedding,
    rotate_input,
    rotate_output,
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


def _norm_groups(block: nn.Module, adapter) -> list[tuple[str, tuple[str, ...]]]:
    """(norm, the linears reading its output) of a block: the scaling groups fed by a norm."""
    return [(group.prev, group.linears) for group in adapter.scaling_groups
            if not isinstance(block.get_submodule(group.prev), nn.Linear)]


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


@register_method("quarot", params=QuarotParams, tracks=("A", "B"), role="transform")
class Quarot(Stage):
    def before_blocks(self, step: ModelStep) -> None:
        model, adapter, params = step.model, step.adapter, self.params
        blocks = list(adapter.decoder_blocks(model))
        embeddings = [model.get_submodule(name) for name in adapter.embeddings]
        hidden = embeddings[0].weight.shape[1]
        head_dim = head_dim_of(model.config)
        self._check(model, blocks[0], adapter, hidden, head_dim)
        notes, runtime = step.result.notes, step.result.runtime
        if untie_lm_head(model, adapter.lm_head, adapter.embeddings[0]):
            notes.append(f"QuaRot: {adapter.lm_head} untied from {adapter.embeddings[0]} (they shared a weight): "
                         "each is rotated on its own side")
            runtime.append(f"{adapter.lm_head} untied from {adapter.embeddings[0]}")
        layer_norm = adapter.norm == "layer"
        head = model.get_submodule(adapter.lm_head)
        if layer_norm:
            for embedding in embeddings:
                center_embedding(embedding)
            if head.bias is None:
                runtime.append(f"{adapter.lm_head} gets a bias (the final LayerNorm's, fused)")
        fuse_norm(model.get_submodule(adapter.final_norm), [head])
        generator = torch.Generator().manual_seed(params.seed)
        rotation = random_hadamard(hidden, generator) if params.rotate_mode == "hadamard" \
            else random_orthogonal(hidden, generator)
        for embedding in embeddings:
            rotate_embedding(embedding, rotation)
        rotate_input(head, rotation)
        per_head = hadamard_matrix(head_dim) / head_dim**0.5 if params.rotate_ov else None
        for block in blocks:
            readers = []
            for norm, names in _norm_groups(block, adapter):
                fuse_norm(block.get_submodule(norm), [block.get_submodule(name) for name in names])
                readers += names
                if layer_norm:
                    _replace(block, norm, RMSNorm(block.get_submodule(norm).eps))
            writers = [block.get_submodule(name) for name in (adapter.attn_out, adapter.mlp_out)]
            for writer in writers:
                if layer_norm:
                    center_output(writer)
                rotate_output(writer, rotation)
            for name in readers:
                rotate_input(block.get_submodule(name), rotation)
            if per_head is not None:
                rotate_output(block.get_submodule(adapter.attn_value), per_head)
                rotate_input(writers[0], per_head)
            if params.online_o:
                hadamard_input(writers[0])
            if params.online_down:
                hadamard_input(writers[1])
        if layer_norm:
            _replace(model, adapter.final_norm, RMSNorm(model.get_submodule(adapter.final_norm).eps))
            runtime.append("every LayerNorm replaced by a weightless RMSNorm (embeddings and output projections "
                           "centred, affine parts fused into the linears reading them)")
        kind = "randomized Hadamard" if params.rotate_mode == "hadamard" else "random orthogonal"
        notes.append(f"QuaRot: norms fused into the linears reading them; residual stream rotated by a {kind} "
                     f"matrix of order {describe_order(hidden) if params.rotate_mode == 'hadamard' else hidden} "
                     f"(seed {params.seed})")
        if params.rotate_ov:
            notes.append(f"QuaRot: per-head Hadamard of order {describe_order(head_dim)} on {adapter.attn_value} "
                         f"outputs and {adapter.attn_out} inputs")
        for flag, name in ((params.online_o, adapter.attn_out), (params.online_down, adapter.mlp_out)):
            if flag:
                n = blocks[0].get_submodule(name).in_features
                runtime.append(f"online Hadamard of order {describe_order(n)} on the input of every {name} "
                               "(a forward pre-hook, before its activation quantizer)")

    def _check(self, model: nn.Module, block: nn.Module, adapter, hidden: int, head_dim: int) -> None:
        """Refuse, before anything changes, a model the rotation cannot be exact on or a dimension
        with no Hadamard construction."""
        params = self.params
        if not getattr(model.config, "do_layer_norm_before", True):
            raise UnsupportedModel("quarot: the blocks normalize after the residual add (post-norm): the "
                                   "residual stream is not rotation-invariant")
        widths = {name: model.get_submodule(name).weight.shape[1] for name in adapter.embeddings}
        if set(widths.values()) != {hidden}:
            raise UnsupportedModel(f"quarot: the embeddings' widths {widths} are not all the hidden size {hidden} "
                                   "(a projection between embeddings and blocks is not supported)")
        readers = {name for _, names in _norm_groups(block, adapter) for name in names}
        uncovered = sorted(set(adapter.block_linears(block)) - readers - {adapter.attn_out, adapter.mlp_out})
        if uncovered:
            raise UnsupportedModel(f"quarot: block linears {uncovered} neither read the residual stream through a "
                                   "norm nor write into it")
        value, out = block.get_submodule(adapter.attn_value), block.get_submodule(adapter.attn_out)
        if params.rotate_ov and (value.out_features % head_dim or out.in_features % head_dim):
            raise UnsupportedModel(f"quarot: rotate_ov needs whole heads of {head_dim} channels, {adapter.attn_value} "
                                   f"has {value.out_features} outputs and {adapter.attn_out} {out.in_features} inputs")
        dims = [(params.rotate_mode == "hadamard", hidden, "the hidden size (residual rotation)",
                 "rotate_mode: random"),
                (params.rotate_ov, head_dim, "the head size (rotate_ov)", "rotate_ov: false"),
                (params.online_o, out.in_features, f"the input of {adapter.attn_out} (online_o)", "online_o: false"),
                (params.online_down, block.get_submodule(adapter.mlp_out).in_features,
                 f"the input of {adapter.mlp_out} (online_down)", "online_down: false")]
        for wanted, n, what, instead in dims:
            if not wanted:
                continue
            try:
                split_order(n)
            except NoHadamard as exc:
                raise UnsupportedModel(f"quarot: {what} is {n}: {exc}. Set {instead} to run without it") from None
