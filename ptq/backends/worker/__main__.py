"""`python -m ptq.backends.worker request.json`: run one library backend (see common.py)."""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

import torch

from ptq.backends.worker.common import Unavailable, changed_tensors, reference_state, versions, write


def main(path: str) -> int:
    request = json.loads(Path(path).read_text())
    torch.manual_seed(request["seed"])
    torch.set_num_threads(request["threads"])
    try:
        library = importlib.import_module(f"ptq.backends.worker.{request['library']}")
    except ImportError as exc:
        print(f"BackendUnavailable: {request['library']} does not import here: {exc}", file=sys.stderr)
        return 3
    tokens = None
    if request["calibration"]:
        from safetensors.torch import load_file

        tokens = load_file(request["calibration"])["input_ids"]
    start = time.perf_counter()
    try:
        outcome = library.quantize(request, tokens)
    except Unavailable as exc:
        print(f"BackendUnavailable: {exc}", file=sys.stderr)
        return 3
    quantize_seconds = time.perf_counter() - start
    start = time.perf_counter()
    tensors = changed_tensors(outcome, request["linears"], reference_state(request["model_dir"]))
    info = {"versions": versions(outcome.packages), "mapping": outcome.mapping,
            "library_defaults": outcome.library_defaults, "notes": outcome.notes, "checkpoint": outcome.checkpoint,
            "seconds": {"quantize": quantize_seconds, "dense": time.perf_counter() - start},
            "specs": outcome.specs, "other_tensors": sorted(set(tensors) - {f"{n}.weight" for n in request["linears"]})}
    write(Path(request["out_dir"]), tensors, info)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
