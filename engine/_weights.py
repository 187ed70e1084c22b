"""How the LLM's weight matrices are multiplied: plain, packed for oneDNN (the server), or int8 (optional).

- **Plain** ``F.linear`` (MKL) is what transformers computes: a stream decoded alone gives
  transformers' logits bit for bit. Offline transcription and the parity tests use it.
- **Packed.** Measured on a 2-core AVX2 CPU (0.6B, fp32): a one-row product over weights laid out
  in advance for oneDNN took 0.53x the time of ``F.linear`` (which re-reads the plain layout), and
  an 8-row one 0.46x; MKL's own packed GEMM, used before for batches, gained nothing below 16 rows.
  ``PackedLinear`` keeps a oneDNN-packed copy of every weight (the LLM's weights in memory twice)
  for all products. oneDNN sums in another order than MKL: results are exact up to float32
  rounding (~1e-6 relative), as batching already was; the server uses it when it batches.
- **int8.** Weight-only int8 with per-row scales, quantized by torchao (``Int8WeightOnlyConfig``).
  On CUDA torchao's tensor multiplies itself; on a CPU its generic path dequantizes (slower than
  bf16 here), so the product goes to torch's own int8-weight kernel
  (``torch._weight_int8pack_mm``, bf16 activations). Accuracy cannot be checked without real
  weights: off by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ._checkpoint import ModelLoadError
from ._options import QUANTIZE_NAMES

if TYPE_CHECKING:
    from ._llm import LeanLM


class PackedLinear:
    """``F.linear(x, weight)`` through oneDNN's packed copy of every weight (the layout it computes from)."""

    def __init__(self, weights: Sequence[torch.Tensor]) -> None:
        self._packed = {id(w): torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights}

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        packed = self._packed.get(id(weight))
        if packed is None:
            return F.linear(x, weight)
        rows = x.reshape(-1, x.shape[-1])  # (rows, in)
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "")
        return out.reshape(*x.shape[:-1], -1)  # (..., out_features)


def can_pack_weights(dtype: torch.dtype) -> bool:
    """oneDNN packs float32 weights on any x86 CPU, bfloat16 ones where the CPU computes in bf16."""
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]  # torch: unannotated
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), 1)
    except RuntimeError:  # e.g. "bf16 path needs the cpu support avx_ne_convert or avx512bw ..."
        return False
    return True


def check_quantize(quantize: str | None) -> None:
    """Refuse an unknown scheme, or int8 without torchao, before any weights are read."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_NAMES:
        raise ValueError(f"unknown quantization {quantize!r}; use one of: {', '.join(QUANTIZE_NAMES)}")
    _torchao()


class Int8Linear:
    """Products with int8 weights (torchao tensors); anything else multiplies plainly."""

    def __init__(self) -> None:
        self._scales: dict[int, torch.Tensor] = {}  # bf16 per-row scales for the CPU kernel

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        parts = _int8_parts(weight)
        if weight.device.type != "cpu" or parts is None:
            return F.linear(x, weight)
        data, scale = parts
        scales = self._scales.get(id(weight))
        if scales is None:
            scales = self._scales[id(weight)] = scale.reshape(-1).to(torch.bfloat16)
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (rows, in)
        out = torch._weight_int8pack_mm(rows, data, scales)  # (rows, out)
        return out.to(x.dtype).reshape(*x.shape[:-1], -1)


def quantize_weights(llm: LeanLM, scheme: str) -> None:
    """Replace every weight matrix of the LLM (layers and head) by its int8 form."""
    ao = _torchao()
    config = ao.quantization.Int8WeightOnlyConfig()

    def int8(weight: torch.Tensor) -> torch.Tensor:
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        ao.quantization.quantize_(linear, config)
        return linear.weight

    llm.layers = [
        replace(layer, qkv=int8(layer.qkv), o=int8(layer.o), gate_up=int8(layer.gate_up), down=int8(layer.down))
        for layer in llm.layers
    ]
    llm.head = int8(llm.head)
    llm.linear = Int8Linear()


def weight_bytes(weight: torch.Tensor) -> int:
    """Bytes a product with ``weight`` reads (int8 data and scales for a quantized one)."""
    parts = _int8_parts(weight) or (weight,)
    return sum(part.numel() * part.element_size() for part in parts)


def _int8_parts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 data (out, in), scales (out, 1)) of a torchao int8 tensor; None for a plain one."""
    untyped: Any = weight  # torchao's tensor subclass, untyped
    if not hasattr(untyped, "qdata"):
        return None
    return untyped.qdata, untyped.scale


def _torchao() -> Any:  # the module; torchao ships no type information
    """torchao (its start-up chatter is silenced where the engine package is imported: engine/__init__.py)."""
    try:
        import torchao.quantization  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ModelLoadError(f"--quantize int8 needs the torchao package ({exc}): pip install torchao") from exc
    return torchao
