"""Offline transcription of a whole clip: split long audio, decode each piece greedily, parse."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from asrlive._audio import SAMPLE_RATE
from asrlive._words import Alignment

from ._aligner import Aligner
from ._loops import without_loop
from ._model import AsrModel
from ._options import DecodingOptions
from ._prompt import PromptIds, build_prompt, parse_answer
from ._steps import Step, Steps, greedy_steps

# Token budget when none is given: the language tag plus far more text than anyone speaks
# (fast speech is ~5 tokens/s), so only a looping model ever reaches it.
BASE_TOKENS = 16
TOKENS_PER_SECOND = 12
_QUIET_FRAME = 1_600  # 100 ms: the unit in which a cut point is searched


@dataclass(frozen=True)
class Segment:
    start: float  # seconds
    end: float
    language: str | None
    text: str
    token_ids: tuple[int, ...]  # generated after the prompt, eos excluded
    alignment: Alignment | None = None  # word times from the start of the clip; None: not asked for


@dataclass(frozen=True)
class Transcription:
    language: str | None  # the first detected (or the forced) language
    text: str
    duration: float
    segments: tuple[Segment, ...]

    @property
    def token_ids(self) -> list[int]:
        return [t for segment in self.segments for t in segment.token_ids]


def token_budget(seconds: float, options: DecodingOptions) -> int:
    if options.max_new_tokens is not None:
        return options.max_new_tokens
    return BASE_TOKENS + math.ceil(TOKENS_PER_SECOND * seconds)


def transcribe(
    model: AsrModel,
    audio: np.ndarray,
    options: DecodingOptions | None = None,
    on_segment: Callable[[Segment], None] | None = None,
    aligner: Aligner | None = None,
) -> Transcription:
    """Transcribe 16 kHz mono float32 audio; ``on_segment`` hears of each piece as it is done.

    With an ``aligner``, each piece's text is aligned on exactly that piece's audio, in its
    language, and pieces are no longer than the aligner can time.
    """
    options = options or DecodingOptions()
    prompt = build_prompt(model.tokenizer, options.context, options.language)
    segments = []
    for start, end in pieces(audio, options, aligner):
        piece = audio[start:end]
        ids = model.run(piece_steps(model, prompt, piece, options))
        segment = make_segment(model, options, start, end, ids)
        if aligner is not None:
            alignment = aligner.alignment(piece, segment.text, segment.language).shifted(segment.start)
            segment = replace(segment, alignment=alignment)
        segments.append(segment)
        if on_segment is not None:
            on_segment(segment)
    return joined(segments, audio.size / SAMPLE_RATE)


def pieces(audio: np.ndarray, options: DecodingOptions, aligner: Aligner | None = None) -> list[tuple[int, int]]:
    """Where a clip is cut for transcription: pieces of at most ``max_segment_seconds``, and no
    longer than an ``aligner`` can time."""
    longest = options.max_segment_seconds
    if aligner is not None:
        longest = min(longest, aligner.timing.max_seconds)
    return split_points(audio, int(longest * SAMPLE_RATE))


def piece_steps(model: AsrModel, prompt: PromptIds, piece: np.ndarray, options: DecodingOptions) -> Steps[list[int]]:
    """The greedy answer for one piece as a computation (``_steps``): the ids after the prompt, eos excluded.

    Run alone it computes what ``generate`` does: one encoder pass per 8 s attention window, the
    prefill of the whole prompt, then one token per step; with ``options.cut_loops`` its answer
    cut where it first loops (``_loops``).
    """
    embeds = model.prompt_embeddings(prompt, (yield from model.audio_steps(piece)))
    cache = model.new_cache()
    next_id = int((yield Step(embeds, cache, 1))[0])
    budget = token_budget(piece.size / SAMPLE_RATE, options)
    tokens = yield from greedy_steps(model, next_id, cache, [], budget, options.cut_loops)
    return without_loop(tokens) if options.cut_loops else tokens


def make_segment(model: AsrModel, options: DecodingOptions, start: int, end: int, ids: list[int]) -> Segment:
    """The piece ``[start, end)`` (samples) with its answer parsed into language and text."""
    language, text = parse_answer(model.decode_text(ids), options.language)
    return Segment(start / SAMPLE_RATE, end / SAMPLE_RATE, language, text, tuple(ids))


def joined(segments: list[Segment], duration: float) -> Transcription:
    language = next((s.language for s in segments if s.language), None)
    text = " ".join(s.text for s in segments if s.text)
    return Transcription(language, text, duration, tuple(segments))


def split_points(audio: np.ndarray, max_samples: int) -> list[tuple[int, int]]:
    """Cut points so no piece exceeds ``max_samples``: each cut at the quietest 100 ms of the
    last third of the allowed span, so words are rarely split."""
    pieces = []
    start = 0
    while audio.size - start > max_samples:
        lo = start + (2 * max_samples) // 3
        cut = _quietest(audio, lo, start + max_samples)
        pieces.append((start, cut))
        start = cut
    pieces.append((start, audio.size))
    return pieces


def _quietest(audio: np.ndarray, lo: int, hi: int) -> int:
    frames = (hi - lo) // _QUIET_FRAME
    if frames < 1:
        return hi
    # (frames, 1600) -> energy per frame
    energy = np.square(audio[lo : lo + frames * _QUIET_FRAME].reshape(frames, _QUIET_FRAME)).sum(axis=1)
    return lo + int(energy.argmin()) * _QUIET_FRAME + _QUIET_FRAME // 2
