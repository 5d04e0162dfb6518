"""One cell's work: quantize a copy of the loaded model, evaluate it, collect metrics."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ptq.config import CellConfig, EvalConfig, ZeroShotConfig
from ptq.data import load_text, tokenize_once
from ptq.eval.memory import PeakMemory
from ptq.eval.perplexity import PerplexityResult, perplexity
from ptq.eval.zeroshot import zero_shot
from ptq.models.adapters import ArchAdapter
from ptq.models.loading import ResolvedSource
from ptq.calib import calibration_set
from ptq.registry import MethodInfo, QuantContext, QuantizedModel

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
    zero_shot: dict[str, Any] | None = None  # see ptq.eval.zeroshot.zero_shot, when configured

    def metrics(self) -> dict[str, Any]:
        seconds = sum(r.seconds for r in self.results.values())
        tokens = sum(r.windows * r.seqlen for r in self.results.values())
        metrics = {
            "ppl": {name: r.ppl for name, r in self.results.items()},
            "eval": {name: {"windows": r.windows, "seqlen": r.seqlen, "tokens_scored": r.tokens_scored,
                            "seconds": r.seconds} for name, r in self.results.items()},
            "eval_tokens_per_s": tokens / seconds if seconds > 0 else None,
        }
        if self.zero_shot is not None:
            metrics["zero_shot"] = self.zero_shot
        return metrics


def evaluate(quantized: QuantizedModel, loaded: LoadedModel, config: EvalConfig,
             zero_shot_config: ZeroShotConfig) -> Evaluation:
    """Perplexity on every configured dataset, then the zero-shot tasks if any. On CUDA OOM the
    perplexity batch is halved and that is recorded."""
    results: dict[str, PerplexityResult] = {}
    data: dict[str, Any] = {}
    fallbacks: list[str] = []
    for dataset in config.datasets:
        text = load_text(dataset, EVAL_SPLIT)
        ids = tokenize_once(loaded.tokenizer, text)
        data[dataset] = {**text.describe(), "tokens": int(ids.shape[1])}
        batch_size = config.batch_size
        while True:
            try:
                results[dataset] = perplexity(quantized.model, ids, config.seqlen, config.max_windows, batch_size,
                                              quantized.make_cache)
                break
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                torch.cuda.empty_cache()
                fallbacks.append(f"{dataset}: out of memory at eval batch {batch_size}, retried at {batch_size // 2}")
                batch_size //= 2
    if not zero_shot_config.tasks:
        return Evaluation(results, data, fallbacks)
    zero_shot_metrics, data["zero_shot"] = zero_shot(quantized.model, loaded.tokenizer, zero_shot_config,
                                                     quantized.make_cache)
    return Evaluation(results, data, fallbacks, zero_shot_metrics)


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
        evaluation = evaluate(quantized, loaded, config.eval, config.zero_shot)
    added = memory.peak_bytes - memory.start_bytes
    metrics = {**evaluation.metrics(), "quant_seconds": quant_seconds, "peak_memory_bytes": memory.peak_bytes,
               "peak_memory_kind": memory.kind, "peak_memory_added_bytes": added,
               "model_float_bytes": loaded.float_bytes, "peak_added_over_float": added / loaded.float_bytes}
    data = {"eval": evaluation.data, "calibration": calibration.record if calibration else None}
    return CellOutcome(metrics, data, quantized.notes,
                       quantized.fallbacks + evaluation.fallbacks)
