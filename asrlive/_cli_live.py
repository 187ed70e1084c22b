"""``asrlive mic`` and ``asrlive stream``: live captions from a microphone or a file, through a server.

Both run the same client (``asrlive.clients.LiveStream``): it reconnects on a dropped connection
and resends the audio no final covers yet. Ctrl-C stops the capture and waits for the last final;
a second Ctrl-C stops at once. The transcript file (if asked for) is rewritten after every final,
so whatever happens to the process, the finals received so far are on disk.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from asrlive._audio import AudioError, load_audio
from asrlive._cli_common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    UsageError,
    check_input_file,
    check_output_file,
    warn,
)
from asrlive.clients._display import Captions
from asrlive.clients._live import LiveOptions, LiveStream, StreamFailed
from asrlive.clients._sources import (
    NO_INPUT,
    MicrophoneError,
    file_chunks,
    find_input_device,
    input_devices,
    microphone,
)
from asrlive.clients._transcript import FORMATS

if TYPE_CHECKING:
    from asrlive._cli_common import Commands

DEFAULT_SERVER = "ws://127.0.0.1:8765/v1/stream"

Source = Callable[[asyncio.Event], AsyncIterator[np.ndarray]]


def add_commands(commands: Commands) -> None:
    mic = commands.add_parser(
        "mic",
        help="live captions from a microphone, transcribed by a server",
        description="Capture a microphone, stream it to an asrlive server and show live captions. "
        "Ctrl-C stops and waits for the last final; twice stops at once.",
    )
    mic.add_argument("--device", default=None, metavar="N|NAME", help="input device index or name part")
    mic.add_argument("--list-devices", action="store_true", help="list the input devices and exit")
    _add_client_options(mic)
    mic.set_defaults(run=_run_mic)
    stream = commands.add_parser(
        "stream",
        help="live captions for an audio file, transcribed by a server",
        description="Stream an audio file to an asrlive server as a live client would; print the finals.",
    )
    stream.add_argument(
        "file", metavar="FILE", help="audio or video file (wav, flac, ogg, mp3, m4a, mp4, webm, ...; any rate)"
    )
    stream.add_argument("--realtime", action="store_true", help="send at real-time pace (default: as fast as taken)")
    _add_client_options(stream)
    stream.set_defaults(run=_run_stream)


def _add_client_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--server", default=DEFAULT_SERVER, metavar="URL", help="(default: %(default)s)")
    cmd.add_argument("--token", default=os.environ.get("ASRLIVE_TOKEN"), help="(default: $ASRLIVE_TOKEN)")
    cmd.add_argument("--language", default=None, help="force a language, e.g. English or en (default: detect)")
    cmd.add_argument("--context", default="", help="text to bias the transcription: names, terms")
    cmd.add_argument("--no-partials", action="store_true", help="finals only")
    cmd.add_argument(
        "--timestamps",
        action="store_true",
        help="word times on every final, for subtitles cut at words (the server needs --aligner)",
    )
    cmd.add_argument(
        "--output", type=Path, default=None, metavar="FILE", help=f"write the transcript ({', '.join(FORMATS)})"
    )


def _run_mic(args: argparse.Namespace) -> int:
    options = _live_options(args, max_attempts=0)
    try:
        if args.list_devices:
            devices = input_devices()
            if not devices:
                raise MicrophoneError(NO_INPUT)
            for device in devices:
                print(f"{device.index:>3}  {device.name}  ({device.sample_rate} Hz, {device.channels} ch)")
            return 0
        device = find_input_device(args.device)
    except MicrophoneError as exc:
        print(f"asrlive mic: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"asrlive mic: {device.name} at {device.sample_rate} Hz -> {args.server}", file=sys.stderr, flush=True)
    overflows = 0

    def overflowed() -> None:
        nonlocal overflows
        overflows += 1

    code = _run_live(args, options, lambda stop: microphone(device, stop, on_overflow=overflowed))
    if overflows:
        print(f"asrlive mic: the capture overflowed {overflows} times (audio lost)", file=sys.stderr)
    return code


def _run_stream(args: argparse.Namespace) -> int:
    check_input_file(args.file)
    options = _live_options(args, max_attempts=5)
    try:
        audio = load_audio(args.file, on_warning=lambda message: warn("stream", message))
    except AudioError as exc:
        raise UsageError(str(exc)) from None
    return _run_live(args, options, lambda stop: file_chunks(audio, args.realtime, stop))


def _live_options(args: argparse.Namespace, max_attempts: int) -> LiveOptions:
    """Everything checkable is checked before a microphone opens or a file is read."""
    if args.output is not None:
        if args.output.suffix.lower() not in FORMATS:
            raise UsageError(f"--output must end in {', '.join(FORMATS)}")
        check_output_file(args.output)
    try:
        return LiveOptions(
            args.server,
            language=args.language,
            context=args.context,
            partials=not args.no_partials,
            timestamps=args.timestamps,
            token=args.token,
            max_attempts=max_attempts,
        )
    except ValueError as exc:
        raise UsageError(f"--server: {exc}") from None


def _run_live(args: argparse.Namespace, options: LiveOptions, source: Source) -> int:
    captions = Captions()
    try:
        return asyncio.run(_live(options, source, captions, args.output))
    except StreamFailed as exc:
        print(f"asrlive {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except MicrophoneError as exc:
        print(f"asrlive {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        captions.close()
        if args.output is not None:
            captions.transcript.write(args.output)


async def _live(options: LiveOptions, source: Source, captions: Captions, output: Path | None) -> int:
    stop = asyncio.Event()
    _on_interrupt(stop, asyncio.current_task())

    def on_event(event: dict[str, Any]) -> None:
        captions.on_event(event)
        if event["type"] == "final" and output is not None:
            captions.transcript.write(output)

    async def tapped() -> AsyncIterator[np.ndarray]:
        async for pcm in source(stop):
            captions.on_audio(pcm)
            yield pcm

    try:
        await LiveStream(options, on_event).run(tapped())
    except asyncio.CancelledError:
        print("asrlive: stopped without waiting for the last final", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _on_interrupt(stop: asyncio.Event, task: asyncio.Task[int] | None) -> None:
    """First SIGINT/SIGTERM: stop capturing and finish; the second: stop now."""

    def interrupted() -> None:
        if stop.is_set() and task is not None:
            task.cancel()
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupted)
