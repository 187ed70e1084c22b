"""Prompt ids, language names and the parsing of the model's answer."""

from __future__ import annotations

import pytest

from asrlive.engine import DecodingOptions, normalize_language
from asrlive.engine._prompt import build_prompt, collapse_repetitions, parse_answer


def test_prompt_matches_the_reference_chat_template(load_model, reference):
    tokenizer = load_model("original").tokenizer
    prompt = build_prompt(tokenizer, "hotword list", "French")
    rendered = reference().processor.apply_transcription_request(
        audio=[0.0] * 16000, language="French", prompt="hotword list", tokenize=False
    )[0]
    head, tail = rendered.split("<|audio_pad|>")
    assert prompt.prefix == tokenizer.encode(head, add_special_tokens=False)
    assert prompt.suffix == tokenizer.encode(tail, add_special_tokens=False)
    assert (
        tokenizer.decode(prompt.suffix) == "<|audio_end|><|im_end|>\n<|im_start|>assistant\nlanguage French<asr_text>"
    )


@pytest.mark.parametrize(
    "given, name",
    [(None, None), ("auto", None), ("", None), ("en", "English"), ("english", "English"), ("yue", "Cantonese")],
)
def test_language_names(given, name):
    assert normalize_language(given) == name


def test_unknown_language_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown language 'Klingon'; use 'auto' or one of: Arabic, Cantonese"):
        DecodingOptions(language="Klingon")


@pytest.mark.parametrize(
    "decoded, forced, expected",
    [
        ("language English<asr_text>Hello there.", None, ("English", "Hello there.")),
        ("language None<asr_text>", None, (None, "")),
        ("no tag at all", None, (None, "no tag at all")),
        (" Bonjour.", "French", ("French", "Bonjour.")),
        ("language Chinese<asr_text>" + "哈" * 30, None, ("Chinese", "哈")),
    ],
)
def test_parse_answer(decoded, forced, expected):
    assert parse_answer(decoded, forced) == expected


def test_repetition_collapse():
    assert collapse_repetitions("ab" * 19 + "c") == "ab" * 19 + "c"  # 19 repeats: left alone
    assert collapse_repetitions("x " + "la " * 20 + "end") == "x la end"
    assert collapse_repetitions("a" * 25 + " then " + "no" * 40) == "a then no"
