"""The audio encoder of Qwen3-ASR, in the two parts that streaming caches differently.

1. The *front end*: each 1 s chunk of log-mel (100 frames) through three stride-2 convolutions,
   a linear layer and sinusoidal positions that restart in every chunk -> 13 tokens. A chunk's
   tokens depend on that chunk's frames only, so a streaming caller keeps the front end of every
   complete chunk and computes only the chunk still filling.
2. The *windows*: transformer layers whose attention is block-diagonal over 8 s windows
   (8 chunks, 104 tokens), then the projection into the LLM's hidden size. Everything but the
   attention is row-wise, so the windows of many streams run as one batch: their rows are stacked
   for the products and attention runs per window, exactly as the reference runs the windows of
   one long clip.

The arithmetic is transformers' ``Qwen3ASREncoder`` + ``Qwen3ASRMultiModalProjector``, operation
for operation, on the same weights. The linear layers' weights are taken over in a format of
``_weights`` (plain, oneDNN-packed, int8); the transformer modules are not kept, only the three
convolutions of the front end.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

from ._store import Reader, Writer
from ._weights import Matrix, to_matrix

if TYPE_CHECKING:
    from transformers import Qwen3ASREncoder
    from transformers.models.qwen3_asr.modeling_qwen3_asr import (
        Qwen3ASRAudioAttention,
        Qwen3ASRAudioEncoderLayer,
        Qwen3ASRMultiModalProjector,
    )


@dataclass(frozen=True)
class Norm:
    """A LayerNorm's parameters: (d,) each."""

    weight: torch.Tensor
    bias: torch.Tensor
    eps: float

    @classmethod
    def of(cls, module: torch.nn.LayerNorm) -> Norm:
        return cls(module.weight, module.bias, module.eps)

    def write(self, out: Writer, prefix: str) -> None:
        out.tensor(f"{prefix}.weight", self.weight)
        out.tensor(f"{prefix}.bias", self.bias)
        out.scalar(f"{prefix}.eps", self.eps)

    @classmethod
    def read(cls, source: Reader, prefix: str) -> Norm:
        return cls(source.tensor(f"{prefix}.weight"), source.tensor(f"{prefix}.bias"), source.scalar(f"{prefix}.eps"))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


@dataclass(frozen=True)
class EncoderLayer:
    attn_norm: Norm
    q: Matrix  # (d_model, d_model) each of q, k, v, out
    k: Matrix
    v: Matrix
    out: Matrix
    scaling: float
    final_norm: Norm
    fc1: Matrix  # (ffn, d_model)
    fc2: Matrix  # (d_model, ffn)

    @classmethod
    def of(cls, layer: Qwen3ASRAudioEncoderLayer, form: str) -> EncoderLayer:
        attn: Qwen3ASRAudioAttention = layer.self_attn
        q, k, v, out, fc1, fc2 = (
            _matrix(m, form) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, layer.fc1, layer.fc2)
        )
        norms = Norm.of(layer.self_attn_layer_norm), Norm.of(layer.final_layer_norm)
        return cls(norms[0], q, k, v, out, attn.scaling, norms[1], fc1, fc2)

    def write(self, out: Writer, prefix: str) -> None:
        self.attn_norm.write(out, f"{prefix}.attn_norm")
        self.final_norm.write(out, f"{prefix}.final_norm")
        for name in _LAYER_MATRICES:
            out.matrix(f"{prefix}.{name}", getattr(self, name))
        out.scalar(f"{prefix}.scaling", self.scaling)

    @classmethod
    def read(cls, source: Reader, prefix: str) -> EncoderLayer:
        q, k, v, out, fc1, fc2 = (source.matrix(f"{prefix}.{name}") for name in _LAYER_MATRICES)
        norms = Norm.read(source, f"{prefix}.attn_norm"), Norm.read(source, f"{prefix}.final_norm")
        return cls(norms[0], q, k, v, out, source.scalar(f"{prefix}.scaling"), norms[1], fc1, fc2)


@dataclass(frozen=True)
class Conv:
    """One of the front end's stride-2 convolutions: (out, in, 3, 3) and its bias."""

    weight: torch.Tensor
    bias: torch.Tensor
    stride: int
    padding: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


@dataclass(frozen=True)
class Geometry:
    """How the encoder cuts audio: mel frames per conv chunk (100: 1 s), chunks per attention window (8)."""

    frames_per_chunk: int
    chunks_per_window: int
    heads: int


class Encoder:
    """The encoder's weights, from transformers' modules (``of``) or the weights cache (``read``)."""

    def __init__(
        self,
        geometry: Geometry,
        convs: tuple[Conv, ...],
        conv_out: Matrix,
        positions: torch.Tensor,
        layers: list[EncoderLayer],
        ln_post: Norm,
        projection: tuple[Matrix, Matrix],
    ) -> None:
        self.geometry = geometry
        self.convs = convs
        self.conv_out = conv_out
        self.positions = positions  # (tokens per chunk, d_model)
        self.layers = layers
        self.ln_post = ln_post
        self.projection = projection
        self.frames_per_chunk = geometry.frames_per_chunk
        self.chunks_per_window = geometry.chunks_per_window
        self.heads = geometry.heads

    @classmethod
    def of(cls, tower: Qwen3ASREncoder, projector: Qwen3ASRMultiModalProjector, form: str) -> Encoder:
        config = tower.config
        if config.activation_function != "gelu" or config.scale_embedding:
            raise ValueError("the audio encoder must be Qwen3-ASR's: gelu activations, unscaled embeddings")
        frames_per_chunk = 2 * config.n_window  # 100
        geometry = Geometry(frames_per_chunk, config.n_window_infer // frames_per_chunk, config.encoder_attention_heads)
        convs = tuple(_conv(module) for module in (tower.conv2d1, tower.conv2d2, tower.conv2d3))
        # torch's ModuleList is not generic (its items are typed Module): these are the encoder layers.
        layers = [EncoderLayer.of(layer, form) for layer in cast("Iterable[Qwen3ASRAudioEncoderLayer]", tower.layers)]
        projection = (_matrix(projector.linear_1, form), _matrix(projector.linear_2, form))
        positions = tower.positional_embedding.positional_embedding
        return cls(
            geometry, convs, _matrix(tower.conv_out, form), positions, layers, Norm.of(tower.ln_post), projection
        )

    def write(self, out: Writer) -> None:
        for name, value in vars(self.geometry).items():
            out.scalar(f"encoder.{name}", value)
        out.scalar("encoder.layers", len(self.layers))
        for index, conv in enumerate(self.convs):
            out.tensor(f"encoder.conv{index}.weight", conv.weight)
            out.tensor(f"encoder.conv{index}.bias", conv.bias)
            out.scalar(f"encoder.conv{index}.stride", conv.stride)
            out.scalar(f"encoder.conv{index}.padding", conv.padding)
        out.matrix("encoder.conv_out", self.conv_out)
        out.tensor("encoder.positions", self.positions)
        for index, layer in enumerate(self.layers):
            layer.write(out, f"encoder.layers.{index}")
        self.ln_post.write(out, "encoder.ln_post")
        out.matrix("encoder.projection.0", self.projection[0])
        out.matrix("encoder.projection.1", self.projection[1])

    @classmethod
    def read(cls, source: Reader) -> Encoder:
        geometry = Geometry(*(source.count(f"encoder.{n}") for n in ("frames_per_chunk", "chunks_per_window", "heads")))
        convs = tuple(
            Conv(
                source.tensor(f"encoder.conv{i}.weight"),
                source.tensor(f"encoder.conv{i}.bias"),
                source.count(f"encoder.conv{i}.stride"),
                source.count(f"encoder.conv{i}.padding"),
            )
            for i in range(3)
        )
        layers = [EncoderLayer.read(source, f"encoder.layers.{i}") for i in range(source.count("encoder.layers"))]
        projection = (source.matrix("encoder.projection.0"), source.matrix("encoder.projection.1"))
        conv_out, positions = source.matrix("encoder.conv_out"), source.tensor("encoder.positions")
        return cls(geometry, convs, conv_out, positions, layers, Norm.read(source, "encoder.ln_post"), projection)

    @property
    def dtype(self) -> torch.dtype:
        return self.convs[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.convs[0].weight.device

    def matrices(self) -> list[Matrix]:
        per_layer = [m for layer in self.layers for m in (layer.q, layer.k, layer.v, layer.out, layer.fc1, layer.fc2)]
        return [self.conv_out, *per_layer, *self.projection]

    def front(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Front-end tokens of each 1 s chunk of (n_mels, frames) log-mel: [(tokens, d_model)] per chunk.

        Frames are zero-padded to whole chunks, as the reference pads them; a chunk of fewer than
        100 frames keeps only the tokens its frames produce.
        """
        n_mels, frames = features.shape
        size = self.frames_per_chunk
        chunks = -(-frames // size)
        padded = torch.zeros(n_mels, chunks * size, dtype=self.dtype, device=self.device)
        padded[:, :frames] = features
        # (n_mels, chunks * size) -> (chunks, 1, n_mels, size)
        batch = padded.view(n_mels, chunks, size).permute(1, 0, 2).contiguous()[:, None]
        out = batch
        for conv in self.convs:
            out = F.gelu(conv(out))
        n, channels, freqs, steps = out.shape
        # (chunks, channels, freqs, steps) -> (chunks, steps, channels * freqs)
        tokens = self.conv_out(out.permute(0, 3, 1, 2).contiguous().view(n, steps, channels * freqs))
        tokens += self.positions[:steps].to(tokens.dtype)
        valid = [_after_convs(min(size, frames - i * size)) for i in range(chunks)]
        return [tokens[i, :count] for i, count in enumerate(valid)]

    def windows(self, fronts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """LLM-ready embeddings of attention windows, each given as its front-end tokens: [(tokens, hidden)]."""
        lengths = [front.shape[0] for front in fronts]
        hidden = torch.cat(list(fronts)) if len(fronts) > 1 else fronts[0]  # (rows, d_model)
        for layer in self.layers:
            hidden = hidden + self._attention(layer, layer.attn_norm(hidden), lengths)
            hidden = hidden + layer.fc2(F.gelu(layer.fc1(layer.final_norm(hidden))))
        first, second = self.projection
        out = second(F.gelu(first(self.ln_post(hidden))))  # (rows, hidden)
        return list(out.split(lengths))  # type: ignore[no-untyped-call]  # torch: unannotated

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Embeddings of a whole clip's (n_mels, frames) log-mel: (tokens, hidden), windows from its first frame."""
        chunks = self.front(features)
        per = self.chunks_per_window
        fronts = [torch.cat(chunks[i : i + per]) for i in range(0, len(chunks), per)]
        return torch.cat(self.windows(fronts))

    def _attention(self, layer: EncoderLayer, hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        rows = hidden.shape[0]
        # (rows, d_model) -> (1, heads, rows, head_dim) each
        q, k, v = (
            proj(hidden).view(rows, self.heads, -1).transpose(0, 1)[None] for proj in (layer.q, layer.k, layer.v)
        )
        outputs = [
            F.scaled_dot_product_attention(qw, kw, vw, scale=layer.scaling)
            for qw, kw, vw in zip(*(t.split(lengths, 2) for t in (q, k, v)), strict=True)  # type: ignore[no-untyped-call]
        ]
        merged = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]  # (1, heads, rows, head_dim)
        return layer.out(merged[0].transpose(0, 1).reshape(rows, -1))


def _after_convs(frames: int) -> int:
    """Tokens of a chunk of ``frames`` after three (kernel 3, stride 2, padding 1) convolutions."""
    for _ in range(3):
        frames = (frames - 1) // 2 + 1 if frames > 0 else 0
    return frames


_LAYER_MATRICES = ("q", "k", "v", "out", "fc1", "fc2")


def _matrix(linear: torch.nn.Linear, form: str) -> Matrix:
    return to_matrix(linear.weight, linear.bias, form)


def _conv(module: torch.nn.Conv2d) -> Conv:
    """The module's weights; ``F.conv2d`` over them computes what the module does (square stride and padding)."""
    stride, padding = module.stride, module.padding
    if isinstance(padding, str) or stride[0] != stride[1] or padding[0] != padding[1]:
        raise ValueError("the audio encoder's convolutions must be Qwen3-ASR's: square stride and padding")
    if module.bias is None or module.groups != 1 or module.dilation != (1, 1):
        raise ValueError("the audio encoder's convolutions must be Qwen3-ASR's: with a bias, undilated")
    return Conv(module.weight, module.bias, stride[0], padding[0])
