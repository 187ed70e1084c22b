"""The inference engine: checkpoint loading, features, encoder and decoder drivers (torch; no I/O loop).

Names are imported on first use (PEP 562): the command line and the server's options read
``DecodingOptions`` and the model names without paying for torch and transformers.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from ._options import DEFAULT_ALIGNER, DEFAULT_MODEL, DTYPE_NAMES, KNOWN_MODELS, MAX_SEGMENT_SECONDS, DecodingOptions

if TYPE_CHECKING:
    from asrlive._audio import SAMPLE_RATE, AudioError, load_audio, to_model_rate

    from ._aligner import Aligner, AlignmentError
    from ._batch import run_batch
    from ._checkpoint import ModelLoadError
    from ._incremental import Hypothesis, StreamTranscriber, UtteranceDecoder
    from ._model import DTYPES, AsrModel, ModelInfo, resolve_device, resolve_dtype
    from ._offline import Segment, Transcription, transcribe
    from ._prompt import LANGUAGES, normalize_language

# transformers imports torchao whenever it is installed (it is optional here: --quantize int8), and
# torchao then reports CUDA kernels that a CPU machine cannot load, torch a deprecation of its
# own, on every start. Neither is the user's concern.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

_LAZY = {
    "asrlive._audio": ("SAMPLE_RATE", "AudioError", "load_audio", "to_model_rate"),
    "._aligner": ("Aligner", "AlignmentError"),
    "._batch": ("run_batch",),
    "._checkpoint": ("ModelLoadError",),
    "._incremental": ("Hypothesis", "StreamTranscriber", "UtteranceDecoder"),
    "._model": ("DTYPES", "AsrModel", "ModelInfo", "resolve_device", "resolve_dtype"),
    "._offline": ("Segment", "Transcription", "transcribe"),
    "._prompt": ("LANGUAGES", "normalize_language"),
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


__all__ = [
    "DEFAULT_ALIGNER",
    "DEFAULT_MODEL",
    "DTYPES",
    "DTYPE_NAMES",
    "KNOWN_MODELS",
    "LANGUAGES",
    "MAX_SEGMENT_SECONDS",
    "SAMPLE_RATE",
    "Aligner",
    "AlignmentError",
    "AsrModel",
    "AudioError",
    "DecodingOptions",
    "Hypothesis",
    "ModelInfo",
    "ModelLoadError",
    "Segment",
    "StreamTranscriber",
    "Transcription",
    "UtteranceDecoder",
    "load_audio",
    "normalize_language",
    "resolve_device",
    "resolve_dtype",
    "run_batch",
    "to_model_rate",
    "transcribe",
]
