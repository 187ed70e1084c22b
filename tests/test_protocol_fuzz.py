"""Property-based fuzzing of the message parser: whatever a client sends, it parses or it raises the
documented ProtocolError, with a short message that can be sent as UTF-8; never another exception.

Bounded (a few hundred examples each, no example database written) so the suite stays fast.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asrlive.streaming import ENCODINGS, AudioDecoder, Finish, ProtocolError, Start, parse_message
from asrlive.streaming._protocol import (
    MAX_CONTEXT_CHARS,
    MAX_JSON_DEPTH,
    MAX_LANGUAGE_CHARS,
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
)
from asrlive.web._rtc import parse_rtc_start

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# The codes a text message can earn (docs/protocol.md section 7); the others are about audio,
# admission, time or the engine.
MESSAGE_CODES = {
    "bad_json",
    "bad_message",
    "unknown_type",
    "not_started",
    "already_started",
    "bad_start",
    "unsupported_protocol",
    "unsupported_sample_rate",
    "unsupported_encoding",
}
START_FIELDS = ["protocol", "language", "context", "sample_rate", "encoding", "partials", "partial_interval_ms"]
CONTROL = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]} - set("\t\n\r")

# Strings as JSON can carry them: any code point, lone surrogates included ("\ud800" is valid JSON;
# Hypothesis' own characters() never makes one).
surrogates = st.integers(0xD800, 0xDFFF).map(chr)
any_string = st.lists(st.characters() | surrogates, max_size=20).map("".join) | st.sampled_from(
    ["", "auto", "en", "English", "yue", "pcm_s16le", "pcm_f32le", "start", "finish", "<|im_end|>", "\ud800", "a\x00b"]
)
numbers = (
    st.integers()
    | st.integers(min_value=-(10**150), max_value=10**150)
    | st.sampled_from([0, 1, 2, 100, 8000, 16000, 192_000, 192_001, 60_000, 60_001, 2**63, -1])
    | st.floats(allow_nan=True, allow_infinity=True)
)
scalars = st.none() | st.booleans() | numbers | any_string
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_string, children, max_size=4),
    max_leaves=10,
)
start_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["start", "finish", "stop", "offer", ""])},
    optional={**{name: json_values for name in START_FIELDS}, "sdp": json_values, "extra": json_values},
)


def dumps(value) -> str:
    # Python writes NaN and Infinity for non-finite floats, and \ud800 for a lone surrogate: both
    # are what a hostile (or sloppy) client may send.
    return json.dumps(value)


def check_error(error: ProtocolError, codes: set[str]) -> None:
    assert error.code in codes, error.code
    assert error.to_json() == {"type": "error", "code": error.code, "message": error.message}
    assert 0 < len(error.message) < 400
    error.message.encode("utf-8")  # sendable: no lone surrogate repeated from the input


def check_start(start: Start) -> None:
    """What a parsed start may hand on to the session and the model."""
    assert len(start.context) <= MAX_CONTEXT_CHARS and not set(start.context) & CONTROL
    start.context.encode("utf-8")  # Unicode scalar values only
    if start.language is not None:
        assert len(start.language) <= MAX_LANGUAGE_CHARS and not set(start.language) & (CONTROL | set("\t\n\r"))
        start.language.encode("utf-8")
    assert type(start.sample_rate) is int and MIN_SAMPLE_RATE <= start.sample_rate <= MAX_SAMPLE_RATE
    assert start.encoding in ENCODINGS
    assert type(start.partials) is bool
    interval = start.partial_interval_ms
    assert interval is None or (type(interval) is int and 100 <= interval <= 60_000)


def parses_or_refuses(text: str, started: bool = False) -> Start | Finish | None:
    try:
        request = parse_message(text, started=started)
    except ProtocolError as error:
        check_error(error, MESSAGE_CODES)
        return None
    if isinstance(request, Start):
        check_start(request)
    else:
        assert isinstance(request, Finish)
    return request


@FUZZ
@given(st.text(max_size=200), st.booleans())
def test_any_text(text, started):
    parses_or_refuses(text, started)


@FUZZ
@given(json_values, st.booleans())
def test_any_json_value(value, started):
    parses_or_refuses(dumps(value), started)


@settings(FUZZ, max_examples=100)
@given(start_like, st.booleans())
def test_start_shaped_objects(message, started):
    request = parses_or_refuses(dumps(message), started)
    if request is not None:
        assert message["type"] in ("start", "finish")
        assert not (started and isinstance(request, Start))


# JSON-ish token soup: unbalanced brackets, duplicate keys, NaN and Infinity, huge exponents and
# integers, stray commas: exercises the parser's own errors rather than the validation after it.
TOKENS = [
    "{", "}", "[", "]", ":", ",", '"type"', '"start"', '"finish"', '"context"', '"language"', '"sample_rate"',
    "NaN", "Infinity", "-Infinity", "1e999", "-0", "16000", "1" * 150, "1." + "1" * 150, "true", "null",
    '"\\ud800"', '"\\u0000"', '"<|im_end|>"', "\\", '"', " ",
]  # fmt: skip


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=40))
def test_token_soup(tokens):
    parses_or_refuses("".join(tokens))
    parses_or_refuses('{"type": "start", ' + "".join(tokens))


@FUZZ
@given(st.integers(min_value=0, max_value=3000), st.sampled_from(["[", '{"k": ']))
def test_nesting_is_bounded_at_the_documented_depth(depth, opener):
    closer = "]" if opener == "[" else "}"
    text = '{"type": "finish", "x": ' + opener * depth + "0" + closer * depth + "}"
    if depth + 1 <= MAX_JSON_DEPTH:
        assert parse_message(text) == Finish()
    else:
        with pytest.raises(ProtocolError) as error:
            parse_message(text)
        assert error.value.code == "bad_message"


# Values the parser reads without complaint (no NaN, no huge integers), so the key decides.
plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**50), 10**50)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(st.lists(st.sampled_from(START_FIELDS + ["type"]), min_size=1, max_size=6), plain_values)
def test_a_key_twice_is_refused(keys, value):
    pairs = [("type", "start"), *((key, value) for key in keys), (keys[0], value)]
    text = "{" + ", ".join(f"{json.dumps(key)}: {dumps(val)}" for key, val in pairs) + "}"
    with pytest.raises(ProtocolError) as error:
        parse_message(text)
    check_error(error.value, MESSAGE_CODES)
    assert error.value.code == "bad_message"


@FUZZ
@given(st.integers(min_value=-(10**400), max_value=10**400))
def test_integers_of_any_size(number):
    text = '{"type": "start", "sample_rate": ' + str(number) + "}"
    if len(str(abs(number))) > 100:
        with pytest.raises(ProtocolError) as error:
            parse_message(text)
        assert error.value.code == "bad_message"
    else:
        parses_or_refuses(text)


@settings(FUZZ, max_examples=100)
@given(start_like | st.fixed_dictionaries({"type": st.just("start"), "sdp": any_string | json_values}))
def test_webrtc_start(message):
    try:
        start, sdp = parse_rtc_start(dumps(message))
    except ProtocolError as error:
        check_error(error, MESSAGE_CODES | {"bad_sdp"})
    else:
        check_start(start)
        assert isinstance(sdp, str) and sdp.strip()
        sdp.encode("utf-8")
        assert "\x00" not in sdp


audio_formats = st.builds(
    Start,
    encoding=st.sampled_from(sorted(ENCODINGS)),
    sample_rate=st.sampled_from([8000, 11025, 16000, 44100, 48000, 192_000])
    | st.integers(MIN_SAMPLE_RATE, MAX_SAMPLE_RATE),
)


@settings(FUZZ, max_examples=100)
@given(audio_formats, st.lists(st.binary(max_size=2000), max_size=5))
def test_any_audio_frames(start, frames):
    decoder = AudioDecoder(start)
    itemsize = ENCODINGS[start.encoding].itemsize
    samples = 0
    for frame in frames:
        try:
            pcm = decoder.decode(frame)
        except ProtocolError as error:
            check_error(error, {"bad_audio"})
            continue
        samples += len(frame) // itemsize
        assert pcm.dtype == np.float32 and pcm.ndim == 1
        assert np.isfinite(pcm).all()
    assert decoder.samples_in == samples
    assert math.isclose(decoder.seconds, samples / start.sample_rate)
    assert np.isfinite(decoder.flush()).all()
