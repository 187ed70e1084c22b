"""The LLM's key/value cache: preallocated per layer, grown by doubling, cut back in O(1).

transformers' ``DynamicCache`` appends with ``torch.cat``, copying every layer's whole cache at
every decode step: on a CPU that copy was over a quarter of a decode step's time. Here each layer
writes new keys and values into spare capacity and hands the attention a view of the filled part.
The values are the same; only the copies are gone.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

_INITIAL_CAPACITY = 256  # tokens; doubled whenever full


# transformers' CacheLayerMixin.__init_subclass__ is unannotated.
class _GrowingLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads, _, dim = key_states.shape
        self._k = key_states.new_empty(batch, heads, _INITIAL_CAPACITY, dim)  # (batch, kv heads, capacity, dim)
        self._v = value_states.new_empty(batch, value_states.shape[1], _INITIAL_CAPACITY, value_states.shape[-1])
        self._length = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self._length + key_states.shape[-2]
        if end > self._k.shape[-2]:
            self._k, self._v = (_grown(t, self._length, end) for t in (self._k, self._v))
        self._k[:, :, self._length : end] = key_states
        self._v[:, :, self._length : end] = value_states
        self._length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop() takes the number of tokens to remove as a negative number")
        if self.is_initialized and tokens_to_remove:
            self._length = max(0, self._length + tokens_to_remove)
            self.keys, self.values = self._k[:, :, : self._length], self._v[:, :, : self._length]


def _grown(buffer: torch.Tensor, filled: int, needed: int) -> torch.Tensor:
    capacity = buffer.shape[-2]
    while capacity < needed:
        capacity *= 2
    grown = buffer.new_empty(*buffer.shape[:-2], capacity, buffer.shape[-1])
    grown[:, :, :filled] = buffer[:, :, :filled]
    return grown


class KVCache(Cache):
    """One growing layer per decoder layer, with an explicit length that can be cut back."""

    def __init__(self, num_layers: int) -> None:
        # transformers' CacheLayerMixin.__init__ is unannotated.
        super().__init__(layers=[_GrowingLayer() for _ in range(num_layers)])  # type: ignore[no-untyped-call]

    @property
    def length(self) -> int:
        """Tokens held (``len()`` of a transformers cache counts layers)."""
        return self.get_seq_length()

    def truncate(self, length: int) -> None:
        excess = self.length - length
        if excess > 0:
            self.crop(-excess)

    def copy(self) -> KVCache:
        """An independent cache holding the same keys and values."""
        other = KVCache(len(self.layers))
        for index, layer in enumerate(self.layers):
            if not isinstance(layer, _GrowingLayer):
                raise TypeError(f"layer {index} of a KVCache is a {type(layer).__name__}")
            if layer.is_initialized and layer.keys is not None and layer.values is not None:  # set once initialized
                other.update(layer.keys.clone(), layer.values.clone(), index)
        return other
