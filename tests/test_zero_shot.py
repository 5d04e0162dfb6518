"""Zero-shot tasks (ptq.eval.lm_tasks, ptq.eval.zeroshot): the offline definitions render
exactly the requests of lm-eval's built-in tasks, the metrics' schema on a tiny random
Llama, the accuracy gate's standard-error logic, and the usage errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ptq.config import (CellConfig, EvalConfig, GateConfig, MethodConfig, ModelConfig, SourceConfig, TrackConfig,
                        ZeroShotConfig)
from ptq.data import load_text
from ptq.errors import ConfigError, DataUnavailable
from ptq.eval.lm_tasks import (OFFLINE_TASKS, Local, build_tasks, check_task_files, check_task_names,
                               local_files, task_manager, wikitext_rows)
from ptq.eval import zeroshot
from ptq.eval.zeroshot import sample_indices, zero_shot
from ptq.gates import accuracy_drop_gate, zero_shot_gates
from ptq.matrix import Catalog, Selection
from ptq.dependencies import fingerprint, settings
from ptq.engine import QuantResult
from ptq.eval.suite import evaluate
from ptq.report.leaderboard import leaderboard_rows, render_table

ROOT = Path(__file__).resolve().parents[1]


def jsonl(*rows: dict[str, Any]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


@dataclass(frozen=True)
class Case:
    """One task: its local files (laid out as the originals in shared/data) and what the hub dataset
    lm-eval reads holds for the same data: the examples its loading script yields, encoded by the
    features the script declares (ClassLabel turns label strings into ints)."""

    files: dict[str, str]  # path relative to the data dir -> content
    hub: tuple[str, str | None]  # the dataset lm-eval 0.4.13's built-in task loads: (path, config)
    features: datasets.Features
    yielded: list[dict[str, Any]]  # the script's `_generate_examples` output, before encoding

    def hub_rows(self) -> datasets.Dataset:
        return datasets.Dataset.from_list(self.yielded, features=self.features)


TEXT = datasets.Value("string")
ARC_FEATURES = datasets.Features({"id": TEXT, "question": TEXT, "answerKey": TEXT,
                                  "choices": datasets.Sequence({"text": TEXT, "label": TEXT})})
SURGEON = "Sarah was a much better surgeon than Maria so _ always got the {} cases."
ETHANOL = ("All biomass goes through at least some of these steps: it needs to be grown, collected, dried, "
           "fermented, distilled, and burned.")
HOUSE_TAX = "Property tax or 'house tax' is a local tax on buildings, along with appurtenant land."
WIKI_RAW = (" \n = Alpha = \n \n Alpha is a @-@ letter . \n \n = = History = = \n \n"
            " It was used ( long ago ) . \n \n = Beta = \n \n Beta 's page , with 1 @,@ 000 words . \n \n")


def arc_v1(id_: str, stem: str, choices: list[tuple[str, str]], key: str) -> dict[str, Any]:
    """One line of ARC-V1-Feb2018's JSON lines: choices as (label, text)."""
    return {"id": id_, "question": {"stem": stem, "choices": [{"text": t, "label": l} for l, t in choices]},
            "answerKey": key}


# Each layout below is written from the dataset's own loading script (and card), never from
# ptq.eval.lm_tasks; the source is named above each case.
CASES: dict[str, Case] = {
    # https://github.com/huggingface/datasets/blob/2.0.0/datasets/piqa/piqa.py (baber/piqa is its
    # parquet copy): valid.jsonl {goal, sol1, sol2} zipped with the lines of valid-labels.lst,
    # label = ClassLabel(names=["0", "1"]).
    "piqa": Case(
        {"piqa/valid.jsonl": jsonl({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid"},
                                   {"goal": "Dry hair", "sol1": "use water", "sol2": "use a towel"},
                                   {"goal": "Cut bread", "sol1": "use a knife", "sol2": "use a spoon"}),
         "piqa/valid-labels.lst": "0\n1\n0\n"},
        ("baber/piqa", None),
        datasets.Features({"goal": TEXT, "sol1": TEXT, "sol2": TEXT,
                           "label": datasets.ClassLabel(names=["0", "1"])}),
        [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": "0"},
         {"goal": "Dry hair", "sol1": "use water", "sol2": "use a towel", "label": "1"},
         {"goal": "Cut bread", "sol1": "use a knife", "sol2": "use a spoon", "label": "0"}]),
    # https://github.com/huggingface/datasets/blob/2.0.0/datasets/ai2_arc/ai2_arc.py: ARC-V1-Feb2018
    # {id, question: {stem, choices: [{text, label}]}, answerKey} -> {id, answerKey, question: the stem,
    # choices: {text: [...], label: [...]}}, labels and key as in the file: letters, or "1".."4".
    "arc_easy": Case(
        {"arc_easy/ARC-Easy-Test.jsonl": jsonl(
            arc_v1("Mercury_1", "Which gas do plants take in?",
                   [("A", "oxygen"), ("B", "carbon dioxide"), ("C", "helium"), ("D", "neon")], "B"),
            arc_v1("NYSEDREGENTS_2015_8_28", "All living and nonliving material is composed of",
                   [("1", "air"), ("2", "elements"), ("3", "water"), ("4", "soil")], "2"))},
        ("allenai/ai2_arc", "ARC-Easy"),
        ARC_FEATURES,
        [{"id": "Mercury_1", "answerKey": "B", "question": "Which gas do plants take in?",
          "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]}},
         {"id": "NYSEDREGENTS_2015_8_28", "answerKey": "2",
          "question": "All living and nonliving material is composed of",
          "choices": {"text": ["air", "elements", "water", "soil"], "label": ["1", "2", "3", "4"]}}]),
    # Same script; a digit-keyed row whose key is the last choice, and a five-choice row (label E).
    "arc_challenge": Case(
        {"arc_challenge/ARC-Challenge-Test.jsonl": jsonl(
            arc_v1("NYSEDREGENTS_2012_4_9", "Which object conducts electricity?",
                   [("1", "a glass cup"), ("2", "a rubber band"), ("3", "a wooden spoon"),
                    ("4", "a steel nail")], "4"),
            arc_v1("Mercury_7", "What melts ice fastest?",
                   [("A", "heat"), ("B", "cold"), ("C", "dark"), ("D", "wind"), ("E", "shade")], "A"))},
        ("allenai/ai2_arc", "ARC-Challenge"),
        ARC_FEATURES,
        [{"id": "NYSEDREGENTS_2012_4_9", "answerKey": "4", "question": "Which object conducts electricity?",
          "choices": {"text": ["a glass cup", "a rubber band", "a wooden spoon", "a steel nail"],
                      "label": ["1", "2", "3", "4"]}},
         {"id": "Mercury_7", "answerKey": "A", "question": "What melts ice fastest?",
          "choices": {"text": ["heat", "cold", "dark", "wind", "shade"],
                      "label": ["A", "B", "C", "D", "E"]}}]),
    # https://github.com/huggingface/datasets/blob/2.0.0/datasets/super_glue/super_glue.py (aps/super_glue is
    # its parquet copy) reads SuperGLUE's BoolQ/val.jsonl, whose rows (the script's dummy data: the split's
    # first two) carry the passage as "{title} -- {passage}", an int idx and a bool label, cast to
    # "False"/"True" for ClassLabel(names=["False", "True"]). The local file is google/boolq's dev.jsonl,
    # {question, title, answer, passage} (passages shortened here to their first sentence).
    "boolq": Case(
        {"boolq/dev.jsonl": jsonl(
            {"question": "does ethanol take more energy make that produces", "title": "Ethanol fuel",
             "answer": False, "passage": ETHANOL},
            {"question": "is house tax and property tax are same", "title": "Property tax", "answer": True,
             "passage": HOUSE_TAX})},
        ("aps/super_glue", "boolq"),
        datasets.Features({"question": TEXT, "passage": TEXT, "idx": datasets.Value("int32"),
                           "label": datasets.ClassLabel(names=["False", "True"])}),
        [{"question": "does ethanol take more energy make that produces",
          "passage": f"Ethanol fuel -- {ETHANOL}", "idx": 0, "label": "False"},
         {"question": "is house tax and property tax are same", "passage": f"Property tax -- {HOUSE_TAX}",
          "idx": 1, "label": "True"}]),
    # https://github.com/huggingface/datasets/blob/2.0.0/datasets/winogrande/winogrande.py: dev.jsonl
    # {qID, sentence, option1, option2, answer} -> {sentence, option1, option2, answer}, answer the
    # string "1"/"2" (dev-labels.lst repeats it; the script does not read it).
    "winogrande": Case(
        {"winogrande/dev.jsonl": jsonl(
            {"qID": "3FCO-2", "sentence": SURGEON.format("easier"), "option1": "Sarah", "option2": "Maria",
             "answer": "2"},
            {"qID": "3FCO-1", "sentence": SURGEON.format("harder"), "option1": "Sarah", "option2": "Maria",
             "answer": "1"}),
         "winogrande/dev-labels.lst": "2\n1\n"},
        ("allenai/winogrande", "winogrande_xl"),
        datasets.Features({"sentence": TEXT, "option1": TEXT, "option2": TEXT, "answer": TEXT}),
        [{"sentence": SURGEON.format("easier"), "option1": "Sarah", "option2": "Maria", "answer": "2"},
         {"sentence": SURGEON.format("harder"), "option1": "Sarah", "option2": "Maria", "answer": "1"}]),
    # The lambada_openai script of lm-evaluation-harness v0.3.0 (lm_eval/datasets/lambada_openai, config
    # "default": lambada_test.jsonl, sha256 4aa8d02c...) yields {"text": row["text"]} per line.
    "lambada_openai": Case(
        {"lambada_openai/lambada_test.jsonl": jsonl({"text": "She opened the door and saw her dog"},
                                                    {"text": "He drank a glass of cold water"})},
        ("EleutherAI/lambada_openai", "default"),
        datasets.Features({"text": TEXT}),
        [{"text": "She opened the door and saw her dog"}, {"text": "He drank a glass of cold water"}]),
    # https://huggingface.co/datasets/EleutherAI/wikitext_document_level/blob/main/wikitext_document_level.py
    # (now .py.backup): the raw file split at "\n", a page started at each level-1 title, a page's lines
    # joined with "\n", pages of only whitespace dropped (here the blank line before the first title).
    "wikitext": Case(
        {"wikitext2/wiki.test.raw": WIKI_RAW},
        ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1"),
        datasets.Features({"page": TEXT}),
        [{"page": " = Alpha = \n \n Alpha is a @-@ letter . \n \n = = History = = \n \n"
                  " It was used ( long ago ) . \n "},
         {"page": " = Beta = \n \n Beta 's page , with 1 @,@ 000 words . \n \n"}]),
}


def write_data(root: Path, tasks: list[str]) -> Path:
    for task in tasks:
        for relative, text in CASES[task].files.items():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_text(text)
    return root


@pytest.fixture
def real_data() -> Path:
    """The shared data folder ($PTQ_DATA_DIR, else ../shared/data); the test is skipped without it."""
    root = Path(os.environ.get("PTQ_DATA_DIR") or ROOT.parent / "shared" / "data")
    if not all((root / file).is_file() for task in OFFLINE_TASKS.values() for file in task.files):
        pytest.skip(f"no offline data in {root}")
    return root


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = write_data(tmp_path / "data", list(CASES))
    monkeypatch.setenv("PTQ_DATA_DIR", str(root))
    return root


def requests(task: Any) -> list[tuple]:
    task.build_all_requests()
    return [(i.request_type, i.doc_id, i.idx, i.arguments) for i in task.instances]


def test_the_seven_offline_tasks_are_defined() -> None:
    assert set(OFFLINE_TASKS) == {"piqa", "arc_easy", "arc_challenge", "boolq", "winogrande", "lambada_openai",
                                  "wikitext"} == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_offline_task_renders_the_builtin_requests(name: str, offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ours = build_tasks((name,))[name]
    # The built-in task, its documents served from the hub rows above instead of the hub.
    asked = []
    hub_rows = CASES[name].hub_rows()

    def load_dataset(path: str, name: str | None = None, **_: Any) -> datasets.DatasetDict:
        asked.append((path, name))
        return datasets.DatasetDict({split: hub_rows for split in ("train", "validation", "test")})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    builtin = task_manager().load([name])["tasks"][name]
    assert asked == [CASES[name].hub]
    assert [dict(doc) for doc in ours.eval_docs] == [dict(doc) for doc in builtin.eval_docs] == list(hub_rows)
    assert requests(ours) == requests(builtin) and len(ours.instances) >= len(hub_rows)
    assert [ours.doc_to_target(doc) for doc in ours.eval_docs] == [builtin.doc_to_target(doc)
                                                                   for doc in builtin.eval_docs]
    assert ours.config.metric_list == builtin.config.metric_list
    assert ours.OUTPUT_TYPE == builtin.OUTPUT_TYPE


def document_level_pages(raw: str) -> list[str]:
    """EleutherAI/wikitext_document_level's pages (source in CASES["wikitext"]), restated by slicing: a
    level-1 title is a line that, with "= = =" read as "===" and then "= =" as "==", stripped, starts
    with "= " and ends with " ="; the lines from one title to the next are one page, joined with "\n";
    the lines before the first title are dropped when they hold only whitespace; the last page stays."""
    lines = raw.split("\n")

    def title(line: str) -> bool:
        normalized = line.replace("= = =", "===").replace("= =", "==").strip()
        return normalized[:2] == "= " and normalized[-2:] == " ="

    bounds = [0, *(i for i, line in enumerate(lines) if title(line)), len(lines)]
    chunks = ["\n".join(lines[a:b]) for a, b in zip(bounds, bounds[1:])]
    return [chunk for chunk in chunks[:-1] if chunk.strip()] + chunks[-1:]


@pytest.mark.parametrize("raw", [
    WIKI_RAW,
    " = A = \n a . \n",  # no blank line before the first title
    " \n \n = A = \n = B = \n b . \n",  # whitespace before the first title; a title right after a title
    " = A = \n = = Section = = \n = = = Sub = = = \n x \n = = = = Deep = = = = \n y",  # headings: not titles
    " = 2 + 2 = 4 = \n z \n =  Spaced  =  \n w \n",  # '=' inside a title; spaces around it
    " no title at all \n \n",  # one page: the last is kept whatever it holds
    "",
])
def test_wikitext_pages_follow_the_document_level_script(raw: str, tmp_path: Path) -> None:
    path = tmp_path / "wiki.test.raw"
    path.write_text(raw)
    assert [row["page"] for row in wikitext_rows(Local(path, raw))] == document_level_pages(raw)


def test_offline_rows_of_the_real_files(real_data: Path) -> None:
    """The local files give the hub's rows: sizes from the dataset cards (super_glue boolq validation 3270,
    ai2_arc test 2376 / 1172, piqa validation 1838, winogrande_xl validation 1267, lambada_openai test
    5153, wikitext_document_level wikitext-2-raw-v1 test 62), BoolQ's first rows as SuperGLUE's
    BoolQ/val.jsonl has them, the WikiText pages as the document-level script cuts them."""
    rows = {name: task.read(*local_files(name, real_data)) for name, task in OFFLINE_TASKS.items()}
    assert {name: len(value) for name, value in rows.items()} == {
        "piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "winogrande": 1267,
        "lambada_openai": 5153, "wikitext": 62}
    first, second = rows["boolq"][:2]
    assert first["passage"].startswith("Ethanol fuel -- All biomass goes through at least some of these")
    assert (first["idx"], first["label"], second["idx"], second["label"]) == (0, 0, 1, 1)
    assert second["passage"].startswith("Property tax -- Property tax or 'house tax' is a local tax")
    for name in ("arc_easy", "arc_challenge"):  # digit keys are kept and name one of the choices
        assert all(row["answerKey"] in row["choices"]["label"] for row in rows[name])
        assert any(row["answerKey"].isdigit() for row in rows[name])
    raw = (real_data / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    pages = [row["page"] for row in rows["wikitext"]]
    assert pages == document_level_pages(raw)
    assert pages[0].startswith(" = Robert Boulter = \n") and "\n".join(pages) == raw.removeprefix(" \n")


def test_missing_file_is_an_error_naming_it(offline: Path) -> None:
    (offline / "piqa" / "valid-labels.lst").unlink()
    with pytest.raises(DataUnavailable, match=r"piqa: missing file .*piqa/valid-labels\.lst"):
        check_task_files(("winogrande", "piqa"))
    with pytest.raises(DataUnavailable, match=r"piqa/valid-labels\.lst"):
        build_tasks(("piqa",))


def test_labels_that_do_not_match_the_examples_are_an_error(offline: Path) -> None:
    (offline / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(DataUnavailable, match=r"valid-labels\.lst has 2 labels for 3 examples"):
        build_tasks(("piqa",))


def test_unknown_task_offline_lists_the_known_tasks(offline: Path) -> None:
    known = r"piqa, arc_easy, arc_challenge, boolq, winogrande, lambada_openai, wikitext"
    unknown = r"unknown zero-shot task\(s\) \['hellaswag'\]; known offline .*"
    with pytest.raises(ConfigError, match=unknown + known):
        check_task_names(("piqa", "hellaswag"))


def test_unknown_task_online_names_the_closest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PTQ_DATA_DIR", raising=False)
    check_task_names(("piqa", "arc_easy", "hellaswag"))  # lm-eval's own names
    with pytest.raises(ConfigError, match=r"unknown zero-shot task\(s\) \['arc_eazy'\].*closest: .*arc_easy"):
        check_task_names(("arc_eazy",))


def test_seeded_sample() -> None:
    first = sample_indices(100, 10, seed=0)
    assert first == sample_indices(100, 10, seed=0) == sorted(set(first)) and len(first) == 10
    assert first != sample_indices(100, 10, seed=1)
    assert sample_indices(100, None, seed=0) is None and sample_indices(10, 10, seed=0) is None


@pytest.fixture(scope="module")
def tiny_llama() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    texts = [text for case in CASES.values() for text in case.files.values()]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=128)).eval()
    return model, PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                          eos_token="</s>")


def test_zero_shot_metrics_schema(offline: Path, tiny_llama: tuple) -> None:
    model, tokenizer = tiny_llama
    config = ZeroShotConfig(tasks=("piqa", "boolq", "lambada_openai"), limit=2, seed=0, batch_size=2, max_length=64)
    metrics, data = zero_shot(model, tokenizer, config)
    assert set(metrics) == {"tasks", "average", "limit", "sampling", "seed", "seconds"}
    assert metrics["limit"] == 2 and metrics["sampling"] == "random" and metrics["seed"] == 0
    tasks = metrics["tasks"]
    assert list(tasks) == ["piqa", "boolq", "lambada_openai"]
    assert set(tasks["piqa"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "total", "limit"}
    assert set(tasks["boolq"]) == {"acc", "acc_stderr", "n", "total", "limit"}
    assert set(tasks["lambada_openai"]) == {"acc", "acc_stderr", "perplexity", "perplexity_stderr", "n", "total",
                                            "limit"}
    assert [(t["n"], t["total"], t["limit"]) for t in tasks.values()] == [(2, 3, 2), (2, 2, 2), (2, 2, 2)]
    for task in tasks.values():
        assert task["acc"] in (0.0, 0.5, 1.0)  # two examples each
    average = metrics["average"]
    assert average["tasks"] == 3
    assert average["acc"] == pytest.approx(sum(t["acc"] for t in tasks.values()) / 3)
    assert average["acc_stderr"] == pytest.approx(sum(t["acc_stderr"] ** 2 for t in tasks.values()) ** 0.5 / 3)
    assert data["piqa"]["origin"] == "local"
    assert sorted(Path(p).name for p in data["piqa"]["files"]) == ["valid-labels.lst", "valid.jsonl"]
    # the same sample again: the same numbers
    again, _ = zero_shot(model, tokenizer, config)
    assert again["tasks"] == tasks


def test_first_sampling_scores_the_first_documents_as_lm_eval_limit_does(
        offline: Path, tiny_llama: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sampling: first` scores documents 0..limit-1 of each task (lm-eval's `--limit`), and says so."""
    model, tokenizer = tiny_llama
    config = ZeroShotConfig(tasks=("piqa", "arc_easy"), limit=2, sampling="first", batch_size=2,
                            max_length=64)
    first, _ = zero_shot(model, tokenizer, config)
    assert first["sampling"] == "first" and [t["n"] for t in first["tasks"].values()] == [2, 2]
    # the same scores as the random path told to pick documents 0 and 1
    monkeypatch.setattr(zeroshot, "sample_indices", lambda total, limit, seed: list(range(limit)))
    chosen, _ = zero_shot(model, tokenizer, dataclasses.replace(config, sampling="random"))
    assert chosen["tasks"] == first["tasks"]


def test_accuracy_gate_is_aware_of_the_standard_error() -> None:
    gates = GateConfig(max_acc_drop=2.0, acc_drop_stderrs=2.0)
    within = accuracy_drop_gate("m", 0.49, 0.01, 0.50, 0.01, gates)  # 1 point
    assert within.passed and within.measured == pytest.approx(1.0) and "within the budget" in within.detail
    noisy = accuracy_drop_gate("m", 0.45, 0.03, 0.50, 0.03, gates)  # 5 points < 2 * 4.24
    assert noisy.passed and "within the noise" in noisy.detail
    real = accuracy_drop_gate("m", 0.45, 0.01, 0.50, 0.01, gates)  # 5 points > 2 * 1.41
    assert real.passed is False and "over the budget and the noise" in real.detail
    assert accuracy_drop_gate("m", 0.45, 0.01, 0.50, 0.01, dataclasses.replace(gates, acc_drop_stderrs=4.0)).passed
    better = accuracy_drop_gate("m", 0.60, 0.0, 0.50, 0.0, gates)
    assert better.passed and better.measured == pytest.approx(-10.0)


def test_zero_shot_gates_cover_each_accuracy_and_the_average() -> None:
    def result(acc: dict[str, float]) -> dict[str, Any]:
        tasks = {name: {"acc": value, "acc_stderr": 0.001, "n": 1000} for name, value in acc.items()}
        tasks["wikitext"] = {"word_perplexity": 20.0, "n": 62}
        return {"tasks": tasks, "average": {"acc": sum(acc.values()) / len(acc), "acc_stderr": 0.001}}

    fp = result({"piqa": 0.60, "boolq": 0.60})
    ours = result({"piqa": 0.59, "boolq": 0.50})
    gates = zero_shot_gates(ours, fp, GateConfig(max_acc_drop=3.0))
    assert [(g.metric, g.passed) for g in gates] == [
        ("zero_shot.piqa.acc", True), ("zero_shot.boolq.acc", False), ("zero_shot.average.acc", False)]
    assert zero_shot_gates(ours, fp, GateConfig()) == []


def test_fingerprint_ignores_zero_shot_settings_without_tasks() -> None:
    config = Catalog(ROOT / "bench").cells(Selection(), "cpu")[0].config
    assert config.zero_shot.tasks == ()
    unused = dataclasses.replace(config, zero_shot=ZeroShotConfig(limit=5, batch_size=3))
    assert fingerprint(unused, "cpu") == fingerprint(config, "cpu")
    used = dataclasses.replace(config, zero_shot=ZeroShotConfig(tasks=("piqa",)))
    assert fingerprint(used, "cpu") != fingerprint(config, "cpu")
    # the sampling rule came later: its default keeps the fingerprints it had, `first` is another config
    assert "sampling" not in settings(used)["zero_shot"]
    first = dataclasses.replace(used, zero_shot=ZeroShotConfig(tasks=("piqa",), sampling="first"))
    assert fingerprint(first, "cpu") != fingerprint(used, "cpu")


def test_zero_shot_experiment_and_device_profiles() -> None:
    catalog = Catalog(ROOT / "bench")
    selection = Selection(experiments=(catalog.experiments["zero-shot"],))
    for device, limit in (("cpu", 100), ("cuda", None)):
        cells = catalog.cells(selection, device)
        assert [cell.id for cell in cells] == ["smollm2-135m-fp16-A-zero-shot", "smollm2-135m-rtn-A-zero-shot"]
        for cell in cells:
            assert cell.config.zero_shot.tasks == ("piqa", "arc_easy", "arc_challenge", "boolq", "winogrande",
                                                   "lambada_openai")
            assert cell.config.zero_shot.limit == limit


@pytest.mark.parametrize("text, message", [
    ("zero_shot: {tasks: [piqa, piqa]}", "zero_shot: tasks lists a task twice"),
    ("zero_shot: {limit: 0}", "zero_shot: limit must be at least 1"),
    ("zero_shot: {sampling: last}", "zero_shot.sampling must be 'random' \\| 'first', got 'last'"),
])
def test_invalid_zero_shot_settings(tmp_path: Path, text: str, message: str) -> None:
    bench = Path(shutil.copytree(ROOT / "bench", tmp_path / "bench"))
    (bench / "experiments" / "bad.yaml").write_text(
        f"experiment: {{name: bad, models: [smollm2-135m], methods: [fp16], tracks: [A]}}\n{text}\n")
    catalog = Catalog(bench)
    with pytest.raises(ConfigError, match=rf"bad\.yaml:2: {message}"):
        catalog.cells(Selection(experiments=(bench / "experiments" / "bad.yaml",)), "cpu")


def test_leaderboard_has_accuracy_columns_only_when_measured() -> None:
    def record(cell: str, zero_shot: dict[str, Any] | None) -> dict[str, Any]:
        metrics = {"ppl": {"wikitext2": 30.0}, **({"zero_shot": zero_shot} if zero_shot else {})}
        return {"cell_id": cell, "config_fingerprint": None, "model": "m", "method": cell, "track": "A",
                "experiment": None, "status": "passed", "reason": None, "metrics": metrics}

    zero_shot = {"tasks": {"piqa": {"acc": 0.625}, "wikitext": {"word_perplexity": 20.0}},
                 "average": {"acc": 0.625}, "limit": 200}
    table = render_table(leaderboard_rows([record("a", zero_shot), record("b", None)]))
    header, _, first, second = table.splitlines()
    assert "| acc piqa " in header and "| acc avg " in header and "acc wikitext" not in header
    assert first.count("62.5") == 2 and "62.5" not in second
    assert "acc" not in render_table(leaderboard_rows([record("b", None)])).splitlines()[0]


def run_bench(bench: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
    # not the outer session's xdist variables: the run is its own session
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env = {**inherited, "PTQ_DATA_DIR": str(data), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "pytest", "bench", "-p", "no:cacheprovider", "--bench-dir", str(bench),
                           "--reports-dir", str(bench.parent / "reports"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_bench_usage_errors_before_any_model_loads(tmp_path: Path) -> None:
    bench = Path(shutil.copytree(ROOT / "bench", tmp_path / "bench"))
    data = write_data(tmp_path / "data", ["wikitext", "piqa"])
    (bench / "experiments" / "typo.yaml").write_text(
        "experiment: {name: typo, models: [smollm2-135m], methods: [fp16], tracks: [A]}\n"
        "zero_shot: {tasks: [piqa, hellaswag]}\n")
    unknown = run_bench(bench, data, "--experiment", "typo", "--collect-only", "-q")
    assert unknown.returncode == 4, unknown.stdout + unknown.stderr
    assert "unknown zero-shot task(s) ['hellaswag']" in unknown.stderr and "lambada_openai" in unknown.stderr

    missing = run_bench(bench, data, "--experiment", "zero-shot")
    assert missing.returncode == 4, missing.stdout + missing.stderr
    assert f"zero-shot task arc_easy: missing file {data / 'arc_easy' / 'ARC-Easy-Test.jsonl'}" in missing.stderr
    assert not (bench.parent / "reports").exists()  # nothing ran


def test_evaluate_adds_zero_shot_to_the_metrics_when_configured(offline: Path, tiny_llama: tuple) -> None:
    model, tokenizer = tiny_llama
    cell = CellConfig(ModelConfig("tiny", SourceConfig("local", path="unused"), family="llama"),
                      MethodConfig("fp16"),
                      TrackConfig("A"), eval=EvalConfig(seqlen=16, max_windows=2, batch_size=2))
    load_text.cache_clear()  # wikitext2 from this test's data dir
    try:
        tasks = ZeroShotConfig(tasks=("boolq",), limit=1, batch_size=2, max_length=64)
        cpu = torch.device("cpu")
        with_tasks = evaluate(QuantResult(model), tokenizer, cpu, dataclasses.replace(cell, zero_shot=tasks))
        without = evaluate(QuantResult(model), tokenizer, cpu, cell)
    finally:
        load_text.cache_clear()
    assert set(with_tasks.metrics()) == {"ppl", "eval", "eval_tokens_per_s", "window_nll", "zero_shot"}
    assert with_tasks.metrics()["zero_shot"]["tasks"]["boolq"]["n"] == 1
    assert with_tasks.data["zero_shot"]["boolq"]["origin"] == "local"
    assert set(without.metrics()) == {"ppl", "eval", "eval_tokens_per_s", "window_nll"}
    assert "zero_shot" not in without.data
    assert with_tasks.metrics()["ppl"] == without.metrics()["ppl"]


def test_a_cells_kv_cache_is_used_and_a_float_cache_changes_nothing(offline: Path, tiny_llama: tuple) -> None:
    model, tokenizer = tiny_llama
    config = ZeroShotConfig(tasks=("piqa", "winogrande"), batch_size=2, max_length=64)
    made = []

    def make_cache() -> DynamicCache:
        made.append(DynamicCache())
        return made[-1]

    plain, _ = zero_shot(model, tokenizer, config)
    cached, _ = zero_shot(model, tokenizer, config, make_cache)
    assert made and cached["tasks"] == plain["tasks"]
