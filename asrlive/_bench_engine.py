"""``asrlive bench engine``: what the engine's forwards cost against what the hardware allows, in one run.

At the true shapes with random weights (compute does not depend on the weights' values):

- memory floor: the bytes of weight a decode step reads, as the engine stores them, over the
  device's read bandwidth (measured: the best of several reads of a 1 GiB buffer);
- kernel floor: one-row ``F.linear`` over every weight matrix of the LLM as the checkpoint lays
  them out (28 layers x q, k, v, o, gate, up, down, and the head): a decode step with no overhead
  and no fusion, the figure the decode targets are stated against;
- the engine's own forwards: a decode step for 1, 4 and 8 streams (one row each, caches holding
  ~150 tokens), a prefill of 60 and 120 rows after a 10-token cached prefix with logits for its
  last 8 (a draft being verified), the encoder over an open window of 1, 4 and 8 s.

Every timed figure is the best of ``repeats`` runs after one warm-up call: first calls allocate
and pick kernels (a compiled path compiles), so the warm-up's time is reported on its own. With
``--quantize`` the decode steps of the same model without quantization are measured first, for
the int8 target (a step at most 0.6x the unquantized one).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from asrlive._bench_stream import Setup, bench_model, dump_json
from asrlive.engine._model import resolve_device
from asrlive.engine._steps import Step

if TYPE_CHECKING:
    from asrlive.engine import AsrModel
    from asrlive.engine._kvcache import KVCache

DECODE_STREAMS = (1, 4, 8)
CACHED_TOKENS = 150  # a cache of a few seconds into an utterance: prompt, audio tokens, text
PREFILL_ROWS = (60, 120)
PREFIX_TOKENS = 10
DRAFT_LOGITS = 8
ENCODER_SECONDS = (1, 4, 8)
FRAMES_PER_SECOND = 100
N_MELS = 128  # the Qwen3-ASR front end (engine/_shapes.py builds it so)
FIRST_TOKEN = 1000  # any ids do: only their embeddings' shapes matter
BANDWIDTH_BYTES = 1 << 30
BANDWIDTH_READS = 5
# The targets for a decode step in bfloat16, as a multiple of the kernel floor (issue 11) ...
KERNEL_FLOOR_TARGETS = (("decode_1_stream", 1.15), ("decode_8_streams", 1.4))
# ... and with --quantize int8, as a multiple of the same step without quantization.
QUANTIZED_TARGET = 0.6


@dataclass(frozen=True)
class EngineBenchOptions:
    size: str
    dtype: torch.dtype
    device: str | None
    quantize: str | None
    repeats: int
    json: bool


@dataclass(frozen=True)
class Figure:
    key: str  # the JSON name
    label: str  # the table's
    seconds: float  # the best run; the memory floor is computed
    first_call: float | None = None  # the warm-up call
    runs: tuple[float, ...] = ()


@dataclass(frozen=True)
class Target:
    label: str
    ratio: float
    limit: float

    @property
    def met(self) -> bool:
        return self.ratio <= self.limit


class Timer:
    """Wall time of calls on one device: a GPU runs ahead of Python, so each timing waits for it."""

    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device = device
        self.repeats = repeats

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def once(self, call: Callable[[], object]) -> float:
        self.sync()
        started = time.perf_counter()
        call()
        self.sync()
        return time.perf_counter() - started

    def figure(self, key: str, label: str, prepare: Callable[[], Callable[[], object]]) -> Figure:
        """Time ``prepare()``'s call once to warm up, then ``repeats`` times; ``prepare`` itself is not timed."""
        _progress(label)
        first = self.once(prepare())
        runs = tuple(self.once(prepare()) for _ in range(self.repeats))
        return Figure(key, label, min(runs), first, runs)


@dataclass(frozen=True)
class EngineReport:
    setup: Setup
    repeats: int
    bandwidth: float  # bytes per second
    weight_bytes: int  # read by one decode step
    figures: tuple[Figure, ...]
    unquantized: tuple[Figure, ...]  # the decode steps without --quantize; empty without it

    def figure(self, key: str) -> Figure:
        return next(f for f in self.figures if f.key == key)

    @property
    def kernel_floor(self) -> float:
        return self.figure("kernel_floor").seconds

    def targets(self) -> list[Target]:
        if not self.unquantized:
            return [
                Target(f"{self.figure(key).label} <= {limit:g}x the kernel floor", self._ratio(key), limit)
                for key, limit in KERNEL_FLOOR_TARGETS
            ]
        base = {f.key: f.seconds for f in self.unquantized}
        return [
            Target(
                f"{self.setup.quantize} {self.figure(key).label} <= {QUANTIZED_TARGET:g}x the unquantized step",
                self.figure(key).seconds / base[key],
                QUANTIZED_TARGET,
            )
            for key, _ in KERNEL_FLOOR_TARGETS
        ]

    def _ratio(self, key: str) -> float:
        return self.figure(key).seconds / self.kernel_floor

    def table(self) -> str:
        lines = [
            f"model: {self.setup.line()}",
            f"weights a decode step reads: {self.weight_bytes / 1e9:.2f} GB (as the engine stores them); "
            f"measured read bandwidth: {self.bandwidth / 1e9:.1f} GB/s",
            f"each figure: the best of {self.repeats} runs after a warm-up call (first call: its own column)",
            "",
            f"{'':<46} {'ms':>9} {'x kernel floor':>15} {'first call ms':>14}",
        ]
        lines += [self._line(figure) for figure in self.figures]
        lines += [self._line(figure, "without quantization: ") for figure in self.unquantized]
        lines += ["", "targets (for bfloat16):" if not self.unquantized else "targets:"]
        lines += [f"  {t.label}: {t.ratio:.2f}x, {'met' if t.met else 'missed'}" for t in self.targets()]
        return "\n".join(lines)

    def _line(self, figure: Figure, prefix: str = "") -> str:
        first = "-" if figure.first_call is None else f"{figure.first_call * 1e3:.1f}"
        ratio = figure.seconds / self.kernel_floor
        return f"{prefix + figure.label:<46} {figure.seconds * 1e3:>9.1f} {ratio:>14.2f}x {first:>14}"

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.setup.fields(),
            "repeats": self.repeats,
            "weight_bytes": self.weight_bytes,
            "read_bandwidth_gb_s": self.bandwidth / 1e9,
            "figures": {f.key: self._figure_json(f) for f in self.figures},
            "unquantized": {f.key: self._figure_json(f) for f in self.unquantized},
            "targets": [{"what": t.label, "ratio": t.ratio, "limit": t.limit, "met": t.met} for t in self.targets()],
        }

    def _figure_json(self, figure: Figure) -> dict[str, Any]:
        return {
            "label": figure.label,
            "ms": figure.seconds * 1e3,
            "ratio_to_kernel_floor": figure.seconds / self.kernel_floor,
            "first_call_ms": None if figure.first_call is None else figure.first_call * 1e3,
            "runs_ms": [run * 1e3 for run in figure.runs],
        }


def bench_engine(options: EngineBenchOptions) -> None:
    report = measure_engine(options)
    print(dump_json(report.as_json()) if options.json else report.table(), flush=True)


@torch.inference_mode()
def measure_engine(options: EngineBenchOptions) -> EngineReport:
    timer = Timer(resolve_device(options.device), options.repeats)
    unquantized = _unquantized_decode(options, timer) if options.quantize else ()
    _progress(f"building a random-weight {options.size} network")
    model = bench_model(options.size, options.dtype, options.device, options.quantize)
    model.pack_weights()  # as the server does
    bandwidth = read_bandwidth(timer.device)
    weight_bytes = model.decode_weight_bytes()
    figures = (
        Figure("memory_floor", "memory floor (weight bytes / read bandwidth)", weight_bytes / bandwidth),
        kernel_floor(model, timer),
        *decode_steps(model, timer),
        *(prefill(model, timer, rows) for rows in PREFILL_ROWS),
        *(encoder(model, timer, seconds) for seconds in ENCODER_SECONDS),
    )
    setup = Setup.of(options.size, model)
    return EngineReport(setup, options.repeats, bandwidth, weight_bytes, figures, unquantized)


def _unquantized_decode(options: EngineBenchOptions, timer: Timer) -> tuple[Figure, ...]:
    """The reference for the int8 target; this model is freed before the quantized one is built."""
    _progress(f"building a random-weight {options.size} network without quantization, for the int8 target")
    model = bench_model(options.size, options.dtype, options.device)
    model.pack_weights()
    return tuple(decode_steps(model, timer))


def read_bandwidth(device: torch.device) -> float:
    """Bytes per second read from the device's memory: the best of several passes over 1 GiB.

    A max reduction does the least work per byte: a float32 sum was compute-bound on 2 CPU cores
    (29 GB/s where the max read 53 GB/s).
    """
    buffer = torch.ones(BANDWIDTH_BYTES // 4, dtype=torch.float32, device=device)
    timer = Timer(device, BANDWIDTH_READS)
    return BANDWIDTH_BYTES / timer.figure("read", "read bandwidth (1 GiB)", lambda: buffer.amax).seconds


def kernel_floor(model: AsrModel, timer: Timer) -> Figure:
    matrices = model.weight_matrices()
    rows = {m.shape[1]: torch.randn(1, m.shape[1], dtype=m.dtype, device=m.device) for m in matrices}

    def one_pass() -> None:
        for matrix in matrices:
            F.linear(rows[matrix.shape[1]], matrix)

    label = f"kernel floor (one-row F.linear, {len(matrices)} matrices)"
    return timer.figure("kernel_floor", label, lambda: one_pass)


def decode_steps(model: AsrModel, timer: Timer) -> list[Figure]:
    """A step for n streams: n one-row Steps in one forward, each on its own cache (~150 tokens, growing)."""
    _progress(f"prefilling {max(DECODE_STREAMS)} caches to {CACHED_TOKENS} tokens")
    caches = _prefilled(model, max(DECODE_STREAMS), CACHED_TOKENS)

    def prepare(n: int) -> Callable[[], object]:
        steps = [Step(model.embed([FIRST_TOKEN]), cache, 1) for cache in caches[:n]]
        return partial(model.forward_batch, steps)

    return [
        timer.figure(
            f"decode_{n}_{_plural(n, 'stream')}", f"decode step, {n} {_plural(n, 'stream')}", partial(prepare, n)
        )
        for n in DECODE_STREAMS
    ]


def prefill(model: AsrModel, timer: Timer, rows: int) -> Figure:
    """One Step of ``rows`` rows after a cached prefix, logits for the last 8: a draft being verified."""
    draft = model.embed(_ids(rows))

    def prepare() -> Callable[[], object]:
        cache = _prefilled(model, 1, PREFIX_TOKENS)[0]  # a fresh one each run: a prefill appends to it
        return partial(model.forward_batch, [Step(draft, cache, DRAFT_LOGITS)])

    label = f"prefill, {rows} rows ({PREFIX_TOKENS} cached, {DRAFT_LOGITS} logits)"
    return timer.figure(f"prefill_{rows}_rows", label, prepare)


def encoder(model: AsrModel, timer: Timer, seconds: int) -> Figure:
    # On the CPU in float32, as the feature extractor hands them over.
    features = torch.randn(N_MELS, seconds * FRAMES_PER_SECOND)
    label = f"encoder, open window of {seconds} s"
    return timer.figure(f"encoder_{seconds}s", label, lambda: partial(model.encode_frames, features))


def _prefilled(model: AsrModel, count: int, tokens: int) -> Sequence[KVCache]:
    caches = [model.new_cache() for _ in range(count)]
    embeds = model.embed(_ids(tokens))
    model.forward_batch([Step(embeds, cache, 1) for cache in caches])
    return caches


def _ids(count: int) -> list[int]:
    return list(range(FIRST_TOKEN, FIRST_TOKEN + count))


def _plural(n: int, word: str) -> str:
    return word if n == 1 else f"{word}s"


def _progress(what: str) -> None:
    print(f"asrlive bench: {what} ...", file=sys.stderr, flush=True)
