"""Library backends (ptq.backends): names with "@" in the registry, the matrix, ids and -k; the
environments' locks and keys; the file exchange end to end on a tiny random Llama with the two
backends of the core install (hqq@hqq, rtn@quanto), each checked against its library called
directly or against a mathematical identity; skips with their reason and command."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ptq.backends import envs
from ptq.backends.stage import Backend
from ptq.backends.worker.common import dense_by_forward
from ptq.calib import CalibrationSet
from ptq.config import CalibConfig, StageConfig
from ptq.errors import BackendUnavailable, ConfigError
from ptq.matrix import Catalog, Selection, compile_keyword
from ptq.models.adapters import adapter_for
from ptq.pipeline import quantize
from ptq.quant import QuantSpec, fake_quantize
from ptq.registry import discover, parse_pipeline, register_method
from tests.tiny import write_tiny_llama, write_wikitext

BENCH = Path(__file__).resolve().parents[1] / "bench"
CPU = torch.device("cpu")
CUDA_LIBRARIES = re.compile(r"nvidia-(cu|nccl|nvjitlink|nvtx|nvshmem)")  # not nvidia-ml-py (NVML bindings, pure Python)


# ---------------------------------------------------------------- names, matrix, -k


def test_a_registered_name_with_plus_is_one_library_stage_else_a_pipeline() -> None:
    registry = discover()
    assert [s.name for s in parse_pipeline("gptq@gptqmodel", registry).stages] == ["gptq@gptqmodel"]
    assert [s.name for s in parse_pipeline("smoothquant+gptq@gptqmodel", registry).stages] == \
        ["smoothquant", "gptq@gptqmodel"]
    with pytest.raises(ConfigError, match="unknown methods"):
        parse_pipeline("gptq@nolibrary", registry)


def test_plus_in_a_name_is_refused_unless_it_is_a_library_backend() -> None:
    with pytest.raises(ValueError, match="joins the stages"):
        register_method("a+b", params=object, tracks=("A",), role="quantizer")(type("X", (Backend,), {}))


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog(BENCH)


def test_backend_cells_ids_and_keywords(catalog: Catalog) -> None:
    cells = {cell.id: cell for cell in catalog.cells(Selection(models=("smollm2-135m",), tracks=("A",),
                                                               methods=("gptq@gptqmodel", "hqq@hqq", "gptq")), "cpu")}
    assert set(cells) == {"smollm2-135m-gptq@gptqmodel-c4-A", "smollm2-135m-hqq@hqq-A", "smollm2-135m-gptq-c4-A"}
    backend = cells["smollm2-135m-gptq@gptqmodel-c4-A"]
    assert backend.config.calib is not None  # calibrated: it gets the same tokens as our gptq
    assert backend.config.method.stages[0].params.percdamp == cells["smollm2-135m-gptq-c4-A"].config.method.stages[
        0].params.percdamp

    def selected(expression: str) -> set[str]:
        compiled = compile_keyword(expression)
        return {cell_id for cell_id, cell in cells.items() if cell.matches(compiled)}

    assert selected("gptq@gptqmodel") == {"smollm2-135m-gptq@gptqmodel-c4-A"}
    assert selected("gptq and gptqmodel") == {"smollm2-135m-gptq@gptqmodel-c4-A"}
    assert selected("gptq and not gptqmodel") == {"smollm2-135m-gptq-c4-A"}
    assert selected("hqq") == {"smollm2-135m-hqq@hqq-A"}


def test_backend_check_refuses_specs_at_collection(catalog: Catalog) -> None:
    with pytest.raises(ConfigError, match="asymmetric"):
        catalog.cells(Selection(models=("smollm2-135m",), tracks=("A",), methods=("hqq@hqq",),
                                overrides=(_override("weight.symmetric=true"),)), "cpu")


def _override(text: str):
    from ptq.config import parse_override

    return parse_override(text)


# ------------------------------------------------------------------------- environments


def test_locks_pin_every_package_and_the_core_torch_build() -> None:
    for lock in envs.LOCKS.glob("*.txt"):
        pins = envs.locked_packages(lock.stem)
        assert pins["torch"] == torch.__version__, f"{lock.name} pins torch {pins['torch']}, the core has another"
        assert not [name for name in pins if CUDA_LIBRARIES.match(name)], f"{lock.name} pulls CUDA libraries"
        requirements = [line for line in lock.read_text().splitlines() if line and not line.lstrip().startswith("#")]
        assert all("==" in line for line in requirements), f"{lock.name} has unpinned lines"


def test_env_key_follows_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envs, "LOCKS", tmp_path)
    (tmp_path / "x.txt").write_text("six==1.17.0\n")
    first = envs.env_key("x")
    assert envs.describe("x")["packages"] == {"six": "1.17.0"}
    (tmp_path / "x.txt").write_text("six==1.16.0\n")
    assert envs.env_key("x") != first


def test_an_environment_without_uv_is_unavailable_with_the_install_command(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envs, "LOCKS", tmp_path)
    monkeypatch.setenv(envs.ENVS_DIR_ENV, str(tmp_path / "envs"))
    (tmp_path / "x.txt").write_text("six==1.17.0\n")
    monkeypatch.setattr(envs.shutil, "which", lambda name: None)
    monkeypatch.setattr(envs.sys, "executable", str(tmp_path / "python"))  # no uv beside it
    with pytest.raises(BackendUnavailable, match="pip install uv"):
        envs.ensure("x")


def test_the_core_environment_is_this_interpreter() -> None:
    assert envs.ensure(envs.CORE) == Path(envs.sys.executable)


# ------------------------------------------------------------------ the exchange, end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A 2-layer Llama whose rows (192 = 128 + 64 columns) end with a smaller group, as smollm2's."""
    base = tmp_path_factory.mktemp("backend")
    _, tokenizer = write_tiny_llama(base / "tok", write_wikitext(base / "data", 200, 300), 300, 4, 2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=192, intermediate_size=384,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, attn_implementation="eager")).eval()
    return model, tokenizer


def run_backend(catalog: Catalog, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, method: str,
                track: str, *overrides: str):
    cell = catalog.cells(Selection(models=("smollm2-135m",), tracks=(track,), methods=(method,),
                                   overrides=tuple(map(_override, overrides))), "cpu")[0]
    copied = copy.deepcopy(model)
    calibration = None
    if cell.pipeline.calibrated:
        tokens = torch.randint(0, tokenizer.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
        calibration = CalibrationSet(tokens, {"seed": 0})
    result = quantize(copied, adapter_for(copied), cell.config, cell.pipeline, calibration, CPU, tokenizer)
    return copied, result, cell


def test_hqq_at_hqq_returns_hqqs_own_dequantized_weights(catalog: Catalog, tiny) -> None:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    model, tokenizer = tiny
    quantized, result, cell = run_backend(catalog, model, tokenizer, "hqq@hqq", "A")
    linear = model.model.layers[1].mlp.down_proj  # 384 columns: 3 groups of 128
    expected = HQQLinear(copy.deepcopy(linear), BaseQuantizeConfig(nbits=4, group_size=128),
                         compute_dtype=torch.float32, device="cpu").dequantize()
    assert torch.allclose(quantized.model.layers[1].mlp.down_proj.weight, expected, atol=1e-6)
    assert set(result.weight_specs) == set(adapter_for(model).quantizable_linears(model))
    assert result.pure_weights
    details = result.details["hqq@hqq"]
    assert details["versions"]["hqq"] and details["environment"]["name"] == "core"
    assert any("span two rows" in note for note in details["notes"])  # 192 = 1.5 groups of 128


def test_rtn_at_quanto_int8_is_symmetric_per_channel_rtn(catalog: Catalog, tiny) -> None:
    """qint8 with absmax scales is round-to-nearest on the symmetric per-channel int8 grid: our
    quantizer with that spec gives the same weights (an identity, not a shared assumption: quanto's
    code is not ours)."""
    model, tokenizer = tiny
    quantized, result, cell = run_backend(catalog, model, tokenizer, "rtn@quanto", "B")
    spec = QuantSpec(bits=8, symmetric=True, granularity="channel")
    for name in adapter_for(model).quantizable_linears(model):
        original = model.get_submodule(name).weight
        ours = fake_quantize(original, spec)
        theirs = quantized.get_submodule(name).weight
        assert torch.allclose(theirs, ours, atol=1e-6, rtol=1e-5), name
    assert result.weight_specs[name] == cell.config.weight


def test_rtn_at_quanto_int4_records_the_groups_quanto_chose(catalog: Catalog, tiny) -> None:
    model, tokenizer = tiny
    quantized, result, cell = run_backend(catalog, model, tokenizer, "rtn@quanto", "A")
    q_proj = "model.layers.0.self_attn.q_proj"  # 192 columns: quanto lowers its group of 128 to 96
    assert result.weight_specs[q_proj].group_size == 96
    assert result.weight_specs["model.layers.0.mlp.down_proj"].group_size == 128
    groups = quantized.get_submodule(q_proj).weight.reshape(-1, 96)  # 2 groups per row
    assert max(len(group.unique()) for group in groups) <= 16  # a 4-bit grid per group
    assert any("quanto adapts the group" in note for note in result.details["rtn@quanto"]["notes"])


def test_dense_by_forward_reads_the_weight_a_module_applies() -> None:
    linear = torch.nn.Linear(7, 5)
    assert torch.allclose(dense_by_forward(linear, 7), linear.weight.detach())


def test_a_backend_that_needs_cuda_is_unavailable_on_the_cpu(catalog: Catalog, tiny,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = tiny
    info = discover()["hqq@hqq"]
    monkeypatch.setattr(info.stage, "needs_cuda", "its kernels need CUDA")
    with pytest.raises(BackendUnavailable, match="its kernels need CUDA.*pytest bench --methods hqq@hqq"):
        run_backend(catalog, model, tokenizer, "hqq@hqq", "A")


@pytest.mark.parametrize(("method", "track", "overrides", "message"), [
    ("rtn@quanto", "B", ("weight.format=fp8_e4m3",),
     "rtn@quanto cannot run this cell: the library rounds weights to integers; the cell's weight format is fp8_e4m3"),
    ("quarot+hqq@hqq", "A", (), "hqq@hqq cannot run this cell: earlier stages changed the model beyond its weights"),
    ("smoothquant+gptq@llmcompressor", "B", ("act.granularity=tensor",),
     "smoothquant+gptq@llmcompressor cannot run this cell: its W8A8 scheme quantizes inputs to int8, symmetric, per "
     "token, dynamically"),
])
def test_a_cell_the_library_cannot_express_skips_before_its_environment(catalog: Catalog, tiny,
                                                                       monkeypatch: pytest.MonkeyPatch, method: str,
                                                                       track: str, overrides: tuple[str, ...],
                                                                       message: str) -> None:
    monkeypatch.setattr(envs, "ensure", _environment_prepared)
    with pytest.raises(BackendUnavailable, match=re.escape(message)):
        run_backend(catalog, *tiny, method, track, *overrides)


def test_track_b_inputs_are_the_w8a8_scheme_of_llm_compressor(catalog: Catalog, tiny,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envs, "ensure", _environment_prepared)
    with pytest.raises(EnvironmentPrepared, match="llmcompressor"):  # not refused: it goes on to its environment
        run_backend(catalog, *tiny, "smoothquant+gptq@llmcompressor", "B")


class EnvironmentPrepared(Exception):
    """Raised in place of preparing a backend's environment."""


def _environment_prepared(name: str) -> Path:
    raise EnvironmentPrepared(name)


# ------------------------------------------------------------------------------- the audit


def _record(cell: str, method: str, track: str, ppl: float, seconds: float, stages: dict | None = None) -> dict:
    return {"cell_id": cell, "method": method, "track": track, "metrics": {"ppl": {"wikitext2": ppl},
                                                                         "quant_seconds": seconds},
            "data": {"stages": stages or {}}}


def test_audit_pairs_backends_with_our_cells_and_gates_unexplained_differences() -> None:
    from ptq.report.audit import AuditConfig, audit_rows

    details = {"gptq@gptqmodel": {"versions": {"gptqmodel": "7.6.0"}, "library_defaults": {"blocksize": "128"},
                                  "seconds": {"quantize": 50.0}}}
    records = [_record("m-gptq-c4-A-audit", "gptq", "A", 40.0, 100.0),
               _record("m-gptq@gptqmodel-c4-A-audit", "gptq@gptqmodel", "A", 39.0, 200.0, details),
               _record("m-hqq-A-audit", "hqq", "A", 30.0, 10.0),
               _record("m-hqq@hqq-A-audit", "hqq@hqq", "A", 30.1, 20.0),
               _record("m-rtn@quanto-A-audit", "rtn@quanto", "A", 50.0, 5.0),  # no native partner: no row
               {"cell_id": "m-awq@autoawq-c4-A-audit", "method": "awq@autoawq", "track": "A", "metrics": {}}]
    rows = {row.library: row for row in audit_rows(records, AuditConfig(tolerance=0.02, explain_above=0.005))}
    assert set(rows) == {"gptqmodel", "hqq"}
    gptq = rows["gptqmodel"]
    assert gptq.diff_percent == pytest.approx(100 * (40 - 39) / 39)
    assert gptq.verdict == "worse" and gptq.failed  # 2.6% worse than the library: over the tolerance
    assert gptq.time_ratio == pytest.approx(0.5) and gptq.library_own_seconds == 50.0
    assert rows["hqq"].verdict == "ok"  # within 0.5%
    explained = audit_rows(records[2:4], AuditConfig(explain_above=0.001))
    assert explained[0].verdict == "unexplained"
    explained = audit_rows(records[2:4], AuditConfig(explain_above=0.001, explanations={"hqq@hqq": "why"}))
    assert explained[0].verdict == "explained" and not explained[0].failed


def test_the_audit_gate_file_is_checked_as_a_config_file(tmp_path: Path) -> None:
    from ptq.report.audit import AuditConfig

    assert AuditConfig.load(BENCH / "audit.yaml").explanations["hqq@hqq"]
    path = tmp_path / "audit.yaml"
    path.write_text("tolerance: 0.02\ntolerence: 0.03\n")
    with pytest.raises(ConfigError, match=r"unknown keys \['tolerence'\]"):
        AuditConfig.load(path)
    path.write_text("tolerance: [0.02\n")
    with pytest.raises(ConfigError, match="audit.yaml:2: malformed YAML"):
        AuditConfig.load(path)


def test_minus_m_audit_runs_the_marked_experiments(catalog: Catalog) -> None:
    assert set(catalog.marked_experiments("audit")) == {"audit", "audit-w8a8"}
    assert catalog.marked_experiments("not slow") == []  # an expression any unmarked cell satisfies
    assert catalog.marked_experiments("") == []
    with pytest.raises(ConfigError, match=re.escape("-m 'audit and (' is not a valid expression")):
        catalog.marked_experiments("audit and (")  # a usage error before xdist starts, not an internal error
    cells = catalog.cells(Selection(experiments=(catalog.experiments["audit"],)), "cpu")
    assert all(cell.markers == ("audit",) for cell in cells)
    assert {cell.config.calib.n_samples for cell in cells if cell.calibrated} == {16}


def test_minus_k_with_an_at_sign_on_the_command_line() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pytest", "bench", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "--methods", "gptq", "gptq@gptqmodel", "--tracks", "A", "-k", "gptq@gptqmodel"],
                          cwd=BENCH.parent, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "test_cell[smollm2-135m-gptq@gptqmodel-c4-A]" in done.stdout
    assert "test_cell[smollm2-135m-gptq-c4-A]" not in done.stdout


BUILD_ENVS = "PTQ_TEST_BACKEND_ENVS"  # building GPTQModel's environment compiles it: minutes


@pytest.mark.skipif(not __import__("os").environ.get(BUILD_ENVS),
                    reason=f"builds the gptqmodel environment (minutes on first use); set {BUILD_ENVS}=1")
def test_a_checkpoint_gptqmodel_wrote_scores_exactly_as_its_cell(catalog: Catalog, tiny, tmp_path: Path) -> None:
    """The offline stand-in for a published checkpoint: gptq@gptqmodel keeps the GPTQ checkpoint it
    writes, gptq@checkpoint loads it as a model YAML would name it; same weights, same logits."""
    from ptq.config import parse_override

    model, tokenizer = tiny
    folder = tmp_path / "gptq-checkpoint"

    def run(method: str, override: str) -> tuple[LlamaForCausalLM, object]:
        cell = catalog.cells(Selection(models=("smollm2-135m",), tracks=("A",), methods=(method,),
                                       overrides=(parse_override(override),)), "cpu")[0]
        copied = copy.deepcopy(model)
        tokens = torch.randint(0, tokenizer.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
        calibration = CalibrationSet(tokens, {"seed": 0}) if cell.pipeline.calibrated else None
        return copied, quantize(copied, adapter_for(copied), cell.config, cell.pipeline, calibration, CPU, tokenizer)

    written, _ = run("gptq@gptqmodel", f"stages.gptq@gptqmodel.params.save_checkpoint={folder}")
    loaded, result = run("gptq@checkpoint", f"stages.gptq@checkpoint.params.location={folder}")
    for (name, a), b in zip(written.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, tokenizer.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    assert torch.equal(written(ids).logits, loaded(ids).logits)
    sizes = result.details["gptq@checkpoint"]["checkpoint"]
    assert 0 < sizes["bytes"] < sizes["float_bytes"]
