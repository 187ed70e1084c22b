"""``asrlive bench soak``: the server's memory over a long soak, at the true model shapes.

The server runs in a child process (``python -m asrlive._bench_soak``), so the resident memory
its /metrics reports is the server's alone, and the clients do not share its event loop: a
random-weight network of the true shapes with the bench's scripted transcriber (simulated text,
as ``bench serve``), weights packed as the server packs them. The child prints one line on
stdout once it listens (``READY`` then its URL and what it runs, as JSON); the soak
(``clients/_soak.py``: sessions after sessions, storms of sessions dropped mid-utterance) then
runs against it for ``minutes``, and the child is stopped with SIGTERM, which it must survive
with a clean exit (its drain, then exit code 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from asrlive._audio import SAMPLE_RATE
from asrlive.clients._soak import HEADER, Sample, SoakOptions, SoakReport, run_soak

READY = "asrlive-bench-soak-ready"
STOP_TIMEOUT_S = 120.0  # for the server's drain after SIGTERM
CLIP_S = 30.0  # each session's audio
CLIPS = 8  # distinct clips, each starting elsewhere in the looped speech


@dataclass(frozen=True)
class SoakBenchOptions:
    size: str
    dtype: str  # a torch dtype's name ("float32"), as the child takes it
    device: str | None
    quantize: str | None
    minutes: float
    sessions: int
    storm: int
    storm_every_s: float
    report_every_s: float
    max_sessions: int
    audio: Path | None
    json: bool
    plain_weights: bool = False  # F.linear over the weights as loaded (--plain-weights)


def server_argv(options: SoakBenchOptions) -> list[str]:
    """The child's command line (a test may run its own child instead)."""
    argv = [sys.executable, "-m", "asrlive._bench_soak", "--size", options.size, "--dtype", options.dtype]
    argv += ["--max-sessions", str(options.max_sessions)]
    if options.device is not None:
        argv += ["--device", options.device]
    if options.quantize is not None:
        argv += ["--quantize", options.quantize]
    if options.plain_weights:
        argv += ["--plain-weights"]
    return argv


def bench_soak(options: SoakBenchOptions) -> int:
    """Run the soak against a child server; 0, or 1 if the clients saw errors or the server did not exit cleanly."""
    clips = _clips(options.audio)
    print(f"starting a server of a random-weight {options.size} network ...", file=sys.stderr, flush=True)
    server = subprocess.Popen(server_argv(options), stdout=subprocess.PIPE, text=True)
    try:
        url, model = _wait_ready(server)
        report = _soak(url, clips, options)
    finally:
        exit_code = _stop(server)
    clean = exit_code == 0
    if options.json:
        figures = {"model": model, **report.figures(), "server_exit_code": exit_code}
        print(json.dumps(figures), flush=True)
    else:
        print(f"model: {model['line']}", flush=True)
        print("\n".join(report.lines()), flush=True)
        print(f"server: stopped by SIGTERM, exit code {exit_code}", flush=True)
    return 0 if clean and not report.errors else 1


def _clips(audio: Path | None) -> list[np.ndarray]:
    from asrlive._bench_stream import looped_speech

    speech = looped_speech(CLIP_S * CLIPS, audio)
    size = int(CLIP_S * SAMPLE_RATE)
    return [speech[i * size : (i + 1) * size] for i in range(CLIPS)]


def _wait_ready(server: subprocess.Popen[str]) -> tuple[str, dict[str, Any]]:
    """The child's URL and model, from its ready line (its other lines are passed on to stderr)."""
    stdout: IO[str] | None = server.stdout
    assert stdout is not None
    for line in stdout:
        if line.startswith(READY):
            _, url, model = line.rstrip("\n").split(" ", 2)
            return url, json.loads(model)
        print(line, end="", file=sys.stderr, flush=True)
    raise SystemExit(f"asrlive bench soak: the server exited before it was ready (exit code {server.wait()})")


def _soak(url: str, clips: list[np.ndarray], options: SoakBenchOptions) -> SoakReport:
    soak = SoakOptions(
        duration_s=options.minutes * 60,
        sessions=options.sessions,
        storm=options.storm,
        storm_every_s=options.storm_every_s,
        report_every_s=options.report_every_s,
    )
    lines = sys.stderr if options.json else sys.stdout

    def show(sample: Sample) -> None:
        print(sample.line(), file=lines, flush=True)

    storms = f", storms of {options.storm} every {options.storm_every_s:g} s" if options.storm else ""
    print(f"soak for {options.minutes:g} min, {options.sessions} sessions{storms} ...", file=sys.stderr, flush=True)
    print(HEADER, file=lines, flush=True)
    return asyncio.run(run_soak(url, clips, soak, show))


def _stop(server: subprocess.Popen[str]) -> int:
    """SIGTERM, then the exit code (the server drains its sessions first); killed if it hangs."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
    try:
        code = server.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print("asrlive bench soak: the server did not stop after SIGTERM; killed", file=sys.stderr, flush=True)
        server.kill()
        code = server.wait()
    if server.stdout is not None:
        server.stdout.close()
    return code


# -- the child: the server -------------------------------------------------------------------------


def serve(argv: list[str]) -> None:
    """The child process: a server of a random-weight network, until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m asrlive._bench_soak")
    parser.add_argument("--size", required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--device", default=None)
    parser.add_argument("--quantize", default=None)
    parser.add_argument("--plain-weights", action="store_true")
    parser.add_argument("--max-sessions", type=int, required=True)
    args = parser.parse_args(argv)

    import logging

    import torch

    from asrlive._bench_serve import _transcriber
    from asrlive._bench_stream import Setup, bench_model
    from asrlive.web import AsrServer, ServerOptions, run_server

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = bench_model(args.size, getattr(torch, args.dtype), args.device, args.quantize, args.plain_weights)
    setup = Setup.of(args.size, model)
    # No lag limit: a CPU that falls behind still takes the soak's sessions (as `bench serve`).
    options = ServerOptions(host="127.0.0.1", port=0, max_sessions=args.max_sessions, max_lag_s=0)
    server = AsrServer(model, options, _transcriber)

    def ready(server: AsrServer) -> None:
        model = {**setup.fields(), "line": setup.line()}
        print(f"{READY} {server.url} {json.dumps(model)}", flush=True)

    asyncio.run(run_server(server, ready))


if __name__ == "__main__":
    serve(sys.argv[1:])
