"""The inference engine: checkpoint loading, features, encoder and decoder drivers (torch; no I/O loop)."""

from ._audio import SAMPLE_RATE, AudioError, load_audio, to_model_rate
from ._batch import run_batch
from ._checkpoint import DEFAULT_MODEL, KNOWN_MODELS, ModelLoadError
from ._incremental import Hypothesis, StreamTranscriber, UtteranceDecoder
from ._model import DTYPES, AsrModel, ModelInfo, resolve_dtype
from ._offline import DecodingOptions, Segment, Transcription, transcribe
from ._prompt import LANGUAGES, normalize_language

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "KNOWN_MODELS",
    "LANGUAGES",
    "SAMPLE_RATE",
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
    "resolve_dtype",
    "run_batch",
    "to_model_rate",
    "transcribe",
]
