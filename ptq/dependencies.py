"""What a cell's result depends on, computed in one place from its configuration (which holds
only what its pipeline reads, see ptq.matrix):

- the **fingerprint** (committed baselines, comparisons between runs): the settings that
  determine the metrics, and the device type;
- the **weights key** (the quantized weights in the cache): those settings without the
  evaluation and the activation spec (applied after the stages), plus the model's content, the
  calibration text, the packages, the code of every stage of the pipeline and the locked
  packages of the environments library backends run in;
- the **metrics key**: the weights key's inputs plus the evaluation settings, its data and code.

The FP baseline of a cell is the cell's `baseline_config` through the same function.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptq.cache import cache_key, code_version, tree_sha256
from ptq.calib import CALIB_SPLITS
from ptq.config import CellConfig, SourceConfig
from ptq.data import load_text
from ptq.models.loading import resolve_source
from ptq.report.records import package_versions

EVAL_SPLIT = "test"
EVAL_SECTIONS = ("eval", "kv_eval", "zero_shot")  # change the metrics, not the weights
# The code a result depends on besides each stage's own module, and the packages that run it.
QUANTIZE_CODE = ("ptq.quant", "ptq.calib", "ptq.engine", "ptq.pipeline", "ptq.transforms", "ptq.hadamard",
                 "ptq.kv", "ptq.registry", "ptq.data", "ptq.config", "ptq.models.adapters", "ptq.models.moe",
                 "ptq.models.loading")
EVALUATE_CODE = ("ptq.cell", "ptq.cache", "ptq.eval.suite", "ptq.eval.perplexity", "ptq.eval.kld",
                 "ptq.eval.decode", "ptq.eval.passkey", "ptq.eval.zeroshot", "ptq.eval.lm_tasks", "ptq.eval.memory",
                 "ptq.data", "ptq.kv")
# What the float model's top-k stores (the KLD's reference) are computed with.
REFERENCES_CODE = ("ptq.eval.suite", "ptq.eval.perplexity", "ptq.eval.kld", "ptq.data")
# Spec fields added after fingerprints were first committed, with the value their absence meant.
SPEC_FIELDS_ADDED_LATER = {"format": "int", "dynamic": True}
RESULT_PACKAGES = ("torch", "transformers", "tokenizers", "gguf", "safetensors", "hqq", "optimum-quanto", "lm_eval")


def settings(config: CellConfig) -> dict[str, Any]:
    """The configuration sections that determine the cell's metrics, as plain data: not the
    gates, the prose, the track's name (it acts through the specs it sets) or model metadata."""
    payload = config.to_dict()
    for key in ("gates", "track"):
        payload.pop(key)
    payload["method"].pop("description")
    for key in ("size", "needs_gpu", "baseline_note", "head_dim"):
        payload["model"].pop(key)
    if payload["model"]["source"]["assemble"] is None:  # unused: sources with a file keep their fingerprints
        payload["model"]["source"].pop("assemble")
    for key in ("calib", "kv_eval"):  # None: not read by this cell
        if payload[key] is None:
            payload.pop(key)
    kv = payload.get("kv") or {}
    for spec in (payload["weight"], payload["act"], kv.get("key"), kv.get("value")):
        for key, default in SPEC_FIELDS_ADDED_LATER.items():  # at their default: what absence meant
            if spec is not None and spec.get(key) == default:
                spec.pop(key)
    payload["eval"].pop("allow_fewer_windows")  # whether a cell may run, not what it measures
    if not config.act_attention_inputs:  # added later: cells without it keep their fingerprints
        payload.pop("act_attention_inputs")
    if not config.zero_shot.tasks:  # unused: cells without zero-shot keep their fingerprints
        payload.pop("zero_shot")
    elif config.zero_shot.sampling == "random":  # added later: the default is what it meant before
        payload["zero_shot"].pop("sampling")
    return payload


def fingerprint(config: CellConfig, device_type: str) -> str:
    """A short hash of everything that determines the cell's metrics (not its gates)."""
    blob = json.dumps({**settings(config), "device_type": device_type}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


@dataclass(frozen=True)
class Dependencies:
    fingerprint: str
    weights: dict[str, Any]  # inputs of the quantized-weights cache key
    metrics: dict[str, Any]  # inputs of the metrics cache key

    @property
    def weights_key(self) -> str:
        return cache_key(self.weights)

    @property
    def metrics_key(self) -> str:
        return cache_key(self.metrics)


def dependencies(config: CellConfig, stage_modules: tuple[str, ...], device_type: str,
                 environments: dict[str, Any] | None = None) -> Dependencies:
    """Everything a cell's result depends on (see the module docstring); `stage_modules` are the
    modules of its pipeline's stages, whose code is part of the keys; `environments` the locked
    packages of stages that run in an environment of their own (library backends). Needs no model load:
    calibration tokens are a function of the tokenizer (in the model's identity), the calib
    settings, the calibration text and ptq.calib, all of which are inputs."""
    quantize = settings(config)
    # activations are quantized after the stages, from the config (ptq.pipeline): W4A16 and W4A8
    # cells share their weights
    evaluation = {section: quantize.pop(section) for section in ("act", *EVAL_SECTIONS) if section in quantize}
    weights: dict[str, Any] = {
        "model": model_identity(config.model.source), "settings": quantize, "device_type": device_type,
        "packages": package_versions(RESULT_PACKAGES), "code": code_version((*stage_modules, *QUANTIZE_CODE))}
    if environments:
        weights["environments"] = environments
    if config.calib is not None:
        split = CALIB_SPLITS[config.calib.dataset]
        weights["calibration_text_sha256"] = load_text(config.calib.dataset, split).sha256
    metrics = {"weights": weights, "eval": evaluation, "code": code_version(EVALUATE_CODE),
               "eval_data_sha256": {name: load_text(name, EVAL_SPLIT).sha256 for name in config.eval.datasets}}
    return Dependencies(fingerprint(config, device_type), weights, metrics)


def references_inputs(config: CellConfig, device_type: str) -> dict[str, Any]:
    """What the float model's top-k stores of a cell's evaluation windows depend on (the inputs of
    their cache key): the model's content and settings, the evaluation settings and text, the code
    and packages; not the method, so every cell of a model and evaluation setting shares them."""
    payload = settings(config)
    return {"model": model_identity(config.model.source), "model_settings": payload["model"],
            "eval": payload["eval"], "device_type": device_type,
            "packages": package_versions(RESULT_PACKAGES), "code": code_version(REFERENCES_CODE),
            "eval_data_sha256": {name: load_text(name, EVAL_SPLIT).sha256 for name in config.eval.datasets}}
