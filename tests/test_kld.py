"""KL divergence to the float model from its stored top-k log-probabilities, tail mass and tail
samples (ptq.eval.kld), on tiny random Llamas: zero to itself, the exact KLD when k is the
vocabulary, a non-negative lower bound without samples, an unbiased estimate with them, and a
store that round-trips through safetensors."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from ptq.eval.kld import TopKLogprobs, coarse_kld, float_topk, kl_divergence, tail_kld
from ptq.quant import QuantSpec, fake_quantize
from tests.tiny import write_tiny_llama, write_wikitext

VOCAB = 120
T = 24  # tokens per window


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LlamaForCausalLM]:
    """The float model, its RTN W3 g16 copy (the project's quantizer), and another random model.
    Their output heads are scaled up: at initialization a random model's next-token distribution is
    nearly uniform, with KL divergences near rounding."""
    base = tmp_path_factory.mktemp("kld")
    lines = write_wikitext(base / "data", words=80, lines=60)
    float_model, _ = write_tiny_llama(base / "model", lines, vocab_size=VOCAB, heads=2, kv_heads=1)
    torch.manual_seed(1)
    other = LlamaForCausalLM(float_model.config).eval()
    with torch.no_grad():
        for model in (float_model, other):
            model.lm_head.weight.mul_(20)
    rtn = copy.deepcopy(float_model)
    with torch.no_grad():
        for name, module in rtn.model.layers.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(fake_quantize(module.weight, QuantSpec(bits=3, group_size=16)))
    return {"float": float_model, "rtn": rtn, "other": other}


@pytest.fixture(scope="module")
def windows(models: dict[str, LlamaForCausalLM]) -> torch.Tensor:
    vocab = models["float"].config.vocab_size
    return torch.randint(0, vocab, (5, T), generator=torch.Generator().manual_seed(0))


def exact_kld(p_model: torch.nn.Module, q_model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per predicted position [W, T-1] from both models' full log-softmax, in float64."""
    with torch.inference_mode():
        log_p = torch.log_softmax(p_model(windows).logits[:, :-1].double(), dim=-1)
        log_q = torch.log_softmax(q_model(windows).logits[:, :-1].double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def test_a_model_to_itself_is_zero_and_always_agrees(models: dict, windows: torch.Tensor) -> None:
    store = float_topk(models["float"], windows, k=8, samples=4, batch_size=2)
    result = kl_divergence(models["float"], windows, store, batch_size=2)
    assert (result.mean, result.max, result.min, result.top1_agreement) == (0.0, 0.0, 0.0, 1.0)
    assert (result.tokens, result.k, result.tail_samples) == (5 * (T - 1), 8, 4)
    assert result.window_kld == (0.0,) * 5 and result.mean_stderr == 0.0


@pytest.mark.parametrize("other", ("rtn", "other"))
def test_with_k_the_vocabulary_it_is_the_exact_kld(models: dict, windows: torch.Tensor, other: str) -> None:
    vocab = models["float"].config.vocab_size
    store = float_topk(models["float"], windows, k=vocab, batch_size=3)
    assert torch.isneginf(store.tail).all() and store.samples.shape[-1] == 0  # no tail to draw from
    result = kl_divergence(models[other], windows, store, batch_size=3)
    exact = exact_kld(models["float"], models[other], windows)
    assert result.mean == pytest.approx(exact.mean().item(), rel=1e-4)
    assert result.median == pytest.approx(exact.median().item(), rel=1e-3)  # odd count: the middle value
    assert result.max == pytest.approx(exact.max().item(), rel=1e-4)
    assert result.window_kld == pytest.approx(exact.mean(dim=1).tolist(), rel=1e-4)
    assert result.min >= 0 and result.mean > 0
    with torch.inference_mode():  # the most likely next token of each model, compared directly
        top = [models[name](windows).logits[:, :-1].argmax(-1) for name in ("float", other)]
    same = top[0] == top[1]
    assert result.top1_agreement == pytest.approx(same.double().mean().item())


@pytest.mark.parametrize("k", (1, 4, 32))
def test_without_tail_samples_it_is_a_nonnegative_lower_bound(models: dict, windows: torch.Tensor,
                                                               k: int) -> None:
    store = float_topk(models["float"], windows, k=k, samples=0, batch_size=2)
    assert 0 < store.tail.exp().min() and store.tail.exp().max() < 1
    result = kl_divergence(models["rtn"], windows, store, batch_size=2)
    exact = exact_kld(models["float"], models["rtn"], windows)
    assert 0 <= result.min and 0 < result.mean <= exact.mean().item() * (1 + 1e-6)  # float32 inputs
    assert all(ours <= full + 1e-6 for ours, full in zip(result.window_kld, exact.mean(dim=1).tolist()))
    assert result.mean == pytest.approx(result.mean_top_k_bound, rel=1e-12) and 0 < result.mean_tail_mass < 1


def test_tail_samples_make_it_an_unbiased_estimate(models: dict, windows: torch.Tensor) -> None:
    """Over seeds, the mean with tail samples centres on the exact KLD; its bound stays below."""
    exact = exact_kld(models["float"], models["rtn"], windows).mean().item()
    results = [kl_divergence(models["rtn"], windows, float_topk(models["float"], windows, k=4, samples=16,
                                                                seed=seed)) for seed in range(8)]
    means = torch.tensor([r.mean for r in results], dtype=torch.float64)
    bound = results[0].mean_top_k_bound
    assert all(r.mean_top_k_bound == bound for r in results) and bound < 0.9 * exact  # the tail matters
    # the seeds' average within 3 standard errors of the exact value, each seed within 10%
    assert abs(means.mean().item() - exact) < 3 * means.std().item() / math.sqrt(len(means)) + 1e-9
    assert ((means - exact).abs() < 0.1 * exact).all()
    again = float_topk(models["float"], windows, k=4, seed=3)  # the same draws for the same seed
    assert kl_divergence(models["rtn"], windows, again) == results[3]


def test_coarse_and_tail_terms_by_hand() -> None:
    # P = (0.5, 0.3, 0.2), Q = (0.4, 0.4, 0.2), k = 1: P' = (0.5, 0.5), Q' = (0.4, 0.6)
    log = lambda *values: torch.tensor(values, dtype=torch.float64).log()  # noqa: E731
    kld = coarse_kld(log(0.5), log(0.5)[0], log(0.4), log(0.6)[0])
    assert kld.item() == pytest.approx(0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6), rel=1e-12)
    none = torch.tensor(-math.inf)
    no_tail = coarse_kld(log(0.5, 0.3, 0.2), none, log(0.4, 0.4, 0.2), none)
    assert no_tail.item() == pytest.approx(0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4), rel=1e-12)
    # P = (0.5, 0.3, 0.2), Q = (0.4, 0.4, 0.2), tail {2nd, 3rd}: P_R = (0.6, 0.4), Q_R = (2/3, 1/3); drawing
    # the 2nd and the 3rd token once each estimates P(R) KL(P_R || Q_R) by 0.5 * mean of the two log ratios
    estimate = tail_kld(log(0.5)[0], log(0.3, 0.2), log(0.6)[0], log(0.4, 0.2))
    by_hand = 0.5 * (math.log(0.6 / (2 / 3)) + math.log(0.4 / (1 / 3))) / 2
    assert estimate.item() == pytest.approx(by_hand, rel=1e-12)
    assert tail_kld(none, log(0.3), log(0.6)[0], log(0.4)).item() == 0.0  # no tail mass, nothing to add


def test_the_store_round_trips_through_safetensors(models: dict, windows: torch.Tensor,
                                                   tmp_path: Path) -> None:
    store = float_topk(models["float"], windows, k=6, seed=5)
    store.save(tmp_path / "fp.safetensors")
    loaded = TopKLogprobs.load(tmp_path / "fp.safetensors")
    for name in ("windows", "ids", "logprobs", "tail", "samples", "sample_logprobs"):
        assert torch.equal(getattr(loaded, name), getattr(store, name))
    assert (loaded.vocab_size, loaded.seed, loaded.k) == (store.vocab_size, 5, 6)
    assert loaded.ids.dtype == loaded.samples.dtype == torch.int32
    assert kl_divergence(models["rtn"], windows, loaded) == kl_divergence(models["rtn"], windows, store)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not a store of top-k log-probabilities"):
        TopKLogprobs.load(tmp_path / "other.safetensors")


def test_other_windows_than_the_stores_are_an_error(models: dict, windows: torch.Tensor) -> None:
    store = float_topk(models["float"], windows, k=4)
    with pytest.raises(ValueError, match=r"not those the float model's top-k store was computed on"):
        kl_divergence(models["rtn"], windows.flip(0), store)
    with pytest.raises(ValueError, match="k must be between 1 and the vocabulary size"):
        float_topk(models["float"], windows, k=10_000)
    with pytest.raises(ValueError, match="samples >= 0"):
        float_topk(models["float"], windows, samples=-1)
