"""``asrlive serve`` (the streaming server) and ``asrlive loadtest`` (clients against one)."""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from typing import TYPE_CHECKING, Any

from asrlive._cli_common import (
    EXIT_FAILED,
    UsageError,
    add_aligner_option,
    add_loop_cut_option,
    add_model_options,
    check_device_options,
    check_input_file,
    invalid_options,
    load_aligner,
    load_model,
    require_server_extra,
    weights_cache_dir,
)
from asrlive.web import STREAM_PATH, ServerOptions

if TYPE_CHECKING:
    import numpy as np

    from asrlive._cli_common import Commands
    from asrlive.clients._soak import SoakOptions


def add_commands(commands: Commands) -> None:
    _add_serve(commands)
    _add_loadtest(commands)


def _add_serve(commands: Commands) -> None:
    defaults = ServerOptions()
    cmd = commands.add_parser(
        "serve",
        help="run the streaming WebSocket server",
        description=f"Serve live transcription over WebSocket at ws://HOST:PORT{STREAM_PATH} and WebRTC "
        "(signalled at /v1/rtc; protocol: docs/protocol.md), the live captions page at http://HOST:PORT/, "
        "OpenAI-compatible endpoints under /v1 (models, audio/transcriptions, realtime: docs/openai.md), "
        "GET /healthz (liveness), GET /readyz (room for a session?) and GET /metrics. SIGTERM or Ctrl-C "
        "finishes every open utterance, then exits (docs/deploy.md: replicas, containers, Kubernetes).",
    )
    add_model_options(cmd)
    add_aligner_option(cmd, default_help='none: sessions that ask for "timestamps" are refused')
    add_loop_cut_option(cmd)
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
    cmd.add_argument(
        "--allowed-origins",
        default=None,
        metavar="ORIGIN[,ORIGIN...]",
        help="only pages of these origins (e.g. https://example.com,http://localhost:8765) and the server's own "
        "page may open WebSocket sessions; clients other than browsers send no origin (default: any origin)",
    )
    limits = cmd.add_argument_group("limits")
    limits.add_argument("--max-sessions", type=int, default=defaults.max_sessions, help="(default: %(default)s)")
    limits.add_argument(
        "--max-batch",
        type=int,
        default=defaults.max_batch,
        help="streams computed together in each inference round (default: %(default)s)",
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
        "--max-upload-mb",
        type=float,
        default=defaults.max_upload_bytes / 2**20,
        help="largest file POST /v1/audio/transcriptions takes, MiB (default: %(default)g, OpenAI's limit)",
    )
    limits.add_argument(
        "--handshake-timeout",
        type=float,
        default=defaults.handshake_timeout_s,
        help="seconds a client has to send a whole request head (HTTP headers, a WebSocket upgrade) from "
        "the connection's start, or from the previous response's end (default: %(default)s)",
    )
    limits.add_argument(
        "--body-timeout",
        type=float,
        default=defaults.body_timeout_s,
        help="seconds a client has to send a whole request body (an upload) after its head (default: %(default)s)",
    )
    limits.add_argument(
        "--keepalive-timeout",
        type=float,
        default=defaults.keepalive_timeout_s,
        help="seconds an HTTP connection may stay idle between requests (default: %(default)s)",
    )
    limits.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        help="TCP connections open at once; more are answered 503 and closed (default: %(default)s)",
    )
    limits.add_argument(
        "--partial-interval-ms",
        type=int,
        default=defaults.session.partial_interval_ms,
        help="default audio between partials; clients may ask for another (default: %(default)s)",
    )
    cmd.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    cmd.set_defaults(run=_run_serve)


def _server_options(args: argparse.Namespace) -> ServerOptions:
    from asrlive.engine import DecodingOptions
    from asrlive.streaming import SessionOptions

    try:
        return ServerOptions(
            host=args.host,
            port=args.port,
            token=args.token,
            certfile=args.certfile,
            keyfile=args.keyfile,
            allowed_origins=_origins(args.allowed_origins),
            max_sessions=args.max_sessions,
            max_batch=args.max_batch,
            max_frame_bytes=args.max_frame_bytes,
            idle_timeout_s=args.idle_timeout,
            max_session_s=args.max_session_seconds,
            max_lag_s=args.max_lag,
            max_upload_bytes=round(args.max_upload_mb * 2**20),
            handshake_timeout_s=args.handshake_timeout,
            body_timeout_s=args.body_timeout,
            keepalive_timeout_s=args.keepalive_timeout,
            max_connections=args.max_connections,
            session=SessionOptions(partial_interval_ms=args.partial_interval_ms),
            decoding=DecodingOptions(cut_loops=not args.no_loop_cut),
        )
    except ValueError as exc:
        raise invalid_options(exc) from None


def _origins(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(origin for origin in (part.strip() for part in text.split(",")) if origin)


def _check_port_free(host: str, port: int) -> None:
    """A port in use is found before minutes of model loading, not after."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself will
        try:
            probe.bind(address)
        except OSError as exc:
            reason = "the port is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise UsageError(f"cannot listen on {host}:{port}: {reason}") from None


def _run_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    require_server_extra()
    options = _server_options(args)
    _check_port_free(args.host, args.port)
    check_device_options(args.device, args.quantize)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # websockets logs every WebSocket handshake: the server says what matters once.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, logging.getLogger().level))
    cache = weights_cache_dir(args.weights_cache)
    model = load_model(args.model, args.dtype, args.device, args.quantize, args.plain_weights, cache)
    aligner = None
    if args.aligner:
        aligner = load_aligner(args.aligner, args.dtype, args.device, args.quantize, args.plain_weights, cache)
    from asrlive.web import AsrServer, run_server

    server = AsrServer(model, options, aligner=aligner)

    def ready(server: AsrServer) -> None:
        print(f"asrlive: listening on {server.url} (captions page: {server.page_url})", file=sys.stderr, flush=True)

    try:
        asyncio.run(run_server(server, ready))
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return 0


def _add_loadtest(commands: Commands) -> None:
    cmd = commands.add_parser(
        "loadtest",
        help="stream real speech from N concurrent clients",
        description="N concurrent clients stream audio files in real time to a server; prints partial and final "
        "latency (p50/p95), the server's real-time factor (from its /metrics) and errors.",
    )
    cmd.add_argument("url", metavar="URL", help=f"ws://HOST:PORT{STREAM_PATH}, or http://HOST:PORT as serve prints")
    cmd.add_argument("--sessions", type=int, default=4, help="concurrent clients (default: %(default)s)")
    cmd.add_argument("--audio", nargs="+", required=True, metavar="FILE", help="speech files, used round-robin")
    cmd.add_argument("--token", default=None)
    cmd.add_argument("--stagger", type=float, default=0.25, help="seconds between client starts (default: %(default)s)")
    cmd.add_argument("--partial-interval-ms", type=int, default=None, help="(default: the server's)")
    soak = cmd.add_argument_group(
        "soak",
        "--soak keeps --sessions clients streaming, session after session, adds storms of sessions dropped "
        "mid-utterance, and prints the server's resident memory (from its /metrics) as it goes, then first, "
        "last and max, and the growth over the second half",
    )
    soak.add_argument("--soak", type=float, default=None, metavar="MINUTES", help="run for this long")
    soak.add_argument(
        "--disconnect-storm",
        type=int,
        default=None,
        metavar="N",
        help="every --storm-every seconds, N more sessions stream speech and drop their TCP connection in the "
        "middle of an utterance (default: no storms)",
    )
    soak.add_argument("--storm-every", type=float, default=None, metavar="SECONDS", help="(default: 60)")
    soak.add_argument(
        "--report-every", type=float, default=None, metavar="SECONDS", help="one line per interval (default: 60)"
    )
    soak.add_argument(
        "--json", action="store_true", help="print the samples and summary as one JSON object (the lines go to stderr)"
    )
    cmd.set_defaults(run=_run_loadtest)


def _run_loadtest(args: argparse.Namespace) -> int:
    import asyncio

    from asrlive._audio import AudioError, load_audio
    from asrlive.clients import stream_url
    from asrlive.clients._loadtest import run_load

    if args.sessions < 1:
        raise UsageError("--sessions must be at least 1")
    soak = _soak_options(args)
    try:
        url = stream_url(args.url)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for path in args.audio:
        check_input_file(path)
    try:
        clips = [load_audio(path) for path in args.audio]
    except AudioError as exc:
        raise UsageError(str(exc)) from None
    if soak is not None:
        return _run_soak(soak, url, clips, args.json)
    seconds = max(clip.size for clip in clips) / 16_000
    print(f"asrlive loadtest: {args.sessions} sessions, about {seconds:.0f} s ...", file=sys.stderr, flush=True)
    report = asyncio.run(
        run_load(
            url,
            clips,
            args.sessions,
            stagger_s=args.stagger,
            token=args.token,
            partial_interval_ms=args.partial_interval_ms,
        )
    )
    print("\n".join(report.lines()), flush=True)
    return EXIT_FAILED if report.errors else 0


_SOAK_FLAGS = {
    "--disconnect-storm": "disconnect_storm",
    "--storm-every": "storm_every",
    "--report-every": "report_every",
    "--json": "json",
}


def _soak_options(args: argparse.Namespace) -> SoakOptions | None:
    """The soak's options, or None without --soak (whose options are then refused)."""
    from asrlive.clients._soak import SoakOptions

    if args.soak is None:
        stray = [flag for flag, value in _SOAK_FLAGS.items() if getattr(args, value) not in (None, False)]
        if stray:
            raise UsageError(f"{stray[0]} goes with --soak")
        return None
    flags = {"storm": args.disconnect_storm, "storm_every_s": args.storm_every, "report_every_s": args.report_every}
    given: dict[str, Any] = {name: value for name, value in flags.items() if value is not None}
    options = SoakOptions(
        duration_s=args.soak * 60,
        sessions=args.sessions,
        stagger_s=args.stagger,
        token=args.token,
        partial_interval_ms=args.partial_interval_ms,
        **given,
    )
    if options.duration_s <= 0:
        raise UsageError("--soak must be more than 0 minutes")
    if options.storm < 0:
        raise UsageError("--disconnect-storm must be 0 or more")
    if options.storm_every_s <= 0 or options.report_every_s <= 0:
        raise UsageError("--storm-every and --report-every must be more than 0 seconds")
    return options


def _run_soak(options: SoakOptions, url: str, clips: list[np.ndarray], as_json: bool) -> int:
    import asyncio
    import json

    from asrlive.clients._loadtest import metrics_url, read_metrics
    from asrlive.clients._soak import HEADER, RSS, Sample, run_soak

    exposition = read_metrics(url)
    if exposition is None:
        raise UsageError(f"cannot read {metrics_url(url)}: the soak reads the server's memory there")
    if f"\n{RSS} " not in exposition:
        print(f"asrlive loadtest: the server's /metrics has no {RSS}: memory is not shown", file=sys.stderr)
    lines = sys.stderr if as_json else sys.stdout

    def show(sample: Sample) -> None:
        print(sample.line(), file=lines, flush=True)

    storms = f", storms of {options.storm}" if options.storm else ""
    minutes = options.duration_s / 60
    print(
        f"asrlive loadtest: soak for {minutes:g} min, {options.sessions} sessions{storms} ...",
        file=sys.stderr,
        flush=True,
    )
    print(HEADER, file=lines, flush=True)
    report = asyncio.run(run_soak(url, clips, options, show))
    if as_json:
        print(json.dumps(report.figures()), flush=True)
    else:
        print("\n".join(report.lines()), flush=True)
    return EXIT_FAILED if report.errors else 0
