"""The LLM forward of Qwen3-ASR's decoder, lean: the engine's hot loop owns its computation.

transformers' ``Qwen3Model`` builds masks, rotary embeddings and cache objects on every call and
dispatches ~20 modules per layer; for a one-row decode step that overhead was a third of the
step. Here each layer is five matrix products on weights laid out once at load time (q, k and v
fused into one matrix, gate and up into another), rotary tables computed once, attention by
``scaled_dot_product_attention`` straight over the explicit ``KVCache``, and no mask at all for
decode rows. The arithmetic is transformers' own, operation for operation (a fused product
computes each output column exactly as the separate one does): one sequence gives transformers'
logits bit for bit in float32.

Several sequences run as one ragged batch: their rows are concatenated for the products (one
pass over the weights for all of them: decode is memory-bound) and attention runs per sequence
on its own cache. In a batch a row may round differently (a many-row product sums in another
order than a one-row one); a sequence alone computes what ``generate`` computes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

from ._kvcache import KVCache
from ._steps import Step
from ._store import Reader, Writer
from ._weights import Matrix, to_matrix

if TYPE_CHECKING:
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3Model


@dataclass(frozen=True)
class Layer:
    """One decoder layer's weights, fused where rows share an input."""

    qkv: Matrix  # (heads * head_dim + 2 * kv heads * head_dim, hidden)
    o: Matrix  # (hidden, heads * head_dim)
    gate_up: Matrix  # (2 * ffn, hidden)
    down: Matrix  # (hidden, ffn)
    input_norm: torch.Tensor  # (hidden,)
    post_norm: torch.Tensor  # (hidden,)
    q_norm: torch.Tensor  # (head_dim,)
    k_norm: torch.Tensor  # (head_dim,)

    def write(self, out: Writer, prefix: str) -> None:
        for name in ("qkv", "o", "gate_up", "down"):
            out.matrix(f"{prefix}.{name}", getattr(self, name))
        for name in ("input_norm", "post_norm", "q_norm", "k_norm"):
            out.tensor(f"{prefix}.{name}", getattr(self, name))

    @classmethod
    def read(cls, source: Reader, prefix: str) -> Layer:
        qkv, o, gate_up, down = (source.matrix(f"{prefix}.{name}") for name in ("qkv", "o", "gate_up", "down"))
        norms = [source.tensor(f"{prefix}.{name}") for name in ("input_norm", "post_norm", "q_norm", "k_norm")]
        return cls(qkv, o, gate_up, down, *norms)


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    eps: float


class LeanLM:
    """Drives a Qwen3 decoder's weights over several (embeds, cache) pairs at once.

    Built from transformers' ``Qwen3Model`` (``of``: the weights taken over in a format of
    ``_weights``, the modules not kept) or from the weights cache (``read``).
    """

    def __init__(self, shape: Shape, layers: list[Layer], norm: torch.Tensor, head: Matrix, rotary: _Rotary) -> None:
        self.shape = shape
        self.layers = layers
        self.norm = norm  # (hidden,)
        self.head = head  # (vocab, hidden)
        self.dtype, self.device = norm.dtype, norm.device
        self.scaling = shape.head_dim**-0.5
        self._rotary = rotary

    @classmethod
    def of(cls, language_model: Qwen3Model, lm_head: torch.nn.Linear, form: str) -> LeanLM:
        config = language_model.config
        if config.layer_types is not None and any(kind != "full_attention" for kind in config.layer_types):
            raise ValueError("only full-attention layers are supported (Qwen3-ASR has no sliding windows)")
        if config.hidden_act != "silu" or getattr(config, "attention_bias", False):
            raise ValueError("the decoder must be Qwen3's: silu MLP, attention without bias")
        shape = Shape(
            config.num_hidden_layers,
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads or config.num_attention_heads,
            config.head_dim or config.hidden_size // config.num_attention_heads,
            config.intermediate_size,
            config.rms_norm_eps,
        )
        # torch's ModuleList is not generic (its items are typed Module): these are the decoder layers.
        layers = [_fuse(layer, form) for layer in cast("Iterable[Qwen3DecoderLayer]", language_model.layers)]
        # A tied head's plain matrix is the embedding table itself; in another format the lookups keep
        # the table (Parts: in bfloat16 where that loses nothing).
        head = to_matrix(lm_head.weight, None, form)
        rotary = language_model.rotary_emb
        return cls(shape, layers, language_model.norm.weight, head, _Rotary(rotary.inv_freq, rotary.attention_scaling))

    def write(self, out: Writer) -> None:
        for name, value in vars(self.shape).items():
            out.scalar(f"llm.shape.{name}", value)
        for index, layer in enumerate(self.layers):
            layer.write(out, f"llm.layers.{index}")
        out.tensor("llm.norm", self.norm)
        out.matrix("llm.head", self.head)
        out.tensor("llm.inv_freq", self._rotary.inv_freq)
        out.scalar("llm.rotary_scaling", self._rotary.scaling)

    @classmethod
    def read(cls, source: Reader) -> LeanLM:
        layers, hidden, heads, kv_heads, head_dim, ffn = (
            source.count(f"llm.shape.{name}") for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn")
        )
        shape = Shape(layers, hidden, heads, kv_heads, head_dim, ffn, source.scalar("llm.shape.eps"))
        decoder = [Layer.read(source, f"llm.layers.{index}") for index in range(shape.layers)]
        rotary = _Rotary(source.tensor("llm.inv_freq"), source.scalar("llm.rotary_scaling"))
        return cls(shape, decoder, source.tensor("llm.norm"), source.matrix("llm.head"), rotary)

    def new_cache(self) -> KVCache:
        s = self.shape
        return KVCache(s.layers, s.kv_heads, s.head_dim, self.dtype, self.device)

    def matrices(self) -> list[Matrix]:
        """Every matrix a decode step multiplies by, as stored here (fused)."""
        return [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [self.head]

    def __call__(self, steps: Sequence[Step]) -> list[torch.Tensor]:
        if len({id(step.cache) for step in steps}) != len(steps):
            raise ValueError("two steps of one forward share a KV cache")
        # 1. Rows of all sequences stacked; each sequence continues its own cache.
        lengths = [step.embeds.shape[0] for step in steps]
        starts = [step.cache.reserve(n) for step, n in zip(steps, lengths, strict=True)]
        hidden = torch.cat([step.embeds for step in steps]) if len(steps) > 1 else steps[0].embeds  # (rows, hidden)
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
        cos, sin = self._rotary(positions, hidden.dtype, hidden.device)  # (rows, head_dim) each
        masks = [_mask(start, n, hidden.device) for start, n in zip(starts, lengths, strict=True)]
        # 2. The layers.
        for index, layer in enumerate(self.layers):
            attended = self._attention(
                index,
                layer,
                _rms_norm(hidden, layer.input_norm, self.shape.eps),
                cos,
                sin,
                steps,
                starts,
                lengths,
                masks,
            )
            hidden = hidden + attended
            hidden = hidden + self._mlp(layer, _rms_norm(hidden, layer.post_norm, self.shape.eps))
        for step, n in zip(steps, lengths, strict=True):
            step.cache.commit(n)
        # 3. Greedy ids of the wanted rows: one head product for all of them.
        hidden = _rms_norm(hidden, self.norm, self.shape.eps)
        return self._greedy(hidden, steps, lengths)

    def _attention(
        self,
        index: int,
        layer: Layer,
        normed: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        steps: Sequence[Step],
        starts: Sequence[int],
        lengths: Sequence[int],
        masks: Sequence[torch.Tensor | None],
    ) -> torch.Tensor:
        s = self.shape
        rows = normed.shape[0]
        qkv = layer.qkv(normed)  # (rows, (heads + 2 kv heads) * head_dim)
        widths = [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim]
        query, key, value = qkv.split(widths, -1)  # type: ignore[no-untyped-call]  # torch: unannotated
        query = _rotate(_rms_norm(query.view(rows, s.heads, s.head_dim), layer.q_norm, s.eps), cos, sin)
        key = _rotate(_rms_norm(key.view(rows, s.kv_heads, s.head_dim), layer.k_norm, s.eps), cos, sin)
        value = value.view(rows, s.kv_heads, s.head_dim)
        outputs = []
        begin = 0
        for step, start, n, mask in zip(steps, starts, lengths, masks, strict=True):
            part = slice(begin, begin + n)
            keys, values = step.cache.write(index, start, key[part].transpose(0, 1), value[part].transpose(0, 1))
            outputs.append(self._sdpa(query[part], keys, values, mask))  # (n, heads * head_dim)
            begin += n
        merged = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        return layer.o(merged)

    def _sdpa(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention of (n, heads, head_dim) queries over (kv heads, length, head_dim) keys and values."""
        s = self.shape
        n = query.shape[0]
        if n == 1:
            # A decode row attends to everything: no mask; kv heads shared by their query heads in SDPA.
            out = F.scaled_dot_product_attention(
                query.transpose(0, 1)[None], keys[None], values[None], scale=self.scaling, enable_gqa=True
            )  # (1, heads, 1, head_dim)
            return out.reshape(1, s.heads * s.head_dim)
        group = s.heads // s.kv_heads
        keys, values = (t.repeat_interleave(group, dim=0)[None] for t in (keys, values))  # (1, heads, length, d)
        out = F.scaled_dot_product_attention(
            query.transpose(0, 1)[None], keys, values, attn_mask=mask, is_causal=mask is None, scale=self.scaling
        )  # (1, heads, n, head_dim)
        return out[0].transpose(0, 1).reshape(n, s.heads * s.head_dim)

    def _mlp(self, layer: Layer, normed: torch.Tensor) -> torch.Tensor:
        gate, up = layer.gate_up(normed).chunk(2, dim=-1)  # (rows, ffn) each
        return layer.down(F.silu(gate) * up)

    def _greedy(self, hidden: torch.Tensor, steps: Sequence[Step], lengths: list[int]) -> list[torch.Tensor]:
        # With one wanted row this is the one-row product that generate's decode steps compute.
        ends = torch.tensor(lengths).cumsum(0).tolist()
        wanted = torch.cat([torch.arange(end - step.n_logits, end) for end, step in zip(ends, steps, strict=True)])
        if wanted.numel() == 0:
            return [torch.empty(0, dtype=torch.long) for _ in steps]
        ids = self.head(hidden[wanted.to(hidden.device)]).argmax(dim=-1).cpu()  # (wanted,)
        return list(ids.split([step.n_logits for step in steps]))  # type: ignore[no-untyped-call]  # torch: unannotated


def _fuse(layer: Qwen3DecoderLayer, form: str) -> Layer:
    """Fused weights in ``form``; a plain one is shared with the module (its weights become views), so
    nothing is held twice while the module lives."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    _share(qkv, [attn.q_proj, attn.k_proj, attn.v_proj])
    _share(gate_up, [mlp.gate_proj, mlp.up_proj])
    return Layer(
        to_matrix(qkv, None, form),
        to_matrix(attn.o_proj.weight, None, form),
        to_matrix(gate_up, None, form),
        to_matrix(mlp.down_proj.weight, None, form),
        layer.input_layernorm.weight,
        layer.post_attention_layernorm.weight,
        attn.q_norm.weight,
        attn.k_norm.weight,
    )


def _share(fused: torch.Tensor, modules: list[torch.nn.Linear]) -> None:
    begin = 0
    for module in modules:
        rows = module.weight.shape[0]
        module.weight = torch.nn.Parameter(fused[begin : begin + rows], requires_grad=False)
        begin += rows


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's RMSNorm: normalised in float32, cast back, then scaled (the order matters in bf16)."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
    return weight * normed


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (rows, heads, head_dim) with (rows, head_dim) tables."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _mask(start: int, n: int, device: torch.device) -> torch.Tensor | None:
    """Causal mask of n rows after ``start`` cached ones: (n, start + n), True where a row may look.

    None where SDPA needs none: one row sees everything, and rows with nothing cached before them
    are plainly causal (``is_causal``).
    """
    if n == 1 or start == 0:
        return None
    return torch.arange(start + n, device=device)[None] <= torch.arange(start, start + n, device=device)[:, None]


class _Rotary:
    """cos/sin tables by position, computed once (grown by doubling) exactly as transformers computes them."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float) -> None:
        self.inv_freq = inv_freq.float()  # (head_dim / 2,)
        self.scaling = float(scaling)
        self._cos = self._sin = torch.empty(0)
        self._key: tuple[torch.dtype, torch.device] | None = None

    def __call__(
        self, positions: torch.Tensor, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        needed = int(positions.max()) + 1
        if self._key != (dtype, device) or needed > self._cos.shape[0]:
            self._build(max(needed, 2 * self._cos.shape[0], 1024), dtype, device)
        index = positions.to(device)
        return self._cos[index], self._sin[index]

    def _build(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        inv_freq = self.inv_freq.to(device)
        freqs = torch.arange(size, device=device, dtype=torch.float32)[:, None] * inv_freq[None]  # (size, d/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (size, head_dim)
        self._cos = (angles.cos() * self.scaling).to(dtype)
        self._sin = (angles.sin() * self.scaling).to(dtype)
        self._key = (dtype, device)
