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
from ptq.eval.lm_tasks import OFFLINE_TASKS, build_tasks, check_task_files, check_task_names, task_manager
from ptq.eval.zeroshot import sample_indices, zero_shot
from ptq.gates import accuracy_drop_gate, zero_shot_gates
from ptq.matrix import Catalog, Selection
from ptq.dependencies import fingerprint
from ptq.engine import QuantResult
from ptq.eval.suite import evaluate
from ptq.report.leaderboard import leaderboard_rows, render_table

ROOT = Path(__file__).resolve().parents[1]


def jsonl(*rows: dict[str, Any]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def arc_v1(id_: str, stem: str, texts: list[str], answer: str) -> dict[str, Any]:
    labels = "ABCDE"[: len(texts)]
    return {"id": id_, "question": {"stem": stem, "choices": [{"text": t, "label": l} for t, l in zip(texts, labels)]},
            "answerKey": answer}


def arc_hub(id_: str, stem: str, texts: list[str], answer: str) -> dict[str, Any]:
    return {"id": id_, "question": stem, "choices": {"text": texts, "label": list("ABCDE"[: len(texts)])},
            "answerKey": answer}


ARC = [("q1", "Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium", "neon"], "B"),
       ("q2", "What melts ice?", ["heat", "cold", "dark"], "A"),
       ("q3", "Which is a mammal?", ["trout", "frog", "whale", "crow"], "C")]
WIKI = (" \n = Alpha = \n \n Alpha is a @-@ letter . \n \n = = History = = \n \n It was used ( long ago ) . \n"
        " = Beta = \n \n Beta 's page , with 1 @,@ 000 words . \n")

# Per task: the local files (as in shared/data) and the rows of the hub dataset they stand for,
# written out here independently of the loaders under test.
CASES: dict[str, tuple[dict[str, str], list[dict[str, Any]]]] = {
    "piqa": ({"piqa/valid.jsonl": jsonl({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid"},
                                        {"goal": "Dry hair", "sol1": "use water", "sol2": "use a towel"},
                                        {"goal": "Cut bread", "sol1": "use a knife", "sol2": "use a spoon"}),
              "piqa/valid-labels.lst": "0\n1\n0\n"},
             [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
              {"goal": "Dry hair", "sol1": "use water", "sol2": "use a towel", "label": 1},
              {"goal": "Cut bread", "sol1": "use a knife", "sol2": "use a spoon", "label": 0}]),
    "arc_easy": ({"arc_easy/ARC-Easy-Test.jsonl": jsonl(*(arc_v1(*q) for q in ARC))}, [arc_hub(*q) for q in ARC]),
    "arc_challenge": ({"arc_challenge/ARC-Challenge-Test.jsonl": jsonl(*(arc_v1(*q) for q in ARC[::-1]))},
                      [arc_hub(*q) for q in ARC[::-1]]),
    "boolq": ({"boolq/dev.jsonl": jsonl({"question": "is water wet", "title": "Water", "answer": True,
                                         "passage": "Water is a liquid."},
                                        {"question": "is the sun cold", "title": "Sun", "answer": False,
                                         "passage": "The sun is a hot star."})},
              [{"question": "is water wet", "passage": "Water is a liquid.", "idx": 0, "label": 1},
               {"question": "is the sun cold", "passage": "The sun is a hot star.", "idx": 1, "label": 0}]),
    "winogrande": ({"winogrande/dev.jsonl": jsonl(
                        {"qID": "a-1", "sentence": "Ann beat Bo because _ was faster.", "option1": "Ann",
                         "option2": "Bo", "answer": "1"},
                        {"qID": "a-2", "sentence": "Ann lost to Bo because _ was slower.", "option1": "Ann",
                         "option2": "Bo", "answer": "2"}),
                    "winogrande/dev-labels.lst": "1\n2\n"},
                   [{"sentence": "Ann beat Bo because _ was faster.", "option1": "Ann", "option2": "Bo", "answer": "1"},
                    {"sentence": "Ann lost to Bo because _ was slower.", "option1": "Ann", "option2": "Bo",
                     "answer": "2"}]),
    "lambada_openai": ({"lambada_openai/lambada_test.jsonl": jsonl({"text": "She opened the door and saw her dog"},
                                                                   {"text": "He drank a glass of cold water"})},
                       [{"text": "She opened the door and saw her dog"}, {"text": "He drank a glass of cold water"}]),
    "wikitext": ({"wikitext2/wiki.test.raw": WIKI},
                 [{"page": " \n = Alpha = \n \n Alpha is a @-@ letter . \n \n = = History = = \n \n"
                           " It was used ( long ago ) . \n"},
                  {"page": " = Beta = \n \n Beta 's page , with 1 @,@ 000 words . \n"}]),
}
# The hub dataset each built-in task reads (lm-eval 0.4.13).
HUB = {"piqa": ("baber/piqa", None), "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
       "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"), "boolq": ("aps/super_glue", "boolq"),
       "winogrande": ("allenai/winogrande", "winogrande_xl"), "lambada_openai": ("EleutherAI/lambada_openai", "default"),
       "wikitext": ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1")}


def write_data(root: Path, tasks: list[str]) -> Path:
    for task in tasks:
        for relative, text in CASES[task][0].items():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_text(text)
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
    hub_rows = datasets.Dataset.from_list(CASES[name][1])

    def load_dataset(path: str, name: str | None = None, **_: Any) -> datasets.DatasetDict:
        asked.append((path, name))
        return datasets.DatasetDict({split: hub_rows for split in ("train", "validation", "test")})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    builtin = task_manager().load([name])["tasks"][name]
    assert asked == [HUB[name]]
    assert [dict(doc) for doc in ours.eval_docs] == [dict(doc) for doc in builtin.eval_docs]
    assert requests(ours) == requests(builtin) and len(ours.instances) >= len(CASES[name][1])
    assert [ours.doc_to_target(doc) for doc in ours.eval_docs] == [builtin.doc_to_target(doc)
                                                                   for doc in builtin.eval_docs]
    assert ours.config.metric_list == builtin.config.metric_list
    assert ours.OUTPUT_TYPE == builtin.OUTPUT_TYPE


def test_wikitext_pages_split_at_titles_only(offline: Path) -> None:
    pages = [doc["page"] for doc in build_tasks(("wikitext",))["wikitext"].eval_docs]
    assert pages == [row["page"] for row in CASES["wikitext"][1]]
    assert "".join(pages) == WIKI


def test_missing_file_is_an_error_naming_it(offline: Path) -> None:
    (offline / "winogrande" / "dev-labels.lst").unlink()
    with pytest.raises(DataUnavailable, match=r"winogrande: missing file .*winogrande/dev-labels\.lst"):
        check_task_files(("piqa", "winogrande"))
    with pytest.raises(DataUnavailable, match=r"winogrande/dev-labels\.lst"):
        build_tasks(("winogrande",))


def test_labels_that_do_not_match_the_examples_are_an_error(offline: Path) -> None:
    (offline / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(DataUnavailable, match=r"valid-labels\.lst has 2 labels for 3 examples"):
        build_tasks(("piqa",))


def test_unknown_task_offline_lists_the_known_tasks(offline: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown zero-shot task\(s\) \['hellaswag'\]; known offline .*"
                                          r"piqa, arc_easy, arc_challenge, boolq, winogrande, lambada_openai, wikitext"):
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
    texts = [text for files, _ in CASES.values() for text in files.values()]
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
    assert set(metrics) == {"tasks", "average", "limit", "seed", "seconds"}
    assert metrics["limit"] == 2 and metrics["seed"] == 0
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
    ("zero_shot: {tasks: [piqa, piqa]}", "tasks lists a task twice"),
    ("zero_shot: {limit: 0}", "limit must be at least 1"),
])
def test_invalid_zero_shot_settings(tmp_path: Path, text: str, message: str) -> None:
    bench = Path(shutil.copytree(ROOT / "bench", tmp_path / "bench"))
    (bench / "experiments" / "bad.yaml").write_text(
        f"experiment: {{name: bad, models: [smollm2-135m], methods: [fp16], tracks: [A]}}\n{text}\n")
    catalog = Catalog(bench)
    with pytest.raises(ConfigError, match=rf"bad\.yaml:2: zero_shot: {message}"):
        catalog.cells(Selection(experiments=(bench / "experiments" / "bad.yaml",)), "cpu")


def test_leaderboard_has_accuracy_columns_only_when_measured() -> None:
    def record(cell: str, zero_shot: dict[str, Any] | None) -> dict[str, Any]:
        metrics = {"ppl": {"wikitext2": 30.0}, **({"zero_shot": zero_shot} if zero_shot else {})}
        return {"cell_id": cell, "model": "m", "method": cell, "track": "A", "experiment": None, "status": "passed",
                "reason": None, "metrics": metrics}

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
    assert set(with_tasks.metrics()) == {"ppl", "eval", "eval_tokens_per_s", "zero_shot"}
    assert with_tasks.metrics()["zero_shot"]["tasks"]["boolq"]["n"] == 1
    assert with_tasks.data["zero_shot"]["boolq"]["origin"] == "local"
    assert set(without.metrics()) == {"ppl", "eval", "eval_tokens_per_s"} and "zero_shot" not in without.data
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
