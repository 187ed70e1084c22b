"""The loaded model: network, tokenizer, feature extractor and the one dtype policy of the engine.

The network is transformers' ``Qwen3ASRForConditionalGeneration``; this module only drives it:
features -> audio embeddings -> prompt embeddings -> greedy decoding over an explicit KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from ._audio import SAMPLE_RATE
from ._checkpoint import DEFAULT_MODEL, ModelLoadError, load_network, read_checkpoint, resolve_model_dir
from ._prompt import PromptIds

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EOS_IDS = (151643, 151645)  # <|endoftext|>, <|im_end|>
# The network was trained with these ids; a tokenizer that puts them elsewhere cannot work.
ASR_TOKEN_IDS = {"<|audio_start|>": 151669, "<|audio_end|>": 151670, "<|audio_pad|>": 151676, "<asr_text>": 151704}


def resolve_dtype(name: str | None) -> torch.dtype:
    """The dtype policy: bf16 (what the checkpoints store) where the CPU has bf16 kernels, else fp32."""
    if name in (None, "auto"):
        if torch.cuda.is_available() or torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of: auto, {', '.join(DTYPES)}") from None


@dataclass(frozen=True)
class ModelInfo:
    name: str  # what the user asked for: hub id or directory
    path: Path
    layout: str  # "original" or "hf"
    dtype: torch.dtype


class AsrModel:
    """A Qwen3-ASR checkpoint ready for inference. Not thread-safe: one thread drives it."""

    def __init__(self, network, tokenizer, feature_extractor, info: ModelInfo) -> None:
        self.network = network
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.info = info
        self.dtype = info.dtype
        self._embed_tokens = network.get_input_embeddings()

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

    def features(self, audio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel features exactly as the reference processor computes them for one clip."""
        out = self.feature_extractor(
            audio, sampling_rate=SAMPLE_RATE, padding=True, return_attention_mask=True, return_tensors="pt"
        )
        # input_features: (1, n_mels, frames padded to a multiple of 100); mask: (1, frames)
        return out["input_features"].to(self.dtype), out["attention_mask"]

    @torch.inference_mode()
    def encode_audio(self, audio: np.ndarray) -> torch.Tensor:
        """Audio embeddings in the LLM's hidden size: (n_audio_tokens, hidden)."""
        features, mask = self.features(audio)
        return self.network.model.get_audio_features(features, mask).pooler_output

    # -- text ----------------------------------------------------------------------------------

    def prompt_embeddings(self, prompt: PromptIds, audio_embeds: torch.Tensor) -> torch.Tensor:
        """(prefix + n_audio + suffix, hidden): audio embeddings in place of the <|audio_pad|> tokens."""
        prefix = self._embed_tokens(torch.tensor([prompt.prefix]))[0]
        suffix = self._embed_tokens(torch.tensor([prompt.suffix]))[0]
        return torch.cat([prefix, audio_embeds.to(prefix.dtype), suffix], dim=0)

    @torch.inference_mode()
    def greedy_decode(self, embeds: torch.Tensor, max_new_tokens: int) -> list[int]:
        """Greedy continuation of a prompt given as embeddings; the eos token is not returned.

        Token-identical to ``generate(do_sample=False)``: the same prefill over the whole prompt,
        then one token per step against the growing KV cache, logits only for the last position.
        """
        cache = DynamicCache(config=self.network.config.text_config)
        tokens: list[int] = []
        step_input = embeds[None]  # (1, seq, hidden)
        while len(tokens) < max_new_tokens:
            next_id = self._forward_next(step_input, cache)
            if next_id in EOS_IDS:
                break
            tokens.append(next_id)
            step_input = self._embed_tokens(torch.tensor([[next_id]]))  # (1, 1, hidden)
        return tokens

    def _forward_next(self, inputs_embeds: torch.Tensor, cache: DynamicCache) -> int:
        hidden = self.network.model.language_model(
            inputs_embeds=inputs_embeds, past_key_values=cache, use_cache=True
        ).last_hidden_state
        logits = self.network.lm_head(hidden[:, -1:, :])  # (1, 1, vocab)
        return int(logits[0, -1].argmax())

    def decode_text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def _load_tokenizer(path: Path):
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


def _load_feature_extractor(path: Path, layout: str):
    from transformers import Qwen3ASRFeatureExtractor

    # The original layout names Whisper's extractor; transformers' converter replaces it by the
    # default Qwen3-ASR one (same mel settings, plus the 0.5 s minimum length), and so do we.
    if layout == "hf" and (path / "preprocessor_config.json").is_file():
        return Qwen3ASRFeatureExtractor.from_pretrained(path)
    return Qwen3ASRFeatureExtractor()
