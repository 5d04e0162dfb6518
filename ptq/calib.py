"""The block-wise calibration engine shared by every calibrated method.

1. `calibration_set`: n samples x seqlen tokens drawn with a seed, as the GPTQ authors do
   (C4: a random document longer than seqlen, then a random window of it; WikiText-2: a
   random window of the tokenized split).
2. `walk_blocks`: capture the inputs of the first decoder block, then for each block let
   the method quantize it (with `BlockRunner` to collect the statistics it needs), and
   feed the block's outputs - of the quantized block, or of the float block with
   `propagate: float` - to the next. Only the current block and the calibration
   activations live on the compute device, so the model itself can stay on the CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ptq import progress
from ptq.config import CalibConfig
from ptq.data import load_text, tokenize_once
from ptq.errors import DataUnavailable
from ptq.models.adapters import ArchAdapter

CALIB_SPLITS = {"c4": "calibration", "wikitext2": "validation"}
MAX_DRAWS_PER_SAMPLE = 100  # C4: documents tried per sample before concluding the data is too short


@dataclass(frozen=True)
class CalibrationSet:
    tokens: torch.Tensor  # [n_samples, seqlen]
    record: dict[str, Any]  # dataset, split, origin, text sha256, seed, token sha256, for the cell record


def _draw_c4(tokenizer: PreTrainedTokenizerBase, rows: tuple[str, ...], config: CalibConfig,
             rng: random.Random) -> list[torch.Tensor]:
    samples = []
    for _ in range(config.n_samples):
        for _attempt in range(MAX_DRAWS_PER_SAMPLE):
            ids = tokenizer(rows[rng.randint(0, len(rows) - 1)], return_tensors="pt").input_ids[0]
            if ids.shape[0] > config.seqlen:
                break
        else:
            raise DataUnavailable(
                f"calibration data shorter than requested: no C4 document of more than {config.seqlen} tokens "
                f"in {MAX_DRAWS_PER_SAMPLE} draws; lower calib.seqlen")
        start = rng.randint(0, ids.shape[0] - config.seqlen - 1)
        samples.append(ids[start:start + config.seqlen])
    return samples


def calibration_set(tokenizer: PreTrainedTokenizerBase, config: CalibConfig) -> CalibrationSet:
    """Seeded calibration windows, reproducible from the record alone."""
    text = load_text(config.dataset, CALIB_SPLITS[config.dataset])
    rng = random.Random(config.seed)
    if config.dataset == "c4":
        samples = _draw_c4(tokenizer, text.rows, config, rng)
    else:
        ids = tokenize_once(tokenizer, text)[0]
        if ids.shape[0] <= config.seqlen:
            raise DataUnavailable(f"calibration data shorter than requested: {text.dataset}/{text.split} has "
                                  f"{ids.shape[0]} tokens, fewer than one window of {config.seqlen}")
        starts = [rng.randint(0, ids.shape[0] - config.seqlen - 1) for _ in range(config.n_samples)]
        samples = [ids[s:s + config.seqlen] for s in starts]
    tokens = torch.stack(samples)
    record = {**text.describe(), "seed": config.seed, "n_samples": config.n_samples, "seqlen": config.seqlen,
              "tokens_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest()}
    return CalibrationSet(tokens, record)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what was needed has been seen."""


@dataclass
class BlockBatch:
    hidden: torch.Tensor  # [batch, seqlen, hidden] on the compute device
    kwargs: dict[str, Any]  # what the model passes its blocks: mask, rotary embeddings, ...


def first_tensor(output: Any) -> torch.Tensor:
    """The hidden states of a module output that may be a tuple (attention, older decoder blocks)."""
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def capture_block_inputs(model: nn.Module, adapter: ArchAdapter, tokens: torch.Tensor, batch_size: int,
                         device: torch.device) -> list[BlockBatch]:
    """Run the model up to its first block on every calibration batch and keep what the block receives."""
    block0 = adapter.decoder_blocks(model)[0]
    modules = [model.get_submodule(name) for name in adapter.pre_block_modules()] + [block0]
    homes = [next(m.parameters(), torch.empty(0)).device for m in modules]
    captured: list[BlockBatch] = []

    def catch(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(BlockBatch(hidden, kwargs))
        raise _Stop

    for module in modules:
        module.to(device)
    handle = block0.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in tokens.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        for module, home in zip(modules, homes):
            module.to(home)
    return captured


class BlockRunner:
    """Runs one block over the calibration batches, with hooks on chosen submodules."""

    def __init__(self, block: nn.Module, batches: list[BlockBatch]) -> None:
        self.block = block
        self.batches = batches

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        return [first_tensor(self.block(batch.hidden, **batch.kwargs)) for batch in self.batches]

    @torch.no_grad()
    def feed_inputs(self, modules: dict[str, nn.Module], consume: Callable[[str, int, torch.Tensor], None]) -> None:
        """Call `consume(name, batch_index, input)` for the input of each named module on every batch.
        Each forward stops as soon as all of them have been reached (later modules are not run)."""
        seen: set[str] = set()
        current = 0

        def hook_for(name: str) -> Callable:
            def hook(module: nn.Module, args: tuple) -> None:
                consume(name, current, args[0])
                seen.add(name)
                if len(seen) == len(modules):
                    raise _Stop

            return hook

        handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in modules.items()]
        try:
            for current, batch in enumerate(self.batches):
                seen.clear()
                try:
                    self.block(batch.hidden, **batch.kwargs)
                except _Stop:
                    pass
        finally:
            for handle in handles:
                handle.remove()

    def inputs_of(self, modules: dict[str, nn.Module]) -> dict[str, list[torch.Tensor]]:
        """The inputs of each named module, one tensor per batch."""
        inputs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.feed_inputs(modules, lambda name, _index, x: inputs[name].append(x))
        return inputs


BlockQuantizer = Callable[[int, nn.Module, BlockRunner], None]


def walk_blocks(model: nn.Module, adapter: ArchAdapter, tokens: torch.Tensor, *, batch_size: int,
                device: torch.device, propagate: str, quantize_block: BlockQuantizer) -> None:
    """Quantize the model block by block with `quantize_block(index, block, runner)`."""
    batches = capture_block_inputs(model, adapter, tokens, batch_size, device)
    blocks = adapter.decoder_blocks(model)
    for index, block in enumerate(blocks):
        progress.report("calibrating block", index + 1, len(blocks))
        home = next(block.parameters()).device
        block.to(device)
        runner = BlockRunner(block, batches)
        float_outputs = runner.outputs() if propagate == "float" else None
        quantize_block(index, block, runner)
        outputs = float_outputs if float_outputs is not None else runner.outputs()
        batches = [dataclasses.replace(batch, hidden=out) for batch, out in zip(batches, outputs)]
        block.to(home)
