"""The Qwen3-ASR prompt as token ids, and the model's answer parsed back into language + text.

Prompt (the system turn is always present, the context may be empty)::

    <|im_start|>system\\n{context}<|im_end|>\\n<|im_start|>user\\n<|audio_start|>
    {<|audio_pad|> x N}
    <|audio_end|><|im_end|>\\n<|im_start|>assistant\\n[language {Name}<asr_text>]

The prompt is tokenized in two pieces around the audio pads. Every piece boundary falls on a
special token, which BPE never merges across, so the ids equal those of the whole string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from transformers.models.qwen3_asr.processing_qwen3_asr import LANGUAGE_CODE_TO_NAME

ASR_TEXT = "<asr_text>"
LANGUAGES: tuple[str, ...] = tuple(sorted(LANGUAGE_CODE_TO_NAME.values()))

_BY_LOWER = {name.lower(): name for name in LANGUAGES} | {
    code.lower(): name for code, name in LANGUAGE_CODE_TO_NAME.items()
}
# A pattern of 1-20 characters repeated 20 times or more: the reference collapses it to one copy.
_REPEATS = re.compile(r"(.{1,20}?)\1{19,}", re.DOTALL)


def normalize_language(language: str | None) -> str | None:
    """``None``/``"auto"`` for detection, else the model's name for it ("English" from "en" or "english")."""
    if language is None or language.strip().lower() in ("", "auto"):
        return None
    name = _BY_LOWER.get(language.strip().lower())
    if name is None:
        raise ValueError(f"unknown language {language!r}; use 'auto' or one of: {', '.join(LANGUAGES)}")
    return name


class TextEncoder(Protocol):
    """What the prompt needs of a tokenizer (transformers' tokenizers have it)."""

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]: ...


@dataclass(frozen=True)
class PromptIds:
    """Token ids before and after the audio pads."""

    prefix: list[int]  # system turn .. <|audio_start|>
    suffix: list[int]  # <|audio_end|> .. assistant turn (+ forced language)


def build_prompt(tokenizer: TextEncoder, context: str, language: str | None) -> PromptIds:
    prefix = f"<|im_start|>system\n{context}<|im_end|>\n<|im_start|>user\n<|audio_start|>"
    suffix = "<|audio_end|><|im_end|>\n<|im_start|>assistant\n"
    if language is not None:
        suffix += f"language {language}{ASR_TEXT}"
    encode = tokenizer.encode
    return PromptIds(encode(prefix, add_special_tokens=False), encode(suffix, add_special_tokens=False))


def collapse_repetitions(text: str) -> str:
    """Collapse any run of a short pattern repeated 20+ times to a single copy (a looping model)."""
    return _REPEATS.sub(r"\1", text)


def parse_answer(decoded: str, forced_language: str | None) -> tuple[str | None, str]:
    """Split ``language English<asr_text>the text`` into (language, text); silence gives language None."""
    decoded = collapse_repetitions(decoded)
    if forced_language is not None:
        return forced_language, decoded.strip()
    if ASR_TEXT not in decoded:
        return None, decoded.strip()
    head, text = decoded.split(ASR_TEXT, 1)
    head = head.strip()
    language = head[len("language ") :].strip() if head.lower().startswith("language ") else head
    if language.lower() in ("", "none"):
        return None, text.strip()
    return language, text.strip()
