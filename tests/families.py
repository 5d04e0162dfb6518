"""Tiny random models of every supported family, built offline from transformers' config classes
(seeded, three blocks, hidden size 64), with random norm weights so that folds into norms are
exercised. Gemma 3 alternates sliding-window (window 8) and global layers; the MoE families have
four experts, two per token; Phi-3 has fused qkv_proj and gate_up_proj, no grouped-query
attention (as Phi-3-mini)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

VOCAB = 128
LAYERS = 3
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
SLIDING_WINDOW = 8

BUILDERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, intermediate_size=128, num_key_value_heads=2)),
    "qwen3": lambda: Qwen3ForCausalLM(
        Qwen3Config(**COMMON, intermediate_size=128, num_key_value_heads=2, head_dim=16)
    ),
    "gemma3": lambda: Gemma3ForCausalLM(
        Gemma3TextConfig(
            **COMMON,
            intermediate_size=128,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
    ),
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(**COMMON, intermediate_size=128, num_key_value_heads=4)),
    "mixtral": lambda: MixtralForCausalLM(
        MixtralConfig(
            **COMMON, intermediate_size=64, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2
        )
    ),
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            **COMMON,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
        )
    ),
    "opt": lambda: OPTForCausalLM(OPTConfig(**COMMON, ffn_dim=128, word_embed_proj_dim=64)),
}
FAMILIES = tuple(BUILDERS)
MOE_FAMILIES = ("mixtral", "qwen3_moe")


def build(family: str, seed: int = 0) -> PreTrainedModel:
    """The family's tiny model in eval mode, its norms (and MoE routers) given random weights."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BUILDERS[family]().eval()
        with torch.no_grad():
            for module in model.modules():
                weight = getattr(module, "weight", None)
                if "Norm" in type(module).__name__ and isinstance(weight, nn.Parameter):
                    weight.add_(0.3 * torch.randn_like(weight))
                    if getattr(module, "bias", None) is not None:
                        module.bias.normal_(0, 0.1)
                elif "Router" in type(module).__name__:  # Qwen3-MoE's starts at zero: no routing at all
                    weight.normal_(0, 0.5)
    model.requires_grad_(False)
    return model


def tokens(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))
