"""Architecture adapters: where a decoder-only family keeps its blocks, norms, embeddings and head.

One small data record per family; no algorithm knows a family by name, it asks the
adapter. Adding a family is one `ArchAdapter(...)` entry in `ADAPTERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ptq.errors import UnsupportedModel


@dataclass(frozen=True)
class ScalingGroup:
    """Linears that read the same input, and the operation producing that input (AWQ folds
    per-channel scales into `prev`). Names are relative to a decoder block."""

    prev: str  # a norm or a linear whose output channels feed `linears`
    linears: tuple[str, ...]
    inspect: str  # the module whose output the scale search compares (attention, MLP or the linear)
    inspect_takes_block_kwargs: bool = False  # attention needs the mask and rotary embeddings


@dataclass(frozen=True)
class ArchAdapter:
    family: str
    architectures: tuple[str, ...]  # transformers class names this adapter covers
    blocks: str  # dotted path from the causal-LM module to the ModuleList of decoder blocks
    embeddings: tuple[str, ...]  # modules before the first block
    final_norm: str
    lm_head: str
    rotary: str | None  # module computing rotary position embeddings, shared by all blocks
    # GPTQ's true-sequential order: each group is quantized before the next one's inputs are
    # collected. The linears of a group read the same input tensor; the groups cover the block.
    sequential: tuple[tuple[str, ...], ...]
    scaling_groups: tuple[ScalingGroup, ...]  # AWQ's groupings, as in the reference implementation
    qkv: tuple[str, ...]  # the projections whose outputs are the attention matmuls' inputs
    # Where a rotation of the residual stream acts (QuaRot): the linears reading the stream are
    # those of the scaling groups fed by a norm; these write into it. `norm` says what the norms
    # compute: "rms" x / rms(x) · w, "layer" (x − mean) / std · w + b.
    norm: Literal["rms", "layer"]
    attn_value: str  # the value projection: its output heads are attn_out's input heads
    attn_out: str  # the attention's output projection
    mlp_out: str  # the MLP's output projection

    def pre_block_modules(self) -> tuple[str, ...]:
        """Modules that run before the first block (they go to the compute device for calibration)."""
        return self.embeddings + ((self.rotary,) if self.rotary else ())

    def decoder_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The linear layers of one decoder block, by their name inside the block, in execution order."""
        return {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}

    def attention_projections(self, model: nn.Module) -> list[str]:
        """Full names of every block's query, key and value projections."""
        blocks = range(len(self.decoder_blocks(model)))
        return [f"{self.blocks}.{index}.{name}" for index in blocks for name in self.qkv]

    def quantizable_linears(self, model: nn.Module) -> dict[str, nn.Linear]:
        """Every linear inside the decoder blocks, by full name. The LM head and embeddings stay in
        float, as in the GPTQ, AWQ and SmoothQuant reference code (they are often tied)."""
        return {
            f"{self.blocks}.{index}.{name}": linear
            for index, block in enumerate(self.decoder_blocks(model))
            for name, linear in self.block_linears(block).items()
        }


ADAPTERS: tuple[ArchAdapter, ...] = (
    ArchAdapter(
        family="llama",  # Llama 1-3, Mistral, Qwen2/2.5, SmolLM2: same module layout
        architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        final_norm="model.norm",
        lm_head="lm_head",
        rotary="model.rotary_emb",
        sequential=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"),
            ("mlp.down_proj",),
        ),
        scaling_groups=(
            ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                         "self_attn", inspect_takes_block_kwargs=True),
            ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
            ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
            ScalingGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
        ),
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        norm="rms",
        attn_value="self_attn.v_proj",
        attn_out="self_attn.o_proj",
        mlp_out="mlp.down_proj",
    ),
    ArchAdapter(
        family="opt",
        architectures=("OPTForCausalLM",),
        blocks="model.decoder.layers",
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        final_norm="model.decoder.final_layer_norm",
        lm_head="lm_head",
        rotary=None,
        sequential=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        scaling_groups=(
            ScalingGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                         "self_attn", inspect_takes_block_kwargs=True),
            ScalingGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
            ScalingGroup("final_layer_norm", ("fc1",), "fc1"),
            ScalingGroup("fc1", ("fc2",), "fc2"),
        ),
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        norm="layer",
        attn_value="self_attn.v_proj",
        attn_out="self_attn.out_proj",
        mlp_out="fc2",
    ),
)


def adapter_for(model: nn.Module, family: str | None = None) -> ArchAdapter:
    """The adapter of a loaded model, by its class name (and checked against the declared family)."""
    arch = type(model).__name__
    for adapter in ADAPTERS:
        if arch in adapter.architectures:
            if family is not None and family != adapter.family:
                raise UnsupportedModel(
                    f"model class {arch} belongs to family {adapter.family!r}, but its YAML says {family!r}"
                )
            return adapter
    known = ", ".join(a for adapter in ADAPTERS for a in adapter.architectures)
    raise UnsupportedModel(
        f"no architecture adapter for {arch}. Known: {known}. To add one, give ptq.models.adapters.ADAPTERS "
        "an ArchAdapter naming the decoder blocks' ModuleList, the embeddings, the final norm, the LM head "
        "and the rotary module (if any)."
    )
