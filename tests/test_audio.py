"""Audio files of any format, rate and channel count become 16 kHz mono float32."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
from scipy.signal import resample_poly

from asrlive.engine import SAMPLE_RATE, AudioError, load_audio


def _snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference**2) / np.sum((reference - estimate) ** 2)))


@pytest.mark.parametrize(
    "suffix, subtype", [(".wav", "PCM_16"), (".flac", "PCM_24"), (".ogg", "VORBIS"), (".mp3", "MPEG_LAYER_III")]
)
def test_formats_rates_and_channels(speech, tmp_path, suffix, subtype):
    mono = speech["goforward"]
    at_48k = resample_poly(mono, 3, 1).astype(np.float32)  # 16 kHz -> 48 kHz
    stereo = np.stack([at_48k, 0.25 * at_48k], axis=1)
    path = tmp_path / f"clip{suffix}"
    soundfile.write(path, stereo, 48_000, subtype=subtype)

    decoded = load_audio(path)

    assert decoded.dtype == np.float32
    expected = 0.625 * mono  # mean of the two channels
    # Lossy codecs add a few ms of delay; compare on the overlap after aligning the starts.
    lag = int(np.argmax(np.correlate(decoded[:4000], expected[:2000], mode="valid")))
    length = min(decoded.size - lag, expected.size) - 1600
    assert abs(decoded.size - mono.size) < 0.06 * SAMPLE_RATE
    lossless = suffix in (".wav", ".flac")
    assert _snr_db(expected[:length], decoded[lag : lag + length]) > (35 if lossless else 8)


def test_mono_16k_passes_through_untouched(speech, tmp_path):
    path = tmp_path / "same.wav"
    soundfile.write(path, speech["cards-002"], SAMPLE_RATE, subtype="FLOAT")
    assert np.array_equal(load_audio(path), speech["cards-002"])


def test_missing_and_undecodable_files(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "absent.wav")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    with pytest.raises(AudioError, match="cannot decode audio"):
        load_audio(junk)
