"""``asrlive bench``: speed measurements at the true model shapes with random weights."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from asrlive._cli_common import add_dtype_option, require_server_extra

if TYPE_CHECKING:
    from asrlive._cli_common import Commands


def add_command(commands: Commands) -> None:
    bench = commands.add_parser("bench", help="speed measurements", description="Speed measurements.")
    which = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    stream = which.add_parser(
        "stream",
        help="per-update cost of live transcription against the official algorithm",
        description="Stream long real speech through the engine at the true model shapes (random weights) "
        "and through the official re-feed-everything algorithm; print per-update cost and real-time factor.",
    )
    stream.add_argument("--size", action="append", choices=["0.6B", "1.7B"], help="model shape (default: 0.6B)")
    add_dtype_option(stream, "the engine's policy")
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
    add_dtype_option(serve, "the engine's policy")
    serve.add_argument("--sessions", default="1,2,4,6,8", help="session counts (default: %(default)s)")
    serve.add_argument("--batch", default="1,8", help="max streams per batch to compare (default: %(default)s)")
    serve.add_argument("--duration", type=float, default=30.0, help="seconds of audio per session (default: 30)")
    serve.add_argument("--partial-interval-ms", type=int, default=1000, help="(default: %(default)s)")
    serve.add_argument("--audio", type=Path, default=None, help="speech to loop (default: the test fixtures)")
    serve.set_defaults(run=_run_bench_serve)


def _run_bench_serve(args: argparse.Namespace) -> int:
    require_server_extra()
    from asrlive._bench_serve import bench_serve
    from asrlive.engine import resolve_dtype

    counts = [int(n) for n in args.sessions.split(",") if n]
    batches = [int(n) for n in args.batch.split(",") if n]
    dtype = resolve_dtype(args.dtype)
    bench_serve(args.size, dtype, counts, batches, args.duration, args.partial_interval_ms, args.audio)
    return 0


def _run_bench_stream(args: argparse.Namespace) -> int:
    require_server_extra()
    from asrlive._bench_stream import bench_stream
    from asrlive.engine import resolve_dtype

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
