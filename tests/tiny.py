"""A tiny random Llama, its BPE tokenizer and a WikiText-2 stand-in, written to disk: the real
loading path (local folder, files on disk) at a size tests can afford."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def write_wikitext(data_dir: Path, words: int, lines: int) -> list[str]:
    """Random lines of `words` distinct words as `data_dir`/wikitext2/wiki.test.raw; returns them."""
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(words)]
    rows = [" " + " ".join(rng.choice(vocabulary) for _ in range(rng.randint(5, 30))) + " \n" for _ in range(lines)]
    (data_dir / "wikitext2").mkdir(parents=True)
    (data_dir / "wikitext2" / "wiki.test.raw").write_text("".join(rows))
    return rows


def write_tiny_llama(folder: Path, lines: list[str], vocab_size: int, heads: int,
                     kv_heads: int) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A seeded 2-layer Llama (hidden 64) with a BPE tokenizer trained on `lines`, saved in `folder`."""
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>")
    model = tiny_llama_model(heads=heads, kv_heads=kv_heads, vocab_size=raw.get_vocab_size())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def tiny_llama_model(hidden: int = 64, intermediate: int = 128, heads: int = 4, kv_heads: int = 2,
                     layers: int = 2, vocab_size: int = 400, tie: bool = False,
                     seed: int = 0) -> LlamaForCausalLM:
    """A seeded random Llama in memory (no tokenizer, nothing on disk), in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=hidden,
                                             intermediate_size=intermediate, num_hidden_layers=layers,
                                             num_attention_heads=heads, num_key_value_heads=kv_heads,
                                             max_position_embeddings=256, tie_word_embeddings=tie))
    return model.eval()
