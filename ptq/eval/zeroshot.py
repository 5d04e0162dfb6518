"""Zero-shot accuracy with lm-evaluation-harness on the model a cell holds in memory.

lm-eval's HFLM wraps the (quantized) model object itself: no save and reload. With a
``limit``, each task is scored on ``limit`` of its examples, the same ones for every cell (so
the FP baseline and a quantized model answer the same questions): by default a seeded random
sample (``sampling: random``), or the first ones (``sampling: first``), which is what
``lm_eval --limit N`` scores.
"""

from __future__ import annotations

import math
import os
import random
import time
from typing import Any, Callable
from unittest import mock

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from ptq.config import ZeroShotConfig
from ptq.eval.lm_tasks import build_tasks, task_origin

# lm-eval bootstraps the standard error of some aggregates (lambada's perplexity); the
# accuracies' standard errors are closed-form and do not depend on this.
BOOTSTRAP_ITERS = 1000


def sample_indices(total: int, limit: int | None, seed: int) -> list[int] | None:
    """A seeded random sample of `limit` document indices, in order; None when every document is scored."""
    if limit is None or limit >= total:
        return None
    return sorted(random.Random(seed).sample(range(total), limit))


def _make_lm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ZeroShotConfig,
             make_cache: Callable[[], Cache] | None) -> Any:
    from lm_eval.models.huggingface import HFLM

    class CellLM(HFLM):
        """HFLM whose forward reads keys/values through the cell's quantized KV cache, if it has one."""

        def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                        labels: torch.Tensor | None = None) -> torch.Tensor:
            if make_cache is None:
                return super()._model_call(inps, attn_mask, labels)
            with torch.no_grad():
                return self.model(inps, past_key_values=make_cache(), use_cache=True).logits

    return CellLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size, max_length=config.max_length)


def _task_metrics(results: dict[str, Any]) -> dict[str, float | None]:
    """lm-eval's "metric,filter" keys -> metric names; its "N/A" standard errors -> None."""
    metrics: dict[str, float | None] = {}
    for key, value in results.items():
        if "," not in key:  # "alias"
            continue
        metrics[key.split(",")[0]] = None if value == "N/A" else float(value)
    return metrics


def average_accuracy(tasks: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    """Mean `acc` over the tasks that have one; its stderr treats the tasks as independent."""
    scored = [task for task in tasks.values() if "acc" in task]
    if not scored:
        return None
    acc = sum(task["acc"] for task in scored) / len(scored)
    stderr = math.sqrt(sum((task["acc_stderr"] or 0.0) ** 2 for task in scored)) / len(scored)
    return {"acc": acc, "acc_stderr": stderr, "tasks": len(scored)}


def zero_shot(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: ZeroShotConfig,
              make_cache: Callable[[], Cache] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score the configured tasks; returns (metrics, data description) for the record.

    metrics: {"tasks": {task: {acc, acc_stderr[, acc_norm, acc_norm_stderr, ...], n, total, limit}},
              "average": {acc, acc_stderr, tasks}, "limit", "sampling", "seed", "seconds"}
    """
    from lm_eval.evaluator import evaluate

    tasks = build_tasks(config.tasks)
    totals = {name: len(task.eval_docs) for name, task in tasks.items()}
    selection: dict[str, Any]
    if config.sampling == "first":  # lm-eval's own `limit`: the first documents of each task
        selection = {"limit": config.limit}
    else:
        samples = {name: indices for name, total in totals.items()
                   if (indices := sample_indices(total, config.limit, config.seed)) is not None}
        selection = {"samples": samples or None}
    start = time.perf_counter()
    # Serial bootstrap: lm-eval would otherwise fork a process pool from a process holding the model.
    with mock.patch.dict(os.environ, {"DISABLE_MULTIPROC": "1"}):
        output = evaluate(_make_lm(model, tokenizer, config, make_cache), {"tasks": tasks}, **selection,
                          bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False)
    seconds = time.perf_counter() - start
    per_task = {}
    for name in config.tasks:
        per_task[name] = {**_task_metrics(output["results"][name]), "n": output["n-samples"][name]["effective"],
                          "total": totals[name], "limit": config.limit}
    metrics = {"tasks": per_task, "average": average_accuracy(per_task), "limit": config.limit,
               "sampling": config.sampling, "seed": config.seed, "seconds": seconds}
    data = {name: task_origin(name) for name in config.tasks}
    return metrics, data
