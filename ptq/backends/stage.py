"""A library backend as a pipeline stage: the library quantizes the whole model in one call.

`Backend.after_blocks` hands the library exactly what our methods get, through files (the
backend may run in an environment of its own, see ptq.backends.envs):

    model/                    the model as the earlier stages left it (config, float tensors) and its tokenizer
    calibration.safetensors   the cell's calibration tokens, the very tensor of ptq.calib.calibration_set
    request.json              the weight spec, the backend's params (the explicit mapping of our
                              settings onto the library's), the seed, the device, the linears to return

and the worker (`python -m ptq.backends.worker request.json`, ptq.backends.worker) answers with

    weights.safetensors       every tensor the library changed, dense float: each quantized linear's
                              weight as the library's own module applies it (dequantized), and any
                              other parameter it rewrote (norms that absorbed AWQ or SmoothQuant scales)
    result.json               package versions, the mapping as applied, the library defaults that
                              differ from the reference (forced or overridden), notes, seconds

The tensors are written into the cell's model, which our evaluation then scores on the same
windows as every other cell: the result is a pure weight replacement, cached like any other.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import ptq
from ptq import progress
from ptq.backends import envs
from ptq.engine import ModelStep, Stage
from ptq.errors import BackendUnavailable
from ptq.quant import QuantSpec

REPO = Path(ptq.__file__).resolve().parent.parent  # put on the worker's PYTHONPATH: it imports ptq.backends.worker
WORKER = "ptq.backends.worker"


def save_float_model(model: nn.Module, folder: Path) -> None:
    """The model's config and float tensors as a transformers folder. Not `save_pretrained`: a model
    read from a GGUF file keeps its `gguf` quantizer, which refuses to serialize, while its
    tensors are plain dequantized floats. Tensors sharing memory (tied embeddings) are written
    once; transformers ties them again on load."""
    folder.mkdir(parents=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.detach().cpu().contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


class Backend(Stage):
    """A library's implementation of `algorithm`, run by the worker module `library`."""

    algorithm: ClassVar[str]  # ours it is compared with: gptq, awq, hqq, rtn, smoothquant+gptq, autoround
    library: ClassVar[str]  # the worker module ptq.backends.worker.<library>
    env: ClassVar[str]  # its environment (ptq.backends.envs; CORE: the core install)
    needs_cuda: ClassVar[str | None] = None  # why it cannot run without CUDA, if it cannot

    @classmethod
    def environment(cls) -> dict[str, Any] | None:
        return None if cls.env == envs.CORE else envs.describe(cls.env)

    @classmethod
    def code_modules(cls) -> tuple[str, ...]:
        return ("ptq.backends.stage", "ptq.backends.envs", "ptq.backends.worker.common",
                f"{WORKER}.{cls.library}")

    def request(self, step: ModelStep, folder: Path) -> dict[str, Any]:
        spec = self.specs.weight
        return {"library": self.library, "algorithm": self.algorithm, "model_dir": str(folder / "model"),
                "calibration": str(folder / "calibration.safetensors") if step.calibration else None,
                "weight": dataclasses.asdict(spec) if spec else None, "params": dataclasses.asdict(self.params),
                "seed": step.calibration.record["seed"] if step.calibration else 0,
                "device": step.device.type, "threads": torch.get_num_threads(),
                "linears": list(step.adapter.quantizable_linears(step.model)), "out_dir": str(folder / "out")}

    def unexpressed(self, step: ModelStep) -> str | None:
        """What of the cell the library cannot express, or None. Libraries round weights to integer
        codes only, and quantize the model transformers rebuilds from the saved folder: modules or
        hooks an earlier stage added (QuaRot's online Hadamard, a head untied from the embedding)
        would not be there."""
        weight = self.specs.weight
        if weight is not None and weight.format != "int":
            return f"the library rounds weights to integers; the cell's weight format is {weight.format}"
        if step.result.runtime:
            return (f"earlier stages changed the model beyond its weights ({'; '.join(step.result.runtime)}), "
                    "which the model the library loads from the saved folder would not have")
        return None

    def after_blocks(self, step: ModelStep) -> None:
        unexpressed = self.unexpressed(step)
        if unexpressed:
            raise BackendUnavailable(f"{self.name} cannot run this cell: {unexpressed}")
        if self.needs_cuda and step.device.type != "cuda":
            raise BackendUnavailable(f"{self.name} cannot run here: {self.needs_cuda}; on a CUDA machine: "
                                     f"{envs.install_command(self.env)} && pytest bench --methods {self.name}")
        progress.report(f"preparing the {self.env} environment")
        python = envs.ensure(self.env)
        with tempfile.TemporaryDirectory(prefix="ptq-backend-") as tmp:
            folder = Path(tmp)
            save_float_model(step.model, folder / "model")
            step.tokenizer.save_pretrained(folder / "model")
            if step.calibration is not None:
                save_file({"input_ids": step.calibration.tokens.contiguous()}, str(folder / "calibration.safetensors"))
            request = self.request(step, folder)
            (folder / "request.json").write_text(json.dumps(request, indent=2))
            progress.report(f"{self.library} quantizing")
            start = time.perf_counter()
            self._run_worker(python, folder)
            seconds = time.perf_counter() - start
            tensors = load_file(str(folder / "out" / "weights.safetensors"))
            info = json.loads((folder / "out" / "result.json").read_text())
        self._write(step, tensors, request["linears"], info["specs"])
        info["worker_seconds"] = seconds
        info["environment"] = {"name": self.env, "build": envs.build_info(self.env) if self.env != envs.CORE
                               else None, "python": str(python)}
        step.result.details[self.name] = info
        step.result.stage_seconds[f"{self.name} (library)"] = info["seconds"]["quantize"]
        versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items())
        step.result.notes.append(f"{self.name}: quantized by {versions}; mapping {info['mapping']}"
                                 + (f"; library defaults kept: {info['library_defaults']}"
                                    if info["library_defaults"] else ""))
        step.result.notes += [f"{self.name}: {note}" for note in info["notes"]]

    def _run_worker(self, python: Path, folder: Path) -> None:
        environ = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads()),
                   "TOKENIZERS_PARALLELISM": "false"}
        with (folder / "worker.log").open("w") as log:
            done = subprocess.run([str(python), "-m", WORKER, str(folder / "request.json")], cwd=folder,
                                  env=environ, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            text = (folder / "worker.log").read_text().strip().splitlines()
            unavailable = [line for line in text if line.startswith(("BackendUnavailable:", "ptq.errors.Backend"))]
            if unavailable:
                raise BackendUnavailable(unavailable[-1].split(":", 1)[1].strip())
            raise RuntimeError(f"{self.name}: the library failed (exit {done.returncode}):\n" + "\n".join(text[-25:]))

    def _write(self, step: ModelStep, tensors: dict[str, torch.Tensor], linears: list[str],
               specs: dict[str, dict[str, Any]]) -> None:
        """The library's tensors into the model; each linear it returned was rounded with the cell's
        spec unless the library says it chose another (`specs`)."""
        state = step.model.state_dict()
        unknown = sorted(set(tensors) - set(state))
        if unknown:
            raise RuntimeError(f"{self.name} returned tensors the model does not have: {unknown[:5]}")
        for name, tensor in tensors.items():
            if tensor.shape != state[name].shape:
                raise RuntimeError(f"{self.name} returned {name} of shape {tuple(tensor.shape)}, "
                                   f"expected {tuple(state[name].shape)}")
        # assigned, not written into: the cell's model shares its embeddings and head with the loaded model
        step.model.load_state_dict({name: tensor.to(state[name].device, state[name].dtype)
                                    for name, tensor in tensors.items()}, strict=False, assign=True)
        for name in linears:
            if f"{name}.weight" in tensors and self.specs.weight is not None:
                step.result.weight_specs[name] = QuantSpec(**specs[name]) if name in specs else self.specs.weight
