"""The quantized KV cache (ptq.kv) and the probes that read through it (ptq.eval.decode,
ptq.eval.passkey, chunked-prefill perplexity), on a tiny random Llama: storage layout and
bytes, the residual window, equality with the float model at full precision, and the
reference cache from transformers."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ptq.config import KVConfig
from ptq.eval.decode import decode_speed, float_cache, greedy_decode, prefill
from ptq.eval.passkey import PasskeyTrial, prompt_ids, shared_prefills, trials
from ptq.eval.perplexity import perplexity
from ptq.kv import KVStream, QuantizedKVCache, StoredChunk, cache_bytes, kv_elements, stored_bytes
from ptq.quant import QuantSpec, fake_quantize, pack_codes, unpack_codes

HEAD_DIM = 16


def states(tokens: int, seed: int = 0) -> torch.Tensor:
    """[batch 2, heads 3, tokens, head_dim] with an outlier channel, as keys have."""
    x = torch.randn(2, 3, tokens, HEAD_DIM, generator=torch.Generator().manual_seed(seed))
    x[..., 5] *= 8
    return x


def per_token(bits: int, group: int = -1) -> QuantSpec:
    return (QuantSpec(bits=bits, symmetric=False, granularity="token") if group == -1
            else QuantSpec(bits=bits, symmetric=False, granularity="group", group_size=group))


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("bits", (1, 2, 3, 4, 5, 8))
def test_codes_pack_and_unpack_exactly(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (3, 4, 37), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.shape[-1] == (math.ceil(37 * bits / 8) if 8 % bits == 0 else 37)
    assert torch.equal(unpack_codes(packed, bits, 37), codes)


@pytest.mark.parametrize("spec", (per_token(8), per_token(4, 8), per_token(2, 4)), ids=("int8", "int4g8", "int2g4"))
def test_token_stream_is_the_shared_quantizer_per_token(spec: QuantSpec) -> None:
    x = states(10)
    stream = KVStream(spec, "token", residual=0)
    out = stream.append(x)
    assert torch.allclose(out, fake_quantize(x, spec), atol=1e-3 * x.abs().max())  # scales stored in fp16
    # appending token by token stores the same thing: nothing is re-quantized
    one_by_one = KVStream(spec, "token", residual=0)
    for t in range(10):
        last = one_by_one.append(x[..., t : t + 1, :])
    assert torch.equal(last, out)


def test_channel_stream_groups_tokens_and_keeps_the_residual_exact() -> None:
    spec = per_token(2, 4)  # per channel: groups of 4 tokens
    stream = KVStream(spec, "channel", residual=6)
    x = states(23)
    for start in range(0, 23, 5):  # chunks of 5 do not align with groups of 4
        out = stream.append(x[..., start : start + 5, :])
        seen = min(start + 5, 23)
        assert out.shape[-2] == seen
        quantized = 0 if stream.stored is None else stream.stored.row_shape[-1]
        assert quantized % 4 == 0 and 6 <= seen - quantized < 6 + 4 or quantized == 0
        assert torch.equal(out[..., quantized:, :], x[..., quantized:seen, :])  # the tail is full precision
    # the quantized part is per channel over its tokens: one (scale, zero) per channel per group
    # whole groups of 4 tokens left the tail as it overflowed: one (scale, zero) per channel per group
    stored = stream.stored
    assert stored.row_shape == (2, 3, HEAD_DIM, 16) and stored.scale.shape == (2, 3, HEAD_DIM, 4)
    expected = fake_quantize(x[..., :16, :].transpose(-1, -2), spec).transpose(-1, -2)
    assert torch.allclose(stored.dequantize(), expected, atol=1e-2)


@pytest.mark.parametrize(("bits", "group", "axis"), [(2, 4, "channel"), (4, 3, "channel"), (3, 4, "channel"),
                                                     (4, 8, "token"), (2, 16, "token")])
def test_chunks_extend_into_what_one_quantization_of_the_same_groups_gives(bits: int, group: int, axis: str) -> None:
    """Storing tokens in several steps dequantizes exactly like storing them at once (same groups)."""
    spec = per_token(bits, group)
    x = states(4 * group if axis == "channel" else 10)
    step = group if axis == "channel" else 3
    stepwise = None
    for start in range(0, x.shape[-2], step):
        chunk = StoredChunk.quantize(x[..., start : start + step, :], spec, axis)
        stepwise = chunk if stepwise is None else stepwise.extend(chunk)
    at_once = StoredChunk.quantize(x, spec, axis)
    assert stepwise.row_shape == at_once.row_shape
    assert torch.equal(stepwise.dequantize(), at_once.dequantize())
    assert stepwise.nbytes() == at_once.nbytes()


@pytest.mark.parametrize(("axis", "group", "residual"), [("token", 8, 0), ("token", 8, 5), ("channel", 4, 6)])
def test_a_stream_reads_its_stored_tokens_dequantized_at_once_after_appends_and_drops(axis: str, group: int,
                                                                                     residual: int) -> None:
    """What attention reads is, bit for bit, the stored chunk dequantized whole, then the tail:
    the stream extends its dequantized copy chunk by chunk instead of dequantizing per read."""
    stream = KVStream(per_token(2, group), axis, residual)
    x = states(40)
    for start in range(0, 40, 5):
        out = stream.append(x[..., start : start + 5, :])
        if start == 20:
            stream.drop_oldest(8)  # whole groups, as a sliding-window layer drops them
            out = stream.append(x[..., :0, :])  # a read, nothing new
        stored = [] if stream.stored is None else [stream.stored.dequantize()]
        assert torch.equal(out, torch.cat([*stored, stream.tail], dim=-2))


def test_per_channel_keys_beat_per_token_keys_on_an_outlier_channel() -> None:
    """KIVI's premise, on keys with an outlier channel: at 2 bits, per-channel groups err less."""
    x = states(64, seed=1)
    spec = per_token(2, 16)
    err_token = (KVStream(spec, "token", 0).append(x) - x).pow(2).mean()
    err_channel = (KVStream(spec, "channel", 0).append(x) - x).pow(2).mean()
    assert err_channel < err_token


def test_stored_bytes_are_codes_at_their_width_plus_fp16_scales_and_zeros() -> None:
    x = states(10)
    chunk = StoredChunk.quantize(x, per_token(4, 8), "token")
    elements = x.numel()
    groups = elements // 8
    assert chunk.nbytes() == elements * 4 // 8 + groups * 2 * 2
    int3 = StoredChunk.quantize(x, per_token(3, 8), "token")
    assert int3.nbytes() == elements + groups * 2 * 2  # 3-bit codes are not packed: a byte each


def test_float_chunked_prefill_scores_what_the_plain_model_scores(tiny: LlamaForCausalLM) -> None:
    ids = torch.randint(0, 97, (1, 4 * 64), generator=torch.Generator().manual_seed(0))
    plain = perplexity(tiny, ids, 64, None, 2)
    for chunk in (16, 48, 64):
        chunked = perplexity(tiny, ids, 64, None, 2, prefill_chunk=chunk)
        assert chunked.ppl == pytest.approx(plain.ppl, rel=1e-5) and chunked.prefill_chunk == chunk
        # window by window too: a Track C baseline takes the plain one's (ptq.session), CIs pair them
        assert chunked.window_nll == pytest.approx(plain.window_nll, rel=1e-5)


def test_quantized_cache_ppl_degrades_with_fewer_bits(tiny: LlamaForCausalLM) -> None:
    ids = torch.randint(0, 97, (1, 4 * 64), generator=torch.Generator().manual_seed(1))
    plain = perplexity(tiny, ids, 64, None, 2).ppl
    errors = []
    for bits in (8, 4, 2):
        config = KVConfig(per_token(bits, 8), per_token(bits, 8))
        ppl = perplexity(tiny, ids, 64, None, 2, partial(QuantizedKVCache, config, 2), prefill_chunk=16).ppl
        errors.append(abs(math.log(ppl / plain)))
    assert errors[0] < 1e-3 and errors[0] < errors[1] < errors[2]


def test_residual_window_keeps_recent_tokens_exact_so_a_large_one_changes_nothing(tiny: LlamaForCausalLM) -> None:
    ids = torch.randint(0, 97, (1, 2 * 64), generator=torch.Generator().manual_seed(2))
    plain = perplexity(tiny, ids, 64, None, 2).ppl
    spec = per_token(2, 8)
    keep_all = KVConfig(QuantSpec(bits=2, symmetric=False, granularity="group", group_size=8), spec,
                        key_axis="channel", residual=64)
    assert perplexity(tiny, ids, 64, None, 2, partial(QuantizedKVCache, keep_all, 2), 16).ppl == \
        pytest.approx(plain, rel=1e-5)


def test_decode_reports_the_float_cache_at_full_size(tiny: LlamaForCausalLM) -> None:
    prompt = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(3))
    result = decode_speed(tiny, prompt, partial(float_cache, tiny.config), chunk=16, steps=5)
    assert result["measured_at_tokens"] == 45 and result["prompt_tokens"] == 40
    assert kv_elements(tiny.config, 45) == 45 * 2 * 2 * 2 * 16
    assert result["bytes_per_token"] == result["float_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert result["bits_per_element"] == 32
    int4 = KVConfig(per_token(4, 8), per_token(4, 8))
    quantized = decode_speed(tiny, prompt, partial(QuantizedKVCache, int4, 2), chunk=16, steps=5)
    assert quantized["bits_per_element"] == pytest.approx(4 + 32 / 8)


def test_greedy_decoding_through_a_float_cache_matches_full_recomputation(tiny: LlamaForCausalLM) -> None:
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(4))
    cache = float_cache(tiny.config)
    last = prefill(tiny, ids, cache, chunk=8, all_logits=False)
    with torch.inference_mode():
        full = tiny(ids).logits[:, -1:]
    assert torch.allclose(last, full, atol=1e-4)


@pytest.mark.parametrize("backend", ("quanto", "hqq"))
def test_transformers_quantized_cache_is_smaller_than_float_and_close_in_ppl(tiny: LlamaForCausalLM,
                                                                             backend: str) -> None:
    from transformers.cache_utils import QuantizedCache

    axis = 0 if backend == "quanto" else 1
    make = partial(QuantizedCache, backend, tiny.config, nbits=4, axis_key=axis, axis_value=axis, q_group_size=16,
                   residual_length=16)
    prompt = torch.randint(0, 97, (1, 96), generator=torch.Generator().manual_seed(5))
    result = decode_speed(tiny, prompt, make, chunk=32, steps=4)
    assert result["bytes_per_token"] < result["float_bytes_per_token"] / 3
    ids = torch.randint(0, 97, (1, 2 * 64), generator=torch.Generator().manual_seed(6))
    plain = perplexity(tiny, ids, 64, None, 2).ppl
    assert perplexity(tiny, ids, 64, None, 2, make, prefill_chunk=16).ppl == pytest.approx(plain, rel=0.05)


def test_stored_bytes_counts_each_tensor_once_and_wrappers_by_their_parts(tiny: LlamaForCausalLM) -> None:
    a = torch.zeros(10, dtype=torch.float16)
    assert stored_bytes({"x": a, "y": [a, (a,)], "z": torch.zeros(3, dtype=torch.uint8)}) == 20 + 3
    cache = float_cache(tiny.config)
    cache.update(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), 0)
    assert cache_bytes(cache) == 2 * 2 * 5 * 4 * 4


def _cache_factory(kind: str, config: LlamaConfig):
    from transformers.cache_utils import QuantizedCache

    if kind == "float":
        return partial(float_cache, config)
    if kind == "kivi":  # keys per channel in groups of 8 tokens, a residual window of 8
        return partial(QuantizedKVCache, KVConfig(per_token(2, 8), per_token(2, 8), "channel", "token", 8), 2)
    if kind == "int4":
        return partial(QuantizedKVCache, KVConfig(per_token(4, 8), per_token(4, 8)), 2)
    return partial(QuantizedCache, kind, config, nbits=4, axis_key=0 if kind == "quanto" else 1,
                   axis_value=0 if kind == "quanto" else 1, q_group_size=16, residual_length=16)


@pytest.mark.parametrize("kind", ("float", "int4", "kivi", "quanto", "hqq"))
def test_shared_prefills_are_each_prompts_own_prefill_bit_for_bit(tiny: LlamaForCausalLM, kind: str) -> None:
    """Prompts alike up to different depths, of different lengths, one the start of another and
    one unlike the rest: each gets the logits and the decoding its own prefill from an empty cache
    gives, and whole chunks they share are prefilled once."""
    make = _cache_factory(kind, tiny.config)
    filler = torch.randint(3, 97, (1, 70), generator=torch.Generator().manual_seed(7))
    needle = torch.tensor([[1, 2, 1, 2, 1]])
    prompts = [torch.cat([filler[:, :depth], needle, filler[:, depth:length]], dim=1)
               for depth, length in ((40, 60), (9, 60), (40, 70), (25, 45))]
    prompts += [filler[:, :32], torch.randint(3, 97, (1, 50), generator=torch.Generator().manual_seed(8))]
    calls: list[int] = []
    hook = tiny.model.embed_tokens.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
    try:
        shared = {index: (last, greedy_decode(tiny, cache, last, 3).tokens)
                  for index, cache, last in shared_prefills(tiny, prompts, make, chunk=8)}
        fed = sum(calls)
    finally:
        hook.remove()
    assert sorted(shared) == list(range(len(prompts)))
    for index, ids in enumerate(prompts):
        cache = make()
        last = prefill(tiny, ids, cache, chunk=8, all_logits=False)
        assert torch.equal(shared[index][0], last)
        assert torch.equal(shared[index][1], greedy_decode(tiny, cache, last, 3).tokens)
    # 337 tokens prefilled one prompt at a time; shared: 5 whole (50); the first chunk of 0-4 (8);
    # 1 after it (57); the next of 0, 2, 3, 4 (8), and the next (8); 3 after its third chunk (26);
    # 4's last chunk (8); 0 is the start of 2: their 5 common chunks more (40); 0's last token (1);
    # 2's last 11. transformers' quantized caches are not copied: each prompt is prefilled whole.
    # Then 3 decoding steps for each of the 6.
    shares = kind in ("float", "int4", "kivi")
    assert fed == (50 + 8 + 57 + 8 + 8 + 26 + 8 + 40 + 1 + 11 if shares else 337) + 6 * 3


def test_passkey_trials_are_seeded_and_prompts_hold_the_key_near_the_requested_length() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    assert trials((256, 512), 3, seed=7) == trials((256, 512), 3, seed=7)
    assert trials((256,), 3, seed=7) != trials((256,), 3, seed=8)
    vocab = {w: i for i, w in enumerate(["<unk>", *"0123456789", ".", "?", "The", "pass", "key", "is", "grass",
                                             "green", "sky", "blue", "sun", "yellow", "Here", "we", "go", "There",
                                             "and", "back", "again", "Remember", "it", "What"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                     pre_tokenizers.Digits(individual_digits=True)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    for trial in (PasskeyTrial(300, 0.1, 12345), PasskeyTrial(300, 0.9, 67890)):
        ids = prompt_ids(tokenizer, trial)
        text = tokenizer.decode(ids[0])
        assert text.count(" ".join(str(trial.key))) == 2  # "The pass key is K. ... K is the pass key."
        assert 0.9 * 300 <= ids.shape[1] <= 300
