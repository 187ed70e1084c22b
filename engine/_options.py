"""Names and options that the command line and the server read without loading torch."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "Qwen/Qwen3-ASR-0.6B"
KNOWN_MODELS = ("Qwen/Qwen3-ASR-0.6B", "Qwen/Qwen3-ASR-1.7B")
DEFAULT_ALIGNER = "Qwen/Qwen3-ForcedAligner-0.6B"
DTYPE_NAMES = ("float32", "bfloat16")
DEVICE_HELP = "auto (CUDA when present, else the CPU), cpu, cuda or cuda:N"
QUANTIZE_NAMES = ("int8", "int4")  # LLM linears and head; the encoder at 8 bits (engine/_weights.py)
MAX_SEGMENT_SECONDS = 60.0


@dataclass(frozen=True)
class DecodingOptions:
    language: str | None = None  # None: detect; else a name or code ("English", "en")
    context: str = ""  # free text for the system turn: hotwords, domain terms
    max_new_tokens: int | None = None  # None: a budget proportional to the audio length
    max_segment_seconds: float = MAX_SEGMENT_SECONDS  # longer audio is cut at its quietest points
    cut_loops: bool = True  # stop a decode that repeats a pattern (engine/_loops.py); off: exactly `generate`

    def __post_init__(self) -> None:
        if self.language is not None:
            # The language table comes with transformers: imported only when a language is named.
            from ._prompt import normalize_language

            object.__setattr__(self, "language", normalize_language(self.language))
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.max_segment_seconds < 1:
            raise ValueError("max_segment_seconds must be at least 1")
