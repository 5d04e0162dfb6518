"""One cell's work: quantize a copy of the loaded model, evaluate it, collect metrics; with
the on-disk cache (ptq.cache), reuse what an earlier run already measured.
"""

from __future__ import annotations

import copy
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ptq.cache import CacheStore, Lookup, Status, cache_key, code_version, tree_sha256
from ptq.config import CellConfig, KVEvalConfig, SourceConfig
from ptq.data import load_text, tokenize_once
from ptq.eval.decode import decode_speed, float_cache
from ptq.eval.memory import PeakMemory
from ptq.eval.passkey import passkey_accuracy, trials
from ptq.eval.perplexity import PerplexityResult, perplexity
from ptq.eval.zeroshot import zero_shot
from ptq.models.adapters import ArchAdapter
from ptq.models.loading import ResolvedSource, resolve_source
from ptq.calib import CALIB_SPLITS, calibration_set
from ptq.registry import MethodInfo, QuantContext, QuantizedModel
from ptq.report.records import package_versions
from ptq.transforms import bits_per_weight

EVAL_SPLIT = "test"

# What a cached result depends on besides the config and the data: the code that computes it
# (the method's own module is added per method) and the packages that run it.
QUANTIZE_CODE = ("ptq.quant", "ptq.calib", "ptq.transforms", "ptq.kv", "ptq.registry", "ptq.data", "ptq.config",
                 "ptq.models.adapters", "ptq.models.loading")
EVALUATE_CODE = ("ptq.pipeline", "ptq.cache", "ptq.eval.perplexity", "ptq.eval.decode", "ptq.eval.passkey",
                 "ptq.eval.zeroshot", "ptq.eval.lm_tasks", "ptq.eval.memory", "ptq.data", "ptq.kv")
RESULT_PACKAGES = ("torch", "transformers", "tokenizers", "gguf", "safetensors", "hqq", "optimum-quanto", "lm_eval")
WEIGHTS_FILE = "weights.safetensors"


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
    zero_shot: dict[str, Any] | None = None  # see ptq.eval.zeroshot.zero_shot, when configured

    def metrics(self) -> dict[str, Any]:
        seconds = sum(r.seconds for r in self.results.values())
        tokens = sum(r.windows * r.seqlen for r in self.results.values())
        metrics = {
            "ppl": {name: r.ppl for name, r in self.results.items()},
            "eval": {name: {"windows": r.windows, "seqlen": r.seqlen, "tokens_scored": r.tokens_scored,
                            "seconds": r.seconds, "prefill_chunk": r.prefill_chunk} for name, r in self.results.items()},
            "eval_tokens_per_s": tokens / seconds if seconds > 0 else None,
            **self.kv_probes,
        }
        if self.zero_shot is not None:
            metrics["zero_shot"] = self.zero_shot
        return metrics


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


def evaluate(quantized: QuantizedModel, loaded: LoadedModel, config: CellConfig) -> Evaluation:
    """Perplexity on every configured dataset (by chunked prefill when the cell has KV probes),
    then the KV probes and the zero-shot tasks, when configured. On CUDA OOM the perplexity
    batch is halved and that is recorded."""
    results: dict[str, PerplexityResult] = {}
    data: dict[str, Any] = {}
    fallbacks: list[str] = []
    chunk = config.kv_eval.prefill_chunk if config.kv_eval else None
    for dataset in config.eval.datasets:
        text = load_text(dataset, EVAL_SPLIT)
        ids = tokenize_once(loaded.tokenizer, text)
        data[dataset] = {**text.describe(), "tokens": int(ids.shape[1])}
        batch_size = config.eval.batch_size
        while True:
            try:
                results[dataset] = perplexity(quantized.model, ids, config.eval.seqlen, config.eval.max_windows, batch_size,
                                              quantized.make_cache, chunk, config.eval.allow_fewer_windows,
                                              f"{dataset}/{EVAL_SPLIT} ({text.origin})")
                break
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                torch.cuda.empty_cache()
                fallbacks.append(f"{dataset}: out of memory at eval batch {batch_size}, retried at {batch_size // 2}")
                batch_size //= 2
    probes = kv_probes(quantized, loaded, config.kv_eval) if config.kv_eval else {}
    accuracy = None
    if config.zero_shot.tasks:
        accuracy, data["zero_shot"] = zero_shot(quantized.model, loaded.tokenizer, config.zero_shot,
                                                quantized.make_cache)
    return Evaluation(results, data, fallbacks, probes, accuracy)


@dataclass
class CellOutcome:
    metrics: dict[str, Any]
    data: dict[str, Any]
    notes: list[str]
    fallbacks: list[str]
    model_source: dict[str, Any]
    # Not stored with the outcome: how this run got it, per stage (see ptq.cache.Status), and
    # why an entry found on disk was not used.
    cache: dict[str, Status] = field(default_factory=dict)
    cache_problems: list[str] = field(default_factory=list)

    def stored(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "data": self.data, "notes": self.notes, "fallbacks": self.fallbacks,
                "model_source": self.model_source}


@functools.lru_cache(maxsize=16)
def model_identity(source: SourceConfig) -> dict[str, Any]:
    """The model's content as far as it is known without loading it: the weights file's sha256,
    a folder's content hash, or, on the hub, the id and the revision asked for."""
    resolved = resolve_source(source)
    if resolved.sha256 is not None:
        return {"sha256": resolved.sha256}
    if resolved.kind == "local":
        return {"tree_sha256": tree_sha256(Path(resolved.location))}
    return {"hub": resolved.location, "revision": resolved.revision}


def cache_inputs(method: MethodInfo, config: CellConfig, device_type: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The inputs of the cell's quantized-weights key and of its metrics key.

    Calibration tokens are a function of the tokenizer (in the model's identity), the calib
    settings, the calibration text and ptq.calib, all of which are inputs: they need no model load.
    """
    settings = config.fingerprint_payload(device_type)
    settings.pop("track")  # a track acts through the specs it sets, which are in the settings
    for section in ("weight", "act", "kv"):  # the FP baseline runs under other cells' configs
        if section not in method.uses:
            settings.pop(section)
    if not method.calibrated:
        settings.pop("calib")
    if method.baseline:  # it reads no method params; the section is that of the cell it serves
        settings.pop("method")
    eval_settings = settings.pop("eval")
    # the probes and zero-shot tasks are evaluation too: they change the metrics, not the weights
    eval_settings.update({section: settings.pop(section) for section in ("kv_eval", "zero_shot") if section in settings})
    weights: dict[str, Any] = {
        "method": method.name, "model": model_identity(config.model.source), "settings": settings,
        "packages": package_versions(RESULT_PACKAGES), "code": code_version((method.apply.__module__, *QUANTIZE_CODE))}
    if method.calibrated:
        weights["calibration_text_sha256"] = load_text(config.calib.dataset, CALIB_SPLITS[config.calib.dataset]).sha256
    metrics = {"weights": weights, "eval": eval_settings, "code": code_version(EVALUATE_CODE),
               "eval_data_sha256": {name: load_text(name, EVAL_SPLIT).sha256 for name in config.eval.datasets}}
    return weights, metrics


def run_cached(method: MethodInfo, config: CellConfig, device: torch.device, load: Callable[[], LoadedModel],
               store: CacheStore) -> CellOutcome:
    """The cell's outcome from the metrics entry when it is whole; else quantize (or take the
    quantized weights from their entry), evaluate, and store. The model is loaded only then."""
    weights_inputs, metrics_inputs = cache_inputs(method, config, device.type)
    metrics_key = cache_key(metrics_inputs)
    found = store.lookup("metrics", metrics_key)
    if found.status == "hit":
        assert found.path is not None
        stored = json.loads((found.path / "outcome.json").read_text())
        return CellOutcome(**stored, cache={"metrics": "hit", "weights": "skipped"})
    outcome = run_method(method, load(), config, store, weights_inputs)
    store.store("metrics", metrics_key, metrics_inputs,
                lambda folder: (folder / "outcome.json").write_text(json.dumps(outcome.stored(), indent=2)))
    outcome.cache["metrics"] = found.status
    outcome.cache_problems += [found.problem] if found.problem else []
    return outcome


def run_method(method: MethodInfo, loaded: LoadedModel, config: CellConfig, store: CacheStore,
               weights_inputs: dict[str, Any]) -> CellOutcome:
    """Quantize with `method` (or take its weights from `store`), then evaluate. Methods work on a
    copy, so the loaded model stays float for the next cell; the baseline method leaves the model
    as it is and gets no copy (and has no weights to store)."""
    weights_key = cache_key(weights_inputs)
    found = Lookup("none", None) if method.baseline else store.lookup("weights", weights_key)
    calibration = calibration_set(loaded.tokenizer, config.calib) if method.calibrated and found.path is None else None
    with PeakMemory(loaded.device) as memory:
        model = loaded.model if method.baseline else copy.deepcopy(loaded.model)
        if found.path is not None:
            quantized, quant_seconds, calibration_record = _load_weights(found.path, model)
        else:
            start = time.perf_counter()
            quantized = method.apply(model, config, QuantContext(loaded.adapter, loaded.device, calibration))
            if loaded.device.type == "cuda":
                torch.cuda.synchronize(loaded.device)
            quant_seconds = time.perf_counter() - start
            calibration_record = calibration.record if calibration else None
        evaluation = evaluate(quantized, loaded, config)
    added = memory.peak_bytes - memory.start_bytes
    metrics = {**evaluation.metrics(), "quant_seconds": quant_seconds, "peak_memory_bytes": memory.peak_bytes,
               "peak_memory_kind": memory.kind, "peak_memory_added_bytes": added,
               "model_float_bytes": loaded.float_bytes, "peak_added_over_float": added / loaded.float_bytes,
               "bits_per_weight": bits_per_weight(loaded.adapter.quantizable_linears(loaded.model),
                                                  None if method.baseline else config.weight)}
    data = {"eval": evaluation.data, "calibration": calibration_record}
    outcome = CellOutcome(metrics, data, quantized.notes, quantized.fallbacks + evaluation.fallbacks,
                          loaded.source.to_dict(), cache={"weights": found.status},
                          cache_problems=[found.problem] if found.problem else [])
    if found.status in ("miss", "rebuilt"):
        changed = changed_tensors(loaded.model, quantized)
        if changed is None:  # not a pure weight replacement: nothing to store
            outcome.cache["weights"] = "none"
        else:
            store.store("weights", weights_key, weights_inputs,
                        functools.partial(_write_weights, changed, quantized, quant_seconds, calibration_record))
    return outcome


def _structure(model: nn.Module) -> list[tuple[str, str, int, int]]:
    return [(name, type(module).__qualname__, len(module._forward_pre_hooks), len(module._forward_hooks))
            for name, module in model.named_modules()]


def changed_tensors(original: nn.Module, quantized: QuantizedModel) -> dict[str, torch.Tensor] | None:
    """The parameters and buffers the method changed, when its result is a pure weight replacement
    (same modules and hooks, no quantized KV cache); else None."""
    if quantized.make_cache is not None or _structure(original) != _structure(quantized.model):
        return None
    before, after = original.state_dict(), quantized.model.state_dict()
    if before.keys() != after.keys():
        return None
    changed: dict[str, torch.Tensor] = {}
    stored: set[int] = set()
    for name, tensor in after.items():
        if not torch.equal(tensor, before[name]):
            # safetensors refuses tensors sharing memory (tied weights): store the second as a copy
            changed[name] = tensor.detach().clone() if tensor.data_ptr() in stored else tensor.detach().contiguous()
            stored.add(tensor.data_ptr())
    return changed


def _write_weights(changed: dict[str, torch.Tensor], quantized: QuantizedModel, quant_seconds: float,
                   calibration_record: dict[str, Any] | None, folder: Path) -> None:
    save_file(changed, str(folder / WEIGHTS_FILE))
    result = {"notes": quantized.notes, "fallbacks": quantized.fallbacks, "quant_seconds": quant_seconds,
              "calibration": calibration_record}
    (folder / "result.json").write_text(json.dumps(result, indent=2))


def _load_weights(folder: Path, model: nn.Module) -> tuple[QuantizedModel, float, dict[str, Any] | None]:
    """The float copy `model` with the entry's tensors written in, and what the quantization run recorded."""
    loaded = model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=False)
    if loaded.unexpected_keys:  # the key covers the model and the code: this is a bug, not a stale entry
        raise RuntimeError(f"cached weights {folder} hold tensors the model lacks: {loaded.unexpected_keys[:5]}")
    result = json.loads((folder / "result.json").read_text())
    note = "quantized weights from the cache: quant_seconds as measured when they were built; peak memory " \
           "covers loading them and the evaluation, not the quantization"
    quantized = QuantizedModel(model, notes=[*result["notes"], note], fallbacks=result["fallbacks"])
    return quantized, result["quant_seconds"], result["calibration"]
