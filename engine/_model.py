"""The loaded model: network, tokenizer, feature extractor and the one dtype policy of the engine.

The network is transformers' ``Qwen3ASRForConditionalGeneration``; this module only drives it:
features -> audio embeddings -> prompt embeddings -> greedy decoding over an explicit KV cache.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

import numpy as np
import torch

from asrlive._audio import SAMPLE_RATE

from ._checkpoint import ModelLoadError, load_network, read_checkpoint, resolve_model_dir
from ._kvcache import KVCache
from ._llm import RaggedForward, Step, can_pack_weights
from ._options import DEFAULT_MODEL, DTYPE_NAMES
from ._prompt import PromptIds, TextEncoder

if TYPE_CHECKING:
    from transformers import (
        Qwen3ASREncoderConfig,
        Qwen3ASRFeatureExtractor,
        Qwen3ASRForConditionalGeneration,
        Qwen3Config,
    )

T = TypeVar("T")
# A computation that needs LLM forwards: it yields each Step it wants run, is sent the greedy
# ids, and returns its result. One driver runs it alone, another runs many in one batch.
Steps = Generator[Step, torch.Tensor, T]

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16), strict=True))
EOS_IDS = (151643, 151645)  # <|endoftext|>, <|im_end|>
# The network was trained with these ids; a tokenizer that puts them elsewhere cannot work.
ASR_TOKEN_IDS = {"<|audio_start|>": 151669, "<|audio_end|>": 151670, "<|audio_pad|>": 151676, "<asr_text>": 151704}


def resolve_dtype(name: str | None) -> torch.dtype:
    """The dtype policy: bf16 (what the checkpoints store) where the hardware computes in bf16, else fp32.

    A CPU without bf16 instructions (AVX512-BF16 or AMX) emulates bf16 matrix products: measured
    2-3x slower than fp32 for prefill and encoder on such a CPU. fp32 holds bf16 weights exactly.
    """
    if name in (None, "auto"):
        return torch.bfloat16 if torch.cuda.is_available() or _cpu_has_bf16() else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of: auto, {', '.join(DTYPES)}") from None


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Tokenizer(TextEncoder, Protocol):
    """What the engine and the server use of a tokenizer (transformers' tokenizers have it)."""

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool) -> str | list[str]: ...
    def get_added_vocab(self) -> dict[str, int]: ...


@dataclass(frozen=True)
class ModelInfo:
    name: str  # what the user asked for: hub id or directory
    path: Path
    layout: str  # "original" or "hf"
    dtype: torch.dtype


class AsrModel:
    """A Qwen3-ASR checkpoint ready for inference. Not thread-safe: one thread drives it."""

    def __init__(
        self,
        network: Qwen3ASRForConditionalGeneration,
        tokenizer: Tokenizer,
        feature_extractor: Qwen3ASRFeatureExtractor,
        info: ModelInfo,
    ) -> None:
        self.network = network
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.info = info
        self.dtype = info.dtype
        # transformers types the sub-configs as dict | PreTrainedConfig | None; Qwen3ASRConfig
        # always builds them as these config objects.
        self.audio_config = cast("Qwen3ASREncoderConfig", network.config.audio_config)
        self.text_config = cast("Qwen3Config", network.config.text_config)
        # Inference only: no caller, inside torch.inference_mode or not, should build autograd graphs.
        network.requires_grad_(False)
        self._embed_tokens = network.get_input_embeddings()
        self._ragged = RaggedForward(network.model.language_model, network.lm_head)

    def pack_weights(self) -> bool:
        """Keep MKL-packed copies of the LLM weights for batched decoding (see ``_llm``), where possible.

        Costs the LLM's weight memory once more; worth it only when several sessions share the model.
        """
        if not can_pack_weights(self.dtype):
            return False
        self._ragged = RaggedForward(self.network.model.language_model, self.network.lm_head, pack_weights=True)
        return True

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, dtype: str | None = None) -> AsrModel:
        """Load from a local directory, the Hugging Face cache, or the hub; raise ModelLoadError if impossible."""
        torch_dtype = resolve_dtype(dtype)
        checkpoint = read_checkpoint(resolve_model_dir(model))
        network = load_network(checkpoint, torch_dtype)
        tokenizer = _load_tokenizer(checkpoint.path)
        feature_extractor = _load_feature_extractor(checkpoint.path, checkpoint.layout)
        return cls(
            network, tokenizer, feature_extractor, ModelInfo(model, checkpoint.path, checkpoint.layout, torch_dtype)
        )

    # -- audio ---------------------------------------------------------------------------------

    def features(self, audio: np.ndarray) -> torch.Tensor:
        """Log-mel features exactly as the reference processor computes them: (n_mels, frames)."""
        # padding=True (longest) is passed on to pad(), which takes it; the extractor annotates it str | None.
        out = self.feature_extractor(
            audio,
            sampling_rate=SAMPLE_RATE,
            padding=True,  # type: ignore[arg-type]
            return_attention_mask=True,
            return_tensors="pt",
        )
        frames = int(out["attention_mask"].sum())
        features: torch.Tensor = out["input_features"][0, :, :frames]  # BatchFeature items are untyped
        return features

    @torch.inference_mode()
    def encode_frames(self, features: torch.Tensor) -> torch.Tensor:
        """Audio embeddings in the LLM's hidden size for (n_mels, frames) log-mel: (n_tokens, hidden).

        Frames are zero-padded to whole 1 s conv chunks, as the reference processor does; attention
        windows count from the first frame given, so any slice starting on a window boundary
        encodes exactly as it does inside the whole clip.
        """
        n_mels, frames = features.shape
        chunk = 2 * self.audio_config.n_window
        padded = -(-frames // chunk) * chunk
        batch = torch.zeros(1, n_mels, padded, dtype=self.dtype)
        batch[0, :, :frames] = features
        mask = torch.zeros(1, padded, dtype=torch.long)
        mask[0, :frames] = 1
        output = self.network.model.get_audio_features(batch, mask)  # untyped in transformers
        embeds: torch.Tensor = output.pooler_output
        return embeds

    def encode_audio(self, audio: np.ndarray) -> torch.Tensor:
        return self.encode_frames(self.features(audio))

    # -- text ----------------------------------------------------------------------------------

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        """(len(token_ids), hidden)"""
        embeds: torch.Tensor = self._embed_tokens(torch.tensor([token_ids], dtype=torch.long))[0]  # Module call: Any
        return embeds

    def prompt_embeddings(self, prompt: PromptIds, audio_embeds: torch.Tensor) -> torch.Tensor:
        """(prefix + n_audio + suffix, hidden): audio embeddings in place of the <|audio_pad|> tokens."""
        return torch.cat([self.embed(prompt.prefix), audio_embeds.to(self.dtype), self.embed(prompt.suffix)], dim=0)

    def forward(self, embeds: torch.Tensor, cache: KVCache, n_logits: int) -> torch.Tensor:
        """Run the LLM over (seq, hidden) after what ``cache`` holds; greedy ids of the last n_logits positions.

        One position gets its logits alone, as in ``generate``: a one-row product rounds
        differently from a many-row one, and the reference's decode steps are one-row products.
        """
        return self._ragged([Step(embeds, cache, n_logits)])[0]

    def forward_batch(self, steps: Sequence[Step]) -> list[torch.Tensor]:
        """``forward`` for several sequences in one pass over the weights (see ``_llm``)."""
        return self._ragged(steps)

    def new_cache(self) -> KVCache:
        return KVCache(self.text_config.num_hidden_layers)

    @torch.inference_mode()
    def greedy_decode(self, embeds: torch.Tensor, max_new_tokens: int) -> list[int]:
        """Greedy continuation of a prompt given as embeddings; the eos token is not returned.

        Token-identical to ``generate(do_sample=False)``: the same prefill over the whole prompt,
        then one token per step against the growing KV cache, logits only for the last position.
        """
        cache = self.new_cache()
        next_id = int(self.forward(embeds, cache, 1)[0])
        return self.run(self.greedy_steps(next_id, cache, [], max_new_tokens))

    def greedy_steps(self, next_id: int, cache: KVCache, tokens: list[int], max_new_tokens: int) -> Steps[list[int]]:
        """Append greedy tokens, starting with ``next_id``, until eos or ``max_new_tokens`` in all."""
        tokens = list(tokens)
        while len(tokens) < max_new_tokens and next_id not in EOS_IDS:
            tokens.append(next_id)
            if len(tokens) < max_new_tokens:
                next_id = int((yield Step(self.embed([next_id]), cache, 1))[0])
        return tokens

    @torch.inference_mode()
    def run(self, steps: Steps[T]) -> T:
        """Drive one computation alone: each forward it asks for is run as it comes."""
        try:
            step = next(steps)
            while True:
                step = steps.send(self.forward(step.embeds, step.cache, step.n_logits))
        except StopIteration as stop:
            result: T = stop.value  # the generator's return value (typed Any)
            return result

    def decode_text(self, token_ids: list[int]) -> str:
        # Typed str | list[str] in transformers: it is a str for one sequence of ids.
        return cast(str, self.tokenizer.decode(token_ids, skip_special_tokens=True))


def _load_tokenizer(path: Path) -> Tokenizer:
    from transformers import AutoTokenizer

    has_files = (path / "tokenizer.json").is_file() or (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    )
    if not has_files:
        raise ModelLoadError(f"{path} has no tokenizer (tokenizer.json, or vocab.json + merges.txt).")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # tokenizers raises its own exception types for corrupt files
        raise ModelLoadError(f"The tokenizer files in {path} could not be read: {exc}") from exc
    for token, expected in ASR_TOKEN_IDS.items():
        found = tokenizer.convert_tokens_to_ids(token)
        if found != expected:
            raise ModelLoadError(
                f"The tokenizer in {path} maps the ASR token {token} to id {found}, but Qwen3-ASR needs {expected}: "
                "it is not (or not a complete) Qwen3-ASR tokenizer."
            )
    return tokenizer


def _load_feature_extractor(path: Path, layout: str) -> Qwen3ASRFeatureExtractor:
    from transformers import Qwen3ASRFeatureExtractor

    # The original layout names Whisper's extractor; transformers' converter replaces it by the
    # default Qwen3-ASR one (same mel settings, plus the 0.5 s minimum length), and so do we.
    if layout == "hf" and (path / "preprocessor_config.json").is_file():
        return Qwen3ASRFeatureExtractor.from_pretrained(path)
    return Qwen3ASRFeatureExtractor()  # type: ignore[no-untyped-call]  # its __init__ is unannotated
