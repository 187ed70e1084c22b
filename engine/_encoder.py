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
for operation, on the same modules' weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers import Qwen3ASREncoder
    from transformers.models.qwen3_asr.modeling_qwen3_asr import (
        Qwen3ASRAudioAttention,
        Qwen3ASRAudioEncoderLayer,
        Qwen3ASRMultiModalProjector,
    )


class Encoder:
    def __init__(self, tower: Qwen3ASREncoder, projector: Qwen3ASRMultiModalProjector) -> None:
        config = tower.config
        if config.activation_function != "gelu" or config.scale_embedding:
            raise ValueError("the audio encoder must be Qwen3-ASR's: gelu activations, unscaled embeddings")
        self.tower = tower
        self.projector = projector
        self.frames_per_chunk = 2 * config.n_window  # 100
        self.chunks_per_window = config.n_window_infer // self.frames_per_chunk  # 8
        self.heads = config.encoder_attention_heads

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.conv2d1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tower.conv2d1.weight.device

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
        tower = self.tower
        out = F.gelu(tower.conv2d1(batch))
        out = F.gelu(tower.conv2d2(out))
        out = F.gelu(tower.conv2d3(out))
        n, channels, freqs, steps = out.shape
        # (chunks, channels, freqs, steps) -> (chunks, steps, channels * freqs)
        tokens = tower.conv_out(out.permute(0, 3, 1, 2).contiguous().view(n, steps, channels * freqs))
        tokens += tower.positional_embedding.positional_embedding[:steps].to(tokens.dtype)
        valid = [_after_convs(min(size, frames - i * size)) for i in range(chunks)]
        return [tokens[i, :count] for i, count in enumerate(valid)]

    def windows(self, fronts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """LLM-ready embeddings of attention windows, each given as its front-end tokens: [(tokens, hidden)]."""
        lengths = [front.shape[0] for front in fronts]
        hidden = torch.cat(list(fronts)) if len(fronts) > 1 else fronts[0]  # (rows, d_model)
        # torch's ModuleList is not generic (its items are typed Module): these are the encoder layers.
        for layer in cast("Iterable[Qwen3ASRAudioEncoderLayer]", self.tower.layers):
            hidden = hidden + self._attention(layer.self_attn, layer.self_attn_layer_norm(hidden), lengths)
            normed = layer.final_layer_norm(hidden)
            hidden = hidden + layer.fc2(F.gelu(layer.fc1(normed)))
        hidden = self.tower.ln_post(hidden)
        projector = self.projector
        out = projector.linear_2(F.gelu(projector.linear_1(hidden)))  # (rows, hidden)
        return list(out.split(lengths))

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Embeddings of a whole clip's (n_mels, frames) log-mel: (tokens, hidden), windows from its first frame."""
        chunks = self.front(features)
        per = self.chunks_per_window
        fronts = [torch.cat(chunks[i : i + per]) for i in range(0, len(chunks), per)]
        return torch.cat(self.windows(fronts))

    def _attention(self, attn: Qwen3ASRAudioAttention, hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        rows = hidden.shape[0]
        # (rows, d_model) -> (1, heads, rows, head_dim) each
        q, k, v = (
            proj(hidden).view(rows, self.heads, -1).transpose(0, 1)[None]
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        outputs = [
            F.scaled_dot_product_attention(qw, kw, vw, scale=attn.scaling)
            for qw, kw, vw in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), strict=True)
        ]
        merged = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]  # (1, heads, rows, head_dim)
        out: torch.Tensor = attn.out_proj(merged[0].transpose(0, 1).reshape(rows, -1))  # Module call: Any
        return out


def _after_convs(frames: int) -> int:
    """Tokens of a chunk of ``frames`` after three (kernel 3, stride 2, padding 1) convolutions."""
    for _ in range(3):
        frames = (frames - 1) // 2 + 1 if frames > 0 else 0
    return frames
