"""OpenAI-compatible REST: ``GET /v1/models`` and ``POST /v1/audio/transcriptions`` (docs/openai.md).

The fields and shapes are the OpenAI audio API's as the ``openai`` Python SDK sends and parses
them (its ``Transcription``, ``TranscriptionVerbose``, ``TranscriptionSegment``,
``TranscriptionWord`` and ``TranscriptionStreamEvent`` types). Any ``model`` name means the loaded
model. The text is the offline transcription of the whole file, computed by the same functions as
``asrlive transcribe`` (``engine/_offline.py``), its pieces run by the server's scheduler in the
batch with the live sessions. Errors have OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, and its status codes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from sse_starlette import EventSourceResponse
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from asrlive._audio import SAMPLE_RATE, AudioError, read_audio
from asrlive.clients._transcript import Line, Transcript
from asrlive.engine import DecodingOptions, normalize_language
from asrlive.engine._aligner import alignment_steps
from asrlive.engine._offline import Segment, Transcription, joined, make_segment, piece_steps, pieces
from asrlive.engine._prompt import build_prompt
from asrlive.streaming import ProtocolError
from asrlive.streaming._protocol import MAX_CONTEXT_CHARS, check_context_tokens, check_text

if TYPE_CHECKING:
    import numpy as np

    from asrlive.engine import Aligner, AsrModel

    from ._admission import Admission
    from ._auth import Auth
    from ._scheduler import Scheduler

log = logging.getLogger("asrlive.server")

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("segment", "word")
OWNER = "asrlive"


class RestHost(Protocol):
    """What the endpoints use of the server."""

    model: AsrModel
    aligner: Aligner | None
    scheduler: Scheduler
    model_name: str
    control_tokens: tuple[str, ...]  # the tokenizer's, read once by the server
    started_at: int  # unix time: the model's ``created``

    auth: Auth  # the one token check of every endpoint
    admission: Admission  # an upload takes a session slot while it is transcribed

    @property
    def max_upload_bytes(self) -> int: ...
    @property
    def decoding(self) -> DecodingOptions: ...  # the server's (serve's flags); a request sets language and prompt


class ApiError(Exception):
    """An error as OpenAI reports it."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def invalid_api_key() -> ApiError:
    """A missing or wrong token, as OpenAI answers a bad API key (REST and Realtime alike)."""
    return ApiError(401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key")


def refused(refusal: ProtocolError) -> ApiError:
    """An admission's refusal as OpenAI says it: 429 when every slot is taken, else 503."""
    if refusal.code == "server_full":
        return ApiError(429, refusal.message, "rate_limit_error", None, refusal.code)
    return ApiError(503, refusal.message, "server_error", None, refusal.code)


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


@dataclass(frozen=True)
class TranscriptionRequest:
    """A validated ``POST /v1/audio/transcriptions``."""

    filename: str
    options: DecodingOptions  # language, prompt as context
    response_format: str
    words: bool  # timestamp_granularities[] has "word" (verbose_json lists its segments either way)
    stream: bool


def models(host: RestHost) -> Response:
    model = {"id": host.model_name, "object": "model", "created": host.started_at, "owned_by": OWNER}
    return JSONResponse({"object": "list", "data": [model]})


async def transcriptions(host: RestHost, request: Request) -> Response:
    """Parse, admit, decode, transcribe, answer in the asked format; every failure as OpenAI shapes it."""
    try:
        if not host.auth.allows(request.headers, request.url.query):
            raise invalid_api_key()
        _check_length(request, host.max_upload_bytes)
        async with request.form(max_files=1, max_fields=32) as form:
            parsed, upload = _parse_form(host, form)
            audio = await _decode(upload, host.max_upload_bytes)
        refusal = host.admission.admit()
        if refusal is not None:
            raise refused(refusal)
    except ApiError as error:
        return error.response()
    if parsed.stream:
        return EventSourceResponse(_stream(host, parsed, audio), ping=15, send_timeout=30)
    try:
        result = await transcribe_upload(host, parsed, audio, None)
    except ApiError as error:
        return error.response()
    finally:
        host.admission.release()
    return render(parsed, result)


def _check_length(request: Request, limit: int) -> None:
    length = request.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > limit + 64 * 1024:
        raise _too_large(f"the request is larger than the {limit} bytes a file may have")


def _too_large(message: str) -> ApiError:
    return ApiError(413, message, "invalid_request_error", "file", "file_too_large")


def _parse_form(host: RestHost, form: Any) -> tuple[TranscriptionRequest, UploadFile]:
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise invalid("you must provide a file (multipart field 'file')", "file")
    if not isinstance(form.get("model"), str) or not form.get("model"):
        raise invalid("you must provide a model parameter (any name: the server's model answers)", "model")
    language = _text_field(form, "language")
    try:
        language = normalize_language(language) if language else None
    except ValueError as exc:
        raise invalid(str(exc), "language", "unsupported_language") from None
    prompt = _text_field(form, "prompt") or ""
    try:
        check_text(prompt, "prompt", MAX_CONTEXT_CHARS, "bad_start", multiline=True)
        check_context_tokens(prompt, host.control_tokens)
    except ProtocolError as exc:
        raise invalid(exc.message, "prompt") from None
    response_format = _text_field(form, "response_format") or "json"
    if response_format not in FORMATS:
        raise invalid(f"response_format {response_format!r} is not one of {', '.join(FORMATS)}", "response_format")
    granularities = [g for g in form.getlist("timestamp_granularities[]") if isinstance(g, str)]
    return _request(host, form, upload, language, prompt, response_format, granularities), upload


def _request(
    host: RestHost, form: Any, upload: UploadFile, language: str | None, prompt: str, fmt: str, granularities: list[str]
) -> TranscriptionRequest:
    unknown = sorted(set(granularities) - set(GRANULARITIES))
    if unknown:
        raise invalid(f"timestamp_granularities {unknown} not among {list(GRANULARITIES)}", "timestamp_granularities")
    if granularities and fmt != "verbose_json":
        raise invalid("timestamp_granularities needs response_format verbose_json", "timestamp_granularities")
    words = "word" in granularities
    if words and host.aligner is None:
        raise invalid("word timestamps need a forced aligner (asrlive serve --aligner)", "timestamp_granularities")
    temperature = _text_field(form, "temperature")
    if temperature is not None and not _is_temperature(temperature):
        raise invalid(f"temperature {temperature!r} is not a number between 0 and 1", "temperature")
    stream = (_text_field(form, "stream") or "false").lower()
    if stream not in ("true", "false"):
        raise invalid(f"stream must be true or false, not {stream!r}", "stream")
    if stream == "true" and fmt not in ("json", "text"):
        raise invalid("streaming is supported with response_format json or text", "stream")
    options = replace(host.decoding, language=language, context=prompt)
    filename = Path(upload.filename or "audio").name
    return TranscriptionRequest(filename, options, fmt, words, stream == "true")


def _text_field(form: Any, name: str) -> str | None:
    value = form.get(name)
    if value is None or isinstance(value, str):
        return value
    raise invalid(f"{name} must be a text field, not a file", name)


def _is_temperature(value: str) -> bool:
    try:
        return 0.0 <= float(value) <= 1.0
    except ValueError:
        return False


async def _decode(upload: UploadFile, limit: int) -> np.ndarray:
    """The upload as 16 kHz mono float32, decoded as ``asrlive transcribe`` decodes files (off the event loop)."""
    if upload.size is not None and upload.size > limit:
        raise _too_large(f"the file is larger than {limit} bytes")
    name = Path(upload.filename or "audio").name
    try:
        decoded = await asyncio.to_thread(_decode_file, upload.file, Path(name).suffix)
    except AudioError as exc:
        raise invalid(f"could not decode {name!r}: {_without_path(str(exc))}", "file", "invalid_audio") from None
    return decoded


def _decode_file(upload: BinaryIO, suffix: str) -> np.ndarray:
    """The decoders want a path: the upload (spooled by the form parser) is copied to a named file,
    block by block, never whole in memory."""
    upload.seek(0)
    with tempfile.NamedTemporaryFile(suffix=suffix[:16]) as file:
        shutil.copyfileobj(upload, file)
        file.flush()
        return read_audio(file.name).samples


def _without_path(message: str) -> str:
    """AudioError messages start with the (temporary) file's path; the client knows its own file."""
    head, _, rest = message.partition(": ")
    return rest if head.startswith(tempfile.gettempdir()) else message


async def transcribe_upload(
    host: RestHost,
    request: TranscriptionRequest,
    audio: np.ndarray,
    on_segment: Callable[[Segment], Awaitable[None]] | None,
) -> Transcription:
    """``asrlive transcribe``'s computation, piece by piece through the scheduler (and the aligner's batch)."""
    model, aligner = host.model, host.aligner if request.words else None
    options = request.options
    prompt = build_prompt(model.tokenizer, options.context, options.language)
    segments = []
    for start, end in pieces(audio, options, aligner):
        piece = audio[start:end]
        ids = await host.scheduler.compute(piece_steps(model, prompt, piece, options))
        segment = make_segment(model, options, start, end, ids)
        if aligner is not None:
            steps = alignment_steps(aligner, piece, segment.text, segment.language)
            alignment = await host.scheduler.compute(steps, aligner=True)
            segment = replace(segment, alignment=alignment.shifted(segment.start))
        segments.append(segment)
        if on_segment is not None:
            await on_segment(segment)
    return joined(segments, audio.size / SAMPLE_RATE)


async def _stream(host: RestHost, request: TranscriptionRequest, audio: np.ndarray) -> AsyncIterator[str]:
    """Server-sent events: a ``transcript.text.delta`` per piece, then ``transcript.text.done``."""
    queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=4)
    spoken: list[str] = []

    async def delta(segment: Segment) -> None:
        if segment.text:
            text = (" " if spoken else "") + segment.text
            spoken.append(segment.text)
            await queue.put(json.dumps({"type": "transcript.text.delta", "delta": text}, ensure_ascii=False))

    async def work() -> None:
        try:
            result = await transcribe_upload(host, request, audio, delta)
            await queue.put(json.dumps({"type": "transcript.text.done", "text": result.text}, ensure_ascii=False))
        except Exception as exc:  # the stream has begun: the error goes in it, as OpenAI sends one
            message = f"transcription failed: {type(exc).__name__}"
            await queue.put(
                json.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
            )
        finally:
            host.admission.release()
            await queue.put(None)

    task = asyncio.create_task(work())
    try:
        while (event := await queue.get()) is not None:
            yield event
    finally:
        task.cancel()  # the client went away: its pieces are cancelled in the scheduler too
        await asyncio.gather(task, return_exceptions=True)


def render(request: TranscriptionRequest, result: Transcription) -> Response:
    fmt = request.response_format
    if fmt == "text":
        return PlainTextResponse(result.text + "\n")
    if fmt in ("srt", "vtt"):
        transcript = Transcript([_line(segment) for segment in result.segments])
        media = "text/vtt" if fmt == "vtt" else "application/x-subrip"
        return Response(transcript.render("." + fmt), media_type=media)
    usage = {"type": "duration", "seconds": result.duration}
    if fmt == "json":
        return JSONResponse({"text": result.text, "usage": usage})
    return JSONResponse(verbose(request, result) | {"usage": usage})


def verbose(request: TranscriptionRequest, result: Transcription) -> dict[str, Any]:
    """``TranscriptionVerbose``: segments always (they cost nothing), words when asked for."""
    record: dict[str, Any] = {
        "task": "transcribe",
        "language": (result.language or "").lower(),
        "duration": result.duration,
        "text": result.text,
        "segments": [_segment(index, segment) for index, segment in enumerate(result.segments)],
    }
    if request.words:
        record["words"] = [
            {"word": word.text, "start": word.start, "end": word.end}
            for segment in result.segments
            for word in (segment.alignment.words if segment.alignment and segment.alignment.words else ())
        ]
    return record


def _segment(index: int, segment: Segment) -> dict[str, Any]:
    """Every field of the SDK's ``TranscriptionSegment``. Greedy decoding computes no probabilities:
    ``avg_logprob`` is 0.0 and ``no_speech_prob`` says only whether the piece has text (docs/openai.md)."""
    return {
        "id": index,
        "seek": round(segment.start * 100),
        "start": segment.start,
        "end": segment.end,
        "text": segment.text,
        "tokens": list(segment.token_ids),
        "temperature": 0.0,
        "avg_logprob": 0.0,
        "compression_ratio": _compression_ratio(segment.text),
        "no_speech_prob": 0.0 if segment.text else 1.0,
    }


def _compression_ratio(text: str) -> float:
    """Whisper's repetition measure: UTF-8 bytes over zlib-compressed bytes."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _line(segment: Segment) -> Line:
    words = segment.alignment.words if segment.alignment is not None else None
    return Line(segment.start, segment.end, segment.text, segment.language, segment.token_ids, words)
