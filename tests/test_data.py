"""Data that is not what it claims is never scored: a local file that differs from its folder's
SHA256SUMS, or that cannot be decoded, is an error naming it (ptq.data); a text holding fewer
evaluation windows than configured fails the cell unless the config allows it (the case that
was scored silently: wiki.test.raw cut to 20 kB gave 9 windows instead of 32)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

from ptq.config import (CellConfig, EvalConfig, KVEvalConfig, MethodConfig, ModelConfig, SourceConfig,
                        TrackConfig)
from ptq.data import SUMS_FILE, listed_sha256, load_text, read_local
from ptq.errors import DataMismatch, TooFewWindows
from ptq.eval.lm_tasks import build_tasks, check_task_files
from ptq.eval.perplexity import perplexity, windows_of
from ptq.matrix import Catalog, Selection
from ptq.cell import LoadedModel
from ptq.dependencies import fingerprint
from ptq.engine import QuantResult
from ptq.eval.kld import STORED, kl_divergence
from ptq.eval.suite import evaluate, evaluation_windows, float_references
from tests.tiny import write_tiny_llama, write_wikitext

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PTQ_DATA_DIR") or ROOT.parent / "shared" / "data")


def sha256sum(root: Path, *relative: str) -> None:
    """root/SHA256SUMS as coreutils' sha256sum writes it, the way shared/data's was made."""
    listing = subprocess.run(["sha256sum", *(f"./{name}" for name in relative)], cwd=root, check=True,
                             capture_output=True, text=True).stdout
    (root / SUMS_FILE).write_text(listing)


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A data folder with WikiText-2 test and BoolQ, listed in SHA256SUMS; PTQ_DATA_DIR points at it."""
    root = tmp_path / "data"
    write_wikitext(root, words=50, lines=40)
    (root / "boolq").mkdir()
    (root / "boolq" / "dev.jsonl").write_text(
        '{"question": "is it", "title": "T", "answer": true, "passage": "p"}\n')
    sha256sum(root, "wikitext2/wiki.test.raw", "boolq/dev.jsonl")
    monkeypatch.setenv("PTQ_DATA_DIR", str(root))
    load_text.cache_clear()
    yield root
    load_text.cache_clear()


def truncate(path: Path, size: int) -> str:
    """Cut the file to `size` bytes; returns the sha256 it had."""
    data = path.read_bytes()
    path.write_bytes(data[:size])
    return hashlib.sha256(data).hexdigest()


def test_intact_files_are_read(data: Path) -> None:
    assert load_text("wikitext2", "test").rows
    check_task_files(("boolq",))
    assert build_tasks(("boolq",))["boolq"].eval_docs[0]["passage"] == "T -- p"


def test_a_truncated_file_is_an_error_naming_it_and_what_was_expected(data: Path) -> None:
    path = data / "wikitext2" / "wiki.test.raw"
    expected = truncate(path, 300)
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(DataMismatch) as error:
        load_text("wikitext2", "test")
    message = str(error.value)
    assert str(path) in message and expected in message and actual in message and "300 bytes" in message
    assert "truncated or altered" in message


def test_a_truncated_task_file_is_an_error_before_any_model(data: Path) -> None:
    truncate(data / "boolq" / "dev.jsonl", 20)
    with pytest.raises(DataMismatch, match=r"boolq/dev\.jsonl is not the file .*SHA256SUMS lists"):
        check_task_files(("boolq",))


def test_without_a_listing_files_are_read_as_they_are(data: Path) -> None:
    truncate(data / "wikitext2" / "wiki.test.raw", 300)
    (data / SUMS_FILE).write_text((data / SUMS_FILE).read_text().splitlines()[1] + "\n")  # boolq only
    assert load_text("wikitext2", "test").rows
    (data / SUMS_FILE).unlink()
    truncate(data / "boolq" / "dev.jsonl", 40)
    with pytest.raises(DataMismatch, match=r"boolq/dev\.jsonl:1: not a JSON line"):  # but it must parse
        build_tasks(("boolq",))


def test_a_file_cut_inside_a_character_names_the_file(data: Path) -> None:
    (data / SUMS_FILE).unlink()
    path = data / "wikitext2" / "wiki.test.raw"
    path.write_bytes(" = Café = \n".encode()[:7])  # the second byte of "é" is gone
    with pytest.raises(DataMismatch, match=rf"{path} is not UTF-8 text at byte 6 of 7"):
        load_text("wikitext2", "test")


def test_a_malformed_listing_names_its_line(data: Path) -> None:
    (data / SUMS_FILE).write_text((data / SUMS_FILE).read_text() + "not a checksum\n")
    with pytest.raises(DataMismatch, match=r"SHA256SUMS:3: not a line of sha256sum output"):
        load_text("wikitext2", "test")


def test_the_shared_data_is_what_its_listing_says() -> None:
    if not (SHARED / SUMS_FILE).is_file():
        pytest.skip(f"no {SUMS_FILE} in {SHARED}")
    listed = listed_sha256(SHARED)
    assert len(listed) == 12 and "wikitext2/wiki.test.raw" in listed
    for relative, expected in listed.items():
        assert hashlib.sha256(read_local(SHARED, relative)).hexdigest() == expected


def test_usage_error_before_any_model_loads(tmp_path: Path) -> None:
    """`pytest bench` on a truncated, listed wiki.test.raw: exit 4 naming the file, nothing run."""
    bench = Path(shutil.copytree(ROOT / "bench", tmp_path / "bench"))
    root = tmp_path / "data"
    write_wikitext(root, words=50, lines=200)
    sha256sum(root, "wikitext2/wiki.test.raw")
    truncate(root / "wikitext2" / "wiki.test.raw", 2000)
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    run = subprocess.run([sys.executable, "-m", "pytest", "bench", "-p", "no:cacheprovider",
                          "--bench-dir", str(bench), "--reports-dir", str(tmp_path / "reports"), "--no-cache",
                          "--tracks", "A", "--methods", "fp16"],
                         cwd=ROOT, env={**inherited, "PTQ_DATA_DIR": str(root), "CUDA_VISIBLE_DEVICES": ""},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 4, run.stdout[-2000:] + run.stderr[-2000:]
    assert f"{root / 'wikitext2' / 'wiki.test.raw'} is not the file" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "reports").exists()


# ------------------------------------------------------------------------- evaluation windows


def test_windows_fewer_than_configured_are_an_error_unless_allowed() -> None:
    ids = torch.arange(9 * 16).unsqueeze(0)  # 9 windows of 16
    assert windows_of(ids, 16, 4).shape == (4, 16) and windows_of(ids, 16, None).shape == (9, 16)
    with pytest.raises(TooFewWindows, match=r"wikitext2/test has 144 tokens: 9 window\(s\) of 16, fewer than "
                                            r"the 32 .*eval\.allow_fewer_windows: true to score 9"):
        windows_of(ids, 16, 32, source="wikitext2/test")
    assert windows_of(ids, 16, 32, allow_fewer=True).shape == (9, 16)
    with pytest.raises(TooFewWindows, match=r"0 window\(s\) of 256"):  # none at all: allowed or not
        windows_of(ids, 256, None, allow_fewer=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoadedModel]:
    base = tmp_path_factory.mktemp("windows")
    lines = write_wikitext(base / "data", words=100, lines=40)
    model, tokenizer = write_tiny_llama(base / "model", lines, vocab_size=200, heads=2, kv_heads=1)
    return base / "data", LoadedModel(model, tokenizer, adapter=None, source=None, device=torch.device("cpu"))


def test_a_cell_scoring_fewer_windows_than_configured_fails(tiny: tuple[Path, LoadedModel],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    root, loaded = tiny
    monkeypatch.setenv("PTQ_DATA_DIR", str(root))
    load_text.cache_clear()
    tokens = loaded.tokenizer(load_text("wikitext2", "test").text, return_tensors="pt").input_ids.shape[1]
    cell = CellConfig(ModelConfig("tiny", "llama", SourceConfig("local", path="unused")),
                      MethodConfig("fp16"), TrackConfig("A"),
                      eval=EvalConfig(seqlen=64, max_windows=tokens // 64 + 5, batch_size=4))
    try:
        with pytest.raises(TooFewWindows, match=rf"wikitext2/test \(local:{root}.*\) has {tokens} tokens"):
            evaluate(QuantResult(loaded.model), loaded.tokenizer, loaded.device, cell)
        allowed = dataclasses.replace(cell, eval=dataclasses.replace(cell.eval, allow_fewer_windows=True))
        metrics = evaluate(QuantResult(loaded.model), loaded.tokenizer, loaded.device, allowed).metrics()
        assert metrics["eval"]["wikitext2"]["windows"] == tokens // 64
    finally:
        load_text.cache_clear()


def test_allowing_fewer_windows_does_not_change_the_fingerprint() -> None:
    config = Catalog(ROOT / "bench").cells(Selection(), "cpu")[0].config
    assert config.eval.allow_fewer_windows is False
    allowed = dataclasses.replace(config, eval=dataclasses.replace(config.eval, allow_fewer_windows=True))
    assert fingerprint(allowed, "cpu") == fingerprint(config, "cpu")


@pytest.mark.parametrize("override, message", [
    ("eval.seqlen=1", "seqlen must be at least 2"),
    ("eval.max_windows=0", "max_windows must be at least 1"),
    ("eval.batch_size=-1", "batch_size must be at least 1"),
    ("eval.allow_fewer_windows=maybe", "eval.allow_fewer_windows must be bool"),
])
def test_invalid_eval_settings_are_config_errors(override: str, message: str) -> None:
    from ptq.config import parse_override
    from ptq.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        Catalog(ROOT / "bench").cells(Selection(overrides=(parse_override(override),)), "cpu")


# ------------------------------------------------------------------------- per-window NLL


def test_per_window_nll_is_each_windows_mean_and_gives_the_ppl(tiny: tuple[Path, LoadedModel]) -> None:
    _, loaded = tiny
    vocab = loaded.model.config.vocab_size
    ids = torch.randint(0, vocab, (1, 5 * 32), generator=torch.Generator().manual_seed(0))
    result = perplexity(loaded.model, ids, 32, None, 2)  # batches of 2, 2 and 1 windows
    assert result.windows == 5 and len(result.window_nll) == 5
    with torch.inference_mode():
        for window, nll in zip(ids.view(5, 32), result.window_nll):  # one window at a time, by hand
            logprobs = torch.log_softmax(loaded.model(window[None]).logits[0, :-1].double(), dim=-1)
            assert nll == pytest.approx(-logprobs.gather(1, window[1:, None]).mean().item(), rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(sum(result.window_nll) / 5), rel=1e-12)


def test_evaluate_builds_the_top_k_store_a_separate_float_pass_builds(
        tiny: tuple[Path, LoadedModel], monkeypatch: pytest.MonkeyPatch) -> None:
    """The FP baseline's perplexity pass gives the float references: its store equals, tensor for
    tensor (the tail draws included), what float_references' own forward gives on the same
    windows; a chunked evaluation (Track C) refuses to build one."""
    root, loaded = tiny
    monkeypatch.setenv("PTQ_DATA_DIR", str(root))
    load_text.cache_clear()
    cell = CellConfig(ModelConfig("tiny", "llama", SourceConfig("local", path="unused")),
                      MethodConfig("fp16"), TrackConfig("A"),
                      eval=EvalConfig(seqlen=32, max_windows=5, batch_size=2))
    try:
        separate = float_references(loaded.model, loaded.tokenizer, cell)["wikitext2"]
        evaluation = evaluate(QuantResult(loaded.model), loaded.tokenizer, loaded.device, cell, topk=True)
        built = evaluation.topk["wikitext2"]
        for name in STORED:
            assert torch.equal(getattr(built, name), getattr(separate, name)), name
        assert (built.vocab_size, built.seed) == (separate.vocab_size, separate.seed)
        assert evaluate(QuantResult(loaded.model), loaded.tokenizer, loaded.device, cell).topk == {}
        chunked = dataclasses.replace(cell, kv_eval=KVEvalConfig())
        with pytest.raises(ValueError, match="plain forwards"):
            evaluate(QuantResult(loaded.model), loaded.tokenizer, loaded.device, chunked, topk=True)
    finally:
        load_text.cache_clear()


def test_evaluate_scores_the_kld_from_the_perplexity_logits_as_a_separate_pass_would(
        tiny: tuple[Path, LoadedModel], monkeypatch: pytest.MonkeyPatch) -> None:
    """KLD from the logits the perplexity pass already computes equals kl_divergence's own forward
    over the same windows; the float model against its own store diverges by nothing."""
    root, loaded = tiny
    monkeypatch.setenv("PTQ_DATA_DIR", str(root))
    load_text.cache_clear()
    cell = CellConfig(ModelConfig("tiny", "llama", SourceConfig("local", path="unused")),
                      MethodConfig("fp16"), TrackConfig("A"), eval=EvalConfig(seqlen=32, max_windows=5, batch_size=2))
    try:
        references = float_references(loaded.model, loaded.tokenizer, cell)
        noisy = copy.deepcopy(loaded.model)
        with torch.no_grad():
            for parameter in noisy.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
        metrics = evaluate(QuantResult(noisy), loaded.tokenizer, loaded.device, cell, references).metrics()
        windows = evaluation_windows(loaded.tokenizer, cell)["wikitext2"]
        separate = kl_divergence(noisy, windows, references["wikitext2"], batch_size=3)
        assert metrics["kld"]["wikitext2"]["mean"] == pytest.approx(separate.mean, rel=1e-6) and separate.mean > 0
        assert metrics["kld"]["wikitext2"]["top1_agreement"] == separate.top1_agreement
        same = evaluate(QuantResult(loaded.model), loaded.tokenizer, loaded.device, cell, references).metrics()
        assert same["kld"]["wikitext2"]["mean"] == pytest.approx(0, abs=1e-9)
        assert same["kld"]["wikitext2"]["top1_agreement"] == 1.0
    finally:
        load_text.cache_clear()
