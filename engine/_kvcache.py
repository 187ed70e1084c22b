"""The LLM's key/value cache: one preallocated buffer for all layers, grown by doubling, cut back in O(1).

A forward over ``n`` new rows first ``reserve``s them (growing the buffer if needed), writes each
layer's keys and values at ``[length, length + n)``, reads the filled part as a view, and
``commit``s the rows at the end. A forward that fails half-way commits nothing, so the cache
still holds exactly what it held before. transformers' ``DynamicCache`` appends with
``torch.cat``, copying every layer's whole cache at every decode step; here nothing is copied.
"""

from __future__ import annotations

import torch

_INITIAL_CAPACITY = 256  # tokens; doubled whenever full


class KVCache:
    """Keys and values of every layer for one sequence: (layers, kv heads, capacity, head_dim) each."""

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> None:
        shape = (layers, kv_heads, _INITIAL_CAPACITY, head_dim)
        self._keys = torch.empty(shape, dtype=dtype, device=device)
        self._values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0  # rows committed

    @property
    def capacity(self) -> int:
        return self._keys.shape[2]

    def reserve(self, rows: int) -> int:
        """Room for ``rows`` more rows; returns where they start. Nothing counts until ``commit``."""
        needed = self.length + rows
        if needed > self.capacity:
            capacity = self.capacity
            while capacity < needed:
                capacity *= 2
            self._keys, self._values = (self._grown(buffer, capacity) for buffer in (self._keys, self._values))
        return self.length

    def write(
        self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (kv heads, n, head_dim) at ``start``; the layer's keys and values up to them, as views."""
        end = start + keys.shape[1]
        self._keys[layer, :, start:end] = keys
        self._values[layer, :, start:end] = values
        return self._keys[layer, :, :end], self._values[layer, :, :end]

    def commit(self, rows: int) -> None:
        self.length += rows

    def truncate(self, length: int) -> None:
        self.length = min(self.length, max(0, length))

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The committed keys and values of one layer: (kv heads, length, head_dim) each."""
        return self._keys[index, :, : self.length], self._values[index, :, : self.length]

    def copy(self) -> KVCache:
        """An independent cache holding the same rows."""
        other = KVCache.__new__(KVCache)
        other.length = self.length
        other._keys, other._values = (self._grown(buffer, self.capacity) for buffer in (self._keys, self._values))
        return other

    def _grown(self, buffer: torch.Tensor, capacity: int) -> torch.Tensor:
        grown = buffer.new_empty(*buffer.shape[:2], capacity, buffer.shape[-1])
        grown[:, :, : self.length] = buffer[:, :, : self.length]
        return grown
