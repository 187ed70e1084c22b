"""The ``asrlive`` command line: one console script, one subcommand per task.

Building the parser imports nothing heavy: each subcommand's module imports torch, the server or
the client only when it runs, so ``--help`` and the client commands start at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from asrlive import __version__, _cli_align, _cli_bench, _cli_live, _cli_serve, _cli_transcribe
from asrlive._cli_common import EXIT_INTERRUPTED, EXIT_USAGE, UsageError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
        return code
    except UsageError as exc:
        print(f"asrlive {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("asrlive: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asrlive", description="Streaming speech transcription with Qwen3-ASR.")
    parser.add_argument("--version", action="version", version=f"asrlive {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _cli_transcribe.add_command(commands)
    _cli_align.add_command(commands)
    _cli_serve.add_commands(commands)
    _cli_live.add_commands(commands)
    _cli_bench.add_command(commands)
    return parser
