"""Micro benchmarks (pytest-benchmark) of the hot paths under the matrix: the shared quantizer
primitive (on weights, and on activations per token), one GPTQ layer, one perplexity window
and one decode step (float and quantized KV cache) on a tiny random Llama. Not part of the
matrix: run them by path, see bench/README.md.

    pytest bench/perf --benchmark-autosave --benchmark-storage=reports/perf
    pytest bench/perf --benchmark-storage=reports/perf --benchmark-compare

Each benchmark also checks a property of what it timed, so a fast wrong result fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from ptq.eval.perplexity import perplexity
from ptq.kv import QuantizedKVCache
from ptq.config import KVConfig
from ptq.methods.gptq import GPTQ, GptqParams
from ptq.quant import ActSpec, QuantSpec, fake_quantize, find_params, quantize

W4G128 = QuantSpec(4, symmetric=False, granularity="group", group_size=128)
VOCAB = 1024


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    """A randomly initialised Llama the size of a unit test: 4 layers, hidden 256, GQA 4/2 heads."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def test_fake_quantize_4096x4096_w4_g128(benchmark) -> None:
    weight = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    result = benchmark(fake_quantize, weight, W4G128)
    scale, _zero = find_params(weight, W4G128)  # [rows, groups]
    step = scale.repeat_interleave(128, dim=1)
    assert (result - weight).abs().le(step / 2 + 1e-6).all()  # round to nearest: within half a step
    assert result[0, :128].unique().numel() <= 2**W4G128.bits


@pytest.mark.parametrize("fmt", ["int", "fp8_e4m3"])
def test_fake_quantize_activations_per_token_4x512x1536(benchmark, fmt: str) -> None:
    """Track B's hot path: the input of smollm2's down_proj for a batch of 4 windows of 512 tokens."""
    x = torch.randn(4, 512, 1536, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3.0, 1536)
    spec = ActSpec(8, symmetric=True, granularity="token", format=fmt)
    result = benchmark(fake_quantize, x, spec)
    assert torch.equal(result, quantize(x, spec).dequantize())  # the generic codes path, bit for bit


def test_gptq_one_linear_576x1536(benchmark) -> None:
    """smollm2-135m's down_proj: 576 outputs, 1536 inputs; 8 calibration sequences of 512 tokens."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(576, 1536, generator=generator) * 0.02
    inputs = torch.randn(8, 512, 1536, generator=generator) * torch.linspace(0.1, 3.0, 1536)  # uneven channels

    def add_batches_and_quantize():
        stats = GPTQ(1536)
        for sequence in inputs.split(1):
            stats.add_batch(sequence)
        return stats.quantize(weight, W4G128, GptqParams())

    result = benchmark.pedantic(add_batches_and_quantize, rounds=3, iterations=1, warmup_rounds=0)
    x = inputs.reshape(-1, 1536)
    gptq_error = (x @ (result.weight - weight).t()).pow(2).sum()
    rtn_error = (x @ (fake_quantize(weight, W4G128) - weight).t()).pow(2).sum()
    assert gptq_error < rtn_error  # GPTQ's point: a smaller output error than round-to-nearest


def test_perplexity_one_window_of_512(benchmark, tiny_llama: LlamaForCausalLM) -> None:
    ids = torch.randint(0, VOCAB, (1, 512), generator=torch.Generator().manual_seed(1))
    result = benchmark(perplexity, tiny_llama, ids, 512, 1, 1)
    assert (result.windows, result.tokens_scored) == (1, 511)
    assert VOCAB / 2 < result.ppl < VOCAB * 2  # a random model is about uniform over the vocabulary
    assert math.isfinite(result.ppl)


@pytest.mark.parametrize("cache", ["float", "int8-kv"])
def test_decode_one_token_after_256(benchmark, tiny_llama: LlamaForCausalLM, cache: str) -> None:
    prompt = torch.randint(0, VOCAB, (1, 256), generator=torch.Generator().manual_seed(2))
    layers = tiny_llama.config.num_hidden_layers
    int8 = QuantSpec(8, symmetric=False, granularity="token")

    def prefilled():  # not timed: a fresh cache holding the prompt, and the next token
        past = DynamicCache() if cache == "float" else QuantizedKVCache(KVConfig(int8, int8), layers)
        with torch.inference_mode():
            logits = tiny_llama(prompt, past_key_values=past, use_cache=True).logits
        return (logits[:, -1:].argmax(-1), past), {}

    @torch.inference_mode()
    def decode_step(token: torch.Tensor, past):
        return tiny_llama(token, past_key_values=past, use_cache=True)

    output = benchmark.pedantic(decode_step, setup=prefilled, rounds=20, iterations=1)
    assert output.logits.shape == (1, 1, VOCAB)
    assert output.past_key_values.get_seq_length() == 257
