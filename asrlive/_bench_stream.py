"""``asrlive bench stream``: per-update cost of live transcription, asrlive against the official algorithm.

Both sides run random-weight networks of the true Qwen3-ASR shapes on real speech (looped).
Random weights make the model's agreement with its own previous hypothesis meaningless, so both
simulate the same realistic text: speech at 3 tokens per second, and every update keeps all but
the last 5 tokens of the previous hypothesis (asrlive: accepted by verification; the official
algorithm: forced as the assistant prefix). Everything else is the real code path.

- asrlive: voice-activity segmentation, the incremental engine, a partial every interval of
  audio, a final per utterance; every job is timed.
- official (upstream's streaming, DESIGN.md 2): no segmentation; every 2 s it re-encodes all
  audio since the start and re-decodes after the forced prefix. Its cost depends only on the
  position in the stream, so it is measured once at each reported position.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Qwen3ASRFeatureExtractor

from asrlive.engine import SAMPLE_RATE, AsrModel, DecodingOptions, ModelInfo, StreamTranscriber, load_audio
from asrlive.engine._incremental import UtteranceDecoder
from asrlive.engine._model import resolve_device
from asrlive.engine._prompt import PromptIds
from asrlive.engine._shapes import random_network
from asrlive.engine._steps import Step, Steps
from asrlive.engine._weights import weight_format
from asrlive.streaming import Session, SessionOptions

TOKENS_PER_SECOND = 3.0
LANGUAGE_TAG = 3  # "language English<asr_text>"
REJECTED = 5  # tokens of the previous hypothesis that each update takes back
OFFICIAL_CHUNK_S = 2.0
WINDOW_S = 5.0  # asrlive's cost at a position: mean over the partial updates within this distance
# "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|audio_start|>" / "<|audio_end|>...assistant\n"
PROMPT = PromptIds(
    prefix=[151644, 8948, 198, 151645, 198, 151644, 872, 198, 151669],
    suffix=[151670, 151645, 198, 151644, 77091, 198],
)
FIXTURE_SPEECH = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "speech"


def target_tokens(seconds: float) -> int:
    return LANGUAGE_TAG + round(TOKENS_PER_SECOND * seconds)


class SimulatedText:
    """Random weights write no language: only token counts matter, so every token reads as one word.

    The prompt is given as ids (``PROMPT``), so nothing is ever encoded; with no added vocabulary
    the bench's server has no control tokens to refuse in a context. The words give the forced
    aligner (``bench align``, ``bench serve --timestamps``) as many units as the text has tokens.
    """

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        raise RuntimeError("the bench's tokenizer has no vocabulary: its prompt is given as token ids")

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return " ".join("w" for _ in token_ids)

    def get_added_vocab(self) -> dict[str, int]:
        return {}


class ScriptedDecoder(UtteranceDecoder):
    """The real incremental update, with the simulated agreement of DESIGN.md / the issue."""

    def _accept(self, draft: list[int], predicted: list[int]) -> int:
        return max(0, len(draft) - REJECTED)

    def _continue(self, next_id: int, tokens: list[int], max_new_tokens: int) -> Steps[list[int]]:
        target = target_tokens(self.seconds)
        tokens = list(tokens)
        while len(tokens) < target:
            tokens.append(next_id)
            if len(tokens) < target:
                next_id = int((yield Step(self.model.embed([next_id]), self._cache, 1))[0])
        return tokens


class ScriptedTranscriber(StreamTranscriber):
    decoder_class = ScriptedDecoder


@dataclass(frozen=True)
class JobTiming:
    end_s: float  # stream position of the job's audio end
    final: bool
    seconds: float  # compute


WEIGHTS_LINE = {
    "plain": "plain weights (F.linear)",
    "packed": "oneDNN-packed weights",
    "int8": "int8 weights (fbgemm)",
    "int4": "int4 weights (LLM; encoder int8)",
}


@dataclass(frozen=True)
class Setup:
    """What a bench ran on: its header line and its JSON ``model`` object say the same."""

    size: str
    dtype: str  # "bfloat16", "float32"
    device: str  # "cpu", "cuda:0"
    device_name: str  # the GPU's name; on a CPU, empty
    threads: int  # torch's CPU threads
    quantize: str | None
    weights: str  # the LLM's weight format (engine/_weights.py): plain, packed, int8, int4

    @classmethod
    def of(cls, size: str, model: AsrModel) -> Setup:
        device = model.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        dtype = str(model.dtype).removeprefix("torch.")
        info = model.info
        return cls(size, dtype, str(device), name, torch.get_num_threads(), info.quantize, info.weights)

    def line(self) -> str:
        # Where it ran and the weight format (engine/_weights.py): the line every bench starts with.
        where = f"{self.threads} threads" if self.device == "cpu" else f"{self.device} ({self.device_name})"
        return f"Qwen3-ASR {self.size} shapes, random weights, {self.dtype}, {where}, {WEIGHTS_LINE[self.weights]}"

    def fields(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "dtype": self.dtype,
            "device": self.device,
            "device_name": self.device_name,
            "threads": self.threads,
            "quantize": self.quantize,
            "weights": self.weights,
            "packed_weights": self.weights == "packed",
        }


def bench_model(
    size: str, dtype: torch.dtype, device: str | None = None, quantize: str | None = None, plain_weights: bool = False
) -> AsrModel:
    """A random-weight model of the true shapes, in the weight format the engine picks for a checkpoint."""
    network = random_network(size, dtype)
    info = bench_info(f"random-{size}", dtype, device, quantize, plain_weights)
    extractor = Qwen3ASRFeatureExtractor()  # type: ignore[no-untyped-call]  # its __init__ is unannotated
    return AsrModel.of_network(network, SimulatedText(), extractor, info)


def bench_info(name: str, dtype: torch.dtype, device: str | None, quantize: str | None, plain: bool) -> ModelInfo:
    """What ``AsrModel.load`` would decide for a checkpoint, for a network built in memory."""
    torch_device = resolve_device(device)
    weights = weight_format(dtype, torch_device, quantize, plain)
    return ModelInfo(name, Path("."), "hf", dtype, torch_device, quantize, weights)


def finite(value: float) -> float | None:
    """A figure for JSON, which has no NaN: a measurement that could not be made is null."""
    return value if math.isfinite(value) else None


def dump_json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, allow_nan=False)


def looped_speech(duration_s: float, audio: Path | None) -> np.ndarray:
    if audio is not None:
        clips = [load_audio(audio)]
    elif FIXTURE_SPEECH.is_dir():
        clips = [load_audio(p) for p in sorted(FIXTURE_SPEECH.glob("*.wav"))]
    else:
        raise SystemExit("asrlive bench: no speech to loop; pass --audio FILE (16 kHz or any WAV/FLAC/MP3)")
    pause = np.zeros(SAMPLE_RATE, dtype=np.float32)
    once = np.concatenate([piece for clip in clips for piece in (clip, pause)])
    repeats = int(np.ceil(duration_s * SAMPLE_RATE / once.size))
    return np.tile(once, repeats)[: int(duration_s * SAMPLE_RATE)]


def run_asrlive(
    model: AsrModel, audio: np.ndarray, interval_ms: int, progress: Callable[[float], None]
) -> list[JobTiming]:
    """Stream ``audio`` as fast as possible; time every job the session hands out."""
    session = Session(SessionOptions(partial_interval_ms=interval_ms))
    # The bench fixes the tokens decoded: a random-weight model's loops are part of the script, not cut.
    transcriber = ScriptedTranscriber(model, DecodingOptions(language="English", cut_loops=False), PROMPT)
    timings: list[JobTiming] = []
    step = SAMPLE_RATE // 10
    for begin in range(0, audio.size + 1, step):
        if begin < audio.size:
            session.feed(audio[begin : begin + step])
        else:
            session.finish()
        while (job := session.next_job()) is not None:
            started = time.perf_counter()
            transcriber.transcribe(job.segment, job.audio, job.final)  # its ids come back as ints: a GPU is done
            timings.append(JobTiming(job.end / SAMPLE_RATE, job.final, time.perf_counter() - started))
        progress(min(begin, audio.size) / SAMPLE_RATE)
    return timings


@torch.inference_mode()
def official_update(model: AsrModel, audio: np.ndarray, position_s: float) -> float:
    """Compute seconds of one upstream streaming update at ``position_s`` into the stream.

    Each step's id is read back as an int, which waits for a GPU: the clock stops when the work is done.
    """
    started = time.perf_counter()
    audio_embeds = model.encode_audio(audio[: int(position_s * SAMPLE_RATE)])
    forced = [1000 + i % 5000 for i in range(max(0, target_tokens(position_s - OFFICIAL_CHUNK_S) - REJECTED))]
    embeds = torch.cat([model.prompt_embeddings(PROMPT, audio_embeds), model.embed(forced)])
    cache = model.new_cache()
    next_id = int(model.forward_batch([Step(embeds, cache, 1)])[0][0])
    for _ in range(target_tokens(position_s) - len(forced) - 1):
        next_id = int(model.forward_batch([Step(model.embed([next_id]), cache, 1)])[0][0])
    return time.perf_counter() - started


def cost_at(timings: Sequence[JobTiming], position: float) -> float:
    near = [t.seconds for t in timings if not t.final and abs(t.end_s - position) <= WINDOW_S]
    return float(np.mean(near)) if near else float("nan")


@dataclass(frozen=True)
class StreamResult:
    """One size's run: the timed jobs of asrlive and the official update at each reported position."""

    setup: Setup
    duration: float
    interval_ms: int
    timings: tuple[JobTiming, ...]
    official: Mapping[float, float | None]  # position -> compute seconds; None: --no-official

    @property
    def compute(self) -> float:
        return sum(t.seconds for t in self.timings)

    @property
    def partials(self) -> list[JobTiming]:
        return [t for t in self.timings if not t.final]

    @property
    def final_mean(self) -> float:
        finals = [t.seconds for t in self.timings if t.final]
        return float(np.mean(finals)) if finals else float("nan")

    def growth(self) -> float | None:
        """Update cost at 300 s over the cost at 30 s, for runs that reach 300 s."""
        return cost_at(self.timings, 300) / cost_at(self.timings, 30) if self.duration >= 300 else None

    def table(self) -> str:
        compute, duration = self.compute, self.duration
        lines = [
            f"model: {self.setup.line()}",
            f"simulated text: {TOKENS_PER_SECOND:g} tokens per second of speech; every update keeps all but the last "
            f"{REJECTED} tokens of the previous hypothesis (asrlive verifies them, the official algorithm forces them)",
            f"stream: {duration:g} s of real speech, looped; asrlive: a partial every {self.interval_ms} ms of audio, "
            f"{len(self.partials)} partials and {len(self.timings) - len(self.partials)} finals",
            "",
            f"{'position':>9} {'asrlive update':>15} {'official update':>16} {'official / asrlive':>19}",
        ]
        for position, theirs in self.official.items():
            ours = cost_at(self.timings, position)
            if theirs is None:  # --no-official
                lines.append(f"{position:>8g}s {ours:>14.2f}s {'skipped':>16} {'-':>19}")
            else:
                lines.append(f"{position:>8g}s {ours:>14.2f}s {theirs:>15.2f}s {theirs / ours:>18.1f}x")
        lines += [
            "",
            f"asrlive update cost: mean of the partial updates within {WINDOW_S:g} s of the position",
            f"asrlive real-time factor: {compute / duration:.2f} "
            f"({compute:.0f} s of compute for {duration:g} s of audio)",
            f"asrlive final latency (compute of the final update): mean {self.final_mean:.2f} s",
        ]
        growth = self.growth()
        if growth is not None:
            lines.append(f"asrlive update cost at 300 s / at 30 s: {growth:.2f}")
        for position, theirs in self.official.items():
            if theirs is not None:
                factor = theirs / OFFICIAL_CHUNK_S
                lines.append(f"official real-time factor at {position:g} s: {factor:.2f} (one update per 2 s)")
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        growth = self.growth()
        return {
            "model": self.setup.fields(),
            "simulated_tokens_per_second": TOKENS_PER_SECOND,
            "rejected_tokens": REJECTED,
            "duration_s": self.duration,
            "partial_interval_ms": self.interval_ms,
            "partials": len(self.partials),
            "finals": len(self.timings) - len(self.partials),
            "positions": [self._position_json(position, theirs) for position, theirs in self.official.items()],
            "real_time_factor": self.compute / self.duration,
            "compute_s": self.compute,
            "final_compute_mean_s": finite(self.final_mean),
            "update_cost_300_over_30": None if growth is None else finite(growth),
        }

    def _position_json(self, position: float, theirs: float | None) -> dict[str, Any]:
        ours = cost_at(self.timings, position)
        return {
            "position_s": position,
            "asrlive_update_s": finite(ours),
            "official_update_s": theirs,
            "official_over_asrlive": None if theirs is None else finite(theirs / ours),
            "official_real_time_factor": None if theirs is None else theirs / OFFICIAL_CHUNK_S,
        }


@dataclass(frozen=True)
class StreamBenchOptions:
    sizes: tuple[str, ...]
    dtype: torch.dtype
    device: str | None
    quantize: str | None
    duration: float
    interval_ms: int
    positions: tuple[float, ...]
    audio: Path | None
    official: bool
    json: bool
    plain_weights: bool = False  # F.linear over the weights as loaded (--plain-weights)


def bench_stream(options: StreamBenchOptions) -> None:
    audio = looped_speech(options.duration, options.audio)
    results = []
    for size in options.sizes:
        result = _run_size(size, audio, options)
        if options.json:
            results.append(result.as_json())
        else:
            print(result.table(), flush=True)
    if options.json:
        print(dump_json({"runs": results}), flush=True)


def _run_size(size: str, audio: np.ndarray, options: StreamBenchOptions) -> StreamResult:
    print(f"building a random-weight {size} network ...", file=sys.stderr, flush=True)
    # The official algorithm runs on the same products.
    model = bench_model(size, options.dtype, options.device, options.quantize, options.plain_weights)
    official_update(model, audio, 2.0)  # warm-up: first calls allocate and pick kernels
    timings = run_asrlive(model, audio, options.interval_ms, _progress(f"asrlive {size}", options.duration))
    measured: dict[float, float | None] = {}
    for position in (p for p in options.positions if p <= options.duration):
        if options.official:
            print(f"official algorithm at {position:g} s ...", file=sys.stderr, flush=True)
        measured[position] = official_update(model, audio, position) if options.official else None
    return StreamResult(Setup.of(size, model), options.duration, options.interval_ms, tuple(timings), measured)


def _progress(label: str, total: float) -> Callable[[float], None]:
    marks = iter(range(30, int(total) + 30, 30))
    mark: float = next(marks)

    def show(position: float) -> None:
        nonlocal mark
        if position >= mark:
            print(f"{label}: {position:.0f} / {total:g} s of audio", file=sys.stderr, flush=True)
            mark = next(marks, float("inf"))

    return show
