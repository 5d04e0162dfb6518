"""A cell's evaluation: perplexity on every configured dataset (by chunked prefill through the
cell's cache when it has KV probes) and, given the float model's top-k store of the same
windows, the KL divergence to it from the same logits; then the KV probes and the zero-shot
tasks when configured."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from transformers import PreTrainedTokenizerBase

from ptq.config import CellConfig, KVEvalConfig
from ptq.data import load_text, tokenize_once
from ptq.dependencies import EVAL_SPLIT
from ptq.engine import QuantResult
from ptq.eval.decode import decode_speed, float_cache
from ptq.eval.passkey import passkey_accuracy, trials
from ptq.eval.kld import FloatTopK, KLDivergence, KLDResult, TopKLogprobs, float_topk
from ptq.eval.perplexity import PerplexityResult, perplexity, windows_of
from ptq.eval.zeroshot import zero_shot


# Windows a dataset is scored on at most, by its paper convention: GPTQ's C4 evaluation keeps
# the first 256 windows of the joined documents (datautils.get_c4).
WINDOW_CAPS = {"c4": 256}


def windows_for(dataset: str, configured: int | None) -> int | None:
    """The windows to score: the configured budget within the dataset's convention."""
    cap = WINDOW_CAPS.get(dataset)
    return cap if configured is None else configured if cap is None else min(configured, cap)


KLD_RECORDED = ("mean", "mean_stderr", "median", "p90", "p99", "max", "top1_agreement", "tokens", "k",
                "tail_samples", "mean_top_k_bound", "mean_tail_mass")


def window_budget(dataset: str, config: CellConfig) -> tuple[int | None, bool]:
    """The windows to score of `dataset`, and whether fewer may be scored: a dataset's own cap is
    its convention, not a budget, so fewer than it is no truncation."""
    capped = config.eval.max_windows is None or windows_for(dataset, None) is not None
    return windows_for(dataset, config.eval.max_windows), config.eval.allow_fewer_windows or capped


def evaluation_windows(tokenizer: PreTrainedTokenizerBase, config: CellConfig) -> dict[str, torch.Tensor]:
    """The [W, seqlen] windows each configured dataset is scored on (as `evaluate` scores them)."""
    windows = {}
    for dataset in config.eval.datasets:
        text = load_text(dataset, EVAL_SPLIT)
        windows[dataset] = windows_of(tokenize_once(tokenizer, text), config.eval.seqlen,
                                      *window_budget(dataset, config), f"{dataset}/{EVAL_SPLIT} ({text.origin})")
    return windows


@torch.inference_mode()
def float_references(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                     config: CellConfig) -> dict[str, TopKLogprobs]:
    """The float model's top-k store of each dataset's evaluation windows (see ptq.eval.kld)."""
    return {dataset: float_topk(model, windows, batch_size=config.eval.batch_size)
            for dataset, windows in evaluation_windows(tokenizer, config).items()}


@dataclass
class Evaluation:
    results: dict[str, PerplexityResult]
    data: dict[str, Any]  # per dataset: origin, sha256, token count
    fallbacks: list[str] = field(default_factory=list)
    kv_probes: dict[str, Any] = field(default_factory=dict)  # passkey, decode speed, cache bytes
    zero_shot: dict[str, Any] | None = None  # see ptq.eval.zeroshot.zero_shot, when configured
    kld: dict[str, KLDResult] = field(default_factory=dict)  # per dataset, given the float model's store
    # per dataset, the model's own top-k store of the windows, when asked for (the FP baseline's pass
    # builds the float references)
    topk: dict[str, TopKLogprobs] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        seconds = sum(r.seconds for r in self.results.values())
        tokens = sum(r.windows * r.seqlen for r in self.results.values())
        metrics = {
            "ppl": {name: r.ppl for name, r in self.results.items()},
            "eval": {name: {"windows": r.windows, "seqlen": r.seqlen, "tokens_scored": r.tokens_scored,
                            "seconds": r.seconds, "prefill_chunk": r.prefill_chunk}
                     for name, r in self.results.items()},
            "eval_tokens_per_s": tokens / seconds if seconds > 0 else None,
            # each window's mean NLL: paired comparisons with the FP baseline and committed baselines
            "window_nll": {name: list(r.window_nll) for name, r in self.results.items()},
            **self.kv_probes,
        }
        if self.zero_shot is not None:
            metrics["zero_shot"] = self.zero_shot
        if self.kld:
            metrics["kld"] = {name: {key: getattr(r, key) for key in KLD_RECORDED} for name, r in self.kld.items()}
        return metrics


def scored_results(metrics: dict[str, Any]) -> dict[str, PerplexityResult]:
    """The perplexity results an evaluation's metrics hold (`Evaluation.metrics`), per dataset."""
    return {name: PerplexityResult(ppl, **metrics["eval"][name],
                                   window_nll=tuple(metrics["window_nll"][name]))
            for name, ppl in metrics["ppl"].items()}


LogitsSink = Callable[[torch.Tensor, torch.Tensor], None]  # takes a window and its logits


def _each(sinks: list[LogitsSink]) -> LogitsSink:
    """One callback for a pass's window logits that hands them to each sink in turn."""
    def call(window: torch.Tensor, logits: torch.Tensor) -> None:
        for sink in sinks:
            sink(window, logits)
    return call


def kv_probes(quantized: QuantResult, tokenizer: PreTrainedTokenizerBase, device: torch.device,
              config: KVEvalConfig) -> dict[str, Any]:
    """Where a KV cache acts beyond perplexity: passkey retrieval and greedy decoding, both
    through the cell's cache (a float one for methods that leave the cache alone)."""
    make_cache = quantized.make_cache or partial(float_cache, quantized.model.config)
    cases = trials(config.passkey_lengths, config.passkey_trials, config.passkey_seed)
    passkey = passkey_accuracy(quantized.model, tokenizer, make_cache, config.prefill_chunk, cases)
    prompt = tokenize_once(tokenizer, load_text("wikitext2", EVAL_SPLIT))[:, : config.decode_prompt]
    decode = decode_speed(quantized.model, prompt.to(device), make_cache, config.prefill_chunk, config.decode_tokens)
    return {
        "passkey": passkey,
        "decode_tokens_per_s": decode.pop("decode_tokens_per_s"),
        "kv": decode,
    }


def evaluate(quantized: QuantResult, tokenizer: PreTrainedTokenizerBase, device: torch.device,
             config: CellConfig, references: dict[str, TopKLogprobs] | None = None,
             topk: bool = False, scored: dict[str, PerplexityResult] | None = None) -> Evaluation:
    """Perplexity on every configured dataset (and the KLD to the float model where `references`
    holds its store; with `topk`, the model's own top-k store from the same logits, as
    `float_references` computes it), then the KV probes and the zero-shot tasks, when configured.
    A dataset in `scored` was scored on the same windows already: its result is taken as it is.
    On CUDA OOM the perplexity batch is halved and that is recorded."""
    results: dict[str, PerplexityResult] = {}
    data: dict[str, Any] = {}
    fallbacks: list[str] = []
    klds: dict[str, KLDResult] = {}
    stores: dict[str, TopKLogprobs] = {}
    chunk = config.kv_eval.prefill_chunk if config.kv_eval else None
    if topk and chunk is not None:
        raise ValueError("a top-k store comes from plain forwards (float_references), "
                         "not from a chunked prefill")
    for dataset in config.eval.datasets:
        text = load_text(dataset, EVAL_SPLIT)
        ids = tokenize_once(tokenizer, text)
        data[dataset] = {**text.describe(), "tokens": int(ids.shape[1])}
        if scored is not None and dataset in scored:
            results[dataset] = scored[dataset]
            continue
        batch_size = config.eval.batch_size
        while True:
            divergence = KLDivergence(references[dataset]) if references and dataset in references else None
            collector = FloatTopK() if topk else None
            sinks = [sink.add for sink in (divergence, collector) if sink is not None]
            try:
                max_windows, allow_fewer = window_budget(dataset, config)
                results[dataset] = perplexity(quantized.model, ids, config.eval.seqlen, max_windows, batch_size,
                                              quantized.make_cache, chunk, allow_fewer,
                                              f"{dataset}/{EVAL_SPLIT} ({text.origin})",
                                              _each(sinks) if sinks else None)
                if divergence is not None:
                    klds[dataset] = divergence.result()
                if collector is not None:
                    stores[dataset] = collector.store()
                break
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                torch.cuda.empty_cache()
                fallbacks.append(f"{dataset}: out of memory at eval batch {batch_size}, retried at {batch_size // 2}")
                batch_size //= 2
    probes = kv_probes(quantized, tokenizer, device, config.kv_eval) if config.kv_eval else {}
    accuracy = None
    if config.zero_shot.tasks:
        accuracy, data["zero_shot"] = zero_shot(quantized.model, tokenizer, config.zero_shot, quantized.make_cache)
    return Evaluation(results, data, fallbacks, probes, accuracy, klds, stores)
