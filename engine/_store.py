"""The engine's weights as named tensors and scalars: what the weights cache writes and reads back.

The drivers (``LeanLM``, ``Encoder``, ``Parts``) describe themselves to a ``Writer`` (each matrix
in its own format, see ``_weights``) and rebuild from a ``Reader`` without transformers' modules.
A tensor that two names share (a tied head is the embedding table) is stored once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ._weights import Matrix, restore_matrix


@dataclass
class Writer:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=lambda: {"kinds": {}, "scalars": {}, "aliases": {}})
    _seen: dict[tuple[int, tuple[int, ...], torch.dtype], str] = field(default_factory=dict)

    def tensor(self, name: str, tensor: torch.Tensor) -> None:
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key in self._seen:
            self.meta["aliases"][name] = self._seen[key]
            return
        self._seen[key] = name
        self.tensors[name] = tensor.contiguous()

    def matrix(self, name: str, matrix: Matrix) -> None:
        self.meta["kinds"][name] = matrix.kind
        for part, tensor in matrix.tensors().items():
            self.tensor(f"{name}.{part}", tensor)

    def scalar(self, name: str, value: float | int) -> None:
        self.meta["scalars"][name] = value


class Reader:
    """Tensors by name; matrices rebuilt in their format.

    With ``copy_tensors`` the tensors that are not a matrix's (norms, biases, the embedding table)
    are copied out of ``tensors``: where every matrix is converted on reading (packed, int8), the
    file's mapping is then let go once loaded, with the pages the conversion read.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], copy_tensors: bool = False):
        self._copy = copy_tensors
        self._tensors = tensors
        self._kinds: Mapping[str, str] = meta["kinds"]
        self._scalars: Mapping[str, float | int] = meta["scalars"]
        self._aliases: Mapping[str, str] = meta["aliases"]

    def tensor(self, name: str) -> torch.Tensor:
        tensor = self._source(name)
        return tensor.clone() if self._copy else tensor

    def _source(self, name: str) -> torch.Tensor:
        return self._tensors[self._aliases.get(name, name)]

    def optional(self, name: str) -> torch.Tensor | None:
        name = self._aliases.get(name, name)
        return self._tensors.get(name)

    def matrix(self, name: str) -> Matrix:
        prefix = f"{name}."
        names = [n for n in (*self._tensors, *self._aliases) if n.startswith(prefix) and "." not in n[len(prefix) :]]
        # A bias is kept as it is (the weight is converted): copied, like the other kept tensors.
        parts = {n[len(prefix) :]: self._source(n) for n in names}
        if self._copy and "bias" in parts:
            parts["bias"] = parts["bias"].clone()
        return restore_matrix(self._kinds[name], parts)

    def scalar(self, name: str) -> float:
        return float(self._scalars[name])

    def count(self, name: str) -> int:
        return int(self._scalars[name])
