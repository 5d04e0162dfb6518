"""How much do simulated (fake-quantized) activations cost next to the float forward?

Times one forward of `--batch` windows of `--seqlen` WikiText-2 test tokens through: the float
model; Track B's W8A8 (int8 per-channel weights, int8 per-token dynamic inputs of every block
linear) with the generic quantizer path (`quantize(x).dequantize()`: codes materialized,
per-group parameters expanded element by element, the path fake_quantize took before it
broadcast) and with `fake_quantize` (the path the wrappers use); and FP8 W8A8 (E4M3 weights per
channel, E4M3 per-token inputs). Rounds alternate between the variants so a loaded machine
slows them alike; the best round of each is kept. The generic and fast paths must give
bit-identical logits (checked; the script fails otherwise).

Not a test (the matrix does not run it): run it on purpose, under the heavy-job lock, and read
the JSON it writes:

    PTQ_DATA_DIR=../shared/data flock /tmp/ptq-heavy.lock python bench/perf/act_quant_speed.py \
        [--threads 1] [--batch 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    from ptq.data import load_text, tokenize_once
    from ptq.eval.perplexity import windows_of
    from ptq.matrix import Catalog
    from ptq.models.adapters import adapter_for
    from ptq.models.loading import load_model
    from ptq.quant import ActSpec, QuantSpec, fake_quantize, quantize
    from ptq.report.records import atomic_write, package_versions
    from ptq.transforms import ActQuantizer, ActQuantLinear, quantize_inputs

    class GenericActQuantizer(ActQuantizer):
        """The same dynamic quantizer through the generic codes path."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return quantize(x, self.spec).dequantize()

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (a cell under `-n 2` on 2 cores has 1); default: torch's")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "perf" / "act_quant_speed.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cpu")
    catalog = Catalog(ROOT / "bench")
    config, _ = catalog.cell_config(args.model, catalog.pipeline("rtn"), "B", (), device.type)
    assert config.act is not None and config.weight is not None
    model, tokenizer, source = load_model(config.model)
    model.to(device)
    text = load_text("wikitext2", "test")
    ids = windows_of(tokenize_once(tokenizer, text), args.seqlen, args.batch)

    def w8a8(weight: QuantSpec, act: ActSpec) -> nn.Module:
        quantized = copy.deepcopy(model)
        linears = adapter_for(quantized).quantizable_linears(quantized)
        with torch.no_grad():
            for linear in linears.values():
                linear.weight.copy_(fake_quantize(linear.weight, weight))
        quantize_inputs(quantized, list(linears), act)
        return quantized

    int8 = w8a8(config.weight, config.act)
    fp8 = w8a8(QuantSpec(8, symmetric=True, granularity="channel", format="fp8_e4m3"),
               ActSpec(8, symmetric=True, granularity="token", format="fp8_e4m3"))
    wrappers = [m for m in int8.modules() if isinstance(m, ActQuantLinear)]
    fast_quantizers = [w.input_quant for w in wrappers]
    generic_quantizers = [GenericActQuantizer(config.act) for _ in wrappers]

    def use(quantizers: list[ActQuantizer]) -> nn.Module:
        for wrapper, quantizer in zip(wrappers, quantizers):
            wrapper.input_quant = quantizer
        return int8

    variants = {"float": lambda: model, "w8a8_int8_generic": lambda: use(generic_quantizers),
                "w8a8_int8_fast": lambda: use(fast_quantizers), "w8a8_fp8_fast": lambda: fp8}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    logits: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name, build in variants.items():  # warm-up: first-call costs belong to no variant
            logits[name] = build()(ids).logits
        for _ in range(args.rounds):
            for name, build in variants.items():
                variant = build()
                start = time.perf_counter()
                variant(ids)
                seconds[name].append(time.perf_counter() - start)

    identical = torch.equal(logits["w8a8_int8_generic"], logits["w8a8_int8_fast"])
    tokens = ids.numel()
    best = {name: min(values) for name, values in seconds.items()}
    result = {
        "model": args.model, "seqlen": args.seqlen, "batch": args.batch, "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "weight": dataclasses.asdict(config.weight), "act": dataclasses.asdict(config.act),
        "tokens_per_second": {name: tokens / s for name, s in best.items()},
        "over_float_speed": {name: best["float"] / s for name, s in best.items()},
        "all_seconds": seconds,
        "generic_and_fast_logits_identical": identical,
        "max_abs_logit_change_vs_float": {name: (logits[name] - logits["float"]).abs().max().item()
                                          for name in variants if name != "float"},
        "text_sha256": text.sha256, "model_source": source.to_dict(), "packages": package_versions(),
    }
    atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("tokens_per_second", "over_float_speed",
                                             "generic_and_fast_logits_identical")}, indent=1))
    print(f"written: {args.out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
