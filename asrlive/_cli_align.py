"""``asrlive align``: the time of every word of a known text in an audio file (Qwen3-ForcedAligner).

Output: ``--format json`` (default) ``{"file", "language", "duration", "text", "words": [{"text",
"start", "end"}]}``, times in seconds; ``--format text``: one word per line, ``START<TAB>END<TAB>WORD``.
The words are the aligner's units: the text's words without punctuation, each CJK character alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from asrlive._cli_common import (
    UsageError,
    add_aligner_option,
    add_device_options,
    add_dtype_option,
    add_weights_cache_option,
    check_device_options,
    check_input_file,
    check_output_file,
    load_aligner,
    require_server_extra,
    warn,
    weights_cache_dir,
)
from asrlive.clients._transcript import write_whole

if TYPE_CHECKING:
    from asrlive._cli_common import Commands
    from asrlive._words import Word

MAX_TEXT_BYTES = 10_000_000  # a text file larger than this is not the transcript of 400 s of speech


def add_command(commands: Commands) -> None:
    cmd = commands.add_parser(
        "align",
        help="time every word of a known transcript in an audio file",
        description="Time every word of a known transcript in an audio file, with Qwen3-ForcedAligner "
        "(at most 400 s of audio per file; 11 languages).",
    )
    cmd.add_argument("audio", metavar="AUDIO", help="WAV, FLAC, MP3, M4A, MP4, ... any rate and channels")
    text = cmd.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the transcript")
    text.add_argument("--text-file", metavar="FILE", help="a UTF-8 file holding the transcript")
    cmd.add_argument(
        "--language",
        default=None,
        help="the transcript's language, a name or code (English, en, zh, ja, ...); Japanese and Korean are "
        "split into words by a segmenter. Default: split at spaces, CJK characters one by one",
    )
    add_aligner_option(cmd)
    add_dtype_option(cmd, "bfloat16 where the hardware computes in it, else float32")
    add_device_options(cmd)
    add_weights_cache_option(cmd)
    cmd.add_argument("--format", choices=("json", "text"), default="json", help="(default: %(default)s)")
    cmd.add_argument("--output", metavar="FILE", default=None, help="write here (default: standard output)")
    cmd.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    require_server_extra()
    check_input_file(args.audio)
    text = args.text if args.text is not None else _read_text(args.text_file)
    language = _check_language(args.language)
    output = Path(args.output) if args.output is not None else None
    if output is not None:
        check_output_file(output)
    check_device_options(args.device, args.quantize)
    from asrlive._audio import SAMPLE_RATE, AudioError, load_audio
    from asrlive.engine._align_text import MissingSegmenter, split_units

    try:
        split_units(text, language)  # a missing word segmenter is said before the model loads
        audio = load_audio(args.audio, on_warning=lambda message: warn("align", f"{message}; aligning what was read"))
    except (MissingSegmenter, AudioError) as exc:
        raise UsageError(str(exc)) from None
    cache = weights_cache_dir(args.weights_cache)
    aligner = load_aligner(args.aligner, args.dtype, args.device, args.quantize, args.plain_weights, cache)
    from asrlive.engine._aligner import AlignmentError

    if sys.stderr.isatty():  # one forward, but minutes on a CPU for a long file: say what is going on
        warn("align", f"timing the words of {audio.size / SAMPLE_RATE:.1f} s of audio ...")
    try:
        words = aligner.align(audio, text, language)
    except AlignmentError as exc:
        raise UsageError(str(exc)) from None
    record = {
        "file": args.audio,
        "language": language,
        "duration": round(audio.size / SAMPLE_RATE, 6),
        "text": text,
        "words": [word.to_json() for word in words],
    }
    rendered = json.dumps(record, ensure_ascii=False) + "\n" if args.format == "json" else _lines(words)
    _write(rendered, output)
    return 0


def _read_text(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--text-file {path}: no such file")
    if file.stat().st_size > MAX_TEXT_BYTES:
        raise UsageError(f"--text-file {path}: larger than {MAX_TEXT_BYTES // 1_000_000} MB; not a transcript")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--text-file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"--text-file {path}: {exc.strerror}") from None


def _check_language(language: str | None) -> str | None:
    from asrlive.engine._align_text import aligner_language

    try:
        return aligner_language(language)
    except ValueError as exc:
        raise UsageError(f"--language {language}: {exc}") from None


def _lines(words: list[Word]) -> str:
    return "".join(f"{word.start:.3f}\t{word.end:.3f}\t{word.text}\n" for word in words)


def _write(rendered: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(rendered)
        sys.stdout.flush()
        return
    write_whole(output, rendered)
