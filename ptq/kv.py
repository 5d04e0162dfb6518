"""Quantized KV cache on transformers' Cache API.

Keys and values are quantized as they are stored (token by token, so appending never
re-quantizes what is already there) and dequantized when attention reads them. The same
cache object serves a prefill (perplexity) and generation.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ptq.config import KVConfig
from ptq.quant import QuantizedTensor, QuantSpec, quantize


class _QuantizedStream:
    """Quantized chunks of one stream (keys or values) of one layer, [batch, heads, tokens, head_dim]."""

    def __init__(self, spec: QuantSpec) -> None:
        if spec.granularity not in ("token", "group"):
            raise ValueError(f"KV quantization here is per token (token or group granularity), got {spec.granularity}")
        self.spec = spec
        self.chunks: list[QuantizedTensor] = []

    def append(self, states: torch.Tensor) -> torch.Tensor:
        self.chunks.append(quantize(states, self.spec))
        return torch.cat([chunk.dequantize() for chunk in self.chunks], dim=-2)

    def nbytes(self) -> int:
        return sum(chunk.nbytes() for chunk in self.chunks)


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's cache, holding only quantized keys and values."""

    def __init__(self, config: KVConfig) -> None:
        super().__init__()
        self.config = config
        self._keys = _QuantizedStream(config.key)
        self._values = _QuantizedStream(config.value)
        self._length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._length += key_states.shape[-2]
        return self._keys.append(key_states), self._values.append(value_states)

    def get_seq_length(self) -> int:
        return self._length

    def nbytes(self) -> int:
        return self._keys.nbytes() + self._values.nbytes()


class QuantizedKVCache(Cache):
    """A cache of `QuantizedKVLayer`s, one per decoder layer."""

    def __init__(self, config: KVConfig, num_layers: int) -> None:
        super().__init__(layers=[QuantizedKVLayer(config) for _ in range(num_layers)])

    def nbytes(self) -> int:
        """Bytes held by the cache: codes at their bit width, plus scales and zero points."""
        return sum(layer.nbytes() for layer in self.layers)
