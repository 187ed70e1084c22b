"""Audio and video files made at test time with PyAV (ffmpeg's encoders), from the speech fixtures.

Nothing is stored: an m4a, an mp4 with a picture, a WebM with Opus are encoded into tmp_path, so
the tests read the containers and codecs people actually have, not a format chosen for a fixture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soxr

from asrlive.engine import SAMPLE_RATE


@dataclass(frozen=True)
class Encoding:
    suffix: str
    audio_codec: str
    rate: int
    video_codec: str | None = None
    container: str | None = None  # ffmpeg's muxer, where the suffix does not say it


M4A = Encoding(".m4a", "aac", 44_100, container="ipod")
MP4_WITH_VIDEO = Encoding(".mp4", "aac", 48_000, video_codec="mpeg4")
WEBM_OPUS = Encoding(".webm", "libopus", 48_000)
WEBM_WITH_VIDEO = Encoding(".webm", "libopus", 48_000, video_codec="libvpx")
MKV_FLAC = Encoding(".mkv", "flac", 22_050)

FPS = 10


def encode(
    path: Path,
    speech: np.ndarray,
    encoding: Encoding,
    right_gain: float = 0.25,
    video_seconds: float | None = None,
) -> Path:
    """``speech`` (16 kHz mono) as stereo, the right channel at ``right_gain``, at the encoding's
    rate; with a video codec, a small moving picture as long as the sound (or ``video_seconds``)."""
    audio = soxr.resample(speech, SAMPLE_RATE, encoding.rate).astype(np.float32)
    stereo = np.stack([audio, right_gain * audio])  # (channels, samples), planar
    with av.open(str(path), "w", format=encoding.container) as out:
        sound = out.add_stream(encoding.audio_codec, rate=encoding.rate, layout="stereo")
        picture = None
        if encoding.video_codec is not None:
            picture = out.add_stream(encoding.video_codec, rate=FPS)
            picture.width, picture.height, picture.pix_fmt = 64, 48, "yuv420p"
        step = 1024  # PyAV re-frames to the encoder's frame size
        for start in range(0, stereo.shape[1], step):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(stereo[:, start : start + step]), format="fltp", layout="stereo"
            )
            frame.sample_rate, frame.pts = encoding.rate, start
            out.mux(sound.encode(frame))
        out.mux(sound.encode(None))
        if picture is not None:
            seconds = speech.size / SAMPLE_RATE if video_seconds is None else video_seconds
            for index in range(round(seconds * FPS)):
                image = np.full((48, 64, 3), (index * 9) % 256, dtype=np.uint8)
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = index
                out.mux(picture.encode(frame))
            out.mux(picture.encode(None))
    return path


def loudness_contour(audio: np.ndarray, frame: int = SAMPLE_RATE // 50) -> np.ndarray:
    """Log RMS per 20 ms: what survives a lossy codec, unlike the samples."""
    frames = audio[: audio.size // frame * frame].reshape(-1, frame)
    return np.log(np.sqrt((frames**2).mean(axis=1)) + 1e-4)


def contour_correlation(decoded: np.ndarray, original: np.ndarray, max_lag_frames: int = 5) -> float:
    """Correlation of the loudness contours, at the best lag of a few frames (codec delay)."""
    a, b = loudness_contour(decoded), loudness_contour(original)
    best = -1.0
    for lag in range(-max_lag_frames, max_lag_frames + 1):
        x, y = (a[lag:], b) if lag >= 0 else (a, b[-lag:])
        n = min(x.size, y.size)
        best = max(best, float(np.corrcoef(x[:n], y[:n])[0, 1]))
    return best
