"""One cell's work: quantize a copy of the loaded model, evaluate it, collect metrics."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ptq.config import CellConfig, EvalConfig, KVEvalConfig
from ptq.data import load_text, tokenize_once
from ptq.eval.decode import decode_speed, float_cache
from ptq.eval.memory import PeakMemory
from ptq.eval.passkey import passkey_accuracy, trials
from ptq.eval.perplexity import PerplexityResult, perplexity
from ptq.models.adapters import ArchAdapter
from ptq.models.loading import ResolvedSource
from ptq.calib import calibration_set
from ptq.registry import MethodInfo, QuantContext, QuantizedModel
from ptq.transforms import bits_per_weight

EVAL_SPLIT = "test"


@dataclass
class LoadedModel:
    """A model as loaded once per worker; cells quantize copies of it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: ArchAdapter
    source: ResolvedSource
    device: torch.device

    @property
    def float_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


@dataclass
class Evaluation:
    results: dict[str, PerplexityResult]
    data: dict[str, Any]  # per dataset: origin, sha256, token count
    fallbacks: list[str] = field(default_factory=list)
    kv_probes: dict[str, Any] = field(default_factory=dict)  # passkey, decode speed, cache bytes

    def metrics(self) -> dict[str, Any]:
        seconds = sum(r.seconds for r in self.results.values())
        tokens = sum(r.windows * r.seqlen for r in self.results.values())
        return {
            "ppl": {name: r.ppl for name, r in self.results.items()},
            "eval": {name: {"windows": r.windows, "seqlen": r.seqlen, "tokens_scored": r.tokens_scored,
                            "seconds": r.seconds, "prefill_chunk": r.prefill_chunk} for name, r in self.results.items()},
            "eval_tokens_per_s": tokens / seconds if seconds > 0 else None,
            **self.kv_probes,
        }


def kv_probes(quantized: QuantizedModel, loaded: LoadedModel, config: KVEvalConfig) -> dict[str, Any]:
    """Where a KV cache acts beyond perplexity: passkey retrieval and greedy decoding, both
    through the cell's cache (a float one for methods that leave the cache alone)."""
    make_cache = quantized.make_cache or float_cache
    cases = trials(config.passkey_lengths, config.passkey_trials, config.passkey_seed)
    passkey = passkey_accuracy(quantized.model, loaded.tokenizer, make_cache, config.prefill_chunk, cases)
    prompt = tokenize_once(loaded.tokenizer, load_text("wikitext2", EVAL_SPLIT))[:, : config.decode_prompt]
    decode = decode_speed(quantized.model, prompt.to(loaded.device), make_cache, config.prefill_chunk,
                          config.decode_tokens)
    return {
        "passkey": passkey,
        "decode_tokens_per_s": decode.pop("decode_tokens_per_s"),
        "kv": decode,
    }


def evaluate(quantized: QuantizedModel, loaded: LoadedModel, config: EvalConfig,
             kv_eval: KVEvalConfig | None = None) -> Evaluation:
    """Perplexity on every configured dataset (chunked prefill when `kv_eval` is set), then the
    KV probes. On CUDA OOM the batch is halved and that is recorded."""
    results: dict[str, PerplexityResult] = {}
    data: dict[str, Any] = {}
    fallbacks: list[str] = []
    chunk = kv_eval.prefill_chunk if kv_eval else None
    for dataset in config.datasets:
        text = load_text(dataset, EVAL_SPLIT)
        ids = tokenize_once(loaded.tokenizer, text)
        data[dataset] = {**text.describe(), "tokens": int(ids.shape[1])}
        batch_size = config.batch_size
        while True:
            try:
                results[dataset] = perplexity(quantized.model, ids, config.seqlen, config.max_windows, batch_size,
                                              quantized.make_cache, chunk)
                break
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                torch.cuda.empty_cache()
                fallbacks.append(f"{dataset}: out of memory at eval batch {batch_size}, retried at {batch_size // 2}")
                batch_size //= 2
    probes = kv_probes(quantized, loaded, kv_eval) if kv_eval else {}
    return Evaluation(results, data, fallbacks, probes)


@dataclass
class CellOutcome:
    metrics: dict[str, Any]
    data: dict[str, Any]
    notes: list[str]
    fallbacks: list[str]


def run_method(method: MethodInfo, loaded: LoadedModel, config: CellConfig) -> CellOutcome:
    """Quantize with `method`, then evaluate. Methods work on a copy, so the loaded model stays
    float for the next cell; the baseline method leaves the model as it is and gets no copy."""
    calibration = calibration_set(loaded.tokenizer, config.calib) if method.calibrated else None
    with PeakMemory(loaded.device) as memory:
        model = loaded.model if method.baseline else copy.deepcopy(loaded.model)
        start = time.perf_counter()
        quantized = method.apply(model, config, QuantContext(loaded.adapter, loaded.device, calibration))
        if loaded.device.type == "cuda":
            torch.cuda.synchronize(loaded.device)
        quant_seconds = time.perf_counter() - start
        evaluation = evaluate(quantized, loaded, config.eval, config.kv_eval)
    added = memory.peak_bytes - memory.start_bytes
    metrics = {**evaluation.metrics(), "quant_seconds": quant_seconds, "peak_memory_bytes": memory.peak_bytes,
               "peak_memory_kind": memory.kind, "peak_memory_added_bytes": added,
               "model_float_bytes": loaded.float_bytes, "peak_added_over_float": added / loaded.float_bytes,
               "bits_per_weight": bits_per_weight(loaded.adapter.quantizable_linears(loaded.model),
                                                  None if method.baseline else config.weight)}
    data = {"eval": evaluation.data, "calibration": calibration.record if calibration else None}
    return CellOutcome(metrics, data, quantized.notes,
                       quantized.fallbacks + evaluation.fallbacks)
