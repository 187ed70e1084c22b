"""The loaded model: network, tokenizer, feature extractor and the one dtype policy of the engine.

``LoadedNetwork`` is what both kinds of the family share: the feature extractor, the audio encoder
and the LLM over an explicit KV cache, driven by the engine (``Encoder``, ``LeanLM``) on the
weights of a transformers network. ``AsrModel`` adds greedy decoding of the vocabulary head
(``Qwen3ASRForConditionalGeneration``); the forced aligner (``_aligner``) a head of timestamp classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

import numpy as np
import torch

from asrlive._audio import SAMPLE_RATE

from ._checkpoint import Checkpoint, ModelLoadError, load_network, read_checkpoint, resolve_model_dir
from ._encoder import Encoder
from ._kvcache import KVCache
from ._llm import LeanLM
from ._options import DEFAULT_MODEL, DEVICE_HELP, DTYPE_NAMES
from ._prompt import PromptIds, TextEncoder
from ._steps import Encode, Step, Steps, run
from ._weights import PackedLinear, can_pack_weights, check_quantize, quantize_weights, weight_bytes

if TYPE_CHECKING:
    from transformers import Qwen3ASRFeatureExtractor, Qwen3ASRForConditionalGeneration, Qwen3ASRForTokenClassification
    from transformers.models.qwen3_asr.modeling_qwen3_asr import Qwen3ASRModel

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
    quantize: str | None = None  # "int8": weight-only int8 LLM linears and head


class LoadedNetwork:
    """The encoder and LLM of a Qwen3-ASR-family network, ready for inference. Not thread-safe: one thread drives it.

    transformers' network holds the weights (its ``model`` is the ``Qwen3ASRModel``; ``head`` the
    output layer); the engine runs them through its own drivers (``Encoder``, ``LeanLM``).
    """

    def __init__(
        self,
        network: Qwen3ASRForConditionalGeneration | Qwen3ASRForTokenClassification,
        head: torch.nn.Linear,
        tokenizer: Tokenizer,
        feature_extractor: Qwen3ASRFeatureExtractor,
        info: ModelInfo,
    ) -> None:
        # Inference only: no caller, inside torch.inference_mode or not, should build autograd graphs.
        network.requires_grad_(False)
        network.to(info.device)  # type: ignore[arg-type]  # transformers' @wraps-typed to() leaves self unbound
        body: Qwen3ASRModel = network.model
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.info = info
        if getattr(head, "bias", None) is not None:  # (torch types a Linear's bias as always present)
            raise ModelLoadError(f"the output layer of {info.path} has a bias, which Qwen3-ASR checkpoints do not have")
        self._embed_tokens = body.get_input_embeddings()
        self.encoder = Encoder(body.audio_tower, body.multi_modal_projector)
        self.llm = LeanLM(body.language_model, head)
        if info.quantize is not None:
            quantize_weights(self.llm, info.quantize)

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

    def pack_weights(self) -> bool:
        """Multiply by oneDNN-packed copies of the LLM weights (see ``_weights``), where possible.

        About twice as fast on a CPU, exact up to float32 rounding, and the LLM's weight memory once more.
        """
        if self.device.type != "cpu" or self.info.quantize is not None or not can_pack_weights(self.dtype):
            return False
        self.llm.linear = PackedLinear(self.llm.weights())
        return True

    @property
    def weights_packed(self) -> bool:
        return isinstance(self.llm.linear, PackedLinear)

    def decode_weight_bytes(self) -> int:
        """Bytes of weights one decode step reads, as the engine stores them (fused, maybe quantized)."""
        return sum(weight_bytes(w) for w in self.llm.weights())

    @staticmethod
    def _resolve(
        model: str, dtype: str | None, device: str | None, quantize: str | None
    ) -> tuple[Checkpoint, ModelInfo]:
        """Where the checkpoint is and how to run it; every refusal before a weight is read."""
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        check_quantize(quantize)
        checkpoint = read_checkpoint(resolve_model_dir(model))
        return checkpoint, ModelInfo(model, checkpoint.path, checkpoint.layout, torch_dtype, torch_device, quantize)

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
        embeds: torch.Tensor = self._embed_tokens(ids)  # Module call: Any
        return embeds

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

    def __init__(
        self,
        network: Qwen3ASRForConditionalGeneration,
        tokenizer: Tokenizer,
        feature_extractor: Qwen3ASRFeatureExtractor,
        info: ModelInfo,
    ) -> None:
        self.network = network
        super().__init__(network, network.lm_head, tokenizer, feature_extractor, info)

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        dtype: str | None = None,
        device: str | None = None,
        quantize: str | None = None,
    ) -> AsrModel:
        """Load from a local directory, the Hugging Face cache, or the hub; raise ModelLoadError if impossible."""
        checkpoint, info = cls._resolve(model, dtype, device, quantize)
        network = load_network(checkpoint, info.dtype)
        tokenizer = load_tokenizer(checkpoint.path, ASR_TOKEN_IDS)
        return cls(network, tokenizer, load_feature_extractor(checkpoint.path, checkpoint.layout), info)

    def weight_matrices(self) -> list[torch.Tensor]:
        """The LLM's linear weight matrices as the checkpoint lays them out (q, k, v, o, gate, up, down; head)."""
        matrices = [m.weight for m in self.network.model.language_model.modules() if isinstance(m, torch.nn.Linear)]
        return [*matrices, self.network.lm_head.weight]

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
