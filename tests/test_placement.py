"""Memory bounded by one block: the engine moves one decoder block at a time to the compute
device during calibration, and an evaluation puts the model there whole only when it fits.
No GPU here: the moves are instrumented, not made."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ptq.calib import CalibrationSet
from ptq.config import CalibConfig
from ptq.engine import BlockStep, ModelStep, QuantResult, Specs, Stage, run_stages
from ptq.models.adapters import adapter_for
from ptq.models import placement
from ptq.models.placement import on_device, one_cpu_thread


class Touch(Stage):
    name = "touch"

    def __init__(self, resident: set[int], peaks: list[int]) -> None:
        super().__init__(None, Specs(), final=True)
        self.resident, self.peaks = resident, peaks

    def on_block(self, step: BlockStep) -> None:
        step.runner.inputs_of({"mlp.down_proj": step.block.mlp.down_proj})
        self.peaks.append(len(self.resident))


def test_calibration_holds_at_most_one_block_on_the_compute_device(monkeypatch) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    adapter = adapter_for(model)
    compute = torch.device("cpu", 1)  # a device the model is not on (no move is actually made)
    resident: set[int] = set()
    peaks: list[int] = []
    original = nn.Module.to

    def instrumented(module: nn.Module, *args, **kwargs):  # records where each block is sent
        target = args[0] if args else kwargs.get("device")
        if module in list(model.model.layers):
            (resident.add if target == compute else resident.discard)(id(module))
            peaks.append(len(resident))
        return original(module, torch.device("cpu"))

    monkeypatch.setattr(nn.Module, "to", instrumented)
    run_stages([Touch(resident, peaks)], ModelStep(model, adapter, QuantResult(model)),
               CalibrationSet(torch.randint(0, 100, (4, 16)), {}), CalibConfig(batch_size=2), compute)
    assert max(peaks) == 1 and not resident  # one block at a time, none left behind


def test_evaluation_puts_the_model_on_the_device_whole_only_when_it_fits(monkeypatch) -> None:
    model = nn.Linear(1000, 1000)  # 4 MB of float32 weights
    moves: list[str] = []
    monkeypatch.setattr(nn.Module, "to", lambda module, device: moves.append(str(device)) or module)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    cuda = torch.device("cuda", 0)
    with on_device(model, torch.device("cpu")) as how:
        assert how == "host" and moves == []
    with on_device(model, cuda, free=lambda device: 100 * 2**20) as how:
        assert how == "whole" and moves == ["cuda:0"]
    assert moves == ["cuda:0", "cpu"]  # back on the host after the evaluation
    offloaded: list[torch.device] = []
    import accelerate
    import accelerate.hooks
    monkeypatch.setattr(accelerate, "cpu_offload", lambda m, execution_device: offloaded.append(execution_device))
    monkeypatch.setattr(accelerate.hooks, "remove_hook_from_module", lambda m, recurse: offloaded.append("removed"))
    with on_device(model, cuda, free=lambda device: 2**20) as how:  # 1 MB free: does not fit
        assert how == "offload"
    assert offloaded == [cuda, "removed"] and placement.model_bytes(model) == 4_004_000


def test_quantization_on_cpu_runs_on_one_thread_and_restores_the_count() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_cpu_thread(torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with one_cpu_thread(torch.device("cuda")):  # only described: other devices keep their threads
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
