"""Word timestamps with Qwen3-ForcedAligner: one LLM forward, no generation.

The aligner is the recognizer's encoder and LLM with a head of timestamp classes (class k means
k x ``segment_ms`` milliseconds into the clip). Its prompt has no chat template::

    <|audio_start|> {<|audio_pad|> x N} <|audio_end|> unit1 <timestamp><timestamp> unit2 <timestamp><timestamp> ...

Every unit is tokenized on its own: ``<timestamp>`` is a special token, which BPE never merges
across, so the ids equal those of the whole string (transformers' processor tokenizes it whole).
At each ``<timestamp>`` the argmax over the classes is a time; the two of a unit are its start and
end, after the reference's monotonic fix-up (``_align_text``). The arithmetic is transformers'
``Qwen3ASRForTokenClassification`` (the head over every position, then the argmax), so in float32
the words equal its pipeline's on the same weights and audio.

``align_steps`` is a computation (``_steps``): it yields one ``Encode`` per 8 s window and one
``Step`` for the whole prompt, so a driver may run it alone (``Aligner.align``) or batch it with
other alignments (the server's scheduler).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from asrlive._audio import SAMPLE_RATE
from asrlive._words import Alignment, Word

from ._align_text import (
    aligner_language,
    fix_timestamps,
    split_units,
    timestamp_ms,
    unit_times,
)
from ._checkpoint import ModelLoadError, check_kind, load_aligner_network, network_config
from ._model import ASR_TOKEN_IDS, LoadedNetwork, ModelInfo, Tokenizer, load_feature_extractor, load_tokenizer
from ._options import DEFAULT_ALIGNER
from ._parts import Parts
from ._steps import Step, Steps

if TYPE_CHECKING:
    from transformers import Qwen3ASRConfig, Qwen3ASRFeatureExtractor, Qwen3ASRForTokenClassification

# The tokens of the aligner's prompt, at the ids the network was trained with (<timestamp>: the config's).
_AUDIO_IDS = {name: ASR_TOKEN_IDS[name] for name in ("<|audio_start|>", "<|audio_end|>", "<|audio_pad|>")}


class AlignmentError(ValueError):
    """This text cannot be aligned on this audio (too long, too many words); the message says why."""


@dataclass(frozen=True)
class AlignerInfo:
    classes: int  # timestamp classes of the head
    segment_ms: float  # milliseconds per class
    timestamp_id: int  # the <timestamp> token

    @property
    def max_seconds(self) -> float:
        """The latest time the head can name: audio beyond it cannot be aligned in one piece."""
        return self.classes * self.segment_ms / 1000


class Aligner(LoadedNetwork):
    """A Qwen3-ForcedAligner checkpoint ready for inference. Not thread-safe: one thread drives it."""

    def __init__(
        self,
        parts: Parts,
        tokenizer: Tokenizer,
        feature_extractor: Qwen3ASRFeatureExtractor,
        info: ModelInfo,
        timing: AlignerInfo,
    ) -> None:
        super().__init__(parts, tokenizer, feature_extractor, info)
        self.timing = timing

    @classmethod
    def of_network(
        cls,
        network: Qwen3ASRForTokenClassification,
        tokenizer: Tokenizer,
        feature_extractor: Qwen3ASRFeatureExtractor,
        info: ModelInfo,
        segment_ms: float,
    ) -> Aligner:
        """From a transformers network in memory (the benches' random one); the network is not kept."""
        timing = _timing(network.config, segment_ms)
        return cls(
            Parts.of(network, network.score, info.weights, info.device), tokenizer, feature_extractor, info, timing
        )

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_ALIGNER,
        dtype: str | None = None,
        device: str | None = None,
        quantize: str | None = None,
        plain_weights: bool = False,
        weights_cache: Path | None = None,
    ) -> Aligner:
        """Load from a local directory, the Hugging Face cache, or the hub; raise ModelLoadError if impossible.

        Weight formats and ``weights_cache`` as ``AsrModel.load``.
        """
        checkpoint, info = cls._resolve(model, dtype, device, quantize, plain_weights)
        check_kind(checkpoint, "aligner")
        assert checkpoint.segment_ms is not None  # read_checkpoint sets it for every aligner
        timing = _timing(network_config(checkpoint), checkpoint.segment_ms)
        tokenizer = load_tokenizer(checkpoint.path, {**_AUDIO_IDS, "<timestamp>": timing.timestamp_id})
        extractor = load_feature_extractor(checkpoint.path, checkpoint.layout)

        def network() -> tuple[Qwen3ASRForTokenClassification, torch.nn.Linear]:
            loaded = load_aligner_network(checkpoint, info.dtype)
            return loaded, loaded.score

        return cls(cls._parts(checkpoint, info, weights_cache, network), tokenizer, extractor, info, timing)

    def align(self, audio: np.ndarray, text: str, language: str | None) -> list[Word]:
        """Words of ``text`` with their times in ``audio`` (16 kHz mono float32), in seconds from its start.

        Raises what ``alignable_units`` raises, before any model work.
        """
        return self.run(align_steps(self, audio, text, language))

    def alignment(self, audio: np.ndarray, text: str, language: str | None) -> Alignment:
        """``align``, with the reason instead of the words when they cannot be had."""
        return self.run(alignment_steps(self, audio, text, language))


def _timing(config: Qwen3ASRConfig, segment_ms: float) -> AlignerInfo:
    """The head's classes and clock, and the <timestamp> token, from the network's config."""
    if not config.num_labels:
        raise ModelLoadError("the aligner's config.json has no timestamp classes (num_labels)")
    token_id = config.timestamp_token_id
    if token_id is None:
        raise ModelLoadError("the aligner's config.json names no timestamp_token_id: the checkpoint is incomplete")
    return AlignerInfo(config.num_labels, segment_ms, int(token_id))


def check_alignable(timing: AlignerInfo, seconds: float, units: Sequence[str]) -> None:
    """Refuse what the head cannot time: audio past its last class, more words than 80 ms slots."""
    if seconds > timing.max_seconds:
        raise AlignmentError(
            f"{seconds:.1f} s of audio is longer than the aligner can time in one piece: at most "
            f"{timing.max_seconds:g} s ({timing.classes} classes of {timing.segment_ms:g} ms). Split the audio "
            "and its text into shorter pieces."
        )
    slots = max(1, math.ceil(seconds * 1000 / timing.segment_ms))
    if len(units) > slots:
        raise AlignmentError(
            f"the text has {len(units)} words but {seconds:.2f} s of audio has only {slots} slots of "
            f"{timing.segment_ms:g} ms: the text cannot be what this audio says."
        )


def alignable_units(timing: AlignerInfo, audio: np.ndarray, text: str, language: str | None) -> list[str]:
    """The units of ``text`` that ``audio`` can be timed for; every refusal of an alignment, before any model work.

    Raises ``AlignmentError``, ``UnsupportedLanguage``, ``ValueError`` (a language no one knows) or
    ``MissingSegmenter`` (an ImportError: Japanese and Korean need a word segmenter).
    """
    language = aligner_language(language)
    units = split_units(text, language)
    if units:
        check_alignable(timing, audio.size / SAMPLE_RATE, units)
    return units


def align_steps(aligner: Aligner, audio: np.ndarray, text: str, language: str | None) -> Steps[list[Word]]:
    """The alignment of ``text`` on ``audio`` as a computation: one Encode per window, one Step."""
    units = alignable_units(aligner.timing, audio, text, language)
    return (yield from _timed_units(aligner, audio, units))


def alignment_steps(aligner: Aligner, audio: np.ndarray, text: str, language: str | None) -> Steps[Alignment]:
    """``align_steps`` for a transcript piece: a text that cannot be aligned gives the reason, not an error."""
    try:
        units = alignable_units(aligner.timing, audio, text, language)
    except (ValueError, ImportError) as exc:
        return Alignment(None, str(exc))
    return Alignment(tuple((yield from _timed_units(aligner, audio, units))))


def _timed_units(aligner: Aligner, audio: np.ndarray, units: list[str]) -> Steps[list[Word]]:
    if not units:
        return []
    # 1. The audio: one Encode per 8 s window.
    audio_embeds = yield from aligner.audio_steps(audio)
    # 2. The prompt: audio, then each unit followed by its two <timestamp> slots.
    timestamp = aligner.timing.timestamp_id
    suffix = [ASR_TOKEN_IDS["<|audio_end|>"]]
    for unit in units:
        suffix += [*aligner.tokenizer.encode(unit, add_special_tokens=False), timestamp, timestamp]
    prefix = [ASR_TOKEN_IDS["<|audio_start|>"]]
    embeds = torch.cat([aligner.embed(prefix), audio_embeds, aligner.embed(suffix)])  # (seq, hidden)
    # 3. One forward; the head's argmax at every position (as the reference computes it), read at the slots.
    classes = yield Step(embeds, aligner.new_cache(), embeds.shape[0])
    offset = embeds.shape[0] - len(suffix)
    slots = [offset + i for i, token in enumerate(suffix) if token == timestamp]
    fixed = fix_timestamps(timestamp_ms(classes[slots].tolist(), aligner.timing.segment_ms))
    return [Word(unit, start, end) for unit, start, end in unit_times(units, fixed)]
