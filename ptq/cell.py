"""One cell's work: quantize a copy of the loaded model with the cell's pipeline, evaluate it,
collect metrics; with the on-disk cache (ptq.cache), reuse what an earlier run already
measured. Its keys come from ptq.dependencies."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
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

from ptq.cache import CacheStore, Lookup, Status
from ptq.calib import calibration_set
from ptq.config import CellConfig
from ptq.dependencies import Dependencies, dependencies
from ptq.engine import QuantResult
from ptq.eval.memory import PeakMemory
from ptq.eval.kld import TopKLogprobs
from ptq.eval.perplexity import PerplexityResult
from ptq.eval.suite import evaluate
from ptq.models.adapters import ArchAdapter
from ptq.models.loading import ResolvedSource
from ptq.models.placement import on_device, one_cpu_thread
from ptq.pipeline import quantize, quantize_activations
from ptq.quant import QuantSpec
from ptq.registry import Pipeline
from ptq.transforms import bits_per_weight

WEIGHTS_FILE = "weights.safetensors"


References = Callable[[], dict[str, TopKLogprobs]]  # the float model's top-k store per evaluation dataset
Scored = Callable[[], dict[str, PerplexityResult]]  # perplexities measured already, per evaluation dataset


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
    topk: dict[str, TopKLogprobs] | None = None  # the model's own top-k stores, when measured and asked for

    def stored(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "data": self.data, "notes": self.notes, "fallbacks": self.fallbacks,
                "model_source": self.model_source}


class SharedTensorsWritten(RuntimeError):
    """A stage wrote into the loaded model's tensors (a bug in the stage): the model must be loaded again."""


@dataclass
class CellCopy:
    """The model a cell quantizes: its decoder blocks copied, the rest (embeddings, final norm, LM
    head: what no stage rounds) shared with the loaded model, so a cell adds about the blocks'
    size, not the model's. A stage that changes a shared module must replace its tensors (assign
    a new parameter), never write into them: `check` finds an in-place write by the tensors'
    version counters."""

    model: nn.Module
    shared: dict[str, torch.Tensor]
    versions: dict[str, int]
    whole: bool = False  # nothing copied: `model` is the loaded model, none of whose tensors may change

    @classmethod
    def of(cls, model: nn.Module, adapter: ArchAdapter, copy_blocks: bool = True) -> CellCopy:
        """With `copy_blocks` false (a pipeline of cache stages only, which build a KV cache from the
        model's config and change no tensor), the cell works on the loaded model itself, and `check`
        also finds a tensor replaced."""
        if not copy_blocks:
            shared = model.state_dict(keep_vars=True)
            return cls(model, shared, {name: t._version for name, t in shared.items()}, whole=True)
        blocks = {id(t) for t in adapter.decoder_blocks(model).state_dict(keep_vars=True).values()}
        shared = {name: t for name, t in model.state_dict(keep_vars=True).items() if id(t) not in blocks}
        memo = {id(t): t for t in shared.values()}
        return cls(copy.deepcopy(model, memo), shared, {name: t._version for name, t in shared.items()})

    def check(self) -> None:
        written = sorted(name for name, t in self.shared.items() if t._version != self.versions[name])
        if self.whole:
            now = self.model.state_dict(keep_vars=True)
            changed = sorted({name for name in self.shared.keys() | now.keys()
                              if name in written or now.get(name) is not self.shared.get(name)})
            if changed:
                raise SharedTensorsWritten(f"a cache stage changed tensors of the loaded model: "
                                           f"{changed[:3]} (it is now damaged, and is loaded again for "
                                           "the next cell)")
        if written:
            raise SharedTensorsWritten(f"a stage wrote in place into tensors shared with the loaded model: "
                                       f"{written[:3]}; replace the module's parameter instead (the loaded "
                                       "model is now damaged, and is loaded again for the next cell)")


def stage_modules(pipeline: Pipeline) -> tuple[str, ...]:
    return tuple(module for stage in pipeline.stages for module in (stage.module, *stage.stage.code_modules()))


def stage_environments(pipeline: Pipeline) -> dict[str, Any]:
    """The packages of the stages that run outside the core install (library backends), from their locks."""
    return {stage.name: env for stage in pipeline.stages if (env := stage.stage.environment()) is not None}


def run_cached(config: CellConfig, pipeline: Pipeline, device: torch.device, load: Callable[[], LoadedModel],
               store: CacheStore, references: References | None = None, topk: bool = False,
               scored: Scored | None = None) -> CellOutcome:
    """The cell's outcome from the metrics entry when it is whole; else quantize (or take the
    quantized weights from their entry), evaluate, and store. The model is loaded only then, and
    `references` (the float model's top-k stores, for the KLD) and `scored` (perplexities measured
    already, see `evaluate`) called only then; with `topk`, a measured outcome brings the model's
    own top-k stores (the FP baseline's are the references)."""
    deps = dependencies(config, stage_modules(pipeline), device.type, stage_environments(pipeline))
    # two workers needing the same outcome (a model's FP baseline) measure it once
    with store.exclusive("metrics", deps.metrics_key):
        found = store.lookup("metrics", deps.metrics_key)
        if found.status == "hit":
            assert found.path is not None
            stored = json.loads((found.path / "outcome.json").read_text())
            return CellOutcome(**stored, cache={"metrics": "hit", "weights": "skipped"})
        outcome = measure(config, pipeline, load(), store, deps, references, topk, scored)

        def write(folder: Path) -> None:
            (folder / "outcome.json").write_text(json.dumps(outcome.stored(), indent=2))

        unstored = store.store("metrics", deps.metrics_key, deps.metrics, write)
    outcome.cache["metrics"] = found.status
    outcome.cache_problems += [problem for problem in (found.problem, unstored) if problem]
    return outcome


def measure(config: CellConfig, pipeline: Pipeline, loaded: LoadedModel, store: CacheStore,
            deps: Dependencies, references: References | None = None, topk: bool = False,
            scored: Scored | None = None) -> CellOutcome:
    """Quantize with the pipeline (or take its weights from `store`), then evaluate. Pipelines work
    on a copy, so the loaded model stays float for the next cell; the baseline leaves the model
    as it is and gets no copy (and has no weights to store)."""
    memory = PeakMemory(loaded.device)
    # cells that share their weights (a pipeline at W4A16, W4A8 and W4A4) quantize once: the
    # others wait here for the entry, then load it
    with contextlib.nullcontext() if pipeline.baseline else store.exclusive("weights", deps.weights_key):
        found = Lookup("none", None) if pipeline.baseline else store.lookup("weights", deps.weights_key)
        # the stages' data (unless their weights are stored), and what static activation ranges
        # are observed on
        calibration = calibration_set(loaded.tokenizer, config.calib) \
            if pipeline.calibrated and found.path is None or config.static_act else None
        with memory:
            # cache stages in a cell that rounds neither weights nor activations change no tensor: no
            # copy of the blocks (checked all the same)
            untouched = pipeline.cache_only and config.weight is None and config.act is None
            work = None if pipeline.baseline else CellCopy.of(loaded.model, loaded.adapter,
                                                              copy_blocks=not untouched)
            model = loaded.model if work is None else work.model
            if found.path is not None:
                result, quant_seconds, calibration_record = _load_weights(found.path, model)
            else:
                start = time.perf_counter()
                with one_cpu_thread(loaded.device):
                    # a static act spec reads the calibration set for its ranges alone (below)
                    stage_data = calibration if pipeline.calibrated else None
                    result = quantize(model, loaded.adapter, config, pipeline, stage_data, loaded.device,
                                      loaded.tokenizer)
                if loaded.device.type == "cuda":
                    torch.cuda.synchronize(loaded.device)
                quant_seconds = time.perf_counter() - start
                calibration_record = calibration.record if pipeline.calibrated else None
            if work is not None:
                work.check()  # the loaded model serves the next cells: nothing may have written into it
            # what the stages changed, before activation wrappers rename the linears
            changed = changed_tensors(loaded.model, model) if found.status in ("miss", "rebuilt") \
                and result.pure_weights else None
        unstored = None
        if changed is not None:  # written outside the measurement: serializing them is not the cell's memory
            write = functools.partial(_write_weights, changed, result, quant_seconds, calibration_record)
            unstored = store.store("weights", deps.weights_key, deps.weights, write)
    # after quantizing, so a worker waiting for another's float references has done its own work
    # first; outside the cell's memory: they are the float model's
    float_stores = references() if references is not None and not pipeline.baseline else None
    measured = scored() if scored is not None else None
    with memory:
        quantize_activations(result, loaded.adapter, config, calibration, loaded.device)
        with on_device(result.model, loaded.device) as placement:
            evaluation = evaluate(result, loaded.tokenizer, loaded.device, config, float_stores, topk,
                                  measured)
    added = memory.peak_bytes - memory.start_bytes
    metrics = {**evaluation.metrics(), "quant_seconds": quant_seconds, "stage_seconds": result.stage_seconds,
               "peak_memory_bytes": memory.peak_bytes, "peak_memory_kind": memory.kind,
               "peak_memory_added_bytes": added, "model_float_bytes": loaded.float_bytes,
               "peak_added_over_float": added / loaded.float_bytes,
               "bits_per_weight": bits_per_weight(loaded.adapter.quantizable_linears(loaded.model),
                                                  result.weight_specs)}
    if calibration_record is None and calibration is not None:  # read for the activation ranges alone
        calibration_record = calibration.record
    data = {"eval": evaluation.data, "calibration": calibration_record, "quantized": _quantized(result),
            "placement": placement}
    if result.details:
        data["stages"] = result.details
    outcome = CellOutcome(metrics, data, result.notes, result.fallbacks + evaluation.fallbacks,
                          loaded.source.to_dict(), cache={"weights": found.status},
                          cache_problems=[problem for problem in (found.problem, unstored) if problem],
                          topk=evaluation.topk if topk else None)
    if found.status in ("miss", "rebuilt") and not result.pure_weights:  # nothing was stored
        outcome.cache["weights"] = "none"
    return outcome


def _quantized(result: QuantResult) -> dict[str, Any]:
    """What was quantized where, as the record states it: each distinct spec with the linears it
    was applied to (weights, inputs), and the KV cache."""

    def by_spec(specs: dict[str, QuantSpec]) -> list[dict[str, Any]]:
        groups: dict[QuantSpec, list[str]] = {}
        for name, spec in specs.items():
            groups.setdefault(spec, []).append(name)
        return [{"spec": dataclasses.asdict(spec), "linears": len(names), "names": names}
                for spec, names in groups.items()]

    return {"weights": by_spec(result.weight_specs), "inputs": by_spec(result.act_specs),
            "outputs": by_spec(result.act_output_specs), "kv_cache": result.kv,
            "runtime": result.runtime, "pure_weight_replacement": result.pure_weights}


def changed_tensors(original: nn.Module, quantized: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers whose values differ between two models of the same structure."""
    before, after = original.state_dict(), quantized.state_dict()
    changed: dict[str, torch.Tensor] = {}
    stored: set[int] = set()
    for name, tensor in after.items():
        if not torch.equal(tensor, before[name]):
            # safetensors refuses tensors sharing memory (tied weights): store the second as a copy
            changed[name] = tensor.detach().clone() if tensor.data_ptr() in stored else tensor.detach().contiguous()
            stored.add(tensor.data_ptr())
    return changed


def _write_weights(changed: dict[str, torch.Tensor], result: QuantResult, quant_seconds: float,
                   calibration_record: dict[str, Any] | None, folder: Path) -> None:
    save_file(changed, str(folder / WEIGHTS_FILE))
    stored = {"notes": result.notes, "fallbacks": result.fallbacks, "quant_seconds": quant_seconds,
              "stage_seconds": result.stage_seconds, "calibration": calibration_record, "details": result.details,
              "weight_specs": {name: dataclasses.asdict(spec) for name, spec in result.weight_specs.items()}}
    (folder / "result.json").write_text(json.dumps(stored, indent=2))


def _load_weights(folder: Path, model: nn.Module) -> tuple[QuantResult, float, dict[str, Any] | None]:
    """The cell's copy `model` with the entry's tensors in place of its own (assigned, not written into:
    some of its tensors are the loaded model's), and what the quantization run recorded."""
    loaded = model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=False, assign=True)
    if loaded.unexpected_keys:  # the key covers the model and the code: this is a bug, not a stale entry
        raise RuntimeError(f"cached weights {folder} hold tensors the model lacks: {loaded.unexpected_keys[:5]}")
    stored = json.loads((folder / "result.json").read_text())
    note = "quantized weights from the cache: quant_seconds as measured when they were built; peak memory " \
           "covers loading them and the evaluation, not the quantization"
    specs = {name: QuantSpec(**spec) for name, spec in stored["weight_specs"].items()}
    result = QuantResult(model, weight_specs=specs, notes=[*stored["notes"], note], fallbacks=stored["fallbacks"],
                         stage_seconds=stored["stage_seconds"], details=stored["details"])
    return result, stored["quant_seconds"], stored["calibration"]
