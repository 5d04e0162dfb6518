"""Quantized KV cache on transformers' Cache API.

Each attention layer keeps two streams, keys and values, each stored as quantized chunks
followed by a full-precision tail of recent tokens. Chunks are quantized once, when tokens
leave the tail, and never re-quantized; attention reads the dequantized chunks and the tail.
The same cache object serves chunked prefill (perplexity) and generation.

Storage is what a kernel would keep: codes packed at their bit width when it divides 8
(2, 4, 8 bits; other widths take a byte per code), scales and zero points in float16, the
tail in the model's dtype. `nbytes` sums those stored tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

from ptq.config import KVAxis, KVConfig
from ptq.errors import NotApplicable
from ptq.quant import QuantSpec, QuantizedTensor, pack_codes, quantize, unpack_codes

META_DTYPE = torch.float16  # scales and zero points as stored


@dataclass(frozen=True)
class StoredChunk:
    """Quantized tokens of one stream: [batch, heads, tokens, head_dim] once dequantized."""

    packed: torch.Tensor  # codes - qmin, packed along the last dim of the row layout
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: QuantSpec
    axis: KVAxis
    row_shape: torch.Size  # token axis: as stored; channel axis: tokens and channels swapped
    dtype: torch.dtype

    @classmethod
    def quantize(cls, states: torch.Tensor, spec: QuantSpec, axis: KVAxis) -> StoredChunk:
        rows = states if axis == "token" else states.transpose(-1, -2)
        q = quantize(rows, spec)
        codes = (q.codes.to(torch.int16) - spec.qmin).to(torch.uint8)
        zero = None if q.zero is None else q.zero.to(META_DTYPE)
        return cls(pack_codes(codes, spec.bits), q.scale.to(META_DTYPE), zero, spec, axis, rows.shape, states.dtype)

    def dequantize(self) -> torch.Tensor:
        codes = unpack_codes(self.packed, self.spec.bits, self.row_shape[-1]).to(torch.int16) + self.spec.qmin
        zero = None if self.zero is None else self.zero.float()
        rows = QuantizedTensor(codes, self.scale.float(), zero, self.spec, self.dtype).dequantize()
        return rows if self.axis == "token" else rows.transpose(-1, -2)

    def nbytes(self) -> int:
        tensors = [self.packed, self.scale] + ([] if self.zero is None else [self.zero])
        return sum(t.numel() * t.element_size() for t in tensors)

    def extend(self, newer: StoredChunk) -> StoredChunk:
        """This chunk followed by `newer` (later tokens), as one: one dequantization per read
        however many times tokens were quantized. Codes and parameters are unchanged."""
        token_dim = -2 if self.axis == "token" else -1  # in the row layout
        length = self.row_shape[-1]
        if self.axis == "channel" and length * self.spec.bits % 8:  # the last byte is shared: repack
            codes = torch.cat([unpack_codes(self.packed, self.spec.bits, length),
                               unpack_codes(newer.packed, newer.spec.bits, newer.row_shape[-1])], dim=-1)
            packed = pack_codes(codes, self.spec.bits)
        else:
            packed = torch.cat([self.packed, newer.packed], dim=token_dim)
        zero = None if self.zero is None else torch.cat([self.zero, newer.zero], dim=token_dim)
        row_shape = list(self.row_shape)
        row_shape[token_dim] += newer.row_shape[token_dim]
        return StoredChunk(packed, torch.cat([self.scale, newer.scale], dim=token_dim), zero, self.spec, self.axis,
                           torch.Size(row_shape), self.dtype)

    @property
    def tokens(self) -> int:
        return self.row_shape[-2] if self.axis == "token" else self.row_shape[-1]

    def without_oldest(self, count: int) -> StoredChunk:
        """This chunk less its `count` oldest tokens (whole token groups on the channel axis); codes
        and parameters of the others are unchanged."""
        if self.axis == "token":
            rows = slice(count, None)
            zero = None if self.zero is None else self.zero[..., rows, :]
            row_shape = (*self.row_shape[:-2], self.row_shape[-2] - count, self.row_shape[-1])
            return StoredChunk(self.packed[..., rows, :], self.scale[..., rows, :], zero, self.spec,
                               self.axis, torch.Size(row_shape), self.dtype)
        groups = slice(count // self.spec.group_size, None)
        codes = unpack_codes(self.packed, self.spec.bits, self.row_shape[-1])[..., count:]
        zero = None if self.zero is None else self.zero[..., groups]
        row_shape = torch.Size((*self.row_shape[:-1], self.row_shape[-1] - count))
        return StoredChunk(pack_codes(codes, self.spec.bits), self.scale[..., groups], zero, self.spec,
                           self.axis, row_shape, self.dtype)


class KVStream:
    """Keys or values of one layer: the quantized tokens, then the full-precision tail."""

    def __init__(self, spec: QuantSpec, axis: KVAxis, residual: int) -> None:
        self.spec, self.axis, self.residual = spec, axis, residual
        self.stored: StoredChunk | None = None
        self.tail: torch.Tensor | None = None
        # `stored` as attention reads it, extended chunk by chunk: codes never change once stored and
        # dequantization is elementwise, so this is `stored.dequantize()` without redoing it per read
        # (a simulation's shortcut: not part of what the cache stores, `nbytes`)
        self.read: torch.Tensor | None = None

    def append(self, states: torch.Tensor) -> torch.Tensor:
        """Store new tokens; return every token so far as attention reads it."""
        self.tail = states if self.tail is None else torch.cat([self.tail, states], dim=-2)
        overflow = self.tail.shape[-2] - self.residual
        if self.axis == "channel":  # a channel group spans group_size tokens: only whole groups leave
            overflow -= overflow % self.spec.group_size
        if overflow > 0:
            chunk = StoredChunk.quantize(self.tail[..., :overflow, :], self.spec, self.axis)
            self.stored = chunk if self.stored is None else self.stored.extend(chunk)
            read = chunk.dequantize()
            self.read = read if self.read is None else torch.cat([self.read, read], dim=-2)
            self.tail = self.tail[..., overflow:, :]
        if self.stored is None:
            return self.tail
        return torch.cat([self.read, self.tail], dim=-2)

    def nbytes(self) -> int:
        tail = 0 if self.tail is None else self.tail.numel() * self.tail.element_size()
        return (0 if self.stored is None else self.stored.nbytes()) + tail

    def droppable(self) -> int:
        """How many of the oldest tokens can leave: quantized ones (whole groups on the channel axis)."""
        return 0 if self.stored is None else self.stored.tokens

    def drop_oldest(self, count: int) -> None:
        if count:
            self.stored = self.stored.without_oldest(count) if count < self.stored.tokens else None
            self.read = None if self.stored is None else self.read[..., count:, :]


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's cache; `keys`/`values` of the parent stay empty. A sliding-window
    layer (`sliding_window` W) keeps, as transformers' `DynamicSlidingWindowLayer` does, what the
    next forward can still attend to: the W - 1 latest tokens, and as many older ones as the
    storage units require (the full-precision tail, whole token groups of a channel stream);
    `get_mask_sizes` tells the mask which positions it holds."""

    def __init__(self, config: KVConfig, sliding_window: int | None = None) -> None:
        super().__init__()
        self._keys = KVStream(config.key, config.key_axis, config.residual)
        self._values = KVStream(config.value, config.value_axis, config.residual)
        self._length = 0  # tokens seen
        self._start = 0  # position of the oldest token held
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        # both streams drop the same tokens: in whole groups if either quantizes channels over tokens
        self._unit = max(spec.group_size if axis == "channel" else 1
                         for spec, axis in ((config.key, config.key_axis), (config.value, config.value_axis)))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._length += key_states.shape[-2]
        keys, values = self._keys.append(key_states), self._values.append(value_states)
        if self.is_sliding:
            excess = self._length - self._start - (self.sliding_window - 1)
            count = max(0, min(excess, self._keys.droppable(), self._values.droppable()))
            count -= count % self._unit
            self._keys.drop_oldest(count)
            self._values.drop_oldest(count)
            self._start += count
        return keys, values

    def get_seq_length(self) -> int:
        return self._length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Length and first position of what the next update returns: the held tokens and the query."""
        return self._length - self._start + query_length, self._start

    def nbytes(self) -> int:
        return self._keys.nbytes() + self._values.nbytes()


class QuantizedKVCache(Cache):
    """A cache of `QuantizedKVLayer`s, one per decoder layer; `sliding_windows` gives each layer's
    window (None: full attention), as the model's config sets them (`quantized_cache_factory`)."""

    def __init__(self, config: KVConfig, num_layers: int,
                 sliding_windows: tuple[int | None, ...] | None = None) -> None:
        windows = sliding_windows or (None,) * num_layers
        if len(windows) != num_layers:
            raise ValueError(f"{len(windows)} sliding windows for {num_layers} layers")
        super().__init__(layers=[QuantizedKVLayer(config, window) for window in windows])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def stored_bytes(obj: object) -> int:
    """Bytes of every distinct tensor reachable from `obj` (attributes, dicts, lists, tuples):
    the storage of any cache, including third-party ones whose layout we do not know."""
    seen: set[int] = set()
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            if type(item) in (torch.Tensor, torch.nn.Parameter):
                total += item.numel() * item.element_size()
            else:  # a wrapper subclass (quanto's packed tensors) owns no storage: its parts do
                stack.extend(vars(item).values())
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, (type, torch.dtype, torch.device)):
            stack.extend(vars(item).values())
    return total


def cache_bytes(cache: Cache) -> int:
    """Bytes a cache holds: `nbytes()` where it states them, else every tensor it stores."""
    return cache.nbytes() if hasattr(cache, "nbytes") else stored_bytes(cache.layers)


def head_dim_of(model_config) -> int:
    """Attention head size from a transformers config (stated, or hidden size / heads), read from
    its text decoder's (a multimodal Gemma 3 keeps it there)."""
    config = model_config.get_text_config(decoder=True)
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class AttentionLayer:
    """What one decoder layer caches per token, from the model's config."""

    kv_heads: int
    head_dim: int
    sliding_window: int | None  # None: full attention


def attention_layers(model_config) -> list[AttentionLayer]:
    """Each decoder layer's cache layout, read as transformers' own caches read it (layer types
    and sliding windows per layer; heterogeneous configs give each layer its own head size)."""
    config = model_config.get_text_config(decoder=True)
    types, kwargs = get_layer_types_and_kwargs(config)
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise NotApplicable(f"layer types {unknown} of {type(config).__name__}: ptq's quantized cache holds "
                            "full and sliding-window attention layers only")
    return [AttentionLayer(getattr(layer, "num_key_value_heads", None) or layer.num_attention_heads,
                           head_dim_of(layer), extra.get("sliding_window"))
            for layer, extra in zip(config.per_layer_config, kwargs)]


def kv_elements(model_config, tokens: int) -> int:
    """Key and value elements a full-precision cache holds after `tokens` tokens, over all layers: a
    sliding-window layer holds its window - 1 latest tokens, as transformers' DynamicCache does."""
    return sum(2 * layer.kv_heads * layer.head_dim
               * (tokens if layer.sliding_window is None else min(tokens, layer.sliding_window - 1))
               for layer in attention_layers(model_config))


def quantized_cache_factory(model: torch.nn.Module, kv: KVConfig) -> Callable[[], QuantizedKVCache]:
    """Fresh `QuantizedKVCache`s for `model` under the `kv` settings, with the model's sliding
    windows, checked against every layer's head size (a model YAML's stated head_dim was checked at
    collection and at load)."""
    layers = attention_layers(model.config)
    for head_dim in sorted({layer.head_dim for layer in layers}):
        kv.check_head_dim(head_dim)
    return partial(QuantizedKVCache, kv, len(layers), tuple(layer.sliding_window for layer in layers))


def describe(kv: KVConfig) -> dict[str, object]:
    """What a native cache stores, for the record."""
    return {"implementation": "ptq.kv.QuantizedKVCache", **dataclasses.asdict(kv)}
