"""The block-wise engine that runs every method: stages, the one block walk, and the result.

A method is a `Stage`: a small class over its frozen params and the specs it reads, with
hooks the engine calls in order for every stage of a pipeline (`smoothquant+gptq`):

    before_blocks(model step)          model-level work (a rotation of embeddings and head)
    for each decoder block:
        on_block(block step)           collect statistics on the block as the earlier stages
                                       left it (the step's runner), then transform or quantize it
    after_blocks(model step)           model-level work (a quantized KV cache)

`run_stages` is the only walker. With a calibrated stage in the pipeline it captures the
first block's inputs for the calibration windows once, with what the model passes each block
(its mask and rotary embeddings, which differ between sliding-window and global layers), and
feeds each block's outputs (of the block as the stages left it, or of the float block with
`propagate: float`) to the next; only the current block and its activations live on the
compute device. Without calibrated stages, blocks are visited one at a time on the device
with no data.

A stage writes rounded weights through `BlockStep.quantized`, which records the effective
spec of each linear: the result says what ran, not what was configured.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_map
from transformers.cache_utils import Cache

from ptq import progress
from ptq.calib import CalibrationSet
from ptq.config import CalibConfig, KVConfig
from ptq.models.adapters import ArchAdapter
from ptq.quant import ActSpec, QuantSpec


@dataclass(frozen=True)
class Specs:
    """The quantizer specs a stage reads; None when it does not read one or the track sets none."""

    weight: QuantSpec | None = None
    kv: KVConfig | None = None
    act: ActSpec | None = None  # applied after the stages (ptq.pipeline); read by a stage whose result depends on it


@dataclass
class QuantResult:
    """What a pipeline did to the model, as the evaluators and the record need it."""

    model: nn.Module
    make_cache: Callable[[], Cache] | None = None  # a fresh cache per forward, when the KV cache is quantized
    kv: dict[str, Any] | None = None  # what that cache stores, as the stage that made it describes it
    weight_specs: dict[str, QuantSpec] = field(default_factory=dict)  # the spec each linear was rounded with
    act_specs: dict[str, QuantSpec] = field(default_factory=dict)  # linears whose inputs are quantized
    act_output_specs: dict[str, QuantSpec] = field(default_factory=dict)  # linears whose outputs are, too
    runtime: list[str] = field(default_factory=list)  # modules or hooks added beyond the weights' values
    notes: list[str] = field(default_factory=list)  # facts worth recording (uneven groups, ...)
    fallbacks: list[str] = field(default_factory=list)  # anything that ran other than as configured
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # What a stage reports as data, by stage name (a library backend: its packages, the mapping of
    # the cell's settings onto the library's, the library's own seconds)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def pure_weights(self) -> bool:
        """The stages changed only parameter values: their result can be stored (and restored) as
        weights. Quantized activations are the pipeline's, re-applied from the configuration."""
        return self.make_cache is None and not self.runtime


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what was needed has been seen."""


@dataclass
class BlockBatch:
    hidden: torch.Tensor  # [batch, seqlen, hidden] on the compute device
    kwargs: dict[str, Any]  # what the model passes the current block: mask, rotary embeddings, ...
    # What the model passes each block, by index: models with several attention types (sliding-window
    # and global layers) give each type its own mask and rotary embeddings.
    per_block: tuple[dict[str, Any], ...] = ()

    def at(self, index: int, hidden: torch.Tensor) -> BlockBatch:
        """This batch entering block `index` with `hidden` states."""
        return dataclasses.replace(self, hidden=hidden, kwargs=self.per_block[index] if self.per_block
                                   else self.kwargs)


def _copied(output: Any) -> Any:
    """A module output with its tensors cloned: a replayed output must not share memory that the
    block could change in place."""
    return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, output)


Observer = Callable[[int, torch.Tensor], None]  # takes a module's input (or output) on one batch (its index)


def _taken(items: list[Any], index: int) -> Any:
    """items[index], which the list no longer holds (it is not needed again)."""
    item, items[index] = items[index], None
    return item


def _input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """A module's input as a forward pre-hook sees it (attention is called with `hidden_states=`)."""
    return args[0] if args else kwargs["hidden_states"]


def first_tensor(output: Any) -> torch.Tensor:
    """The hidden states of a module output that may be a tuple (attention, older decoder blocks)."""
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def capture_block_inputs(model: nn.Module, adapter: ArchAdapter, tokens: torch.Tensor, batch_size: int,
                         device: torch.device) -> list[BlockBatch]:
    """Run the model up to its blocks on every calibration batch and keep what the first block
    receives, with the arguments the model gives each block (the blocks themselves do not run:
    each passes its input on, the last one ends the forward)."""
    blocks = adapter.decoder_blocks(model)
    modules = [model.get_submodule(name) for name in adapter.pre_block_modules()]
    homes = [next(m.parameters(), torch.empty(0)).device for m in modules]
    captured: list[BlockBatch] = []
    hidden: list[torch.Tensor] = []
    arguments: list[dict[str, Any]] = []

    def catcher(index: int) -> Callable[..., torch.Tensor]:
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            states = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                hidden.append(states)
            arguments.append(kwargs)
            if index == len(blocks) - 1:
                captured.append(BlockBatch(hidden[0], arguments[0], tuple(arguments)))
                raise _Stop
            return states

        return forward

    for module in modules:
        module.to(device)
    for index, block in enumerate(blocks):  # an instance attribute: nn.Module.__call__ runs it instead
        block.forward = catcher(index)
    try:
        for batch in tokens.split(batch_size):
            hidden.clear()
            arguments.clear()
            try:
                model(batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for block in blocks:
            del block.forward
        for module, home in zip(modules, homes):
            module.to(home)
    return captured


class _Shortcut:
    """The forward of a frozen child during its recording pass, when the input of its last linear
    was kept. The first batch runs the child and checks, bit for bit, that its output is that
    linear's output (no residual, no scaling, no hook after it, nothing else computed in it);
    then every other batch with a kept input is the linear applied to it, and a batch without
    one runs the child. If the check fails, the child runs on every batch as before."""

    def __init__(self, forward: Callable[..., Any], linear: nn.Module, inputs: dict[int, torch.Tensor],
                 position: list[int], consume: bool) -> None:
        self.forward = forward
        self.linear = linear
        self.inputs = inputs
        self.position = position
        self.consume = consume  # the block's last pass: each kept input is dropped once used
        self.layout: Any = None  # the first batch's output, once it passed the check
        self.checked = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        index = self.position[0]
        if self.layout is None or index not in self.inputs:
            output = self.forward(*args, **kwargs)
            if not self.checked:
                self.checked = True
                expected = self._linear_output(index)
                if self._replaceable(output) and torch.equal(first_tensor(output), expected):
                    self.layout = output
            return output
        computed = self._linear_output(index)
        return (computed, *self.layout[1:]) if isinstance(self.layout, tuple) else computed

    def _linear_output(self, index: int) -> torch.Tensor:
        # forward, not __call__: the kept input has been through the linear's pre-hooks already
        return self.linear.forward(self.inputs.pop(index) if self.consume else self.inputs[index])

    @staticmethod
    def _replaceable(output: Any) -> bool:
        """A tensor, or a plain tuple whose other items are not tensors (attention's weights: None)."""
        if isinstance(output, torch.Tensor):
            return True
        return type(output) is tuple and isinstance(output[0], torch.Tensor) \
            and not any(isinstance(item, torch.Tensor) for item in output[1:])


class BlockRunner:
    """Runs one block over the calibration batches, with hooks on chosen submodules.

    A stage may declare children of the block final (`freeze`): their weights will not change
    again and neither will their inputs (everything before them in the block is final too), so
    the next pass through them records their outputs, and later passes replay those instead of
    computing them (GPTQ's true-sequential passes re-run the attention otherwise). The engine
    forgets them when the next stage starts, as it may change the block.

    The recording pass itself is cheap when the stage kept the input of the child's last linear
    (`feed_inputs(keep=...)`): a child whose output is that linear's output (attention ends in
    o_proj, the MLP in down_proj) runs on the first batch only, where this is checked bit for bit,
    and on the others its output is the linear applied to the kept input. Kept inputs take at most
    as much memory as the block's input activations (`keep_budget`): the batches beyond run the
    child (down_proj's inputs are 2.7x the hidden states on SmolLM2, 3.5x on Llama-3-70B)."""

    def __init__(self, block: nn.Module, batches: list[BlockBatch]) -> None:
        self.block = block
        self.batches = batches
        self._frozen: set[str] = set()
        self._replays: dict[str, list[Any]] = {}  # child -> its output per batch
        self._kept: dict[str, dict[int, torch.Tensor]] = {}  # linear -> its input by batch index
        self.keep_budget = sum(batch.hidden.numel() * batch.hidden.element_size() for batch in batches)

    def freeze(self, children: set[str]) -> None:
        self._frozen |= children

    def thaw(self) -> None:
        self._frozen.clear()
        self._replays.clear()
        self._kept.clear()

    def _last_linear_of(self, child: str) -> str | None:
        """The one linear inside `child` whose input was kept, for the first batch (the checked one)
        at least, if there is one."""
        kept = [name for name, inputs in self._kept.items() if name.startswith(child + ".") and 0 in inputs]
        return kept[0] if len(kept) == 1 else None

    def _kept_bytes(self) -> int:
        return sum(x.numel() * x.element_size() for inputs in self._kept.values() for x in inputs.values())

    @contextmanager
    def _passing(self, last: bool = False) -> Iterator[list[int]]:
        """A pass over the batches: frozen children replay what they recorded, or record it;
        yields the index of the batch being run (to set). The `last` pass over the block records
        nothing and drops each kept input once used: nothing runs the block again."""
        position = [0]
        unrecorded = self._frozen - set(self._replays)
        recording = {} if last else {name: [] for name in unrecorded}
        patched = [self.block.get_submodule(name) for name in self._replays]
        replay = _taken if last else lambda items, index: _copied(items[index])
        for name, module in zip(self._replays, patched):
            module.forward = lambda *_args, _outputs=self._replays[name], **_kwargs: \
                replay(_outputs, position[0])
        shortcuts = {name: linear for name in unrecorded if (linear := self._last_linear_of(name))}
        for name, linear in shortcuts.items():
            child = self.block.get_submodule(name)
            child.forward = _Shortcut(child.forward, self.block.get_submodule(linear), self._kept[linear],
                                      position, consume=last)
            patched.append(child)

        def recorder(name: str) -> Callable:
            def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
                if len(recording[name]) == position[0]:  # once per batch
                    recording[name].append(_copied(output))
            return hook

        handles = [self.block.get_submodule(name).register_forward_hook(recorder(name)) for name in recording]
        try:
            yield position
        finally:
            for handle in handles:
                handle.remove()
            for module in patched:
                del module.forward
        if last:
            self._replays.clear()
            self._kept.clear()
        recorded = {name: outputs for name, outputs in recording.items() if len(outputs) == len(self.batches)}
        self._replays.update(recorded)
        for name in recorded.keys() & shortcuts.keys():
            del self._kept[shortcuts[name]]  # the child now replays its outputs

    @torch.no_grad()
    def outputs(self, observers: dict[str, Observer] | None = None, last: bool = False,
                output_observers: dict[str, Observer] | None = None) -> list[torch.Tensor]:
        """The block's output on every batch; `observers` (module name -> callback) see the inputs of
        those modules on the way, as `feed_inputs` gives them, and `output_observers` a copy of their
        outputs (the first tensor). After the `last` pass the runner holds no recorded outputs or kept
        inputs (they go batch by batch, as used)."""
        outputs = []
        with self._passing(last) as position:

            def hook_for(observe: Observer) -> Callable:
                def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
                    observe(position[0], _input(args, kwargs))
                return hook

            def output_hook_for(observe: Observer) -> Callable:
                def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
                    observe(position[0], first_tensor(output).clone())
                return hook

            handles = [self.block.get_submodule(name).register_forward_pre_hook(hook_for(observe),
                                                                                with_kwargs=True)
                       for name, observe in (observers or {}).items()]
            handles += [self.block.get_submodule(name).register_forward_hook(output_hook_for(observe))
                        for name, observe in (output_observers or {}).items()]
            try:
                for position[0], batch in enumerate(self.batches):
                    outputs.append(first_tensor(self.block(batch.hidden, **batch.kwargs)))
            finally:
                for handle in handles:
                    handle.remove()
        return outputs

    @torch.no_grad()
    def feed_inputs(self, modules: dict[str, nn.Module], consume: Callable[[str, int, torch.Tensor], None],
                    keep: set[str] = frozenset()) -> None:
        """Call `consume(name, batch_index, input)` for the input of each named module on every batch
        that reaches it (an MoE expert only sees the batches routing tokens to it; a module called
        with keywords, as attention is, gives its `hidden_states`). Each forward stops as soon as all
        of them have been reached (later modules are not run).

        The runner keeps the inputs of the linears in `keep`, which the caller vouches are final
        (every linear that runs before them is), to shortcut their child's recording pass: those
        that fit in `keep_budget` with the ones it holds."""
        seen: set[str] = set()
        with self._passing() as position:

            def hook_for(name: str) -> Callable:
                def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
                    x = _input(args, kwargs)
                    if name in keep and self._kept_bytes() + x.numel() * x.element_size() <= self.keep_budget:
                        self._kept.setdefault(name, {})[position[0]] = x
                    consume(name, position[0], x)
                    seen.add(name)
                    if len(seen) == len(modules):
                        raise _Stop

                return hook

            handles = [module.register_forward_pre_hook(hook_for(name), with_kwargs=True)
                       for name, module in modules.items()]
            try:
                for position[0], batch in enumerate(self.batches):
                    seen.clear()
                    try:
                        self.block(batch.hidden, **batch.kwargs)
                    except _Stop:
                        pass
            finally:
                for handle in handles:
                    handle.remove()

    def inputs_of(self, modules: dict[str, nn.Module]) -> dict[str, list[torch.Tensor]]:
        """The inputs of each named module, one tensor per batch that reaches it."""
        inputs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.feed_inputs(modules, lambda name, _index, x: inputs[name].append(x))
        return inputs

    def first(self, samples: int | None) -> BlockRunner:
        """A runner over the batches holding the first `samples` sequences (all with None)."""
        if samples is None:
            return self
        count, total = 0, 0
        for batch in self.batches:
            if total >= samples:
                break
            total += batch.hidden.shape[0]
            count += 1
        return BlockRunner(self.block, self.batches[:count])


@dataclass
class ModelStep:
    """What a stage's model-level hooks work on. A whole-model stage (a library backend, which
    quantizes the model in one call) also gets the calibration tokens, the tokenizer and the
    compute device (the model itself stays on the host)."""

    model: nn.Module
    adapter: ArchAdapter
    result: QuantResult
    calibration: CalibrationSet | None = None
    tokenizer: Any = None
    device: torch.device = torch.device("cpu")


@dataclass
class BlockStep:
    """One decoder block as the engine hands it to each stage in turn."""

    index: int
    block: nn.Module
    name: str  # the block's full name, e.g. "model.layers.3"
    adapter: ArchAdapter  # the block's layout: sequential groups, scaling groups
    runner: BlockRunner | None  # the calibration batches through this block; None in a data-free pipeline
    result: QuantResult
    # The float model's activations at this block's input through the block (as the earlier
    # stages left it): for stages that calibrate on the unquantized model (`float_inputs`).
    float_runner: BlockRunner | None = None
    # The stage's `float_observers` (and `float_output_observers`) saw this block's float inputs
    # (and outputs) during the engine's float pass: only ever the first stage's.
    float_observed: bool = False

    def linears(self) -> dict[str, nn.Linear]:
        """The block's linears by name inside the block, in execution order."""
        return self.adapter.block_linears(self.block)

    def quantized(self, name: str, weight: torch.Tensor, spec: QuantSpec) -> None:
        """Write the rounded `weight` of linear `name` (inside the block), rounded with `spec`."""
        with torch.no_grad():
            self.block.get_submodule(name).weight.copy_(weight)
        self.result.weight_specs[f"{self.name}.{name}"] = spec


class Stage:
    """One method as a step of a pipeline. Subclasses override the hooks they need; the engine
    calls them in pipeline order. `final` is True for the stage that rounds the weights: a
    stage that can also hand the rounding to a later one (AWQ before GPTQ) checks it."""

    name: ClassVar[str]  # set by ptq.registry.register_method
    # Statistics come from the float model's activations (SmoothQuant's reference calibrates the
    # unquantized model), whatever the pipeline propagates: the engine then keeps both streams.
    float_inputs: ClassVar[bool] = False

    def __init__(self, params: Any, specs: Specs, final: bool) -> None:
        self.params = params
        self.specs = specs
        self.final = final

    @classmethod
    def check(cls, params: Any, specs: Specs) -> None:
        """Refuse, with a ValueError saying why, specs the method cannot run with; called when
        the cell is built, before any model loads."""

    def before_blocks(self, step: ModelStep) -> None:
        """Model-level work before the block walk."""

    def float_observers(self, step: BlockStep) -> dict[str, Observer]:
        """The modules of the block whose float inputs the stage reads, each with the callback taking
        them (batch index, input). When the stage is the first and the engine runs its own pass over
        the float block anyway (for the float outputs: a `float_inputs` stage, or float propagation),
        the engine calls them in that pass and sets `step.float_observed`: the stage then needs no
        pass of its own."""
        return {}

    def float_output_observers(self, step: BlockStep) -> dict[str, Observer]:
        """As `float_observers`, for the outputs of modules of the float block."""
        return {}

    def on_block(self, step: BlockStep) -> None:
        """Per block: collect statistics on the block as the earlier stages left it, then
        transform or quantize it."""

    def after_blocks(self, step: ModelStep) -> None:
        """Model-level work after the block walk."""

    def samples_read(self) -> int | None:
        """How many calibration sequences, the first ones, the stage reads (None: all)."""
        return None

    @classmethod
    def code_modules(cls) -> tuple[str, ...]:
        """Modules beside the stage's own whose source its result depends on (part of the cache keys)."""
        return ()

    @classmethod
    def environment(cls) -> dict[str, Any] | None:
        """The packages of an environment of its own the stage runs in (a library backend's lock),
        part of the cache keys; None for a stage of the core install."""
        return None

    @classmethod
    def walks_blocks(cls) -> bool:
        return cls.on_block is not Stage.on_block


@contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


ENGINE = "engine"  # stage_seconds key of the engine's own forwards (capture, propagation)


def run_stages(stages: list[Stage], step: ModelStep, calibration: CalibrationSet | None, config: CalibConfig,
               device: torch.device) -> None:
    """Run the stages' hooks in order, walking the blocks once for all of them; the time of each
    stage (its statistics forwards included) goes to `step.result.stage_seconds`."""
    seconds = step.result.stage_seconds
    for stage in stages:
        with _timed(seconds, stage.name):
            stage.before_blocks(step)
    walkers = [stage for stage in stages if stage.walks_blocks()]
    if walkers:
        _walk(walkers, step, calibration, config, device)
    for stage in stages:
        with _timed(seconds, stage.name):
            stage.after_blocks(step)


def _sequences_read(stages: list[Stage], tokens: torch.Tensor, batch_size: int, result: QuantResult) -> torch.Tensor:
    """The calibration sequences some stage reads: when every stage reads only the first n, the
    batches holding them (as `BlockRunner.first` picks them), so that no block runs on the
    others. The same batches as with all sequences: the same numbers, fewer forwards."""
    reads = [stage.samples_read() for stage in stages]
    if None in reads:
        return tokens
    keep = -(-max(reads) // batch_size) * batch_size
    if keep >= tokens.shape[0]:
        return tokens
    result.notes.append(f"calibration: the stages read only the first {keep} of the {tokens.shape[0]} "
                        "sequences; the blocks ran on those alone")
    return tokens[:keep]


def _walk(stages: list[Stage], step: ModelStep, calibration: CalibrationSet | None, config: CalibConfig,
          device: torch.device) -> None:
    seconds = step.result.stage_seconds
    batches = None
    if calibration is not None:
        tokens = _sequences_read(stages, calibration.tokens, config.batch_size, step.result)
        with _timed(seconds, ENGINE):
            batches = capture_block_inputs(step.model, step.adapter, tokens, config.batch_size, device)
    # float_batches: the float model's activations, kept apart when the propagated ones are quantized
    float_batches = batches if batches is not None and config.propagate == "quantized" \
        and any(stage.float_inputs for stage in stages) else None
    blocks = step.adapter.decoder_blocks(step.model)
    for index, block in enumerate(blocks):
        progress.report("calibrating block" if batches is not None else "quantizing block", index + 1, len(blocks))
        home = next(block.parameters()).device
        block.to(device)
        runner = None if batches is None else BlockRunner(block, batches)
        float_runner = runner if float_batches is None else BlockRunner(block, float_batches)
        block_step = BlockStep(index, block, f"{step.adapter.blocks}.{index}", step.adapter, runner,
                               step.result, float_runner)
        float_outputs = None
        if runner is not None and (config.propagate == "float" or float_batches is not None):
            # the first stage sees the block as it is: it may take its float inputs (and module outputs)
            # from this pass, when they are what it calibrates on
            first = stages[0]
            observed = first.float_inputs or config.propagate == "float"
            observers = first.float_observers(block_step) if observed else {}
            output_observers = first.float_output_observers(block_step) if observed else {}
            with _timed(seconds, ENGINE):
                float_outputs = float_runner.outputs(observers, output_observers=output_observers)
            block_step.float_observed = bool(observers or output_observers)
        for position, stage in enumerate(stages):
            if runner is not None:
                runner.thaw()  # what the previous stage froze, this one may change
            if position:  # what the float pass observed, it observed for the first stage
                block_step.float_observed = False
            with _timed(seconds, stage.name):
                stage.on_block(block_step)
        if runner is not None:
            with _timed(seconds, ENGINE):
                outputs = float_outputs if config.propagate == "float" else runner.outputs(last=True)
            if index + 1 < len(blocks):
                batches = [batch.at(index + 1, out) for batch, out in zip(runner.batches, outputs)]
                if float_batches is not None:
                    float_batches = [batch.at(index + 1, out)
                                     for batch, out in zip(float_batches, float_outputs)]
        block.to(home)
