"""``asrlive bench align``: what word timestamps cost, at the true shapes of Qwen3-ForcedAligner-0.6B.

A random-weight aligner (the 1.7B recognizer's encoder, the 0.6B LLM, 5000 classes) times the
words of real speech (looped) of several lengths, with a simulated transcript of 2.5 words per
second of one token each (English speech runs at 2-3 words per second, most of them one token).
For each length: the encoder (front end and attention windows), the LLM forward over the whole
prompt, and the whole alignment, each the best of ``repeats`` runs after a warm-up call; and the
cost per second of audio, the figure that says how much a live final's words add to its latency.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Qwen3ASRFeatureExtractor

from asrlive._bench_engine import Figure, Timer
from asrlive._bench_stream import WEIGHTS_LINE, SimulatedText, bench_info, dump_json, looped_speech
from asrlive.engine import SAMPLE_RATE
from asrlive.engine._aligner import Aligner, alignable_units
from asrlive.engine._shapes import ALIGNER_SEGMENT_MS, random_aligner_network
from asrlive.engine._steps import Step

SECONDS = (2, 5, 10, 30)
WORDS_PER_SECOND = 2.5
WORD_TOKEN = 1000  # any id does: only the prompt's length matters


@dataclass(frozen=True)
class AlignBenchOptions:
    dtype: torch.dtype
    device: str | None
    quantize: str | None
    repeats: int
    audio: Path | None
    json: bool
    plain_weights: bool = False  # F.linear over the weights as loaded (--plain-weights)


class _OneTokenPerWord(SimulatedText):
    """The aligner encodes each unit on its own: here every unit is one token, as most English words are."""

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return [WORD_TOKEN]


def bench_aligner(
    dtype: torch.dtype, device: str | None = None, quantize: str | None = None, plain_weights: bool = False
) -> Aligner:
    """A random-weight aligner of the true shapes, in the weight format the engine picks for a checkpoint."""
    network = random_aligner_network(dtype)
    info = bench_info("random-aligner-0.6B", dtype, device, quantize, plain_weights)
    extractor = Qwen3ASRFeatureExtractor()  # type: ignore[no-untyped-call]  # its __init__ is unannotated
    return Aligner.of_network(network, _OneTokenPerWord(), extractor, info, ALIGNER_SEGMENT_MS)


@dataclass(frozen=True)
class AlignRow:
    seconds: int
    words: int
    prompt_rows: int
    encoder: Figure
    llm: Figure
    total: Figure

    def figures(self) -> dict[str, Any]:
        return {
            "audio_s": self.seconds,
            "words": self.words,
            "prompt_rows": self.prompt_rows,
            "encoder_ms": self.encoder.seconds * 1e3,
            "llm_ms": self.llm.seconds * 1e3,
            "total_ms": self.total.seconds * 1e3,
            "ms_per_audio_s": self.total.seconds * 1e3 / self.seconds,
            "first_call_ms": (self.total.first_call or 0.0) * 1e3,
        }

    def line(self) -> str:
        f = self.figures()
        return (
            f"{self.seconds:>7} {self.words:>6} {self.prompt_rows:>6} {f['encoder_ms']:>9.0f} {f['llm_ms']:>8.0f} "
            f"{f['total_ms']:>9.0f} {f['ms_per_audio_s']:>11.0f}"
        )


HEADER = f"{'audio s':>7} {'words':>6} {'rows':>6} {'encoder':>9} {'LLM':>8} {'total ms':>9} {'ms/audio s':>11}"


@torch.inference_mode()
def bench_align(options: AlignBenchOptions) -> None:
    print("asrlive bench align: building a random-weight Qwen3-ForcedAligner-0.6B ...", file=sys.stderr, flush=True)
    aligner = bench_aligner(options.dtype, options.device, options.quantize, options.plain_weights)
    timer = Timer(aligner.device, options.repeats)
    speech = looped_speech(max(SECONDS), options.audio)
    rows = [_row(aligner, timer, speech[: seconds * SAMPLE_RATE], seconds) for seconds in SECONDS]
    dtype = str(options.dtype).removeprefix("torch.")
    where = f"{torch.get_num_threads()} threads" if aligner.device.type == "cpu" else str(aligner.device)
    setup = f"Qwen3-ForcedAligner-0.6B shapes, random weights, {dtype}, {where}, {WEIGHTS_LINE[aligner.info.weights]}"
    if options.json:
        record = {"model": setup, "repeats": options.repeats, "words_per_second": WORDS_PER_SECOND}
        print(dump_json(record | {"rows": [row.figures() for row in rows]}), flush=True)
        return
    lines = [
        f"model: {setup}",
        f"a transcript of {WORDS_PER_SECOND:g} one-token words per second of speech; each figure the best of "
        f"{options.repeats} runs after a warm-up call; rows: the LLM's prompt (audio tokens, words, timestamp slots)",
        "",
        HEADER,
        *(row.line() for row in rows),
    ]
    print("\n".join(lines), flush=True)


def _row(aligner: Aligner, timer: Timer, audio: np.ndarray, seconds: int) -> AlignRow:
    text = " ".join("w" for _ in range(round(WORDS_PER_SECOND * seconds)))
    units = alignable_units(aligner.timing, audio, text, "English")
    features = aligner.features(audio)
    label = f"{seconds} s"
    encoder = timer.figure(f"encoder_{seconds}s", f"encoder, {label}", lambda: partial(aligner.encode_frames, features))
    embeds = torch.cat([aligner.encode_frames(features), aligner.embed([WORD_TOKEN] * (3 * len(units) + 2))])
    llm = timer.figure(f"llm_{seconds}s", f"LLM forward, {label}", _forward(aligner, embeds))
    total = timer.figure(f"align_{seconds}s", f"alignment, {label}", lambda: partial(aligner.align, audio, text, None))
    return AlignRow(seconds, len(units), embeds.shape[0], encoder, llm, total)


def _forward(aligner: Aligner, embeds: torch.Tensor) -> Callable[[], Callable[[], object]]:
    def prepare() -> Callable[[], object]:
        return partial(aligner.forward_batch, [Step(embeds, aligner.new_cache(), embeds.shape[0])])

    return prepare
