"""The ``asrlive`` command line: one console script, one subcommand per task."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from asrlive import __version__
from asrlive.clients._local import stream_audio
from asrlive.engine import (
    DEFAULT_MODEL,
    DTYPES,
    AsrModel,
    AudioError,
    DecodingOptions,
    ModelLoadError,
    StreamTranscriber,
    Transcription,
    load_audio,
    resolve_dtype,
    transcribe,
)
from asrlive.streaming import Final, Session, SessionOptions, VadOptions

EXIT_USAGE = 2
EXIT_SOME_FAILED = 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ModelLoadError as exc:
        print(f"asrlive: cannot load the model.\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("asrlive: interrupted", file=sys.stderr)
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asrlive", description="Streaming speech transcription with Qwen3-ASR.")
    parser.add_argument("--version", action="version", version=f"asrlive {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_transcribe(commands)
    _add_bench(commands)
    return parser


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Hugging Face id or local checkpoint directory (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="weights and activations dtype (default: bfloat16 where the CPU supports it, else float32)",
    )


def _add_transcribe(commands) -> None:
    cmd = commands.add_parser("transcribe", help="transcribe audio files", description="Transcribe audio files.")
    cmd.add_argument("audio", nargs="+", metavar="AUDIO", help="WAV, FLAC, OGG, MP3, ... any rate and channels")
    _add_model_options(cmd)
    cmd.add_argument("--language", default="auto", help="'auto' (detect) or a language: English, en, Chinese, ...")
    cmd.add_argument("--context", default="", help="context text for the model: hotwords, names, domain terms")
    cmd.add_argument(
        "--max-new-tokens", type=int, default=None, help="cap on generated tokens per piece (default: by duration)"
    )
    cmd.add_argument(
        "--max-segment-seconds",
        type=float,
        default=DecodingOptions.max_segment_seconds,
        help="longer audio is cut at its quietest points into pieces of at most this length (default: %(default)s)",
    )
    cmd.add_argument(
        "--format",
        choices=["text", "json", "jsonl"],
        default="text",
        help="text; json: one object per file; jsonl (with --stream): one event per line (default: text)",
    )
    stream = cmd.add_argument_group("streaming (--stream)")
    stream.add_argument("--stream", action="store_true", help="feed the file through the live streaming path")
    stream.add_argument(
        "--partial-interval-ms", type=int, default=1000, help="audio between partial results (default: %(default)s)"
    )
    stream.add_argument("--no-partials", action="store_true", help="only finals")
    stream.add_argument("--realtime", action="store_true", help="feed at real-time pace instead of as fast as possible")
    stream.add_argument("--vad-aggressiveness", type=int, default=2, choices=[0, 1, 2, 3], help="(default: 2)")
    stream.add_argument(
        "--end-silence-ms", type=int, default=600, help="silence that ends an utterance (default: %(default)s)"
    )
    stream.add_argument(
        "--max-utterance-seconds",
        type=float,
        default=30.0,
        help="longer utterances are cut at a quiet point (default: %(default)s)",
    )
    cmd.set_defaults(run=_run_transcribe)


def _run_transcribe(args: argparse.Namespace) -> int:
    try:
        options = DecodingOptions(
            language=args.language,
            context=args.context,
            max_new_tokens=args.max_new_tokens,
            max_segment_seconds=args.max_segment_seconds,
        )
    except ValueError as exc:
        print(f"asrlive transcribe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.stream:
        try:
            session_options = _session_options(args)
        except ValueError as exc:
            print(f"asrlive transcribe: {exc}", file=sys.stderr)
            return EXIT_USAGE
    elif args.format == "jsonl":
        print("asrlive transcribe: --format jsonl needs --stream", file=sys.stderr)
        return EXIT_USAGE
    model = AsrModel.load(args.model, args.dtype)
    failed = 0
    for path in args.audio:
        try:
            audio = load_audio(path)
        except AudioError as exc:
            print(f"asrlive transcribe: {exc}", file=sys.stderr)
            failed += 1
            continue
        if args.stream:
            _stream_file(model, audio, options, session_options, args)
            continue
        result = _transcribe_with_progress(model, audio, options, path)
        _print_result(path, result, args.format, several=len(args.audio) > 1)
    return EXIT_SOME_FAILED if failed else 0


def _session_options(args: argparse.Namespace) -> SessionOptions:
    vad = VadOptions(
        aggressiveness=args.vad_aggressiveness,
        end_silence_ms=args.end_silence_ms,
        max_utterance_s=args.max_utterance_seconds,
    )
    return SessionOptions(vad=vad, partials=not args.no_partials, partial_interval_ms=args.partial_interval_ms)


def _stream_file(model, audio, options: DecodingOptions, session_options: SessionOptions, args) -> None:
    session = Session(session_options)
    transcriber = StreamTranscriber(model, options)
    for event in stream_audio(session, transcriber, audio, realtime=args.realtime):
        if args.format == "text":
            if isinstance(event, Final) and event.text:
                print(event.text, flush=True)
        else:
            print(json.dumps(event.to_json(), ensure_ascii=False), flush=True)


def _transcribe_with_progress(model, audio, options, path: str) -> Transcription:
    seconds = round(audio.size / 16_000, 1)
    # tqdm draws only on a terminal (disable=None), so piped output stays clean.
    with tqdm(total=seconds, desc=path, unit="s", disable=None, leave=False, file=sys.stderr) as bar:
        return transcribe(model, audio, options, on_segment=lambda s: bar.update(round(s.end - s.start, 1)))


def _print_result(path: str, result: Transcription, fmt: str, several: bool) -> None:
    if fmt == "json":
        record = {
            "file": path,
            "language": result.language,
            "text": result.text,
            "duration": round(result.duration, 6),
            "token_ids": result.token_ids,
        }
        if len(result.segments) > 1:
            record["segments"] = [
                {"start": s.start, "end": s.end, "language": s.language, "text": s.text, "token_ids": list(s.token_ids)}
                for s in result.segments
            ]
        print(json.dumps(record, ensure_ascii=False), flush=True)
    elif several:
        print(f"{path}: {result.text}", flush=True)
    else:
        print(result.text, flush=True)


def _add_bench(commands) -> None:
    bench = commands.add_parser("bench", help="speed measurements", description="Speed measurements.")
    which = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    stream = which.add_parser(
        "stream",
        help="per-update cost of live transcription against the official algorithm",
        description="Stream long real speech through the engine at the true model shapes (random weights) "
        "and through the official re-feed-everything algorithm; print per-update cost and real-time factor.",
    )
    stream.add_argument("--size", action="append", choices=["0.6B", "1.7B"], help="model shape (default: 0.6B)")
    stream.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="(default: the engine's policy)")
    stream.add_argument("--duration", type=float, default=300.0, help="seconds of audio (default: %(default)s)")
    stream.add_argument("--partial-interval-ms", type=int, default=1000, help="(default: %(default)s)")
    stream.add_argument(
        "--positions", default="10,30,60,120,300", help="stream positions to report, seconds (default: %(default)s)"
    )
    stream.add_argument("--audio", type=Path, default=None, help="speech to loop (default: the test fixtures)")
    stream.add_argument("--no-official", action="store_true", help="skip the official algorithm")
    stream.set_defaults(run=_run_bench_stream)


def _run_bench_stream(args: argparse.Namespace) -> int:
    from asrlive.clients._bench import bench_stream

    positions = [float(p) for p in args.positions.split(",") if p]
    bench_stream(
        args.size or ["0.6B"],
        resolve_dtype(args.dtype),
        args.duration,
        args.partial_interval_ms,
        positions,
        args.audio,
        not args.no_official,
    )
    return 0
