"""The LLM forward over several sequences at once, each with its own KV cache ("ragged" batching).

Decode is memory-bound: a decode step reads every weight once to produce one token. Stacking the
rows of several sessions into one matrix reads the weights once for all of them. Sequences have
different lengths and caches, so only the row-wise parts are shared (norms, projections, rotary
embedding, MLP, lm_head); attention runs per sequence against that sequence's cache, with the
same mask and attention function as transformers' own forward. With one sequence the result is
bit-identical to ``Qwen3Model.forward``; with several, a row differs only in the rounding of a
many-row product versus a one-row one (fp32: ~1e-7 relative).

MKL's fp32 GEMM repacks the whole weight matrix on every call once a product has 4 or more rows,
which made a decode step of 4 sessions cost twice one of 3. With ``pack_weights`` every linear
layer keeps an MKL-packed copy of its weight (the LLM's weights in memory twice) and products of
4+ rows use it: measured on 2 cores, 0.6B, one decode step for 8 sessions cost 1.6x a step for one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb, eager_attention_forward

from ._kvcache import KVCache

if TYPE_CHECKING:
    from typing import TypeAlias

    from torch.nn.attention.flex_attention import BlockMask
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3MLP, Qwen3Model

    # ``module(x)`` for a linear layer of the LLM: plain, or through packed weights.
    LinearFn: TypeAlias = Callable[[torch.nn.Linear, torch.Tensor], torch.Tensor]
    # What transformers' create_causal_mask builds for one sequence.
    Mask: TypeAlias = torch.Tensor | BlockMask | None


@dataclass(frozen=True)
class Step:
    """One sequence's share of a forward: ``embeds`` after what ``cache`` holds; greedy ids of the last n_logits."""

    embeds: torch.Tensor  # (seq, hidden)
    cache: KVCache
    n_logits: int


class RaggedForward:
    """Drives the decoder layers of a transformers ``Qwen3Model`` over several (embeds, cache) pairs."""

    def __init__(self, language_model: Qwen3Model, lm_head: torch.nn.Linear, pack_weights: bool = False) -> None:
        config = language_model.config
        if config.layer_types is None or any(kind != "full_attention" for kind in config.layer_types):
            raise ValueError("only full-attention layers are supported (Qwen3-ASR has no sliding windows)")
        self.lm = language_model
        self.lm_head = lm_head
        # torch's ModuleList is not generic (its items are typed Module): these are the decoder layers.
        self.layers = cast("Iterable[Qwen3DecoderLayer]", language_model.layers)
        self.config = config
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)
        self._packed = _PackedLinear(language_model, lm_head) if pack_weights else None

    @torch.inference_mode()
    def __call__(self, steps: Sequence[Step]) -> list[torch.Tensor]:
        # 1. Rows of all sequences side by side; positions continue each sequence's cache.
        lengths = [step.embeds.shape[0] for step in steps]
        hidden = torch.cat([step.embeds for step in steps])[None]  # (1, rows, hidden)
        positions = [torch.arange(n) + step.cache.length for n, step in zip(lengths, steps, strict=True)]
        position_ids = torch.cat(positions)[None]  # (1, rows)
        # 2. Masks exactly as transformers builds them, before any cache grows.
        masks: list[Mask] = [
            create_causal_mask(self.config, step.embeds[None], None, step.cache, pos[None])
            for step, pos in zip(steps, positions, strict=True)
        ]
        rotary: tuple[torch.Tensor, torch.Tensor] = self.lm.rotary_emb(hidden, position_ids)  # (cos, sin)
        # A stream alone computes exactly what transformers computes; packed weights only in batches.
        linear: LinearFn = self._packed if self._packed is not None and len(steps) > 1 else _plain_linear
        for index, layer in enumerate(self.layers):
            normed = layer.input_layernorm(hidden)
            hidden = hidden + self._attention(layer, index, normed, rotary, steps, masks, lengths, linear)
            hidden = hidden + _mlp(layer.mlp, layer.post_attention_layernorm(hidden), linear)
        hidden = self.lm.norm(hidden)[0]  # (rows, hidden)
        return self._greedy(hidden, steps, lengths, linear)

    def _attention(
        self,
        layer: Qwen3DecoderLayer,
        index: int,
        hidden: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        steps: Sequence[Step],
        masks: Sequence[Mask],
        lengths: Sequence[int],
        linear: LinearFn,
    ) -> torch.Tensor:
        attn = layer.self_attn
        shape = (*hidden.shape[:-1], -1, attn.head_dim)  # (1, rows, heads, head_dim)
        query = attn.q_norm(linear(attn.q_proj, hidden).view(shape)).transpose(1, 2)  # (1, heads, rows, head_dim)
        key = attn.k_norm(linear(attn.k_proj, hidden).view(shape)).transpose(1, 2)  # (1, kv heads, rows, head_dim)
        value = linear(attn.v_proj, hidden).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *rotary)
        outputs: list[torch.Tensor] = []
        begin = 0
        for step, mask, n in zip(steps, masks, lengths, strict=True):
            rows = slice(begin, begin + n)
            keys, values = step.cache.update(key[:, :, rows], value[:, :, rows], index)
            out, _ = self.attention(attn, query[:, :, rows], keys, values, mask, dropout=0.0, scaling=attn.scaling)
            outputs.append(out)  # (1, n, heads, head_dim)
            begin += n
        merged = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        return linear(attn.o_proj, merged.reshape(*hidden.shape[:-1], -1).contiguous())

    def _greedy(
        self, hidden: torch.Tensor, steps: Sequence[Step], lengths: list[int], linear: LinearFn
    ) -> list[torch.Tensor]:
        # One lm_head product for every wanted row: with one row this is the one-row product that
        # generate's decode steps compute.
        ends = torch.tensor(lengths).cumsum(0).tolist()
        rows = [torch.arange(end - step.n_logits, end) for end, step in zip(ends, steps, strict=True)]
        wanted = torch.cat(rows)
        if wanted.numel() == 0:
            return [torch.empty(0, dtype=torch.long) for _ in steps]
        ids = linear(self.lm_head, hidden[wanted]).argmax(dim=-1)  # (wanted,)
        return list(ids.split([step.n_logits for step in steps]))  # type: ignore[no-untyped-call]  # torch: unannotated


def _mlp(mlp: Qwen3MLP, hidden: torch.Tensor, linear: LinearFn) -> torch.Tensor:
    return linear(mlp.down_proj, mlp.act_fn(linear(mlp.gate_proj, hidden)) * linear(mlp.up_proj, hidden))


def _plain_linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = module(x)  # torch types Module.__call__ as returning Any
    return out


_PACKED_FROM_ROWS = 4  # below this MKL does not repack, and one row stays the reference's product


class _PackedLinear:
    """``module(x)``, but through an MKL-packed copy of the weight for products of 4+ rows."""

    def __init__(self, language_model: Qwen3Model, lm_head: torch.nn.Linear) -> None:
        linears = [m for m in language_model.modules() if isinstance(m, torch.nn.Linear)] + [lm_head]
        # torch types Linear.bias as always set; it is None for Linear(..., bias=False).
        if any(m.bias is not None or m.weight.dtype != torch.float32 for m in linears):  # type: ignore[unreachable]
            raise ValueError("packed weights need float32 linear layers without bias")
        self._packed: dict[int, torch.Tensor] = {
            id(m): torch.ops.mkl._mkl_reorder_linear_weight(m.weight, 8) for m in linears
        }

    def __call__(self, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows < _PACKED_FROM_ROWS:
            plain: torch.Tensor = module(x)  # torch types Module.__call__ as returning Any
            return plain
        out: torch.Tensor = torch.ops.mkl._mkl_linear(
            x.reshape(rows, -1), self._packed[id(module)], module.weight, None, rows
        )
        return out.reshape(*x.shape[:-1], -1)  # (..., out_features)


def can_pack_weights(dtype: torch.dtype) -> bool:
    """MKL-packed weights exist for float32 on CPU builds with MKL."""
    return (
        dtype == torch.float32
        and torch.backends.mkl.is_available()  # type: ignore[no-untyped-call]  # torch: unannotated
        and hasattr(torch.ops.mkl, "_mkl_linear")
    )
