"""lm-evaluation-harness tasks, online under lm-eval's own names or offline from the local data dir.

Offline, a task is lm-eval's built-in task itself (its YAML as installed: prompts, choices,
targets, metrics, processing functions) with one change: its documents come from the local
files, converted to the rows of the hub dataset the built-in task reads. Nothing about the
prompts is restated here, so the offline numbers are lm-eval's numbers.

Which source is used follows ptq.data: with ``PTQ_DATA_DIR`` set, the local files (a missing
file is an error naming it); without it, the hub through lm-eval.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from ptq.data import DATA_DIR_ENV, data_dir, decode_text, json_lines, read_local
from ptq.errors import ConfigError, DataUnavailable

Row = dict[str, Any]


@dataclass(frozen=True)
class Local:
    """One local file, read and checked against the data folder's SHA256SUMS (ptq.data.read_local)."""

    path: Path
    text: str  # decoded as Python's text mode reads it


def _labels(labels: Local) -> list[str]:
    return [line.strip() for line in labels.text.split("\n") if line.strip()]


def _zip_labels(rows: list[Row], labels: Local) -> list[tuple[Row, str]]:
    values = _labels(labels)
    if len(rows) != len(values):
        raise DataUnavailable(f"{labels.path} has {len(values)} labels for {len(rows)} examples")
    return list(zip(rows, values))


# Each reader below turns the original files into the rows the hub dataset's own loading script
# yields (field names, types, label encodings); the script is named in each docstring.

def piqa_rows(examples: Local, labels: Local) -> list[Row]:
    """ybisk/piqa valid.jsonl + valid-labels.lst -> rows of baber/piqa (the parquet copy of the `piqa`
    script's output): {goal, sol1, sol2, label}, the label line cast by ClassLabel(["0", "1"]) to 0/1."""
    return [{"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"], "label": int(label)}
            for row, label in _zip_labels(json_lines(examples.text, examples.path), labels)]


def arc_rows(examples: Local) -> list[Row]:
    """ARC V1 JSON lines -> rows of allenai/ai2_arc: {id, question (the stem), choices: {text, label},
    answerKey}, labels and key copied as they are (letters, or digits "1".."4" in some rows)."""
    return [{"id": row["id"], "question": row["question"]["stem"],
             "choices": {"text": [c["text"] for c in row["question"]["choices"]],
                         "label": [c["label"] for c in row["question"]["choices"]]},
             "answerKey": row["answerKey"]}
            for row in json_lines(examples.text, examples.path)]


def boolq_rows(examples: Local) -> list[Row]:
    """google/boolq dev.jsonl -> rows of aps/super_glue boolq: {question, passage, idx, label}.

    The super_glue script reads SuperGLUE's BoolQ/val.jsonl: these questions in this order, each
    passage prefixed by its article's title ("{title} -- {passage}"), idx the line number, and the
    bool label cast by ClassLabel(["False", "True"]) to 0/1."""
    return [{"question": row["question"], "passage": f"{row['title']} -- {row['passage']}", "idx": idx,
             "label": int(row["answer"])}
            for idx, row in enumerate(json_lines(examples.text, examples.path))]


def winogrande_rows(examples: Local) -> list[Row]:
    """winogrande_1.1 dev.jsonl -> rows of allenai/winogrande: {sentence, option1, option2, answer}, the
    answer kept the string "1"/"2" of the file, as the `winogrande` script does."""
    return [{"sentence": row["sentence"], "option1": row["option1"], "option2": row["option2"],
             "answer": row["answer"]}
            for row in json_lines(examples.text, examples.path)]


def lambada_rows(examples: Local) -> list[Row]:
    """lambada_test.jsonl is the file of EleutherAI/lambada_openai (default config): rows {text}."""
    return [{"text": row["text"]} for row in json_lines(examples.text, examples.path)]


def _is_title(line: str) -> bool:
    """A level-1 heading (" = Title = ") by wikitext_document_level's test: "= = ="/"= =" read as
    "==="/"==", the stripped line starts with "= " and ends with " =" ("= = Section = =" does not)."""
    normalized = line.replace("= = =", "===").replace("= =", "==").strip()
    return normalized.startswith("= ") and normalized.endswith(" =")


def wikitext_rows(raw: Local) -> list[Row]:
    """wiki.test.raw -> rows of EleutherAI/wikitext_document_level: {page}, as its script builds them:
    the file split at "\\n", a page started at each title line, a page's lines joined with "\\n",
    pages holding only whitespace dropped; the last page is kept as it is."""
    pages: list[str] = []
    lines: list[str] = []
    for line in raw.text.split("\n"):
        if _is_title(line):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return [{"page": page} for page in pages]


@dataclass(frozen=True)
class OfflineTask:
    """Where one built-in task's evaluation split lives in the local data directory."""

    split: str  # the split the built-in task evaluates (its test split, else its validation split)
    files: tuple[str, ...]  # relative to the data dir, in the order `read` takes them
    read: Callable[..., list[Row]]  # the files (`Local`) -> rows of the hub dataset the built-in task reads


OFFLINE_TASKS: dict[str, OfflineTask] = {
    "piqa": OfflineTask("validation", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), piqa_rows),
    "arc_easy": OfflineTask("test", ("arc_easy/ARC-Easy-Test.jsonl",), arc_rows),
    "arc_challenge": OfflineTask("test", ("arc_challenge/ARC-Challenge-Test.jsonl",), arc_rows),
    "boolq": OfflineTask("validation", ("boolq/dev.jsonl",), boolq_rows),
    "winogrande": OfflineTask("validation", ("winogrande/dev.jsonl",), winogrande_rows),
    "lambada_openai": OfflineTask("test", ("lambada_openai/lambada_test.jsonl",), lambada_rows),
    "wikitext": OfflineTask("test", ("wikitext2/wiki.test.raw",), wikitext_rows),
}


@lru_cache(maxsize=1)
def task_manager() -> Any:
    """lm-eval's index of its built-in tasks (reading it takes seconds: once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def check_task_names(names: tuple[str, ...]) -> None:
    """Unknown names are an error listing the known ones (offline: the tasks defined here;
    online: lm-eval's, of which the closest to each unknown name)."""
    root = data_dir()
    if not names:
        return
    if root is not None:
        unknown = [name for name in names if name not in OFFLINE_TASKS]
        if unknown:
            raise ConfigError(f"unknown zero-shot task(s) {unknown}; known offline ({DATA_DIR_ENV}={root}): "
                              f"{', '.join(OFFLINE_TASKS)}")
        return
    known = set(task_manager().all_tasks)
    unknown = [name for name in names if name not in known]
    if unknown:
        close = sorted({match for name in unknown for match in difflib.get_close_matches(name, known, n=5)})
        raise ConfigError(f"unknown zero-shot task(s) {unknown}: not among lm-eval's {len(known)} tasks "
                          f"(closest: {', '.join(close) or 'none'}; all: `lm_eval ls tasks`); "
                          f"with {DATA_DIR_ENV} set, the offline tasks are: {', '.join(OFFLINE_TASKS)}")


def check_task_files(names: tuple[str, ...]) -> None:
    """Offline, every file of every task exists and is the file SHA256SUMS lists (an error names the
    first that is not)."""
    root = data_dir()
    if root is not None:
        for name in names:
            local_files(name, root)


def builtin_config(name: str) -> dict[str, Any]:
    """The built-in task's configuration as lm-eval reads it (includes merged, functions resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(task_manager().task_index[name].yaml_path, resolve_func=True)


def local_paths(name: str, root: Path) -> list[Path]:
    """The task's local files; a missing one is an error naming it."""
    paths = [root / file for file in OFFLINE_TASKS[name].files]
    for path in paths:
        if not path.is_file():
            raise DataUnavailable(f"zero-shot task {name}: missing file {path} "
                                  f"({DATA_DIR_ENV} must be laid out like shared/data, see its README)")
    return paths


def local_files(name: str, root: Path) -> list[Local]:
    """The task's local files, read and checked against SHA256SUMS (see ptq.data.read_local)."""
    return [Local(path, decode_text(read_local(root, relative), path))
            for relative, path in zip(OFFLINE_TASKS[name].files, local_paths(name, root))]


def offline_config(name: str, root: Path) -> dict[str, Any]:
    """The built-in task's configuration with its documents read from the local files."""
    offline = OFFLINE_TASKS[name]
    config = builtin_config(name)
    evaluated = config.get("test_split") or config.get("validation_split")
    if evaluated != offline.split:
        raise ConfigError(f"lm-eval's task {name} evaluates its {evaluated!r} split, but the local files "
                          f"{list(offline.files)} hold the {offline.split!r} split")
    rows = offline.read(*local_files(name, root))

    def dataset(**_metadata: Any) -> Any:  # lm-eval passes the task's metadata as keywords
        import datasets

        return datasets.DatasetDict({offline.split: datasets.Dataset.from_list(rows)})

    # Zero-shot needs only the evaluated split: no training split to draw few-shot examples from.
    return {**config, "custom_dataset": dataset, "training_split": None, "fewshot_split": None,
            "validation_split": offline.split if offline.split == "validation" else None,
            "test_split": offline.split if offline.split == "test" else None}


def task_origin(name: str) -> dict[str, Any]:
    """Where a task's documents come from, for the record (local files with their sha256)."""
    root = data_dir()
    if root is None:
        config = builtin_config(name)
        return {"origin": "hub", "dataset": config.get("dataset_path"), "name": config.get("dataset_name")}
    return {"origin": "local", "files": {str(path): hashlib.sha256(path.read_bytes()).hexdigest()
                                         for path in local_paths(name, root)}}


def build_tasks(names: tuple[str, ...]) -> dict[str, Any]:
    """lm-eval Task objects by name: offline definitions with PTQ_DATA_DIR set, else the built-in ones."""
    check_task_names(names)
    root = data_dir()
    specs: list[Any] = [offline_config(name, root) for name in names] if root is not None else list(names)
    return task_manager().load(specs)["tasks"]
