"""What every subcommand shares: exit codes, model options, checks made before anything loads.

Exit codes, the same in every command: 0 done; 1 it ran but part of the work failed (a file among
several, a stream that lost its server, a load test with errors); 2 nothing could be done (bad
arguments, a missing or unreadable input, an output that cannot be written, a model that cannot
be loaded, a port in use, missing dependencies); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from asrlive.engine import DEFAULT_MODEL, DTYPE_NAMES
from asrlive.engine._options import DEFAULT_ALIGNER, DEVICE_HELP, QUANTIZE_NAMES

if TYPE_CHECKING:
    import torch

    from asrlive.engine import AsrModel
    from asrlive.engine._aligner import Aligner

    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# What `asrlive serve`, `transcribe` and `bench` need beyond a client install (`asrlive[server]`).
SERVER_MODULES = ("torch", "transformers", "safetensors", "aiortc", "prometheus_client", "starlette", "h11")


# The options' messages name their fields; a person typed flags.
FLAGS = {
    "max_new_tokens": "--max-new-tokens",
    "max_segment_seconds": "--max-segment-seconds",
    "partial_interval_ms": "--partial-interval-ms",
    "vad aggressiveness": "--vad-aggressiveness",
    "end_silence_ms": "--end-silence-ms",
    "max_utterance_s": "--max-utterance-seconds",
    "max_sessions": "--max-sessions",
    "max_batch": "--max-batch",
    "max_frame_bytes": "--max-frame-bytes",
    "max_upload_bytes": "--max-upload-mb",
    "idle_timeout_s": "--idle-timeout",
    "max_session_s": "--max-session-seconds",
    "certfile and keyfile": "--certfile and --keyfile",
    "allowed_origins": "--allowed-origins",
}
_FIELDS = re.compile(r"\b(" + "|".join(map(re.escape, FLAGS)) + r")\b")


class UsageError(Exception):
    """A problem with the command line or its inputs, found before any work: exit status 2."""


def invalid_options(exc: ValueError) -> UsageError:
    """An options dataclass refused a value: the same message, in the flags' names."""
    return UsageError(_FIELDS.sub(lambda match: FLAGS[match[1]], str(exc)))


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Hugging Face id or local checkpoint directory (default: {DEFAULT_MODEL})",
    )
    add_dtype_option(parser, "bfloat16 where the hardware computes in it, else float32")
    add_device_options(parser)
    add_weights_cache_option(parser)


def add_aligner_option(parser: argparse.ArgumentParser, default_help: str | None = None) -> None:
    """``--aligner``: the forced aligner (word timestamps), found and loaded by the same rules as ``--model``.

    With ``default_help`` it has no default value (None: the command decides, and says so there).
    """
    parser.add_argument(
        "--aligner",
        metavar="ID_OR_DIR",
        default=DEFAULT_ALIGNER if default_help is None else None,
        help="Qwen3-ForcedAligner for word timestamps: Hugging Face id or local checkpoint directory "
        f"(default: {default_help or DEFAULT_ALIGNER})",
    )


def add_loop_cut_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-loop-cut",
        action="store_true",
        help="decode on to the end of the answer or the token budget where the model repeats itself, "
        "token-identical to transformers' generate (default: stop where the tokens repeat a pattern of up to "
        "16 over the last 40 or more, keeping one copy)",
    )


def add_dtype_option(parser: argparse.ArgumentParser, default_help: str) -> None:
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPE_NAMES],
        default="auto",
        help=f"weights and activations (default: {default_help})",
    )


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=f"where the model runs: {DEVICE_HELP} (default: %(default)s)")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_NAMES,
        default=None,
        help="int8: 8-bit weights for the LLM and the audio encoder (fbgemm); int4: 4-bit weights for the LLM "
        "(torchao + torch's int4 kernel), the encoder at 8 bits. Off by default: their accuracy cannot be "
        "checked without real weights",
    )
    parser.add_argument(
        "--plain-weights",
        action="store_true",
        help="on a CPU, multiply by the weights as loaded (F.linear): bit-identical to transformers, decode "
        "about 1.5x slower (default: oneDNN's packed layout, exact up to float32 rounding)",
    )


def add_weights_cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights-cache",
        default=None,
        metavar="DIR",
        help="keep the weights converted to the engine's layout here, so later starts map them instead of "
        "converting again; 'none' turns it off (default: asrlive/weights in the Hugging Face home, "
        "~/.cache/huggingface unless HF_HOME says otherwise)",
    )


def weights_cache_dir(value: str | None) -> Path | None:
    """The directory --weights-cache names: the default one, or None for 'none'."""
    if value is None:
        from asrlive.engine._cache import default_cache_dir

        return default_cache_dir()
    return None if value.lower() == "none" else Path(value).expanduser()


def check_device_options(device: str, quantize: str | None) -> torch.device:
    """The device --device names, checked with --quantize before a model loads: a missing GPU or torchao is
    said at once, not after the weights are read."""
    from asrlive.engine import ModelLoadError
    from asrlive.engine._model import resolve_device
    from asrlive.engine._weights import check_quantize

    try:
        resolved = resolve_device(device)
    except ValueError as exc:
        raise UsageError(f"--device {device}: {exc}") from None
    try:
        check_quantize(quantize)
    except ModelLoadError as exc:  # torchao missing: the message names the flag and the package
        raise UsageError(str(exc)) from None
    return resolved


def require_server_extra() -> None:
    """The model and server dependencies are an extra: say how to get them instead of an ImportError."""
    missing = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(
            f"this command runs the model and needs {', '.join(missing)}, which a client-only install lacks.\n"
            "Install the server extra: pip install 'asrlive[server]' (see the README for the CPU-only torch)."
        )


def check_input_file(path: str) -> None:
    """A missing path, a directory or an unreadable file is reported before any model loads."""
    from asrlive._audio import AudioError, check_path

    try:
        check_path(path)
    except AudioError as exc:
        raise UsageError(str(exc)) from None


def check_output_file(path: Path) -> None:
    """An output that cannot be written is reported now, not after minutes of transcription."""
    if path.is_dir():
        raise UsageError(f"--output {path}: is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"--output {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"--output {path}: permission denied")


def warn(command: str, message: str) -> None:
    print(f"asrlive {command}: {message}", file=sys.stderr, flush=True)


def load_model(
    model: str,
    dtype: str,
    device: str = "auto",
    quantize: str | None = None,
    plain_weights: bool = False,
    weights_cache: Path | None = None,
) -> AsrModel:
    """Load the model for a command: a checkpoint that cannot be had is a usage error (exit 2).

    Call ``check_device_options`` first: the device and quantization are refused before any loading.
    """
    quiet_libraries()
    from asrlive.engine import AsrModel, ModelLoadError

    try:
        return AsrModel.load(model, dtype, device, quantize, plain_weights, weights_cache)
    except ModelLoadError as exc:
        raise UsageError(f"cannot load the model.\n{exc}") from None


def load_aligner(
    aligner: str,
    dtype: str,
    device: str = "auto",
    quantize: str | None = None,
    plain_weights: bool = False,
    weights_cache: Path | None = None,
) -> Aligner:
    """Load the forced aligner for a command, like ``load_model``: one that cannot be had is a usage error."""
    quiet_libraries()
    from asrlive.engine import ModelLoadError
    from asrlive.engine._aligner import Aligner

    try:
        return Aligner.load(aligner, dtype, device, quantize, plain_weights, weights_cache)
    except ModelLoadError as exc:
        raise UsageError(f"cannot load the aligner.\n{exc}") from None


def quiet_libraries() -> None:
    """Library chatter says nothing to the user: warnings about generation flags of the checkpoint's
    generation_config (never used: asrlive decodes greedily itself), and progress bars off a terminal."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # untyped in transformers
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
