"""Evaluation and calibration text: from a local data directory, else from the hub.

The local directory (``PTQ_DATA_DIR``, laid out as ``shared/data``) holds the original
files; the hub path goes through ``datasets`` under the usual names. Both produce the
same rows, so the sha256 of the text recorded for a cell is the same either way.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Callable

import torch
from transformers import PreTrainedTokenizerBase

from ptq import hub
from ptq.errors import DataUnavailable

DATA_DIR_ENV = "PTQ_DATA_DIR"
C4_EVAL_DOCUMENTS = 1100


@dataclass(frozen=True)
class Text:
    """One dataset split: its rows, and the single string they join into, with their origin."""

    dataset: str
    split: str
    rows: tuple[str, ...]
    joiner: str
    origin: str  # "local:<path>" or "hub"

    @cached_property
    def text(self) -> str:
        return self.joiner.join(self.rows)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def describe(self) -> dict[str, object]:
        return {"dataset": self.dataset, "split": self.split, "origin": self.origin, "rows": len(self.rows),
                "sha256": self.sha256, "chars": len(self.text)}


def _wikitext_rows_from_file(path: Path) -> list[str]:
    # The hub's wikitext builder yields each line with its "\n", and "" for blank lines.
    with path.open(encoding="utf-8") as handle:
        return [line if line.strip() else "" for line in handle]


def _c4_rows_from_file(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def _hub_rows(name: str, config: str | None, split: str, **kwargs: object) -> list[str]:
    import datasets  # imported lazily: only users online need it

    return list(datasets.load_dataset(name, config, split=split, **kwargs)["text"])


@dataclass(frozen=True)
class DatasetSplit:
    """How to get one split: its local file (relative to the data dir) and its hub equivalent."""

    local_file: str
    read_local: Callable[[Path], list[str]]
    read_hub: Callable[[], list[str]]
    joiner: str  # how rows become one text


SPLITS: dict[tuple[str, str], DatasetSplit] = {
    ("wikitext2", "test"): DatasetSplit(
        "wikitext2/wiki.test.raw", _wikitext_rows_from_file,
        lambda: _hub_rows("Salesforce/wikitext", "wikitext-2-raw-v1", "test"), "\n\n"),
    ("wikitext2", "validation"): DatasetSplit(
        "wikitext2/wiki.valid.raw", _wikitext_rows_from_file,
        lambda: _hub_rows("Salesforce/wikitext", "wikitext-2-raw-v1", "validation"), "\n\n"),
    # C4 train is what the GPTQ paper calibrates on; the local slice stands in for it offline.
    ("c4", "calibration"): DatasetSplit(
        "c4/c4_calibration.jsonl.gz", _c4_rows_from_file,
        lambda: _hub_rows("allenai/c4", None, "train",
                          data_files={"train": "en/c4-train.00000-of-01024.json.gz"}), "\n\n"),
    ("c4", "validation"): DatasetSplit(
        "c4/c4_validation_2k.jsonl.gz", _c4_rows_from_file,
        lambda: _hub_rows("allenai/c4", None, "validation",
                          data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}), "\n\n"),
    # C4 perplexity as the GPTQ paper scores it (datautils.get_c4): the first 1100 documents of
    # the first validation shard joined with a space (its 256-window cap: ptq.eval.suite).
    ("c4", "test"): DatasetSplit(
        "c4/c4_validation_2k.jsonl.gz", lambda path: _c4_rows_from_file(path)[:C4_EVAL_DOCUMENTS],
        lambda: _hub_rows("allenai/c4", None, "validation",
                          data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"})[:C4_EVAL_DOCUMENTS],
        " "),
}


def data_dir() -> Path | None:
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


@lru_cache(maxsize=8)
def load_text(dataset: str, split: str) -> Text:
    """The split as one text: local file if present, else the hub; else an error naming the file."""
    if (dataset, split) not in SPLITS:
        known = ", ".join(f"{d}/{s}" for d, s in SPLITS)
        raise DataUnavailable(f"unknown dataset split {dataset}/{split}; known: {known}")
    spec = SPLITS[(dataset, split)]
    root = data_dir()
    if root is not None and (root / spec.local_file).is_file():
        path = root / spec.local_file
        try:
            rows = spec.read_local(path)
        except UnicodeDecodeError as exc:
            raise DataUnavailable(f"{path} is not UTF-8 text at byte {exc.start} (a file cut inside a "
                                  "character, or not this dataset's file): restore the original") from None
        return Text(dataset, split, tuple(rows), spec.joiner, f"local:{path}")
    where = f"{root / spec.local_file}" if root else f"$PTQ_DATA_DIR/{spec.local_file}"
    missing = (f"{dataset}/{split} is not available: expected the file {where} "
               f"(set {DATA_DIR_ENV} to a folder laid out like shared/data, see its README)")
    if offline := hub.unreachable():
        raise DataUnavailable(f"{missing}, and the hub is not used: {offline}")
    try:
        rows = spec.read_hub()
    except Exception as exc:  # any hub failure (missing package, unknown split): one actionable message
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise DataUnavailable(f"{missing}, and loading it from the hub failed "
                              f"({type(exc).__name__}: {first_line})") from None
    return Text(dataset, split, tuple(rows), spec.joiner, "hub")


_TOKEN_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def tokenize_once(tokenizer: PreTrainedTokenizerBase, text: Text) -> torch.Tensor:
    """Token ids [1, N] of the whole text, computed once per (tokenizer, text) in this process."""
    key = (_tokenizer_key(tokenizer), text.sha256)
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = tokenizer(text.text, return_tensors="pt").input_ids
    return _TOKEN_CACHE[key]


@lru_cache(maxsize=8)  # tokenizers hash by identity: the vocabulary is hashed once per tokenizer
def _tokenizer_key(tokenizer: PreTrainedTokenizerBase) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return f"{tokenizer.name_or_path}:{hashlib.sha256(vocab.encode()).hexdigest()[:16]}"
