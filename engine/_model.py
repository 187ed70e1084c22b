"""The loaded model: network, tokenizer, feature extractor and the one dtype policy of the engine.

``LoadedNetwork`` is what both kinds of the family share: the feature extractor, the audio encoder
and the LLM over an explicit KV cache, driven by the engine (``Encoder``, ``LeanLM``) on the
weights of a transformers network. ``AsrModel`` adds greedy decoding of the vocabulary head
(``Qwen3ASRForConditionalGeneration``); the forced aligner (``_aligner``) a head of timestamp classes.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F

from asrlive._audio import SAMPLE_RATE

from ._cache import cached_parts
from ._checkpoint import Checkpoint, ModelLoadError, check_kind, load_network, read_checkpoint, resolve_model_dir
from ._kvcache import KVCache
from ._options import DEFAULT_MODEL, DEVICE_HELP, DTYPE_NAMES
from ._parts import Parts
from ._prompt import PromptIds, TextEncoder
from ._steps import Encode, Step, Steps, run
from ._weights import check_quantize, weight_format

if TYPE_CHECKING:
    from transformers import Qwen3ASRFeatureExtractor, Qwen3ASRForConditionalGeneration, Qwen3ASRForTokenClassification

T = TypeVar("T")

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16), strict=True))
# The network was trained with these ids; a tokenizer that puts them elsewhere cannot work.
ASR_TOKEN_IDS = {"<|audio_start|>": 151669, "<|audio_end|>": 151670, "<|audio_pad|>": 151676, "<asr_text>": 151704}


def resolve_dtype(name: str | None, device: torch.device | None = None) -> torch.dtype:
    """The dtype policy: bf16 (what the checkpoints store) where the hardware computes in bf16, else fp32.

    A CPU without bf16 instructions (AVX512-BF16 or AMX) emulates bf16 matrix products: measured
    2-3x slower than fp32 for prefill and encoder on such a CPU. fp32 holds bf16 weights exactly.
    """
    if name in (None, "auto"):
        on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
        return torch.bfloat16 if on_gpu or _cpu_has_bf16() else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of: auto, {', '.join(DTYPES)}") from None


def resolve_device(name: str | None) -> torch.device:
    """The device policy: ``auto`` is the first CUDA device when there is one, else the CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use {DEVICE_HELP}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use {DEVICE_HELP}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("this machine has no CUDA device, or this torch build has no CUDA support")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"there are only {torch.cuda.device_count()} CUDA devices (cuda:0 ..)")
    return device


def release_freed_memory() -> None:
    """Hand memory freed by Python back to the system (glibc keeps freed heap memory for reuse).

    Converting the weights frees the network's float tensors (gigabytes); glibc's allocator keeps
    much of that as its own free heap, which counts as resident memory for ever after. Its
    ``malloc_trim`` returns it. Elsewhere (another C library) nothing is done.
    """
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.malloc_trim(0)


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
    device: torch.device = torch.device("cpu")
    quantize: str | None = None  # "int8" or "int4": the LLM's linears and head (the encoder at 8 bits)
    weights: str = "plain"  # the LLM's weight format (engine/_weights.py): plain, packed, int8, int4


class LoadedNetwork:
    """The encoder and LLM of a Qwen3-ASR-family network, ready for inference. Not thread-safe: one thread drives it.

    The weights of transformers' network are taken over by the engine's own drivers (``Parts``:
    ``Encoder``, ``LeanLM``) in the format ``info.weights``, or read back from the weights cache;
    the network itself is not kept, so each weight is held once.
    """

    def __init__(
        self, parts: Parts, tokenizer: Tokenizer, feature_extractor: Qwen3ASRFeatureExtractor, info: ModelInfo
    ):
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.info = info
        self._embedding = parts.embedding  # (vocab, hidden)
        self.encoder = parts.encoder
        self.llm = parts.llm

    @staticmethod
    def _parts(
        checkpoint: Checkpoint,
        info: ModelInfo,
        weights_cache: Path | None,
        network: Callable[
            [], tuple[Qwen3ASRForConditionalGeneration | Qwen3ASRForTokenClassification, torch.nn.Linear]
        ],
    ) -> Parts:
        """The weights in ``info.weights``: from the weights cache when it has them, else through transformers."""

        def build() -> Parts:
            loaded, head = network()
            parts = Parts.of(loaded, head, info.weights, info.device)
            del loaded, head
            release_freed_memory()  # the network's float copies, once converted
            return parts

        if weights_cache is None or info.device.type != "cpu":
            return build()
        description = {"kind": checkpoint.kind, "dtype": str(info.dtype), "weights": info.weights}
        return cached_parts(weights_cache, checkpoint, description, build)

    @property
    def dtype(self) -> torch.dtype:
        return self.info.dtype

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def hidden_size(self) -> int:
        return self.llm.shape.hidden

    @property
    def frames_per_chunk(self) -> int:
        return self.encoder.frames_per_chunk

    @property
    def frames_per_window(self) -> int:
        return self.encoder.frames_per_chunk * self.encoder.chunks_per_window

    @property
    def mel_filters(self) -> np.ndarray:
        filters: np.ndarray = self.feature_extractor.mel_filters  # untyped in transformers
        return filters

    @staticmethod
    def _resolve(
        model: str, dtype: str | None, device: str | None, quantize: str | None, plain_weights: bool
    ) -> tuple[Checkpoint, ModelInfo]:
        """Where the checkpoint is and how to run it; every refusal before a weight is read."""
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        check_quantize(quantize)
        weights = weight_format(torch_dtype, torch_device, quantize, plain_weights)
        checkpoint = read_checkpoint(resolve_model_dir(model))
        info = ModelInfo(model, checkpoint.path, checkpoint.layout, torch_dtype, torch_device, quantize, weights)
        return checkpoint, info

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

        Attention windows count from the first frame given, so any slice starting on a window
        boundary encodes exactly as it does inside the whole clip.
        """
        return self.encoder.encode(features.to(self.device))

    def encode_audio(self, audio: np.ndarray) -> torch.Tensor:
        return self.encode_frames(self.features(audio))

    def encode_front(self, features: torch.Tensor) -> list[torch.Tensor]:
        """The convolution front end of each 1 s chunk of (n_mels, frames): [(tokens, d_model)]."""
        return self.encoder.front(features.to(self.device))

    def audio_steps(self, audio: np.ndarray) -> Steps[torch.Tensor]:
        """A whole clip's audio embeddings as a computation: one ``Encode`` per 8 s attention window
        (the conv front end of every 1 s chunk computed here), their answers joined: (tokens, hidden)."""
        chunks = self.encode_front(self.features(audio))
        per = self.frames_per_window // self.frames_per_chunk
        windows = []
        for first in range(0, len(chunks), per):
            windows.append((yield Encode(torch.cat(chunks[first : first + per]))))
        return torch.cat(windows)

    def encode_batch(self, requests: Sequence[Encode]) -> list[torch.Tensor]:
        """Several attention windows (of any streams) through the encoder layers in one pass."""
        return [embeds.to(self.dtype) for embeds in self.encoder.windows([r.front for r in requests])]

    # -- text ----------------------------------------------------------------------------------

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        """(len(token_ids), hidden)"""
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        return F.embedding(ids, self._embedding).to(self.dtype)

    @torch.inference_mode()
    def forward(self, embeds: torch.Tensor, cache: KVCache, n_logits: int) -> torch.Tensor:
        """Run the LLM over (seq, hidden) after what ``cache`` holds; greedy ids of the last n_logits positions.

        One position gets its logits alone, as in ``generate``: a one-row product rounds
        differently from a many-row one, and the reference's decode steps are one-row products.
        """
        return self.llm([Step(embeds, cache, n_logits)])[0]

    @torch.inference_mode()
    def forward_batch(self, steps: Sequence[Step]) -> list[torch.Tensor]:
        """``forward`` for several sequences in one pass over the weights (see ``_llm``)."""
        return self.llm(steps)

    def new_cache(self) -> KVCache:
        return self.llm.new_cache()

    @torch.inference_mode()
    def run(self, steps: Steps[T]) -> T:
        """Drive one computation alone: each request it makes is answered as it comes."""
        return run(self, steps)

    def decode_text(self, token_ids: list[int]) -> str:
        # Typed str | list[str] in transformers: it is a str for one sequence of ids.
        return cast(str, self.tokenizer.decode(token_ids, skip_special_tokens=True))


class AsrModel(LoadedNetwork):
    """A Qwen3-ASR speech recognizer (the engine's ``Model``): greedy decoding over the vocabulary."""

    @classmethod
    def of_network(
        cls,
        network: Qwen3ASRForConditionalGeneration,
        tokenizer: Tokenizer,
        feature_extractor: Qwen3ASRFeatureExtractor,
        info: ModelInfo,
    ) -> AsrModel:
        """From a transformers network in memory (the benches' random ones); the network is not kept."""
        return cls(Parts.of(network, network.lm_head, info.weights, info.device), tokenizer, feature_extractor, info)

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        dtype: str | None = None,
        device: str | None = None,
        quantize: str | None = None,
        plain_weights: bool = False,
        weights_cache: Path | None = None,
    ) -> AsrModel:
        """Load from a local directory, the Hugging Face cache, or the hub; raise ModelLoadError if impossible.

        The weights are multiplied in the fastest format this machine has (``_weights``), exact up
        to float32 rounding; ``plain_weights`` keeps transformers' own products, bit for bit. With
        ``weights_cache`` (a directory) the converted weights are kept there for the next start (``_cache``).
        """
        checkpoint, info = cls._resolve(model, dtype, device, quantize, plain_weights)
        check_kind(checkpoint, "asr")
        tokenizer = load_tokenizer(checkpoint.path, ASR_TOKEN_IDS)

        def network() -> tuple[Qwen3ASRForConditionalGeneration, torch.nn.Linear]:
            loaded = load_network(checkpoint, info.dtype)
            return loaded, loaded.lm_head

        parts = cls._parts(checkpoint, info, weights_cache, network)
        return cls(parts, tokenizer, load_feature_extractor(checkpoint.path, checkpoint.layout), info)

    def prompt_embeddings(self, prompt: PromptIds, audio_embeds: torch.Tensor) -> torch.Tensor:
        """(prefix + n_audio + suffix, hidden): audio embeddings in place of the <|audio_pad|> tokens."""
        return torch.cat([self.embed(prompt.prefix), audio_embeds.to(self.dtype), self.embed(prompt.suffix)], dim=0)


def load_tokenizer(path: Path, expected_ids: dict[str, int]) -> Tokenizer:
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
    for token, expected in expected_ids.items():
        found = tokenizer.convert_tokens_to_ids(token)
        if found != expected:
            raise ModelLoadError(
                f"The tokenizer in {path} maps the ASR token {token} to id {found}, but Qwen3-ASR needs {expected}: "
                "it is not (or not a complete) Qwen3-ASR tokenizer."
            )
    return tokenizer


def load_feature_extractor(path: Path, layout: str) -> Qwen3ASRFeatureExtractor:
    from transformers import Qwen3ASRFeatureExtractor

    # The original layout names Whisper's extractor; transformers' converter replaces it by the
    # default Qwen3-ASR one (same mel settings, plus the 0.5 s minimum length), and so do we.
    if layout == "hf" and (path / "preprocessor_config.json").is_file():
        return Qwen3ASRFeatureExtractor.from_pretrained(path)
    return Qwen3ASRFeatureExtractor()  # type: ignore[no-untyped-call]  # its __init__ is unannotated
