"""How the weight matrices are stored and multiplied: one ``Matrix`` per weight, in one format.

A format is chosen once at load time (``weight_format``) and every matrix of the network is
converted to it; the plain tensor is then dropped, so each weight is held once, in the layout
its product reads.

- **plain**: ``F.linear`` (MKL), what transformers computes: a stream decoded alone gives
  transformers' logits bit for bit. The parity tests and ``--plain-weights`` use it.
- **packed**: oneDNN's own layout of each float32 weight (``_reorder_linear_weight``, what
  inductor's CPU freezing uses). Measured on a 2-core AVX2 CPU (0.6B, fp32): a one-row product
  0.53x the time of ``F.linear``, an 8-row one 0.46x. oneDNN sums in another order than MKL:
  exact up to float32 rounding (~1e-6 relative). The default on a CPU.
- **int8**: weight-only-stored int8 with per-row scales, multiplied by fbgemm's dynamic
  quantized linear (activations quantized per product to 8 bits, integer dot products:
  ``vpmaddubsw`` on AVX2, VNNI where present). Measured on the AVX2 CPU against
  ``torch._weight_int8pack_mm`` (int8 weights, bf16 activations), the kernel used before: one
  row 0.69x the time, 120 rows 0.31x, and 0.45x of float32 oneDNN at 120 rows: the first int8
  format here that speeds the prefill and the encoder, not only decode steps.
- **int4**: group-wise (128 columns) asymmetric 4-bit weights, quantized by torchao
  (``groupwise_affine_quantize_tensor``) and multiplied by torch's CPU int4 kernel
  (``_weight_int4pack_mm_for_cpu``, bf16 activations). The audio encoder stays at 8 bits (4-bit
  audio towers drift: CrispASR's experience), so ``int4`` means "LLM int4, encoder int8".

The quantized formats are off by default: their accuracy cannot be checked without real weights.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F

from ._checkpoint import ModelLoadError
from ._options import QUANTIZE_NAMES

INT4_GROUPS = (128, 64, 32)  # columns per scale and zero point: torchao's default 128 where it divides


Tensors = dict[str, torch.Tensor]


class Matrix(Protocol):
    """A weight (out_features, in_features) and its optional bias, ready to multiply: ``x @ W.T + b``.

    ``tensors()`` is what the weights cache stores of it; ``restore_matrix`` builds it back.
    """

    kind: ClassVar[str]  # its format's name

    @property
    def nbytes(self) -> int: ...  # what one product reads of the weight, as stored
    @property
    def shape(self) -> tuple[int, int]: ...  # (out_features, in_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...  # (..., in) -> (..., out)
    def tensors(self) -> Tensors: ...


@dataclass(frozen=True)
class PlainMatrix:
    weight: torch.Tensor  # (out, in)
    bias: torch.Tensor | None = None
    kind: ClassVar[str] = "plain"

    @classmethod
    def restore(cls, tensors: Tensors) -> PlainMatrix:
        return cls(tensors["weight"], tensors.get("bias"))

    def tensors(self) -> Tensors:
        return _with_bias({"weight": self.weight}, self.bias)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape[0], self.weight.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class PackedMatrix:
    packed: torch.Tensor  # oneDNN's layout of (out, in): opaque to anything but _linear_pointwise
    bias: torch.Tensor | None
    kind: ClassVar[str] = "packed"

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> PackedMatrix:
        return cls(torch.ops.mkldnn._reorder_linear_weight(weight, 1), bias)

    @classmethod
    def restore(cls, tensors: Tensors) -> PackedMatrix:
        return cls.of(tensors["weight"], tensors.get("bias"))

    def tensors(self) -> Tensors:
        """The plain weight: oneDNN's packed tensors are opaque (no storage to save), so the cache keeps
        the fused weights and the reorder runs again at each start."""
        return _with_bias({"weight": self.packed.to_dense()}, self.bias)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1]  # oneDNN keeps the logical shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (rows, in)
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], -1)  # (..., out)


@dataclass(frozen=True)
class Int8Matrix:
    """fbgemm's dynamic quantized linear: int8 weights with per-row scales, activations quantized per product.

    The ops ``torch.ao.nn.quantized.dynamic.Linear`` calls, without the module: its constructor packs a
    placeholder weight of the full size before the real one (three packings per matrix, measured).
    """

    packed: Any  # fbgemm's packed weight and bias (a torch ScriptObject)
    out_features: int
    in_features: int
    kind: ClassVar[str] = "int8"

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Matrix:
        from torch.ao.quantization import PerChannelMinMaxObserver

        observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        observer(weight.float())
        scales, _ = observer.calculate_qparams()
        return cls._packed(weight.float(), scales, bias)

    @classmethod
    def restore(cls, tensors: Tensors) -> Int8Matrix:
        """From the int8 rows and their scales: ``q * s`` quantizes back to exactly ``q``."""
        scales = tensors["scales"]
        return cls._packed(tensors["qdata"].float() * scales[:, None], scales, tensors.get("bias"))

    @classmethod
    def _packed(cls, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> Int8Matrix:
        out_features, in_features = weight.shape
        zero_points = torch.zeros(out_features, dtype=torch.long)
        with warnings.catch_warnings():
            # torch 2.13 deprecates creating quantized tensors (pytorch#184982); fbgemm's dynamic
            # linear still takes its weight that way, and is the fastest int8 product on x86 CPUs
            # measured here. Revisit when torch removes it (torch is capped below 2.15).
            warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
            qweight = torch.quantize_per_channel(weight, scales.double(), zero_points, 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.float())
        return cls(packed, out_features, in_features)

    def tensors(self) -> Tensors:
        qweight, bias = torch.ops.quantized.linear_unpack(self.packed)
        return _with_bias({"qdata": qweight.int_repr(), "scales": qweight.q_per_channel_scales().float()}, bias)

    @property
    def nbytes(self) -> int:
        return self.out_features * (self.in_features + 4)  # int8 rows and a float32 scale each

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit activations, as the module uses on fbgemm (no int16 overflow without VNNI).
        rows = x.reshape(-1, x.shape[-1]).float()  # (rows, in)
        out: torch.Tensor = torch.ops.quantized.linear_dynamic(rows, self.packed, reduce_range=True)
        return out.to(x.dtype).reshape(*x.shape[:-1], -1)  # (..., out)


@dataclass(frozen=True)
class Int4Matrix:
    packed: torch.Tensor  # torch's CPU int4 layout of (out, in)
    scales_and_zeros: torch.Tensor  # (in / group, out, 2), bfloat16
    group: int
    bias: torch.Tensor | None
    shape: tuple[int, int]  # (out, in)
    kind: ClassVar[str] = "int4"

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Matrix:
        """The int4 form; a matrix whose width no group size divides (none in Qwen3-ASR) stays at 8 bits."""
        group = next((g for g in INT4_GROUPS if weight.shape[1] % g == 0), None)
        if group is None:
            return Int8Matrix.of(weight, bias)
        utils = _torchao_module("torchao.quantization.utils", "int4")
        values, scales_and_zeros = utils.groupwise_affine_quantize_tensor(
            weight.to(torch.bfloat16), 4, group, torch.bfloat16
        )  # values (out, in) in 0..15
        packed = torch._convert_weight_to_int4pack_for_cpu(values.to(torch.int32), 1)
        return cls(packed, scales_and_zeros, group, bias, (weight.shape[0], weight.shape[1]))

    @classmethod
    def restore(cls, tensors: Tensors) -> Int4Matrix:
        packed, scales_and_zeros = tensors["packed"], tensors["scales_and_zeros"]
        in_features = 2 * packed.shape[1]  # two 4-bit values a byte
        shape = (scales_and_zeros.shape[1], in_features)
        return cls(packed, scales_and_zeros, in_features // scales_and_zeros.shape[0], tensors.get("bias"), shape)

    def tensors(self) -> Tensors:
        return _with_bias({"packed": self.packed, "scales_and_zeros": self.scales_and_zeros}, self.bias)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (rows, in): the kernel's activations
        out = torch._weight_int4pack_mm_for_cpu(rows, self.packed, self.group, self.scales_and_zeros)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], -1)  # (..., out)


WEIGHT_FORMATS = ("plain", "packed", *QUANTIZE_NAMES)


def weight_format(dtype: torch.dtype, device: torch.device, quantize: str | None, plain: bool) -> str:
    """The format of the LLM's matrices: quantized if asked, else packed where oneDNN can, else plain."""
    if quantize is not None:
        if device.type != "cpu":
            raise ValueError(f"--quantize {quantize} runs on a CPU only (its kernels are CPU kernels)")
        return quantize
    if plain or device.type != "cpu" or not can_pack_weights(dtype):
        return "plain"
    return "packed"


def encoder_format(llm_format: str) -> str:
    """The audio encoder's format: 8 bits when the LLM is at 4 (see the module docstring)."""
    return "int8" if llm_format == "int4" else llm_format


def to_matrix(weight: torch.Tensor, bias: torch.Tensor | None, form: str) -> Matrix:
    """``weight`` (and ``bias``) in the format ``form``; the caller drops its own reference to ``weight``."""
    if form == "plain":
        return PlainMatrix(weight, bias)
    if form == "packed":
        return PackedMatrix.of(weight, bias)
    if form == "int8":
        return Int8Matrix.of(weight, bias)
    if form == "int4":
        return Int4Matrix.of(weight, bias)
    raise ValueError(f"unknown weight format {form!r}; use one of: {', '.join(WEIGHT_FORMATS)}")


_KINDS: dict[str, Any] = {kind.kind: kind for kind in (PlainMatrix, PackedMatrix, Int8Matrix, Int4Matrix)}


def restore_matrix(kind: str, tensors: Tensors) -> Matrix:
    """A matrix from what its ``tensors()`` gave (the weights cache)."""
    matrix: Matrix = _KINDS[kind].restore(tensors)
    return matrix


def _with_bias(tensors: Tensors, bias: torch.Tensor | None) -> Tensors:
    return tensors if bias is None else {**tensors, "bias": bias}


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
    """Refuse an unknown scheme, or one whose kernels this torch lacks, before any weights are read."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_NAMES:
        raise ValueError(f"unknown quantization {quantize!r}; use one of: {', '.join(QUANTIZE_NAMES)}")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ModelLoadError(f"--quantize {quantize} needs torch's fbgemm int8 kernels, which this torch build lacks")
    if quantize == "int4":
        _torchao_module("torchao.quantization.utils", quantize)


def _torchao_module(name: str, quantize: str) -> Any:  # the module; torchao ships no type information
    """A torchao module (its start-up chatter is silenced where the engine package is imported)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ModelLoadError(f"--quantize {quantize} needs the torchao package ({exc}): pip install torchao") from exc
