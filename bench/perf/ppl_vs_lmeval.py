"""Is a cell's perplexity evaluation at least as fast as lm-eval's rolling loglikelihood?

Scores the same WikiText-2 windows (the CPU profile's: the first W windows of S tokens of the
joined test split) twice in one process: with ptq.eval.perplexity, and with lm-eval's
HFLM.loglikelihood_rolling on the same model object, same batch size. lm-eval is handed the
token ids themselves, with max_length S and the first token as its prefix, so its rolling
windows are exactly our windows as model inputs (it also scores each window's last logit,
the next window's first token: S targets per window where we score S - 1).

Not a test (the matrix does not run it): run it on purpose and read the JSON it writes:

    PTQ_DATA_DIR=../shared/data python bench/perf/ppl_vs_lmeval.py [--windows 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]


def lmeval_rolling_nll(model: Any, tokenizer: Any, ids: torch.Tensor, seqlen: int, batch_size: int) -> float:
    """Total negative log-likelihood of ids[1:] (plus one token per window, see above) from HFLM."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    targets = ids[0, 1:].tolist()

    class TokenIdsLM(HFLM):
        """The request's text is a name for the token ids to score: no re-tokenization."""

        def tok_encode(self, string: str, **_: Any) -> list[int]:
            assert string == "windows"
            return targets

    lm = TokenIdsLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=seqlen,
                    prefix_token_id=int(ids[0, 0]))
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=("windows",), idx=0)
    (loglikelihood,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    return -loglikelihood


def main(argv: list[str] | None = None) -> int:
    from ptq.data import load_text, tokenize_once
    from ptq.eval.perplexity import perplexity, windows_of
    from ptq.matrix import Catalog
    from ptq.models.loading import load_model
    from ptq.report.records import atomic_write, package_versions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="each timed this many times, alternating; best kept")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "perf" / "ppl_vs_lmeval.json")
    args = parser.parse_args(argv)

    device = torch.device("cpu")
    catalog = Catalog(ROOT / "bench")
    config, _ = catalog.cell_config(args.model, catalog.pipeline("fp16"), "A", (), device.type)
    model, tokenizer, source = load_model(config.model)
    text = load_text("wikitext2", "test")
    windows = windows_of(tokenize_once(tokenizer, text), args.seqlen, args.windows)
    ids = windows.reshape(1, -1)  # exactly the windows, as one token stream
    with torch.inference_mode():  # warm-up: first-call costs belong to neither side
        model(windows[:1])

    ours_seconds, theirs_seconds = [], []
    for _ in range(args.repeats):
        ours = perplexity(model, ids, args.seqlen, None, args.batch_size)
        ours_seconds.append(ours.seconds)
        start = time.perf_counter()
        nll = lmeval_rolling_nll(model, tokenizer, ids, args.seqlen, args.batch_size)
        theirs_seconds.append(time.perf_counter() - start)
    theirs_tokens = ids.shape[1] - 1
    result = {
        "model": args.model, "windows": len(windows), "seqlen": args.seqlen, "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
        "ptq_seconds": min(ours_seconds), "lmeval_seconds": min(theirs_seconds),
        "lmeval_over_ptq_seconds": min(theirs_seconds) / min(ours_seconds),
        "ptq": {"ppl": ours.ppl, "tokens_scored": ours.tokens_scored, "all_seconds": ours_seconds},
        "lmeval": {"ppl": math.exp(nll / theirs_tokens), "tokens_scored": theirs_tokens, "all_seconds": theirs_seconds},
        "text_sha256": text.sha256, "model_source": source.to_dict(), "packages": package_versions(),
    }
    atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ptq_seconds", "lmeval_seconds", "lmeval_over_ptq_seconds")}))
    print(f"PPL: ptq {result['ptq']['ppl']:.3f}, lm-eval {result['lmeval']['ppl']:.3f}; written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
