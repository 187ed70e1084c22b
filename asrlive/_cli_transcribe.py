"""``asrlive transcribe``: audio and video files to text or subtitles, offline or through the live path.

Output: ``--format`` text (also spelled txt), json, jsonl (events, with --stream), srt or vtt, on
standard output or, with ``--output``, in a file (one input) or in a folder (one file per input,
named after it). Files are written as the work goes: each piece (offline) or final (--stream) is
appended and flushed, a json file is rewritten whole after each, so an interrupted run leaves a
file with everything done until then.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from asrlive._cli_common import (
    EXIT_FAILED,
    EXIT_USAGE,
    UsageError,
    add_aligner_option,
    add_loop_cut_option,
    add_model_options,
    check_device_options,
    check_input_file,
    check_output_file,
    invalid_options,
    load_aligner,
    load_model,
    require_server_extra,
    warn,
    weights_cache_dir,
)
from asrlive._words import words_json
from asrlive.clients._transcript import write_whole
from asrlive.engine import MAX_SEGMENT_SECONDS, DecodingOptions
from asrlive.engine._options import DEFAULT_ALIGNER

if TYPE_CHECKING:
    import numpy as np

    from asrlive._cli_common import Commands
    from asrlive.clients._transcript import Line
    from asrlive.engine import AsrModel
    from asrlive.engine._aligner import Aligner
    from asrlive.streaming import SessionOptions

# Streaming-only flags and their defaults: given without --stream they are refused, not ignored.
STREAM_DEFAULTS = {
    "partial_interval_ms": 1000,
    "no_partials": False,
    "realtime": False,
    "vad_aggressiveness": 2,
    "end_silence_ms": 600,
    "max_utterance_seconds": 30.0,
}

FORMATS = ("text", "txt", "json", "jsonl", "srt", "vtt")
# A file's format from its suffix, and back ("txt" is "text" by its file name).
SUFFIX_FORMATS = {".txt": "text", ".json": "json", ".jsonl": "jsonl", ".srt": "srt", ".vtt": "vtt"}
FORMAT_SUFFIXES = {fmt: suffix for suffix, fmt in SUFFIX_FORMATS.items()}
# tqdm's {n} and {total} are floats: one decimal, never 221.70000000000002.
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s [{elapsed}<{remaining}]"


def add_command(commands: Commands) -> None:
    cmd = commands.add_parser(
        "transcribe", help="transcribe audio and video files", description="Transcribe audio and video files."
    )
    cmd.add_argument(
        "audio", nargs="+", metavar="AUDIO", help="WAV, FLAC, OGG, MP3, M4A, MP4, WebM, MKV, ... any rate and channels"
    )
    add_model_options(cmd)
    cmd.add_argument("--language", default="auto", help="'auto' (detect) or a language: English, en, Chinese, ...")
    cmd.add_argument("--context", default="", help="context text for the model: hotwords, names, domain terms")
    cmd.add_argument(
        "--max-new-tokens", type=int, default=None, help="cap on generated tokens per piece (default: by duration)"
    )
    cmd.add_argument(
        "--max-segment-seconds",
        type=float,
        default=MAX_SEGMENT_SECONDS,
        help="longer audio is cut at its quietest points into pieces of at most this length (default: %(default)s)",
    )
    add_loop_cut_option(cmd)
    cmd.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="text (or txt); json: one object per file; jsonl (with --stream): one event per line; srt, vtt: "
        "subtitles (default: from the --output file's suffix, else text)",
    )
    cmd.add_argument(
        "--output",
        metavar="FILE|FOLDER",
        default=None,
        help="write to FILE (one input), or into an existing FOLDER one file per input, named after it "
        "with the format's suffix (default: standard output)",
    )
    cmd.add_argument(
        "--timestamps",
        action="store_true",
        help="time every word with Qwen3-ForcedAligner: each piece's (or final's) text is aligned on its audio; "
        "subtitles are cut at word times, json and jsonl list the words",
    )
    add_aligner_option(cmd, default_help=f"{DEFAULT_ALIGNER} with --timestamps")
    stream = cmd.add_argument_group("streaming (only with --stream)")
    stream.add_argument("--stream", action="store_true", help="feed the file through the live streaming path")
    stream.add_argument("--partial-interval-ms", type=int, help="audio between partial results (default: 1000)")
    stream.add_argument("--no-partials", action="store_true", default=None, help="only finals")
    stream.add_argument(
        "--realtime", action="store_true", default=None, help="feed at real-time pace instead of as fast as possible"
    )
    stream.add_argument("--vad-aggressiveness", type=int, choices=[0, 1, 2, 3], help="(default: 2)")
    stream.add_argument("--end-silence-ms", type=int, help="silence that ends an utterance (default: 600)")
    stream.add_argument(
        "--max-utterance-seconds", type=float, help="longer utterances are cut at a quiet point (default: 30)"
    )
    cmd.set_defaults(run=run)


@dataclass(frozen=True)
class OutputPlan:
    format: str  # text, json, jsonl, srt or vtt
    targets: tuple[Path | None, ...]  # one per input, in order; None: standard output


def run(args: argparse.Namespace) -> int:
    require_server_extra()
    session_options = _session_options(args)
    options = _decoding_options(args)
    plan = plan_output(args.audio, args.format, args.output)
    if plan.format == "jsonl" and session_options is None:
        raise UsageError("--format jsonl needs --stream")
    for path in args.audio:
        check_input_file(path)
    if args.aligner is not None and not args.timestamps:
        raise UsageError("--aligner: only with --timestamps")
    check_device_options(args.device, args.quantize)
    cache = weights_cache_dir(args.weights_cache)
    model = load_model(args.model, args.dtype, args.device, args.quantize, args.plain_weights, cache)
    aligner = None
    if args.timestamps:
        name = args.aligner or DEFAULT_ALIGNER
        aligner = load_aligner(name, args.dtype, args.device, plain_weights=args.plain_weights, weights_cache=cache)
    from asrlive._audio import AudioError, load_audio

    failed = 0
    for path, target in zip(args.audio, plan.targets, strict=True):
        try:
            audio = load_audio(
                path, on_warning=lambda message: warn("transcribe", f"{message}; transcribing what was read")
            )
        except AudioError as exc:
            warn("transcribe", str(exc))
            failed += 1
            continue
        _transcribe_file(model, aligner, audio, path, target, plan.format, options, session_options, args)
    if failed == len(args.audio):
        return EXIT_USAGE
    return EXIT_FAILED if failed else 0


def plan_output(inputs: list[str], fmt: str | None, output: str | None) -> OutputPlan:
    """Where each input's transcript goes and in what format; every refusal before a model loads."""
    fmt = "text" if fmt == "txt" else fmt
    if output is None:
        fmt = fmt or "text"
        if fmt in ("srt", "vtt") and len(inputs) > 1:
            raise UsageError(f"--format {fmt} makes one file per input: with several, give --output FOLDER")
        return OutputPlan(fmt, (None,) * len(inputs))
    if Path(output).is_dir() or output.endswith(("/", os.sep)):
        if fmt is None:
            raise UsageError(
                f"--output {output} is a folder: say what to write there with --format srt, vtt, txt, json"
            )
        targets = tuple(Path(output) / (Path(path).stem + FORMAT_SUFFIXES[fmt]) for path in inputs)
    else:
        if len(inputs) > 1:
            raise UsageError(
                f"--output {output} is one file for {len(inputs)} inputs: give an existing folder instead, "
                "to get one file per input"
            )
        named = SUFFIX_FORMATS.get(Path(output).suffix.lower())
        if fmt is None and named is None:
            raise UsageError(
                f"--output {output}: say the format with --format, or end the name in .srt, .vtt, .txt, .json"
            )
        if fmt is not None and named is not None and named != fmt:
            raise UsageError(f"--output {output} is named for {named}, not --format {fmt}")
        fmt = fmt or named
        targets = (Path(output),)
    assert fmt is not None
    _check_targets(inputs, targets)
    return OutputPlan(fmt, targets)


def _check_targets(inputs: list[str], targets: tuple[Path, ...]) -> None:
    written: dict[Path, str] = {}
    sources = {Path(path).resolve() for path in inputs}
    for path, target in zip(inputs, targets, strict=True):
        key = target.resolve()
        if key in written:
            raise UsageError(f"{written[key]} and {path} would both be written to {target}")
        if key in sources:
            raise UsageError(f"--output {target} is an input: it would be overwritten")
        written[key] = path
        check_output_file(target)


def _decoding_options(args: argparse.Namespace) -> DecodingOptions:
    try:
        return DecodingOptions(
            language=args.language,
            context=args.context,
            max_new_tokens=args.max_new_tokens,
            max_segment_seconds=args.max_segment_seconds,
            cut_loops=not args.no_loop_cut,
        )
    except ValueError as exc:
        raise invalid_options(exc) from None


def _session_options(args: argparse.Namespace) -> SessionOptions | None:
    given = [name for name in STREAM_DEFAULTS if getattr(args, name) is not None]
    if not args.stream:
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise UsageError(f"{flags}: only with --stream")
        return None
    for name, default in STREAM_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    from asrlive.streaming import SessionOptions, VadOptions

    try:
        vad = VadOptions(
            aggressiveness=args.vad_aggressiveness,
            end_silence_ms=args.end_silence_ms,
            max_utterance_s=args.max_utterance_seconds,
        )
        return SessionOptions(vad=vad, partials=not args.no_partials, partial_interval_ms=args.partial_interval_ms)
    except ValueError as exc:
        raise invalid_options(exc) from None


def _transcribe_file(
    model: AsrModel,
    aligner: Aligner | None,
    audio: np.ndarray,
    path: str,
    target: Path | None,
    fmt: str,
    options: DecodingOptions,
    session_options: SessionOptions | None,
    args: argparse.Namespace,
) -> None:
    """One file, its results written as they come; on Ctrl-C, say what the output holds."""
    from asrlive.engine import SAMPLE_RATE

    seconds = audio.size / SAMPLE_RATE
    streaming = session_options is not None
    # Results printed to the terminal as they come would tear a progress bar drawn on it.
    live_on_terminal = target is None and (streaming or fmt in ("srt", "vtt")) and sys.stdout.isatty()
    with _open_sink(fmt, target, path, seconds, several=len(args.audio) > 1, streaming=streaming) as sink:
        progress = Progress(path, seconds, show=not live_on_terminal)
        try:
            with progress:
                if session_options is None:
                    _offline(model, aligner, audio, options, sink, progress)
                else:
                    _stream(model, aligner, audio, options, session_options, args.realtime, sink, progress)
        except KeyboardInterrupt:
            if target is not None:
                done = f"the first {progress.reached:.1f} s (of {seconds:.1f} s)"
                warn("transcribe", f"{target} holds the transcript of {done}")
            raise
        sink.finish()


def _offline(
    model: AsrModel,
    aligner: Aligner | None,
    audio: np.ndarray,
    options: DecodingOptions,
    sink: Sink,
    progress: Progress,
) -> None:
    from asrlive.clients._transcript import Line
    from asrlive.engine import Segment, transcribe

    def done(segment: Segment) -> None:
        alignment = segment.alignment
        words = None if alignment is None else alignment.words
        if alignment is not None and alignment.error is not None:
            _no_words(segment.start, segment.end, alignment.error)
        sink.piece(Line(segment.start, segment.end, segment.text, segment.language, segment.token_ids, words))
        progress.reach(segment.end)

    transcribe(model, audio, options, on_segment=done, aligner=aligner)


def _no_words(start: float, end: float, error: str) -> None:
    warn("transcribe", f"no word times for {start:.1f}-{end:.1f} s: {error}")


def _stream(
    model: AsrModel,
    aligner: Aligner | None,
    audio: np.ndarray,
    options: DecodingOptions,
    session_options: SessionOptions,
    realtime: bool,
    sink: Sink,
    progress: Progress,
) -> None:
    from asrlive._local import stream_audio
    from asrlive.clients._transcript import Line
    from asrlive.engine import StreamTranscriber
    from asrlive.streaming import Session

    session = Session(session_options)
    transcriber = StreamTranscriber(model, options)
    for event in stream_audio(session, transcriber, audio, realtime=realtime, aligner=aligner):
        record = event.to_json()
        sink.event(record)
        if record["type"] == "final":
            if record.get("words_error"):
                _no_words(record["start"], record["end"], record["words_error"])
            sink.piece(Line.from_final(record))
        progress.reach(max(record.get(key, 0.0) for key in ("start", "end", "audio_end")))


class Progress:
    """A bar on stderr (only on a terminal) counting seconds of audio done; remembers how far it got."""

    def __init__(self, path: str, seconds: float, show: bool = True, file: TextIO | None = None) -> None:
        from tqdm import tqdm

        self.reached = 0.0
        # disable=None: tqdm draws only on a terminal, so piped output stays clean.
        self._bar = tqdm(
            total=seconds,
            desc=path,
            disable=None if show else True,
            leave=False,
            file=file or sys.stderr,
            bar_format=BAR_FORMAT,
        )

    def reach(self, seconds: float) -> None:
        """The audio up to ``seconds`` is done (times from the segments, so they add up exactly)."""
        if seconds > self.reached:
            self._bar.update(seconds - self.reached)
            self.reached = seconds

    def __str__(self) -> str:
        """The bar as it is drawn now."""
        return str(self._bar)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()


# --- where results go -------------------------------------------------------------------------


class Sink:
    """One input's results: each piece (offline) or final (--stream) as done, every streaming event."""

    def piece(self, line: Line) -> None:
        pass

    def event(self, event: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class StdoutText(Sink):
    """Offline: the whole text at the end, one line per file (named when there are several).
    --stream: each final's text as it comes."""

    def __init__(self, source: str, several: bool, streaming: bool) -> None:
        self._prefix = f"{source}: " if several else ""
        self._streaming = streaming
        self._lines: list[Line] = []

    def piece(self, line: Line) -> None:
        if self._streaming:
            if line.text:
                print(line.text, flush=True)
        else:
            self._lines.append(line)

    def finish(self) -> None:
        if not self._streaming:
            print(self._prefix + _joined_text(self._lines), flush=True)


class StdoutJson(Sink):
    """Offline: one object per file at the end (its pieces listed when it was split).
    --stream: every event, one per line, as jsonl (as it always did)."""

    def __init__(self, source: str, seconds: float, streaming: bool) -> None:
        self._source, self._seconds, self._streaming = source, seconds, streaming
        self._lines: list[Line] = []

    def piece(self, line: Line) -> None:
        self._lines.append(line)

    def event(self, event: dict[str, Any]) -> None:
        if self._streaming:
            print(json.dumps(event, ensure_ascii=False), flush=True)

    def finish(self) -> None:
        if not self._streaming:
            record = transcript_record(self._source, self._seconds, self._lines, segments=len(self._lines) > 1)
            print(json.dumps(record, ensure_ascii=False), flush=True)


class JsonFile(Sink):
    """The object of ``--format json``, with its segments always (their times are the point of a
    file), rewritten whole after each piece: a reader or a Ctrl-C never finds half a document."""

    def __init__(self, path: Path, source: str, seconds: float) -> None:
        self._path, self._source, self._seconds = path, source, seconds
        self._lines: list[Line] = []
        self._write()

    def piece(self, line: Line) -> None:
        self._lines.append(line)
        self._write()

    def _write(self) -> None:
        record = transcript_record(self._source, self._seconds, self._lines, segments=True)
        write_whole(self._path, json.dumps(record, ensure_ascii=False) + "\n")


class Events(Sink):
    """--stream --format jsonl: every event, one JSON object per line, flushed."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def event(self, event: dict[str, Any]) -> None:
        self._out.write(json.dumps(event, ensure_ascii=False) + "\n")
        self._out.flush()


class Captions(Sink):
    """txt (in a file), srt, vtt: the live client's transcript writer, fed each piece or final."""

    def __init__(self, out: TextIO, fmt: str) -> None:
        from asrlive.clients._transcript import TranscriptWriter

        self._writer = TranscriptWriter(out, FORMAT_SUFFIXES[fmt])

    def piece(self, line: Line) -> None:
        self._writer.add(line)


@contextmanager
def _open_sink(
    fmt: str, target: Path | None, source: str, seconds: float, several: bool, streaming: bool
) -> Iterator[Sink]:
    if target is None:
        if fmt == "text":
            yield StdoutText(source, several, streaming)
        elif fmt == "json":
            yield StdoutJson(source, seconds, streaming)
        elif fmt == "jsonl":
            yield Events(sys.stdout)
        else:
            yield Captions(sys.stdout, fmt)
    elif fmt == "json":
        yield JsonFile(target, source, seconds)
    else:
        with target.open("w", encoding="utf-8") as out:
            yield Events(out) if fmt == "jsonl" else Captions(out, fmt)


def transcript_record(source: str, seconds: float, lines: list[Line], segments: bool) -> dict[str, Any]:
    """The ``--format json`` object; the same whether the pieces are split points or finals."""
    record: dict[str, Any] = {
        "file": source,
        "language": next((line.language for line in lines if line.language), None),
        "text": _joined_text(lines),
        "duration": round(seconds, 6),
        "token_ids": [token for line in lines for token in line.token_ids],
    }
    timed = any(line.words is not None for line in lines)
    if timed:
        record["words"] = [word.to_json() for line in lines for word in line.words or ()]
    if segments:
        record["segments"] = [_segment_record(line, timed) for line in lines]
    return record


def _segment_record(line: Line, timed: bool) -> dict[str, Any]:
    record: dict[str, Any] = {
        "start": line.start,
        "end": line.end,
        "language": line.language,
        "text": line.text,
        "token_ids": list(line.token_ids),
    }
    if timed:
        record["words"] = words_json(line.words)
    return record


def _joined_text(lines: list[Line]) -> str:
    return " ".join(line.text for line in lines if line.text)
