"""Architecture adapters: where a decoder-only model keeps its blocks, norms, embeddings and head,
and which linears of a block read which input.

An adapter is a data record (`ArchAdapter`) for one loaded model; no algorithm knows a family
by name, it asks the adapter. Most decoders follow one pattern, and their adapter is derived
from the module tree (`derive_adapter`): a ModuleList of blocks; in each block an attention
with q/k/v/o projections (or a fused qkv_proj), an MLP with gate/up/down projections (or a
fused gate_up_proj, or mixture-of-experts), and norms whose outputs are the attention's and
the MLP's inputs, found by running the first block once. An explicit adapter exists only for
a layout the derivation does not cover (OPT, below). `FAMILIES` names the families a model
YAML may state, each with the transformers classes it covers.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ptq.errors import UnsupportedModel
from ptq.models.moe import ExpertList, unfuse_experts

Steps = tuple[tuple[tuple[str, ...], ...], ...]


@dataclass(frozen=True)
class ScalingGroup:
    """Linears that read the same input, and the operation producing that input (AWQ folds
    per-channel scales into `prev`). Names are relative to a decoder block."""

    prev: str  # a norm or a linear whose output channels feed `linears`
    linears: tuple[str, ...]
    inspect: str  # the module whose output the scale search compares (attention, MLP or the linear)
    inspect_takes_block_kwargs: bool = False  # attention needs the mask and rotary embeddings
    # The output rows of a fused `prev` that are the linears' inputs (the v slice of qkv_proj, the up
    # half of gate_up_proj); None: all of its outputs.
    prev_rows: tuple[int, int] | None = None
    # Modules left in float that read the same input (an MoE router): their weight columns take the
    # scales too, so they compute what they did before.
    float_readers: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """The group as records name it, MoE experts as one (`mlp.experts.*.up_proj`)."""

        def pattern(name: str) -> str:
            return re.sub(r"\.\d+\.", ".*.", name)

        return f"{pattern(self.prev)} -> {', '.join(dict.fromkeys(pattern(name) for name in self.linears))}"


def _inside(name: str, paths: tuple[str, ...] | list[str]) -> bool:
    return any(name == path or name.startswith(path + ".") for path in paths)


def linears_of(block: nn.Module, keep_float: tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """The linears of a block by name, in execution order, but those inside `keep_float` modules."""
    return {
        name: module
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear) and not _inside(name, keep_float)
    }


@dataclass(frozen=True)
class ArchAdapter:
    family: str
    architectures: tuple[str, ...]  # transformers class names this adapter covers
    blocks: str  # dotted path from the causal-LM module to the ModuleList of decoder blocks
    embeddings: tuple[str, ...]  # modules before the first block
    final_norm: str
    lm_head: str
    rotary: str | None  # module computing rotary position embeddings, shared by all blocks
    # GPTQ's true-sequential order, in steps: each step's linears are quantized before the next step's
    # inputs are collected. A step holds groups of linears reading the same input: one group in a dense
    # block, one per expert in a mixture-of-experts step (each expert reads the tokens routed to it).
    sequential: Steps
    scaling_groups: tuple[ScalingGroup, ...]  # AWQ's groupings, as in the reference implementation
    qkv: tuple[str, ...]  # the projections whose outputs are the attention matmuls' inputs (or a fused one)
    # Where a rotation of the residual stream acts (QuaRot): the linears reading the stream are
    # those of the scaling groups fed by a norm; these write into it. `norm` says what the norms
    # compute: "rms" x / rms(x) · w, "layer" (x − mean) / std · w + b.
    norm: Literal["rms", "layer"]
    attn_value: str  # the value projection (or a fused qkv_proj): its value heads are attn_out's input heads
    attn_out: str  # the attention's output projection
    mlp_out: str | None  # the MLP's output projection; None: one per expert (mixture of experts)
    norm_offset: float = 0.0  # the block norms compute x̂·(norm_offset + weight): 1 for Gemma, else 0
    keep_float: tuple[str, ...] = ()  # modules of a block no method quantizes (MoE routers)

    def pre_block_modules(self) -> tuple[str, ...]:
        """Modules that run before the first block (they go to the compute device for calibration)."""
        return self.embeddings + ((self.rotary,) if self.rotary else ())

    def decoder_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The linear layers of one decoder block to quantize, by their name inside the block, in
        execution order (those inside `keep_float` modules are left out)."""
        return linears_of(block, self.keep_float)

    def value_rows(self) -> tuple[int, int] | None:
        """The output rows of `attn_value` that are the value heads (the last rows of a fused
        qkv_proj); None: all of them."""
        return next(group.prev_rows for group in self.scaling_groups if group.linears == (self.attn_out,))

    def attention_projections(self, model: nn.Module) -> list[str]:
        """Full names of every block's query, key and value projections."""
        blocks = range(len(self.decoder_blocks(model)))
        return [f"{self.blocks}.{index}.{name}" for index in blocks for name in self.qkv]

    def quantizable_linears(self, model: nn.Module) -> dict[str, nn.Linear]:
        """Every linear inside the decoder blocks, by full name. The LM head and embeddings stay in
        float, as in the GPTQ, AWQ and SmoothQuant reference code (they are often tied)."""
        return {
            f"{self.blocks}.{index}.{name}": linear
            for index, block in enumerate(self.decoder_blocks(model))
            for name, linear in self.block_linears(block).items()
        }


@dataclass(frozen=True)
class Family:
    """A family a model YAML may name: the transformers classes it covers and, only for a layout
    `derive_adapter` does not cover, its explicit adapter."""

    name: str
    architectures: tuple[str, ...]
    adapter: ArchAdapter | None = None


OPT = ArchAdapter(
    family="opt",
    architectures=("OPTForCausalLM",),
    blocks="model.decoder.layers",
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    final_norm="model.decoder.final_layer_norm",
    lm_head="lm_head",
    rotary=None,
    sequential=(
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),),
        (("self_attn.out_proj",),),
        (("fc1",),),
        (("fc2",),),
    ),
    scaling_groups=(
        ScalingGroup(
            "self_attn_layer_norm",
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "self_attn",
            inspect_takes_block_kwargs=True,
        ),
        ScalingGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
        ScalingGroup("final_layer_norm", ("fc1",), "fc1"),
        ScalingGroup("fc1", ("fc2",), "fc2"),
    ),
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    norm="layer",
    attn_value="self_attn.v_proj",
    attn_out="self_attn.out_proj",
    mlp_out="fc2",
)

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")),
    Family("qwen3", ("Qwen3ForCausalLM",)),
    Family("gemma3", ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")),  # 4B and up: image-text
    Family("phi3", ("Phi3ForCausalLM",)),
    Family("mixtral", ("MixtralForCausalLM",)),
    Family("qwen3_moe", ("Qwen3MoeForCausalLM",)),
    Family("opt", ("OPTForCausalLM",), OPT),
)


def adapter_for(model: nn.Module, family: str | None = None) -> ArchAdapter:
    """The adapter of a loaded model: its family's explicit one, else derived from the module tree
    (checked against the family its YAML states, if any). Fused MoE experts are first split into
    per-expert linears, in place (ptq.models.moe): the layout every method works on."""
    arch = type(model).__name__
    known = next((f for f in FAMILIES if arch in f.architectures), None)
    if family is not None and (known is None or known.name != family):
        declared = next((f for f in FAMILIES if f.name == family), None)
        covered = f"covers {', '.join(declared.architectures)}" if declared else "is not a known family"
        raise UnsupportedModel(
            f"model class {arch} is not in family {family!r} (which {covered}); leave "
            "`family` out of the model YAML to derive its layout from the module tree"
        )
    unfuse_experts(model)
    if known is not None and known.adapter is not None:
        return known.adapter
    return derive_adapter(model, known.name if known else arch)


# ------------------------------------------------------------------------- derivation

ATTENTION_INPUTS = (("q_proj", "k_proj", "v_proj"), ("qkv_proj",))
MLP_INPUTS = (("gate_proj", "up_proj"), ("gate_up_proj",))
ATTENTION_OUTPUT, MLP_OUTPUT = "o_proj", "down_proj"
NORM_OFFSETS = (0.0, 1.0)  # x̂·w (Llama, Qwen, Phi, Mistral), x̂·(1 + w) (Gemma)
PROBE_TOKENS = 8
NEEDS = (
    "a derived adapter needs: a ModuleList of num_hidden_layers decoder blocks next to one final norm; "
    "in each block an attention module with linears q_proj, k_proj, v_proj (or a fused qkv_proj) and "
    "o_proj, an MLP with gate_proj, up_proj (or a fused gate_up_proj) and down_proj, or transformers' "
    "fused experts with a router, and two distinct norms computing x·w or x·(1+w) whose outputs are the "
    "attention's and the MLP's inputs; every block with the same linears. For another layout, give its "
    "family an explicit ArchAdapter in ptq.models.adapters.FAMILIES (see README, 'Adding a model')"
)


class _Stop(Exception):
    """Ends the probe forward once the first block has run."""


def _error(model: nn.Module, problem: str) -> UnsupportedModel:
    return UnsupportedModel(f"{type(model).__name__}: {problem}. {NEEDS}")


def is_norm(module: nn.Module, hidden: int) -> bool:
    """Whether the module looks like a norm over the hidden size: a leaf with a weight of that size."""
    weight = getattr(module, "weight", None)
    return not list(module.children()) and isinstance(weight, nn.Parameter) and weight.shape == (hidden,)


def _owner(block: nn.Module, names: tuple[str, ...], skip: type[nn.Module]) -> str | None:
    """The module of `block` (not inside a `skip` module) having every name as a child linear."""
    skipped = [name for name, module in block.named_modules() if isinstance(module, skip)]
    for path, module in block.named_modules():
        if not _inside(path, skipped) and all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
            return path
    return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _name_of(model: nn.Module, target: nn.Module | None) -> str | None:
    return next((name for name, module in model.named_modules() if module is target), None)


@torch.no_grad()
def _probe(
    model: nn.Module, block: nn.Module, watched: dict[str, nn.Module], norms: dict[str, nn.Module]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run the model on a few tokens up to the end of its first block: the input of each watched
    module and the output of each norm."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            inputs[name] = args[0] if args else kwargs["hidden_states"]

        return hook

    def keep_output(name: str):
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            outputs[name] = output

        return hook

    def stop(*_: object) -> None:
        raise _Stop

    handles = [
        module.register_forward_pre_hook(keep_input(name), with_kwargs=True)
        for name, module in watched.items()
    ]
    handles += [module.register_forward_hook(keep_output(name)) for name, module in norms.items()]
    handles.append(block.register_forward_hook(stop))
    device = next(block.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    try:
        model(torch.arange(1, PROBE_TOKENS + 1, device=device).remainder(vocab).unsqueeze(0), use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs


@torch.no_grad()
def _norm_function(model: nn.Module, name: str, norm: nn.Module) -> tuple[Literal["rms", "layer"], float]:
    """What the norm computes: x̂ = x / rms(x) ("rms") or (x − mean) / std ("layer"), times
    (c + weight) for the offset c, the one for which weight = -c gives zero."""
    x = torch.randn(2, norm.weight.shape[0], generator=torch.Generator().manual_seed(0)).to(norm.weight) + 1
    probe = copy.deepcopy(norm)
    if getattr(probe, "bias", None) is not None:
        probe.bias.zero_()
    for offset in NORM_OFFSETS:
        probe.weight.fill_(-offset)
        if not probe(x).any():
            probe.weight.fill_(1 - offset)
            unit = probe(x).float()
            wide = x.float()
            for kind, centred in (("rms", wide), ("layer", wide - wide.mean(-1, keepdim=True))):
                expected = centred * centred.pow(2).mean(-1, keepdim=True).rsqrt()
                if torch.allclose(unit, expected, rtol=0.02, atol=0.02):  # a bfloat16 norm included
                    return kind, offset
    raise _error(model, f"norm {name} computes neither x̂·w nor x̂·(1+w), x̂ = x / rms(x) or (x − mean) / std")


def derive_adapter(model: nn.Module, family: str) -> ArchAdapter:
    """The adapter of a model following the common decoder pattern, from its module tree and one
    forward of its first block on a few tokens; an UnsupportedModel error says what is missing."""
    config = model.config.get_text_config(decoder=True)
    hidden = config.hidden_size
    lists = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name and len(module) == config.num_hidden_layers
    ]
    if not lists:
        raise _error(model, f"no ModuleList of {config.num_hidden_layers} decoder blocks")
    blocks_name = min(lists, key=lambda name: name.count("."))
    blocks = model.get_submodule(blocks_name)
    parent_name = blocks_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name)
    others = [name for name, child in parent.named_children() if child is not blocks]
    final = [name for name in others if is_norm(parent.get_submodule(name), hidden)]
    rotary = [
        name for name in others if type(parent.get_submodule(name)).__name__.endswith("RotaryEmbedding")
    ]
    lm_head = _name_of(model, model.get_output_embeddings())
    if len(final) != 1 or lm_head is None:
        raise _error(
            model, f"no single final norm next to {blocks_name} (found {final}) or no output embeddings"
        )
    block = blocks[0]
    layout = _block_layout(model, block, config)
    names = list(linears_of(block, layout["keep_float"]))
    for index, other in enumerate(blocks):
        if list(linears_of(other, layout["keep_float"])) != names:
            raise _error(model, f"block {index} has other linears than block 0")
    placed = {name for step in layout["sequential"] for group in step for name in group}
    if set(names) != placed:
        raise _error(model, f"block linears the layout does not place: {sorted(set(names) - placed)}")
    return ArchAdapter(
        family=family,
        architectures=(type(model).__name__,),
        blocks=blocks_name,
        embeddings=tuple(_join(parent_name, name) for name in others if name not in final + rotary[:1]),
        final_norm=_join(parent_name, final[0]),
        lm_head=lm_head,
        rotary=_join(parent_name, rotary[0]) if len(rotary) == 1 else None,
        **layout,
    )


def _block_layout(model: nn.Module, block: nn.Module, config: Any) -> dict[str, Any]:
    """Sequential steps, scaling groups, attention and MLP projections, norm function and float
    modules of one block."""
    attention, attention_inputs = next(
        (
            (path, inputs)
            for inputs in ATTENTION_INPUTS
            if (path := _owner(block, inputs + (ATTENTION_OUTPUT,), ExpertList)) is not None
        ),
        (None, ()),
    )
    experts = next((name for name, module in block.named_modules() if isinstance(module, ExpertList)), None)
    if experts is not None:
        mlp, _, experts_name = experts.rpartition(".")
        count = len(block.get_submodule(experts))
        routers = [
            name
            for name, child in block.get_submodule(mlp).named_children()
            if name != experts_name
            and getattr(child, "weight", torch.empty(0)).shape == (count, config.hidden_size)
        ]
        extra = [
            name
            for name, child in block.get_submodule(mlp).named_children()
            if name not in routers + [experts_name] and any(True for _ in child.parameters())
        ]
        if len(routers) != 1 or extra:
            raise _error(
                model,
                f"MoE block {mlp}: expected experts and one router, found "
                f"{[name for name, _ in block.get_submodule(mlp).named_children()]}",
            )
        mlp_inputs: tuple[str, ...] = ()
    else:
        mlp, mlp_inputs = next(
            (
                (path, inputs)
                for inputs in MLP_INPUTS
                if (path := _owner(block, inputs + (MLP_OUTPUT,), ExpertList)) is not None
            ),
            (None, ()),
        )
    if attention is None or mlp is None:
        raise _error(model, f"no attention ({attention}) or no MLP ({mlp}) in the first block")
    norms = {name: child for name, child in block.named_children() if is_norm(child, config.hidden_size)}
    watched = {attention: block.get_submodule(attention), mlp: block.get_submodule(mlp)}
    inputs, outputs = _probe(model, block, watched, norms)
    producers = {}
    for path in (attention, mlp):
        found = [
            name
            for name, out in outputs.items()
            if out.shape == inputs[path].shape and torch.equal(out, inputs[path])
        ]
        if len(found) != 1:
            raise _error(
                model,
                f"the input of {path} is not the output of one norm of the block (norms: {list(norms)})",
            )
        producers[path] = found[0]
    if producers[attention] == producers[mlp]:
        raise _error(model, f"one norm ({producers[mlp]}) feeds both attention and MLP (a parallel block)")
    functions = {_norm_function(model, name, norms[name]) for name in producers.values()}
    if len(functions) != 1:
        raise _error(model, "the attention's and the MLP's norms compute different functions")

    attn = tuple(_join(attention, name) for name in attention_inputs)
    o_proj = _join(attention, ATTENTION_OUTPUT)
    groups = [ScalingGroup(producers[attention], attn, attention, inspect_takes_block_kwargs=True)]
    if len(attn) == 3:
        groups.append(ScalingGroup(attn[2], (o_proj,), o_proj))
    else:  # fused q, k, v rows, in that order: q has o_proj's inputs, k and v split the rest; v is last
        fused = block.get_submodule(attn[0]).out_features
        v_rows, odd = divmod(fused - block.get_submodule(o_proj).in_features, 2)
        if odd or v_rows <= 0:
            raise _error(model, f"{attn[0]} has {fused} outputs: not q rows for {o_proj}, then k and v rows")
        groups.append(ScalingGroup(attn[0], (o_proj,), o_proj, prev_rows=(fused - v_rows, fused)))
    steps: list[tuple[tuple[str, ...], ...]] = [(attn,), ((o_proj,),)]
    keep_float: tuple[str, ...] = ()
    mlp_out: str | None = None  # a mixture of experts has one per expert
    if experts is not None:
        each = [_join(experts, str(index)) for index in range(count)]
        keep_float = (_join(mlp, routers[0]),)
        groups.append(
            ScalingGroup(
                producers[mlp],
                tuple(f"{e}.{p}" for e in each for p in ("gate_proj", "up_proj")),
                mlp,
                float_readers=keep_float,
            )
        )
        groups += [ScalingGroup(f"{e}.up_proj", (f"{e}.down_proj",), f"{e}.down_proj") for e in each]
        steps += [
            tuple((f"{e}.gate_proj", f"{e}.up_proj") for e in each),
            tuple((f"{e}.down_proj",) for e in each),
        ]
    else:
        up = tuple(_join(mlp, name) for name in mlp_inputs)
        down = mlp_out = _join(mlp, MLP_OUTPUT)
        groups.append(ScalingGroup(producers[mlp], up, mlp))
        if len(up) == 2:
            groups.append(ScalingGroup(up[1], (down,), down))
        else:  # fused gate then up rows: down reads act(gate) · up, linear in the up half
            rows = block.get_submodule(up[0]).out_features
            groups.append(ScalingGroup(up[0], (down,), down, prev_rows=(rows // 2, rows)))
        steps += [(up,), ((down,),)]
    norm, norm_offset = functions.pop()
    return {
        "sequential": tuple(steps),
        "scaling_groups": tuple(groups),
        "qkv": attn,
        "norm": norm,
        "attn_value": groups[1].prev,
        "attn_out": o_proj,
        "mlp_out": mlp_out,
        "norm_offset": norm_offset,
        "keep_float": keep_float,
    }
