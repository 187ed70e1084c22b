"""``asrlive bench``: speed measurements at the true model shapes with random weights."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from asrlive._cli_common import (
    UsageError,
    add_device_options,
    add_dtype_option,
    check_device_options,
    require_server_extra,
)

if TYPE_CHECKING:
    import torch

    from asrlive._cli_common import Commands

SIZES = ("0.6B", "1.7B")


def add_command(commands: Commands) -> None:
    bench = commands.add_parser("bench", help="speed measurements", description="Speed measurements.")
    which = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    _add_engine(which)
    _add_align(which)
    _add_stream(which)
    _add_serve(which)
    _add_soak(which)


def _add_common(parser: argparse.ArgumentParser) -> None:
    add_dtype_option(parser, "the engine's policy")
    add_device_options(parser)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object instead of a table")


def _add_engine(which: Commands) -> None:
    engine = which.add_parser(
        "engine",
        help="one forward of each kind against the memory and kernel floors",
        description="At the true model shapes (random weights), side by side: the memory floor (weight bytes / "
        "measured read bandwidth), the kernel floor (one-row products over every weight matrix), decode steps "
        "for 1/4/8 streams, prefills of 60/120 rows, the encoder over 1/4/8 s; and the decode-step targets, "
        "met or missed.",
    )
    engine.add_argument("--size", choices=SIZES, default="0.6B", help="model shape (default: %(default)s)")
    engine.add_argument("--repeats", type=int, default=5, help="timed runs per figure, the best kept (default: 5)")
    _add_common(engine)
    engine.set_defaults(run=_run_bench_engine)


def _add_align(which: Commands) -> None:
    align = which.add_parser(
        "align",
        help="what word timestamps cost: the forced aligner over 2 to 30 s of speech",
        description="At the true shapes of Qwen3-ForcedAligner-0.6B (random weights): the encoder, the LLM forward "
        "and the whole alignment of 2, 5, 10 and 30 s of real speech with a transcript of 2.5 words per second; "
        "the cost per second of audio.",
    )
    align.add_argument("--repeats", type=int, default=3, help="timed runs per figure, the best kept (default: 3)")
    align.add_argument("--audio", type=Path, default=None, help="speech to loop (default: the test fixtures)")
    _add_common(align)
    align.set_defaults(run=_run_bench_align)


def _add_stream(which: Commands) -> None:
    stream = which.add_parser(
        "stream",
        help="per-update cost of live transcription against the official algorithm",
        description="Stream long real speech through the engine at the true model shapes (random weights) "
        "and through the official re-feed-everything algorithm; print per-update cost and real-time factor.",
    )
    stream.add_argument("--size", action="append", choices=SIZES, help="model shape (default: 0.6B)")
    stream.add_argument("--duration", type=float, default=300.0, help="seconds of audio (default: %(default)s)")
    stream.add_argument("--partial-interval-ms", type=int, default=1000, help="(default: %(default)s)")
    stream.add_argument(
        "--positions", default="10,30,60,120,300", help="stream positions to report, seconds (default: %(default)s)"
    )
    stream.add_argument("--audio", type=Path, default=None, help="speech to loop (default: the test fixtures)")
    stream.add_argument("--no-official", action="store_true", help="skip the official algorithm")
    _add_common(stream)
    stream.set_defaults(run=_run_bench_stream)


def _add_serve(which: Commands) -> None:
    serve = which.add_parser(
        "serve",
        help="concurrent real-time sessions on one server, batched versus one stream at a time",
        description="In-process servers with a random-weight network of the true shapes; N clients stream real "
        "speech in real time; prints real-time factor, partial and final latencies (final: from sending the "
        "audio at the final's end to receiving it; p50 in the first and second half of the sessions) and lost "
        "finals per batch limit and session count.",
    )
    serve.add_argument("--size", choices=SIZES, default="0.6B", help="model shape (default: %(default)s)")
    serve.add_argument("--sessions", default="1,4,8", help="session counts (default: %(default)s)")
    serve.add_argument("--batch", default="1,8", help="max streams per batch to compare (default: %(default)s)")
    serve.add_argument("--duration", type=float, default=30.0, help="seconds of audio per session (default: 30)")
    serve.add_argument("--partial-interval-ms", type=int, default=1000, help="(default: %(default)s)")
    serve.add_argument("--audio", type=Path, default=None, help="speech to loop (default: the test fixtures)")
    serve.add_argument(
        "--timestamps",
        action="store_true",
        help="run every row twice, the second time with word timestamps on every final (a random-weight "
        "Qwen3-ForcedAligner-0.6B on the server): their effect on latency, side by side",
    )
    _add_common(serve)
    serve.set_defaults(run=_run_bench_serve)


def _add_soak(which: Commands) -> None:
    soak = which.add_parser(
        "soak",
        help="the server's memory over a long soak with disconnect storms",
        description="A server of a random-weight network of the true shapes in a child process; for --minutes, "
        "--sessions clients stream real speech session after session and every --storm-every seconds "
        "--disconnect-storm more sessions drop their TCP connection mid-utterance; prints the server's resident "
        "memory as it goes, then first, last, max and the growth over the second half; the server is then "
        "stopped with SIGTERM and must exit cleanly.",
    )
    soak.add_argument("--size", choices=SIZES, default="0.6B", help="model shape (default: %(default)s)")
    soak.add_argument("--minutes", type=float, default=20.0, help="(default: %(default)s)")
    soak.add_argument("--sessions", type=int, default=2, help="normal sessions at a time (default: %(default)s)")
    soak.add_argument(
        "--disconnect-storm", type=int, default=30, metavar="N", help="sessions per storm (default: %(default)s)"
    )
    soak.add_argument("--storm-every", type=float, default=60.0, metavar="SECONDS", help="(default: %(default)s)")
    soak.add_argument("--report-every", type=float, default=60.0, metavar="SECONDS", help="(default: %(default)s)")
    soak.add_argument("--audio", type=Path, default=None, help="speech to loop (default: the test fixtures)")
    _add_common(soak)
    soak.set_defaults(run=_run_bench_soak)


def _numbers(flag: str, text: str, kind: type[float] | type[int], least: float) -> tuple[float, ...]:
    """A comma-separated list of numbers, each at least ``least``: a bad one is named with its flag."""
    try:
        values = tuple(kind(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise UsageError(f"{flag} {text}: not a comma-separated list of numbers") from None
    if not values or min(values) < least:
        raise UsageError(f"{flag} {text}: give one or more numbers, each at least {least:g}")
    return values


def _at_least(flag: str, value: float, least: float) -> None:
    if value < least:
        raise UsageError(f"{flag} must be at least {least:g}")


def _dtype(args: argparse.Namespace) -> torch.dtype:
    """What every bench checks before building a network (the server extra, the device, torchao), and
    the dtype: the engine's policy depends on the device."""
    require_server_extra()
    device = check_device_options(args.device, args.quantize)
    from asrlive.engine import resolve_dtype

    return resolve_dtype(args.dtype, device)


def _run_bench_engine(args: argparse.Namespace) -> int:
    _at_least("--repeats", args.repeats, 1)
    dtype = _dtype(args)
    from asrlive._bench_engine import EngineBenchOptions, bench_engine

    bench_engine(
        EngineBenchOptions(args.size, dtype, args.device, args.quantize, args.repeats, args.json, args.plain_weights)
    )
    return 0


def _run_bench_align(args: argparse.Namespace) -> int:
    _at_least("--repeats", args.repeats, 1)
    dtype = _dtype(args)
    from asrlive._bench_align import AlignBenchOptions, bench_align

    bench_align(
        AlignBenchOptions(dtype, args.device, args.quantize, args.repeats, args.audio, args.json, args.plain_weights)
    )
    return 0


def _run_bench_stream(args: argparse.Namespace) -> int:
    _at_least("--duration", args.duration, 1)
    positions = _numbers("--positions", args.positions, float, 0)
    dtype = _dtype(args)
    from asrlive._bench_stream import StreamBenchOptions, bench_stream

    options = StreamBenchOptions(
        sizes=tuple(args.size or ["0.6B"]),
        dtype=dtype,
        device=args.device,
        quantize=args.quantize,
        plain_weights=args.plain_weights,
        duration=args.duration,
        interval_ms=args.partial_interval_ms,
        positions=positions,
        audio=args.audio,
        official=not args.no_official,
        json=args.json,
    )
    bench_stream(options)
    return 0


def _run_bench_serve(args: argparse.Namespace) -> int:
    _at_least("--duration", args.duration, 1)
    counts = tuple(int(n) for n in _numbers("--sessions", args.sessions, int, 1))
    batches = tuple(int(n) for n in _numbers("--batch", args.batch, int, 1))
    dtype = _dtype(args)
    from asrlive._bench_serve import ServeBenchOptions, bench_serve

    options = ServeBenchOptions(
        size=args.size,
        dtype=dtype,
        device=args.device,
        quantize=args.quantize,
        plain_weights=args.plain_weights,
        counts=counts,
        batches=batches,
        duration=args.duration,
        interval_ms=args.partial_interval_ms,
        audio=args.audio,
        timestamps=args.timestamps,
        json=args.json,
    )
    bench_serve(options)
    return 0


def _run_bench_soak(args: argparse.Namespace) -> int:
    _at_least("--minutes", args.minutes, 0.01)
    _at_least("--sessions", args.sessions, 1)
    _at_least("--disconnect-storm", args.disconnect_storm, 0)
    _at_least("--storm-every", args.storm_every, 0.1)
    _at_least("--report-every", args.report_every, 0.1)
    dtype = _dtype(args)
    from asrlive._bench_soak import SoakBenchOptions, bench_soak

    options = SoakBenchOptions(
        size=args.size,
        dtype=str(dtype).removeprefix("torch."),
        device=args.device,
        quantize=args.quantize,
        plain_weights=args.plain_weights,
        minutes=args.minutes,
        sessions=args.sessions,
        storm=args.disconnect_storm,
        storm_every_s=args.storm_every,
        report_every_s=args.report_every,
        max_sessions=args.sessions + args.disconnect_storm,
        audio=args.audio,
        json=args.json,
    )
    return bench_soak(options)
