"""Seconds per block of a calibrated method, with and without the engine's recording shortcut.

Quantizes the first `--blocks` decoder blocks of the model (a truncated copy: the per-block
cost does not depend on how many blocks follow) with a method's track-A pipeline, exactly as
a cell does (the cell's calibration set, one torch thread on CPU), twice per round: as the
engine runs it, and with the shortcut off (`BlockRunner` never computes a frozen child's
output from its last linear's kept input, so the child runs in its recording pass). Rounds
alternate between the two so a loaded machine slows them alike; the best round of each is
kept. The two must give bit-identical weights (checked; the script fails otherwise).

Not a test (the matrix does not run it): run it on purpose, under the heavy-job lock, and read
the JSON it writes:

    PTQ_DATA_DIR=../shared/data flock /tmp/ptq-heavy.lock python bench/perf/calib_speed.py \
        [--method gptq] [--blocks 6] [--rounds 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    from ptq.calib import calibration_set
    from ptq.engine import BlockRunner
    from ptq.matrix import Catalog
    from ptq.models.adapters import adapter_for
    from ptq.models.loading import load_model
    from ptq.models.placement import one_cpu_thread
    from ptq.pipeline import quantize
    from ptq.report.records import atomic_write, package_versions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None,
                        help="default: reports/perf/calib_speed_METHOD.json")
    args = parser.parse_args(argv)
    out = args.out or ROOT / "reports" / "perf" / f"calib_speed_{args.method}.json"

    device = torch.device("cpu")
    catalog = Catalog(ROOT / "bench")
    pipeline = catalog.pipeline(args.method)
    config, _ = catalog.cell_config(args.model, pipeline, "A", (), device.type)
    model, tokenizer, source = load_model(config.model)
    adapter = adapter_for(model)
    blocks = adapter.decoder_blocks(model)
    del blocks[args.blocks:]
    model.config.num_hidden_layers = args.blocks
    calibration = calibration_set(tokenizer, config.calib)
    shortcut = BlockRunner._last_linear_of

    def run(with_shortcut: bool) -> tuple[float, dict[str, torch.Tensor]]:
        BlockRunner._last_linear_of = shortcut if with_shortcut else lambda self, child: None
        quantized = copy.deepcopy(model)
        try:
            with one_cpu_thread(device):
                start = time.perf_counter()
                quantize(quantized, adapter, config, pipeline, calibration, device)
                seconds = time.perf_counter() - start
        finally:
            BlockRunner._last_linear_of = shortcut
        linears = adapter.quantizable_linears(quantized)
        return seconds, {name: linear.weight for name, linear in linears.items()}

    seconds: dict[str, list[float]] = {"shortcut": [], "no_shortcut": []}
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for _ in range(args.rounds):
        for name in seconds:
            elapsed, weights[name] = run(name == "shortcut")
            seconds[name].append(elapsed)
            print(f"{name}: {elapsed:.1f} s", flush=True)
    identical = all(torch.equal(weights["shortcut"][name], weight)
                    for name, weight in weights["no_shortcut"].items())
    best = {name: min(values) for name, values in seconds.items()}
    result = {
        "model": args.model, "method": args.method, "blocks": args.blocks, "rounds": args.rounds,
        "calibration": calibration.record, "torch_threads_while_quantizing": 1,
        "seconds_per_block": {name: s / args.blocks for name, s in best.items()},
        "speedup": best["no_shortcut"] / best["shortcut"],
        "all_seconds": seconds, "weights_identical": identical,
        "model_source": source.to_dict(), "packages": package_versions(),
    }
    atomic_write(out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds_per_block", "speedup", "weights_identical")}, indent=1))
    print(f"written: {out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
