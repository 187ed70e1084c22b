"""Audio and video files of any format, rate and channel count become 16 kHz mono float32; a file
read only in part says so."""

from __future__ import annotations

import os
import re
import threading

import av
import numpy as np
import pytest
import soundfile
from scipy.signal import resample_poly

from asrlive._audio import AudioWarning, Incomplete, read_audio
from asrlive.engine import SAMPLE_RATE, AudioError, load_audio

from .media import M4A, MKV_FLAC, MP4_WITH_VIDEO, WEBM_OPUS, WEBM_WITH_VIDEO, Encoding, contour_correlation, encode


def _name(encoding: Encoding) -> str:
    return f"{encoding.suffix[1:]}-{encoding.audio_codec}" + (
        f"-{encoding.video_codec}" if encoding.video_codec else ""
    )


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


# --- containers and codecs libsndfile does not read: ffmpeg through PyAV ------------------------


@pytest.mark.parametrize("encoding", [M4A, MP4_WITH_VIDEO, WEBM_OPUS, WEBM_WITH_VIDEO, MKV_FLAC], ids=_name)
def test_ffmpeg_formats_decode_to_the_same_speech(speech, tmp_path, encoding):
    original = speech["librivox-0870"]
    path = encode(tmp_path / f"clip{encoding.suffix}", original, encoding)

    decoded = read_audio(path)

    assert decoded.decoder == "ffmpeg" and decoded.incomplete is None
    assert (decoded.source_rate, decoded.source_channels) == (encoding.rate, 2)
    assert decoded.samples.dtype == np.float32
    # AAC pads its last frame (1024 samples at 44.1 kHz is 23 ms); nothing else may change the length.
    assert abs(decoded.duration - original.size / SAMPLE_RATE) < 0.03
    assert contour_correlation(decoded.samples, original) > 0.95
    # Downmixed as the mean of the channels, (1 + 0.25) / 2 of the original, as libsndfile's files
    # are (ffmpeg's own mono downmix would give (1 + 0.25) / sqrt(2)).
    rms = np.sqrt(np.mean(decoded.samples**2) / np.mean(original**2))
    assert rms == pytest.approx(0.625, rel=0.05)


def test_a_colon_in_the_name_is_no_protocol(speech, tmp_path):
    """ffmpeg reads "take:2.m4a" as protocol "take" unless told it is a file."""
    path = encode(tmp_path / "take:2.m4a", speech["goforward"], M4A)
    assert abs(load_audio(path).size - speech["goforward"].size) < 0.03 * SAMPLE_RATE


def test_lossless_flac_in_matroska_keeps_the_waveform(speech, tmp_path):
    original = speech["goforward"]
    path = encode(tmp_path / "clip.mkv", original, MKV_FLAC, right_gain=1.0)
    decoded = load_audio(path)
    # 16 kHz -> 22.05 kHz (16-bit) -> 16 kHz: what is lost is the resampling and the rounding.
    n = min(decoded.size, original.size)
    assert _snr_db(original[:n], decoded[:n]) > 30


def test_a_video_whose_sound_stops_early_is_not_truncated(speech, tmp_path):
    original = speech["cards-001"]
    path = encode(tmp_path / "longer-video.webm", original, WEBM_WITH_VIDEO, video_seconds=6.0)
    decoded = read_audio(path)
    assert decoded.incomplete is None
    assert abs(decoded.duration - original.size / SAMPLE_RATE) < 0.03


def test_a_video_without_sound_says_so(tmp_path):
    path = tmp_path / "silent.webm"
    with av.open(str(path), "w") as out:
        picture = out.add_stream("libvpx", rate=10)
        picture.width, picture.height, picture.pix_fmt = 64, 48, "yuv420p"
        for index in range(5):
            frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
            frame.pts = index
            out.mux(picture.encode(frame))
        out.mux(picture.encode(None))
    with pytest.raises(AudioError, match=r"silent\.webm: no audio in this file \(it holds video only\)"):
        load_audio(path)


def test_undecodable_file_lists_what_can_be_read(tmp_path):
    text = tmp_path / "notes.m4a"
    text.write_text("not audio at all\n" * 100)
    with pytest.raises(AudioError) as raised:
        load_audio(text)
    message = str(raised.value)
    assert message.startswith(f"{text}: cannot decode audio (")
    assert "asrlive reads WAV, FLAC, OGG, MP3" in message and "anything ffmpeg decodes: M4A/AAC, MP4" in message


# --- files read only in part --------------------------------------------------------------------


@pytest.mark.parametrize("container", ["WAV", "RF64", "AIFF"])
def test_truncated_pcm_file_warns_and_gives_the_audio_there_is(speech, tmp_path, container):
    original = speech["librivox-0870"]  # 7.1 s
    full = tmp_path / "full.audio"
    soundfile.write(full, original, SAMPLE_RATE, format=container, subtype="PCM_16")
    data = full.read_bytes()
    cut = tmp_path / "cut.audio"
    cut.write_bytes(data[: len(data) // 2])  # what a copy or a download interrupted halfway leaves
    complete = load_audio(full)

    said: list[str] = []
    partial = load_audio(cut, on_warning=said.append)

    kept = partial.size
    assert 3.4 * SAMPLE_RATE < kept < 3.6 * SAMPLE_RATE
    assert np.array_equal(partial, complete[:kept])  # exactly the first half, as read before
    assert said == [
        f"{cut}: the file is truncated: read {kept / SAMPLE_RATE:.2f} s of audio, its header announces 7.10 s"
    ]


def test_truncation_is_a_warning_when_no_one_listens(speech, tmp_path):
    path = tmp_path / "cut.wav"
    soundfile.write(path, speech["goforward"], SAMPLE_RATE, subtype="PCM_16")
    path.write_bytes(path.read_bytes()[:1001])  # the header and 478 samples: 0.03 s
    with pytest.warns(AudioWarning, match=r"cut\.wav: the file is truncated: read 0\.03 s of audio"):
        audio = load_audio(path)
    assert audio.size == 478
    decoded = read_audio(path)  # the typed result carries it, and warns of nothing
    announced = speech["goforward"].size / SAMPLE_RATE
    assert decoded.incomplete == Incomplete(str(path), "the file is truncated", 478 / SAMPLE_RATE, announced)


def test_a_wav_streamed_without_its_size_is_read_to_the_end(speech, tmp_path):
    """A WAV written to a pipe cannot go back to fill in its sizes: 0 or 0xFFFFFFFF is no truncation."""
    original = speech["cards-002"]
    path = tmp_path / "piped.wav"
    soundfile.write(path, original, SAMPLE_RATE, subtype="PCM_16")
    for size in (b"\xff\xff\xff\xff", b"\x00\x00\x00\x00"):
        data = bytearray(path.read_bytes())
        at = data.index(b"data") + 4
        data[at : at + 4] = size
        path.write_bytes(bytes(data))
        decoded = read_audio(path)
        assert decoded.incomplete is None
        assert np.allclose(decoded.samples, original, atol=1 / 32768)


@pytest.mark.parametrize("encoding", [WEBM_OPUS, WEBM_WITH_VIDEO, MKV_FLAC], ids=_name)
def test_truncated_container_warns(speech, tmp_path, encoding):
    original = speech["librivox-0870"]
    path = encode(tmp_path / f"full{encoding.suffix}", original, encoding)
    cut = tmp_path / f"cut{encoding.suffix}"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    said: list[str] = []
    partial = load_audio(cut, on_warning=said.append)
    assert 2.5 < partial.size / SAMPLE_RATE < 4.5
    [message] = said
    assert message.startswith(f"{cut}: the file is truncated: read {partial.size / SAMPLE_RATE:.2f} s of audio")
    assert "its header announces 7.1" in message
    assert contour_correlation(partial, original[: partial.size]) > 0.95


def test_damaged_packets_are_skipped_and_reported(speech, tmp_path):
    original = speech["librivox-0870"]
    path = encode(tmp_path / "clip.m4a", original, M4A)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = bytes((b * 7 + 13) % 256 for b in data[middle : middle + 2000])
    path.write_bytes(bytes(data))
    said: list[str] = []
    audio = load_audio(path, on_warning=said.append)
    [message] = said
    assert re.match(rf"{re.escape(str(path))}: \d+ damaged packets? skipped \(.+\): read \d\.\d\d s of audio", message)
    assert abs(audio.size / SAMPLE_RATE - 7.1) < 0.5  # the rest of the file is there


# --- what is not an audio file ------------------------------------------------------------------


def test_a_pipe_is_read_as_a_stream(speech, tmp_path):
    """`asrlive transcribe /dev/stdin < talk.wav` or a FIFO: read once, by ffmpeg, from the start."""
    source = tmp_path / "clip.wav"
    soundfile.write(source, speech["cards-003"], SAMPLE_RATE, subtype="PCM_16")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(source.read_bytes()))
    writer.start()
    try:
        decoded = read_audio(fifo)
    finally:
        if writer.is_alive():  # read_audio failed before opening the FIFO: let the writer's open return
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        writer.join()
    assert decoded.decoder == "ffmpeg" and decoded.incomplete is None
    assert np.allclose(decoded.samples, speech["cards-003"], atol=1 / 32768)


def test_a_directory_a_missing_and_an_empty_file(tmp_path):
    with pytest.raises(AudioError, match=r"^.*absent\.wav: no such file$"):
        load_audio(tmp_path / "absent.wav")
    with pytest.raises(AudioError, match=r"^.*: is a directory, not an audio file$"):
        load_audio(tmp_path)
    empty = tmp_path / "empty.m4a"
    empty.touch()
    with pytest.raises(AudioError, match=r"empty\.m4a: the file is empty$"):
        load_audio(empty)
    header_only = tmp_path / "header.wav"
    soundfile.write(header_only, np.zeros(0, np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match=r"header\.wav: the file holds no audio samples$"):
        load_audio(header_only)
