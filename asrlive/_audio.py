"""Audio in: decode a file, downmix to mono and resample to the model's 16 kHz.

libsndfile (soundfile) reads what it knows (WAV, FLAC, OGG, MP3, AIFF, ...) exactly; every other
file goes to ffmpeg's decoders through PyAV: M4A/AAC, MP4 and other videos, WebM/Opus, MKV, ...
Torch-free: the client commands read files too.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import soundfile
import soxr

if TYPE_CHECKING:
    import av

SAMPLE_RATE = 16_000

FORMATS_READ = (
    "asrlive reads WAV, FLAC, OGG, MP3, AIFF (libsndfile) and anything ffmpeg decodes: "
    "M4A/AAC, MP4, MOV, WebM, MKV, Opus, WMA, AMR, ... (the first audio stream of a video)"
)

# Formats whose header states the exact amount of audio (libsndfile quietly reads a truncated one
# to its end); any other stated length can be an estimate, so a shortfall must exceed a margin.
_EXACT_HEADERS = {"WAV", "WAVEX", "RF64", "AIFF"}
_MARGIN_S = 0.2
_MARGIN_FRACTION = 0.02
# An audio stream starting later than its container is placed at its time (subtitles then match
# the video); a start further off than this is taken for a broken timestamp, not for silence.
_MAX_LEADING_GAP_S = 30.0


class AudioError(ValueError):
    """An audio file could not be read or holds no usable samples."""


class AudioWarning(UserWarning):
    """A file was read, but not all of its audio: it is truncated or damaged."""


@dataclass(frozen=True)
class Incomplete:
    """Only part of a file's audio could be read; the samples are what was read."""

    path: str
    reason: str  # "the file is truncated", or what the decoder said
    read_seconds: float
    announced_seconds: float | None = None  # what the file's header says, when it says

    def __str__(self) -> str:
        announced = "" if self.announced_seconds is None else f", its header announces {self.announced_seconds:.2f} s"
        return f"{self.path}: {self.reason}: read {self.read_seconds:.2f} s of audio{announced}"


@dataclass(frozen=True, eq=False)  # arrays have no single truth value to compare by
class DecodedAudio:
    samples: np.ndarray  # float32, 16 kHz mono
    source_rate: int
    source_channels: int
    decoder: str  # "libsndfile" or "ffmpeg"
    incomplete: Incomplete | None = None

    @property
    def duration(self) -> float:
        return self.samples.size / SAMPLE_RATE


def load_audio(path: str | Path, on_warning: Callable[[str], None] | None = None) -> np.ndarray:
    """Any audio or video file as float32 16 kHz mono. A file read only in part (truncated,
    damaged) gives what could be read, and the reason goes to ``on_warning`` (by default, an
    ``AudioWarning``)."""
    decoded = read_audio(path)
    if decoded.incomplete is not None:
        if on_warning is None:
            warnings.warn(str(decoded.incomplete), AudioWarning, stacklevel=2)
        else:
            on_warning(str(decoded.incomplete))
    return decoded.samples


def read_audio(path: str | Path) -> DecodedAudio:
    """Decode with libsndfile where it can (exact, and what asrlive always did), else with ffmpeg."""
    _check_readable(path)
    if not Path(path).is_file():
        # A pipe (/dev/stdin, a FIFO) can be read once, from the start: libsndfile wants to seek,
        # ffmpeg reads WAV, FLAC, Ogg, MP3, WebM, ... as a stream.
        return _nonempty(path, _read_ffmpeg(path, libsndfile_said="not a regular file"))
    try:
        decoded = _read_libsndfile(path)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        decoded = _read_ffmpeg(path, libsndfile_said=str(exc))
    else:
        if decoded.samples.size == 0 and decoded.incomplete is None:
            # A WAV written to a pipe can leave its data size 0: libsndfile reads none of it,
            # ffmpeg reads to the end of the file.
            try:
                decoded = _read_ffmpeg(path, libsndfile_said="no samples")
            except AudioError:
                pass
    return _nonempty(path, decoded)


def _nonempty(path: str | Path, decoded: DecodedAudio) -> DecodedAudio:
    if decoded.samples.size == 0:
        if decoded.incomplete is not None:
            raise AudioError(str(decoded.incomplete))
        raise AudioError(f"{path}: the file holds no audio samples")
    return decoded


def to_model_rate(mono: np.ndarray, rate: int) -> np.ndarray:
    """Resample mono float32 audio to 16 kHz with soxr's high-quality band-limited filter."""
    if rate <= 0:
        raise AudioError(f"invalid sample rate {rate}")
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if rate == SAMPLE_RATE or mono.size == 0:
        return mono
    resampled: np.ndarray = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return resampled.astype(np.float32, copy=False)


def check_path(path: str | Path) -> None:
    """A directory, a missing path or an unreadable file, named as such (the command line checks
    every input with it before any model loads)."""
    file = Path(path)
    if file.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    if not file.exists():
        raise AudioError(f"{path}: no such file")
    if not os.access(file, os.R_OK):
        raise AudioError(f"{path}: permission denied")


def _check_readable(path: str | Path) -> None:
    check_path(path)
    file = Path(path)
    if file.is_file() and file.stat().st_size == 0:  # a pipe (/dev/stdin) has no size to go by
        raise AudioError(f"{path}: the file is empty")


# --- libsndfile -------------------------------------------------------------------------------


def _read_libsndfile(path: str | Path) -> DecodedAudio:
    with soundfile.SoundFile(str(path)) as file:
        stated = file.frames  # for WAV/AIFF already cut to the bytes present; see _header_frames
        samples = file.read(dtype="float32", always_2d=True)
        rate, channels, container = file.samplerate, file.channels, file.format
    # samples: (frames, channels) -> (frames,)
    mono = samples.mean(axis=1, dtype=np.float32)
    read = mono.size
    if container in _EXACT_HEADERS:
        announced = _header_frames(Path(path))
        short = announced is not None and read < announced
    else:
        announced = stated
        short = read < announced - max(_MARGIN_S * rate, _MARGIN_FRACTION * announced)
    incomplete = None
    if short:
        assert announced is not None
        incomplete = Incomplete(str(path), "the file is truncated", read / rate, announced / rate)
    return DecodedAudio(to_model_rate(mono, rate), rate, channels, "libsndfile", incomplete)


def _header_frames(path: Path) -> int | None:
    """Sample frames a WAV (RIFF, RIFX, RF64) or AIFF header announces; None where it does not say
    (a streamed WAV leaves the size 0 or 0xFFFFFFFF) or cannot be parsed."""
    try:
        with path.open("rb") as file:
            head = file.read(12)
            if head[8:12] == b"WAVE" and head[:4] in (b"RIFF", b"RIFX", b"RF64", b"BW64"):
                return _wav_frames(file, big_endian=head[:4] == b"RIFX")
            if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
                return _aiff_frames(file)
    except (OSError, struct.error):
        return None
    return None


def _chunks(file: Any, size_format: str) -> Any:
    """(id, size, offset of the payload) of each chunk of an IFF-style file, from the current position."""
    while len(header := file.read(8)) == 8:
        chunk_id, (size,) = header[:4], struct.unpack(size_format, header[4:])
        offset = file.tell()
        yield chunk_id, size, offset
        file.seek(offset + size + (size & 1))  # chunks are padded to an even length


def _wav_frames(file: Any, big_endian: bool) -> int | None:
    block_align = None
    ds64_data_size = None
    for chunk_id, size, _ in _chunks(file, ">I" if big_endian else "<I"):
        if chunk_id == b"ds64":  # RF64: the real sizes are 64-bit, here
            ds64_data_size = struct.unpack("<Q", file.read(16)[8:16])[0]
        elif chunk_id == b"fmt ":
            (block_align,) = struct.unpack(">H" if big_endian else "<H", file.read(14)[12:14])
        elif chunk_id == b"data":
            if size == 0xFFFFFFFF and ds64_data_size is not None:
                size = ds64_data_size
            if not block_align or size in (0, 0xFFFFFFFF):
                return None
            frames: int = size // block_align
            return frames
    return None


def _aiff_frames(file: Any) -> int | None:
    for chunk_id, _, _ in _chunks(file, ">I"):
        if chunk_id == b"COMM":
            _, frames = struct.unpack(">hI", file.read(6))
            return int(frames)
    return None


# --- ffmpeg (PyAV) ----------------------------------------------------------------------------


def _read_ffmpeg(path: str | Path, libsndfile_said: str) -> DecodedAudio:
    try:
        import av
    except ImportError:
        raise AudioError(
            f"{path}: cannot decode audio ({libsndfile_said}); formats beyond libsndfile's need PyAV: pip install av"
        ) from None
    # "file:" keeps a colon in the name from being read as a protocol ("take:2.m4a").
    url = "file:" + str(Path(path).absolute())
    try:
        container = av.open(url, metadata_errors="ignore")
    except av.FFmpegError as exc:
        raise AudioError(f"{path}: cannot decode audio ({_said(exc)}). {FORMATS_READ}") from None
    with container:
        if not container.streams.audio:
            kinds = sorted({stream.type for stream in container.streams})
            holds = f"it holds {', '.join(kinds)} only" if kinds else "it holds no streams"
            raise AudioError(f"{path}: no audio in this file ({holds})")
        return _decode_stream(str(path), container, container.streams.audio[0])


def _said(exc: Exception) -> str:
    """What ffmpeg said, without PyAV's errno and file name around it."""
    return getattr(exc, "strerror", None) or str(exc)


def _decode_stream(path: str, container: av.container.InputContainer, stream: av.AudioStream) -> DecodedAudio:
    import av

    announced, check_others = _announced_seconds(container, stream)
    mono = _MonoDecoder(container)
    damaged: list[str] = []
    stopped = None
    data_end = 0.0  # where the other streams' packets end, in seconds
    try:
        # Without the audio's own length, only the container's is known, and a video may rightly
        # run longer than its sound: where the other streams' data ends tells truncation apart.
        for packet in container.demux() if check_others else container.demux(stream):
            if packet.stream_index != stream.index:
                if packet.pts is not None and packet.time_base is not None:
                    data_end = max(data_end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
                continue
            try:
                frames = packet.decode()
            except av.FFmpegError as exc:
                # One bad packet loses a few ms; ffmpeg itself skips it and goes on, and so do we.
                damaged.append(_said(exc))
                continue
            for frame in frames:
                if isinstance(frame, av.AudioFrame):  # demuxed from the audio stream: always
                    mono.add(frame)
    except av.FFmpegError as exc:
        stopped = _said(exc)
    samples = mono.finish()
    if mono.rate is None:
        failure = stopped or (damaged[0] if damaged else "no audio frames in its audio stream")
        raise AudioError(f"{path}: cannot decode audio ({failure}). {FORMATS_READ}")
    read = mono.frames / mono.rate
    reason: str | None
    if stopped is not None:
        reason = f"decoding stopped at damaged data ({stopped})"
    elif announced is not None and max(read, data_end) < announced - max(_MARGIN_S, _MARGIN_FRACTION * announced):
        reason = "the file is truncated"  # its last packet is cut too: that is no separate damage
    elif damaged:
        reason = f"{len(damaged)} damaged packet{'s' if len(damaged) > 1 else ''} skipped ({damaged[0]})"
    else:
        reason = None
    incomplete = None if reason is None else Incomplete(path, reason, read, announced)
    return DecodedAudio(samples, mono.rate, mono.channels, "ffmpeg", incomplete)


def _announced_seconds(container: av.container.InputContainer, stream: av.AudioStream) -> tuple[float | None, bool]:
    """The audio's stated length, and whether it is the container's (then the other streams must be
    looked at too) rather than the audio stream's own."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base), False
    if container.duration is not None:
        return container.duration / 1_000_000, len(container.streams) > 1  # AV_TIME_BASE
    return None, False


class _MonoDecoder:
    """Decoded frames -> float32 mono at the stream's first rate -> 16 kHz, resampled as they come
    (an hour of 48 kHz audio is never held at 48 kHz)."""

    def __init__(self, container: av.container.InputContainer) -> None:
        self._container = container
        self.rate: int | None = None
        self.channels = 0
        self.frames = 0  # at the native rate
        self._converter: Any = None
        self._converter_key: tuple[str, str, int] | None = None
        self._resampler: soxr.ResampleStream | None = None
        self._pieces: list[np.ndarray] = []

    def add(self, frame: av.AudioFrame) -> None:
        if self.rate is None:
            self._start(frame)
        key = (frame.format.name, frame.layout.name, frame.sample_rate)
        if key != self._converter_key:
            # The stream's format, layout or rate changed (it happens in broadcast recordings):
            # drain the old converter, then convert to planar float at the first rate anew.
            self._drain()
            import av

            self._converter = av.AudioResampler(format="fltp", rate=self.rate)
            self._converter_key = key
        for converted in self._converter.resample(frame):
            self._take(converted)

    def finish(self) -> np.ndarray:
        self._drain()
        if self._resampler is not None:
            self._pieces.append(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        if not self._pieces:
            return np.zeros(0, np.float32)
        return np.concatenate(self._pieces).astype(np.float32, copy=False)

    def _start(self, frame: av.AudioFrame) -> None:
        self.rate = frame.sample_rate
        self.channels = frame.layout.nb_channels
        if self.rate != SAMPLE_RATE:
            self._resampler = soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        start = self._container.start_time
        if frame.time is not None and start is not None:
            gap = frame.time - start / 1_000_000
            if 0 < gap <= _MAX_LEADING_GAP_S:
                self._mono(np.zeros(round(gap * self.rate), np.float32))

    def _drain(self) -> None:
        if self._converter is not None:
            for converted in self._converter.resample(None):
                self._take(converted)
            self._converter = None
            self._converter_key = None

    def _take(self, frame: av.AudioFrame) -> None:
        planes = frame.to_ndarray()  # (channels, samples), float32
        # The mean of the channels, as for libsndfile's files: ffmpeg's own downmix to mono adds
        # them at -3 dB each, 1.41 times louder than the mean, and could go past full scale.
        self._mono(planes.mean(axis=0, dtype=np.float32) if planes.shape[0] > 1 else planes[0])

    def _mono(self, mono: np.ndarray) -> None:
        self.frames += mono.size
        if self._resampler is None:
            self._pieces.append(np.array(mono, dtype=np.float32))
        else:
            self._pieces.append(self._resampler.resample_chunk(mono))
