"""The configuration of a Realtime transcription session: parsed from ``session.update`` (GA) or
``transcription_session.update`` (beta), validated, and written back as the session object of
``session.created``/``session.updated`` (GA) or ``transcription_session.created``/``.updated`` (beta).

The field names follow the openai SDK's types (``openai.types.realtime`` for GA,
``openai.types.beta.realtime`` for beta). An update changes only the fields it names, nested objects
included (a ``turn_detection`` object without ``silence_duration_ms`` keeps the current value, or the
server's default when it switches the type); ``null`` turns ``turn_detection`` and
``noise_reduction`` off and resets ``transcription`` to its default. Unknown fields and values of the
wrong type or out of range are refused, as OpenAI does, with ``invalid_request_error`` codes
(``unknown_parameter``, ``missing_required_parameter``, ``invalid_type``, ``invalid_value``) and the
field's path in ``param``.

What is accepted but has no effect here: ``noise_reduction`` (reported back, asrlive filters
nothing), ``include`` (reported back; no logprobs are sent), the transcription ``model`` (reported
back; the server has one model) and ``delay``, and the turn detection fields about model responses
(``create_response``, ``interrupt_response``, ``idle_timeout_ms``: a transcription session has no
responses). How turn detection maps to asrlive's VAD: see ``TurnDetection.vad``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

from ._protocol import MAX_CONTEXT_CHARS, MAX_LANGUAGE_CHARS, ProtocolError, check_text, quote
from ._realtime_audio import FORMATS, PCM, AudioFormat
from ._vad import VadOptions

MAX_PREFIX_PADDING_MS = 1000  # the Session keeps 2 s of audio before an utterance opens: room for this
MIN_SILENCE_MS, MAX_SILENCE_MS = 30, 30_000
EAGERNESS = ("low", "medium", "high", "auto")
# semantic_vad: the trailing silence that ends a turn, as a multiple of the server's end_silence_ms.
EAGERNESS_SILENCE = {"low": 2.0, "medium": 1.0, "auto": 1.0, "high": 0.5}
INCLUDE = ("item.input_audio_transcription.logprobs",)
NOISE_REDUCTION = ("near_field", "far_field")
DELAY = ("minimal", "low", "medium", "high", "xhigh")


class RealtimeError(Exception):
    """A client event refused: the ``error`` object of an ``error`` event."""

    def __init__(self, code: str, message: str, param: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.code, self.message, self.param, self.kind = code, message, param, kind


@dataclass(frozen=True)
class TurnDetection:
    type: str  # "server_vad" | "semantic_vad"
    threshold: float
    prefix_padding_ms: int
    silence_duration_ms: int
    eagerness: str = "auto"

    def vad(self, base: VadOptions) -> VadOptions:
        """asrlive's VAD (webrtcvad in 30 ms frames) for this turn detection; ``base``: the server's.

        server_vad: ``silence_duration_ms`` -> ``end_silence_ms`` (rounded up to 30 ms frames by the
        segmenter); ``prefix_padding_ms`` -> ``pad_ms``, which asrlive keeps both before the first and
        after the last voiced frame; ``threshold`` (0..1) -> webrtcvad's aggressiveness 0..3 in bins
        of 0.25 (0.5, OpenAI's default, is the server's default 2). The server's defaults map to its
        VadOptions exactly, so a client that changes nothing gets ``/v1/stream``'s utterances.
        semantic_vad: there is no turn model; ``eagerness`` scales the trailing silence (low x2,
        medium/auto x1, high x0.5 of the server's ``end_silence_ms``), the rest is the server's.
        """
        if self.type == "semantic_vad":
            silence = max(MIN_SILENCE_MS, round(base.end_silence_ms * EAGERNESS_SILENCE[self.eagerness]))
            return replace(base, end_silence_ms=silence)
        aggressiveness = min(3, int(self.threshold * 4))
        return replace(
            base, aggressiveness=aggressiveness, pad_ms=self.prefix_padding_ms, end_silence_ms=self.silence_duration_ms
        )

    def to_json(self, beta: bool) -> dict[str, Any]:
        if self.type == "semantic_vad":
            return {"type": "semantic_vad", "eagerness": self.eagerness}
        record: dict[str, Any] = {
            "type": "server_vad",
            "threshold": self.threshold,
            "prefix_padding_ms": self.prefix_padding_ms,
            "silence_duration_ms": self.silence_duration_ms,
        }
        if not beta:
            record["idle_timeout_ms"] = None
        return record


@dataclass(frozen=True)
class Transcription:
    model: str
    language: str | None = None  # as the client wrote it (ISO-639-1, or a name)
    prompt: str = ""
    keywords: tuple[str, ...] | None = None
    languages: tuple[str, ...] | None = None
    delay: str | None = None

    def to_json(self, beta: bool) -> dict[str, Any]:
        record: dict[str, Any] = {"model": self.model, "language": self.language, "prompt": self.prompt}
        if not beta:
            for name in ("keywords", "languages", "delay"):
                value = getattr(self, name)
                if value is not None:
                    record[name] = list(value) if isinstance(value, tuple) else value
        return record


@dataclass(frozen=True)
class NoiseReduction:
    type: str | None
    strength: float | None = None

    def to_json(self, beta: bool) -> dict[str, Any]:
        record: dict[str, Any] = {"type": self.type}
        if self.strength is not None and not beta:
            record["strength"] = self.strength
        return record


@dataclass(frozen=True)
class Config:
    format: AudioFormat
    transcription: Transcription
    turn_detection: TurnDetection | None
    noise_reduction: NoiseReduction | None = None
    include: tuple[str, ...] | None = None


def default_config(vad: VadOptions, model: str) -> Config:
    return Config(PCM, Transcription(model), default_turn_detection(vad))


def default_turn_detection(vad: VadOptions, kind: str = "server_vad") -> TurnDetection:
    return TurnDetection(kind, vad.aggressiveness / 4, vad.pad_ms, vad.end_silence_ms)


def session_object(config: Config, session_id: str, expires_at: int | None, beta: bool) -> dict[str, Any]:
    transcription = config.transcription.to_json(beta)
    turn_detection = config.turn_detection.to_json(beta) if config.turn_detection else None
    noise_reduction = config.noise_reduction.to_json(beta) if config.noise_reduction else None
    include = list(config.include) if config.include is not None else None
    record: dict[str, Any] = {"id": session_id, "object": "realtime.transcription_session"}
    if expires_at is not None:
        record["expires_at"] = expires_at
    if beta:
        return record | {
            "input_audio_format": config.format.beta,
            "input_audio_transcription": transcription,
            "turn_detection": turn_detection,
            "input_audio_noise_reduction": noise_reduction,
            "include": include,
        }
    audio_input = {
        "format": config.format.to_json(),
        "transcription": transcription,
        "noise_reduction": noise_reduction,
        "turn_detection": turn_detection,
    }
    return {"type": "transcription"} | record | {"audio": {"input": audio_input}, "include": include}


def decoding(
    config: Config,
    language_name: Callable[[str], str | None] | None,
    check_prompt: Callable[[str], None] | None,
    beta: bool,
) -> tuple[str | None, str]:
    """The model's language (None: detect) and the context for ``config``, or RealtimeError.

    The language is ``language``, else the one entry of ``languages``; ``language_name`` turns it
    into the model's name (raising ValueError for one it lacks). The context is the prompt and the
    keywords, one a line; ``check_prompt`` may refuse it.
    """
    transcription = config.transcription
    path = "session.input_audio_transcription" if beta else "session.audio.input.transcription"
    language = transcription.language
    if language is None and transcription.languages is not None and len(transcription.languages) == 1:
        language = transcription.languages[0]
    try:
        name = None
        if language is not None and language.strip().lower() not in ("", "auto"):
            check_text(language, "language", MAX_LANGUAGE_CHARS, "bad_start", multiline=False)
            name = language_name(language) if language_name is not None else language.strip()
    except (ProtocolError, ValueError) as exc:
        raise RealtimeError("invalid_value", _reason(exc), f"{path}.language") from None
    context = "\n".join(part for part in (transcription.prompt, *(transcription.keywords or ())) if part)
    try:
        check_text(context, "prompt", MAX_CONTEXT_CHARS, "bad_start", multiline=True)
        if check_prompt is not None:
            check_prompt(context)
    except (ProtocolError, ValueError) as exc:
        raise RealtimeError("invalid_value", _reason(exc), f"{path}.prompt") from None
    return name, context


def _reason(exc: ProtocolError | ValueError) -> str:
    if isinstance(exc, ProtocolError):
        return exc.message
    reason = str(exc)  # (the route's callable: short and printable, or quoted and cut)
    return reason if len(reason) <= 1000 and reason.isprintable() and reason.isascii() else quote(reason, 1000)


# -- parsing -------------------------------------------------------------------------------------


def update_ga(value: Any, current: Config, vad: VadOptions, model: str) -> Config:
    """``session.update``'s ``session``, applied to ``current``."""
    session = _object(value, "session")
    _known(session, ("type", "audio", "include"), "session")
    kind = _required(session, "type", "session")
    if kind != "transcription":
        raise RealtimeError(
            "invalid_value",
            f"Invalid value: {quote(kind)}. This is a transcription session: session.type must be 'transcription'.",
            "session.type",
        )
    config = current
    if "include" in session:
        config = replace(config, include=_include(session["include"], "session.include"))
    audio = _optional_object(session.get("audio"), "session.audio")
    if audio is None:
        return config
    _known(audio, ("input",), "session.audio")
    given = _optional_object(audio.get("input"), "session.audio.input")
    if given is None:
        return config
    path = "session.audio.input"
    _known(given, ("format", "transcription", "noise_reduction", "turn_detection"), path)
    if "format" in given:
        config = replace(config, format=_format_ga(given["format"], f"{path}.format"))
    if "transcription" in given:
        transcription = _transcription(given["transcription"], config.transcription, model, f"{path}.transcription")
        config = replace(config, transcription=transcription)
    if "noise_reduction" in given:
        config = replace(config, noise_reduction=_noise_reduction(given["noise_reduction"], f"{path}.noise_reduction"))
    if "turn_detection" in given:
        turn = _turn_detection(given["turn_detection"], config.turn_detection, vad, f"{path}.turn_detection", False)
        config = replace(config, turn_detection=turn)
    return config


_BETA_FIELDS = (
    "input_audio_format",
    "input_audio_transcription",
    "turn_detection",
    "input_audio_noise_reduction",
    "include",
    "modalities",
    "client_secret",
)


def update_beta(value: Any, current: Config, vad: VadOptions, model: str) -> Config:
    """``transcription_session.update``'s ``session``, applied to ``current``."""
    session = _object(value, "session")
    _known(session, _BETA_FIELDS, "session")
    config = current
    if "input_audio_format" in session:
        name = _typed(session["input_audio_format"], str, "session.input_audio_format")
        fmt = next((f for f in FORMATS if f.beta == name), None)
        if fmt is None:
            raise _invalid_choice(name, [f.beta for f in FORMATS], "session.input_audio_format")
        config = replace(config, format=fmt)
    if "input_audio_transcription" in session:
        path = "session.input_audio_transcription"
        transcription = _transcription(session["input_audio_transcription"], config.transcription, model, path, True)
        config = replace(config, transcription=transcription)
    if "turn_detection" in session:
        turn = _turn_detection(session["turn_detection"], config.turn_detection, vad, "session.turn_detection", True)
        config = replace(config, turn_detection=turn)
    if "input_audio_noise_reduction" in session:
        path = "session.input_audio_noise_reduction"
        config = replace(config, noise_reduction=_noise_reduction(session["input_audio_noise_reduction"], path))
    if "include" in session:
        config = replace(config, include=_include(session["include"], "session.include"))
    modalities = session.get("modalities")
    if modalities is not None:  # accepted, meaningless here: a transcription session answers with text
        for index, item in enumerate(_typed(modalities, list, "session.modalities")):
            if item not in ("text", "audio"):
                raise _invalid_choice(item, ["text", "audio"], f"session.modalities[{index}]")
    if session.get("client_secret") is not None:  # for the REST call that creates sessions; ignored
        _typed(session["client_secret"], dict, "session.client_secret")
    return config


def _format_ga(value: Any, path: str) -> AudioFormat:
    spec = _object(value, path)
    kind = _typed(_required(spec, "type", path), str, f"{path}.type")
    fmt = next((f for f in FORMATS if f.type == kind), None)
    if fmt is None:
        raise _invalid_choice(kind, [f.type for f in FORMATS], f"{path}.type")
    _known(spec, ("type", "rate"), path)
    if "rate" in spec and (type(spec["rate"]) is not int or spec["rate"] != fmt.rate):
        raise RealtimeError(
            "invalid_value", f"Invalid value: {quote(spec['rate'])}. {fmt.type} is at {fmt.rate} Hz.", f"{path}.rate"
        )
    return fmt


def _transcription(value: Any, current: Transcription, model: str, path: str, beta: bool = False) -> Transcription:
    if value is None:
        return Transcription(model)
    spec = _object(value, path)
    _known(spec, ("model", "language", "prompt") if beta else ("model", "language", "prompt", *_GA_ONLY), path)
    result = current
    if "model" in spec:
        result = replace(result, model=_typed_or_none(spec["model"], str, f"{path}.model") or model)
    if "language" in spec:
        result = replace(result, language=_typed_or_none(spec["language"], str, f"{path}.language") or None)
    if "prompt" in spec:
        result = replace(result, prompt=_typed_or_none(spec["prompt"], str, f"{path}.prompt") or "")
    if "keywords" in spec:
        result = replace(result, keywords=_strings(spec["keywords"], f"{path}.keywords"))
    if "languages" in spec:
        result = replace(result, languages=_strings(spec["languages"], f"{path}.languages"))
    if "delay" in spec:
        delay = _typed_or_none(spec["delay"], str, f"{path}.delay")
        if delay is not None and delay not in DELAY:
            raise _invalid_choice(delay, DELAY, f"{path}.delay")
        result = replace(result, delay=delay)
    return result


_GA_ONLY = ("keywords", "languages", "delay")


def _turn_detection(
    value: Any, current: TurnDetection | None, vad: VadOptions, path: str, beta: bool
) -> TurnDetection | None:
    if value is None:
        return None
    spec = _object(value, path)
    kind = (spec.get("type") or "server_vad") if beta else _required(spec, "type", path)
    if kind not in ("server_vad", "semantic_vad"):
        raise _invalid_choice(kind, ["server_vad", "semantic_vad"], f"{path}.type")
    responses = ("create_response", "interrupt_response")
    if kind == "server_vad":
        fields = ("threshold", "prefix_padding_ms", "silence_duration_ms", "idle_timeout_ms")
        _known(spec, ("type", *fields, *responses), path)
    else:
        _known(spec, ("type", "eagerness", *responses), path)
    result = current if current is not None and current.type == kind else default_turn_detection(vad, kind)
    for name in responses:
        if spec.get(name) is not None:
            _typed(spec[name], bool, f"{path}.{name}")
    if spec.get("idle_timeout_ms") is not None:
        _integer(spec["idle_timeout_ms"], 0, 24 * 3600 * 1000, f"{path}.idle_timeout_ms")
    if spec.get("threshold") is not None:
        threshold = spec["threshold"]
        if type(threshold) not in (int, float) or not 0 <= threshold <= 1:
            raise RealtimeError(
                "invalid_value", f"Invalid value: {quote(threshold)}. Expected 0..1.", f"{path}.threshold"
            )
        result = replace(result, threshold=float(threshold))
    if spec.get("prefix_padding_ms") is not None:
        padding = _integer(spec["prefix_padding_ms"], 0, MAX_PREFIX_PADDING_MS, f"{path}.prefix_padding_ms")
        result = replace(result, prefix_padding_ms=padding)
    if spec.get("silence_duration_ms") is not None:
        silence = _integer(spec["silence_duration_ms"], MIN_SILENCE_MS, MAX_SILENCE_MS, f"{path}.silence_duration_ms")
        result = replace(result, silence_duration_ms=silence)
    if spec.get("eagerness") is not None:
        eagerness = spec["eagerness"]
        if eagerness not in EAGERNESS:
            raise _invalid_choice(eagerness, EAGERNESS, f"{path}.eagerness")
        result = replace(result, eagerness=eagerness)
    return result


def _noise_reduction(value: Any, path: str) -> NoiseReduction | None:
    if value is None:
        return None
    spec = _object(value, path)
    _known(spec, ("type", "strength"), path)
    kind = _typed_or_none(spec.get("type"), str, f"{path}.type")
    if kind is not None and kind not in NOISE_REDUCTION:
        raise _invalid_choice(kind, NOISE_REDUCTION, f"{path}.type")
    strength = spec.get("strength")
    if strength is not None and (type(strength) not in (int, float) or not 0 <= strength <= 1):
        raise RealtimeError("invalid_value", f"Invalid value: {quote(strength)}. Expected 0..1.", f"{path}.strength")
    return NoiseReduction(kind, None if strength is None else float(strength))


def _include(value: Any, path: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = _strings(value, path) or ()
    for index, item in enumerate(items):
        if item not in INCLUDE:
            raise _invalid_choice(item, INCLUDE, f"{path}[{index}]")
    return items


# -- helpers -------------------------------------------------------------------------------------

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer"}


def _object(value: Any, path: str) -> dict[str, Any]:
    result: dict[str, Any] = _typed(value, dict, path)
    return result


def _optional_object(value: Any, path: str) -> dict[str, Any] | None:
    return None if value is None else _object(value, path)


def _typed(value: Any, kind: type, path: str) -> Any:
    # bool is an int in Python; a JSON true is not a number of milliseconds.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RealtimeError(
            "invalid_type", f"Invalid type for '{path}': expected {_JSON_TYPES[kind]}, but got {quote(value)}.", path
        )
    return value


def _typed_or_none(value: Any, kind: type, path: str) -> Any:
    return None if value is None else _typed(value, kind, path)


def _integer(value: Any, low: int, high: int, path: str) -> int:
    number: int = _typed(value, int, path)
    if not low <= number <= high:
        raise RealtimeError("invalid_value", f"Invalid value: {quote(number)}. Expected {low}..{high}.", path)
    return number


def _strings(value: Any, path: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(_typed(item, str, f"{path}[{index}]") for index, item in enumerate(_typed(value, list, path)))


def _required(spec: dict[str, Any], name: str, path: str) -> Any:
    if name not in spec:
        param = f"{path}.{name}"
        raise RealtimeError("missing_required_parameter", f"Missing required parameter: '{param}'.", param)
    return spec[name]


def _known(spec: dict[str, Any], names: Collection[str], path: str) -> None:
    for name in spec:
        if name not in names:
            # (a client's key goes into param only when it is short, printable ASCII)
            param = f"{path}.{name}" if len(name) <= 64 and name.isascii() and name.isprintable() else path
            raise RealtimeError("unknown_parameter", f"Unknown parameter: {quote(f'{path}.{name}')}.", param)


def _invalid_choice(value: Any, choices: Collection[str], path: str) -> RealtimeError:
    listed = ", ".join(f"'{choice}'" for choice in choices)
    return RealtimeError("invalid_value", f"Invalid value: {quote(value)}. Supported values are: {listed}.", path)
