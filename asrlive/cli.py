"""The ``asrlive`` command line: one console script, one subcommand per task."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from asrlive import __version__
from asrlive._cli_live import add_live_commands
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
from asrlive.web import STREAM_PATH, AsrServer, ServerOptions, run_server

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
    _add_serve(commands)
    add_live_commands(commands)
    _add_loadtest(commands)
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


def _add_serve(commands) -> None:
    defaults = ServerOptions()
    cmd = commands.add_parser(
        "serve",
        help="run the streaming WebSocket server",
        description=f"Serve live transcription over WebSocket at ws://HOST:PORT{STREAM_PATH} and WebRTC "
        "(signalled at /v1/rtc; protocol: docs/protocol.md), the live captions page at http://HOST:PORT/, "
        "GET /healthz and GET /metrics. SIGTERM or Ctrl-C finishes every open utterance, then exits.",
    )
    _add_model_options(cmd)
    cmd.add_argument("--host", default=defaults.host, help="interface to listen on (default: %(default)s)")
    cmd.add_argument("--port", type=int, default=defaults.port, help="0 picks a free port (default: %(default)s)")
    cmd.add_argument("--token", default=None, help="require this bearer token (header or ?token=)")
    cmd.add_argument(
        "--certfile",
        default=None,
        help="TLS certificate (PEM): serve https:// and wss://, which browsers need "
        "for the microphone anywhere but localhost",
    )
    cmd.add_argument("--keyfile", default=None, help="the certificate's private key (PEM)")
    limits = cmd.add_argument_group("limits")
    limits.add_argument("--max-sessions", type=int, default=defaults.max_sessions, help="(default: %(default)s)")
    limits.add_argument(
        "--max-batch", type=int, default=defaults.max_batch, help="streams per inference batch (default: %(default)s)"
    )
    limits.add_argument("--max-frame-bytes", type=int, default=defaults.max_frame_bytes, help="(default: %(default)s)")
    limits.add_argument(
        "--idle-timeout", type=float, default=defaults.idle_timeout_s, help="seconds (default: %(default)s)"
    )
    limits.add_argument(
        "--max-session-seconds", type=float, default=defaults.max_session_s, help="of audio (default: %(default)s)"
    )
    limits.add_argument(
        "--max-lag",
        type=float,
        default=defaults.max_lag_s,
        help="refuse new sessions while open ones get results this many seconds late; 0: never (default: %(default)s)",
    )
    limits.add_argument(
        "--partial-interval-ms",
        type=int,
        default=defaults.session.partial_interval_ms,
        help="default audio between partials; clients may ask for another (default: %(default)s)",
    )
    cmd.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    cmd.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = ServerOptions(
            host=args.host,
            port=args.port,
            token=args.token,
            certfile=args.certfile,
            keyfile=args.keyfile,
            max_sessions=args.max_sessions,
            max_batch=args.max_batch,
            max_frame_bytes=args.max_frame_bytes,
            idle_timeout_s=args.idle_timeout,
            max_session_s=args.max_session_seconds,
            max_lag_s=args.max_lag,
            session=SessionOptions(partial_interval_ms=args.partial_interval_ms),
        )
    except ValueError as exc:
        print(f"asrlive serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    model = AsrModel.load(args.model, args.dtype)
    if args.max_batch > 1 and model.pack_weights():
        logging.getLogger("asrlive.server").info("MKL-packed weight copies kept for batched decoding")
    server = AsrServer(model, options)

    def ready(server: AsrServer) -> None:
        print(f"asrlive: live captions at {server.page_url}", file=sys.stderr, flush=True)
        print(f"asrlive: listening on {server.url}", file=sys.stderr, flush=True)

    try:
        asyncio.run(run_server(server, ready))
    except OSError as exc:
        print(f"asrlive serve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _add_loadtest(commands) -> None:
    cmd = commands.add_parser(
        "loadtest",
        help="stream real speech from N concurrent clients",
        description="N concurrent clients stream audio files in real time to a server; prints partial and final "
        "latency (p50/p95), the server's real-time factor (from its /metrics) and errors.",
    )
    cmd.add_argument("url", metavar="URL", help=f"ws://HOST:PORT{STREAM_PATH}")
    cmd.add_argument("--sessions", type=int, default=4, help="concurrent clients (default: %(default)s)")
    cmd.add_argument("--audio", nargs="+", required=True, metavar="FILE", help="speech files, used round-robin")
    cmd.add_argument("--token", default=None)
    cmd.add_argument("--stagger", type=float, default=0.25, help="seconds between client starts (default: %(default)s)")
    cmd.add_argument("--partial-interval-ms", type=int, default=None, help="(default: the server's)")
    cmd.set_defaults(run=_run_loadtest)


def _run_loadtest(args: argparse.Namespace) -> int:
    import asyncio

    from asrlive.clients._loadtest import run_load

    if args.sessions < 1:
        print("asrlive loadtest: --sessions must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        clips = [load_audio(path) for path in args.audio]
    except AudioError as exc:
        print(f"asrlive loadtest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    seconds = max(clip.size for clip in clips) / 16_000
    print(f"asrlive loadtest: {args.sessions} sessions, about {seconds:.0f} s ...", file=sys.stderr, flush=True)
    report = asyncio.run(
        run_load(
            args.url,
            clips,
            args.sessions,
            stagger_s=args.stagger,
            token=args.token,
            partial_interval_ms=args.partial_interval_ms,
        )
    )
    print("\n".join(report.lines()), flush=True)
    return EXIT_SOME_FAILED if report.errors else 0


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
    serve = which.add_parser(
        "serve",
        help="concurrent real-time sessions on one server, batched versus one stream at a time",
        description="In-process servers with a random-weight network of the true shapes; N clients stream real "
        "speech in real time; prints real-time factor and latencies per batch limit and session count.",
    )
    serve.add_argument("--size", choices=["0.6B", "1.7B"], default="0.6B", help="model shape (default: 0.6B)")
    serve.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="(default: the engine's policy)")
    serve.add_argument("--sessions", default="1,2,4,6,8", help="session counts (default: %(default)s)")
    serve.add_argument("--batch", default="1,8", help="max streams per batch to compare (default: %(default)s)")
    serve.add_argument("--duration", type=float, default=30.0, help="seconds of audio per session (default: 30)")
    serve.add_argument("--partial-interval-ms", type=int, default=1000, help="(default: %(default)s)")
    serve.add_argument("--audio", type=Path, default=None, help="speech to loop (default: the test fixtures)")
    serve.set_defaults(run=_run_bench_serve)


def _run_bench_serve(args: argparse.Namespace) -> int:
    from asrlive.clients._bench_serve import bench_serve

    counts = [int(n) for n in args.sessions.split(",") if n]
    batches = [int(n) for n in args.batch.split(",") if n]
    dtype = resolve_dtype(args.dtype)
    bench_serve(args.size, dtype, counts, batches, args.duration, args.partial_interval_ms, args.audio)
    return 0


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
