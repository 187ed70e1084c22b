"""Every ```python example of docs/openai.md, executed against a real server: what it prints is what
the server's transcription of its audio is, so the documentation cannot rot.

Each block runs as the script a reader would copy (``__name__ == "__main__"``), in a fresh namespace
and a thread of its own (its ``asyncio.run`` gets its own loop; the server's loop, the test's, goes
on), in a folder holding the files the examples open (``talk.mp3``, ``talk.wav``), with the
documented address replaced by the test server's."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import soxr

from asrlive.engine import DecodingOptions, load_audio, transcribe

from .checkpoints import FIXTURES
from .serving import GAP, TIMEOUT, running_server, stream_audio

DOC = Path(__file__).parents[1] / "docs" / "openai.md"
DOCUMENTED_URL = "http://127.0.0.1:8765/v1"
RATE = 24_000
CLIP = FIXTURES / "speech" / "cards-001.wav"


def python_blocks(markdown: str) -> list[str]:
    """The code of every fenced ```python block, in order, after as many empty lines as precede it
    in the file: a traceback names the documentation's own line."""
    return [
        "\n" * markdown.count("\n", 0, block.start(1)) + block[1]
        for block in re.finditer(r"^```python\n(.*?)^```$", markdown, flags=re.DOTALL | re.MULTILINE)
    ]


def example(kind: str) -> str:
    """The one example of ``kind``: what the block calls tells them apart."""
    [code] = [code for code in python_blocks(DOC.read_text(encoding="utf-8")) if _kind(code) == kind]
    return code


def _kind(code: str) -> str | None:
    if "OpenAISTTModel" in code:
        return "agents"
    if "realtime.connect" in code:
        return "realtime"
    if "audio.transcriptions.create" in code:
        return "rest"
    return None


def test_every_example_is_one_the_tests_run():
    """A new example (or one that no longer talks to the documented address) fails here first."""
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert sorted(_kind(code) or code for code in blocks) == ["agents", "realtime", "rest"]
    assert all(DOCUMENTED_URL in code for code in blocks)


async def run_example(code: str, server) -> str:
    """Execute ``code`` as a script against ``server`` (in the current folder); what it prints."""
    code = code.replace(DOCUMENTED_URL, f"http://127.0.0.1:{server.port}/v1")
    assert DOCUMENTED_URL not in code
    compiled = compile(code, str(DOC), "exec")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        await asyncio.wait_for(asyncio.to_thread(exec, compiled, {"__name__": "__main__"}), TIMEOUT)
    return printed.getvalue()


@pytest.fixture(scope="module")
def talk(speech) -> np.ndarray:
    """One utterance then a pause long enough for the VAD to end it, as 24 kHz 16-bit samples."""
    audio = np.concatenate([GAP[:8000], speech[CLIP.stem], GAP])
    return np.round(np.clip(soxr.resample(audio, 16_000, RATE), -1, 32767 / 32768) * 32768).astype(np.int16)


@pytest.fixture
def folder(tmp_path, monkeypatch, talk) -> Path:
    """The working folder of the examples: ``talk.wav`` (16-bit mono, 24 kHz) and ``talk.mp3``."""
    with wave.open(str(tmp_path / "talk.wav"), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes(talk.tobytes())
    with av.open(str(tmp_path / "talk.mp3"), "w") as container:
        stream = container.add_stream("libmp3lame", rate=RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(talk[np.newaxis], format="s16", layout="mono")
        frame.sample_rate = RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "audio"), [("rest", "talk.mp3"), ("agents", "talk.wav")])
async def test_the_example_prints_the_offline_transcription(load_model, folder, name, audio):
    model = load_model("hf")
    expected = transcribe(model, load_audio(folder / audio), DecodingOptions("English"))
    async with running_server(model) as server:
        printed = await run_example(example(name), server)
    assert printed == expected.text + "\n" and expected.text.strip()


@pytest.mark.asyncio
async def test_the_realtime_example_prints_the_stream_final(load_model, folder, talk):
    async with running_server(load_model("hf")) as server:
        result = await asyncio.wait_for(stream_audio(server.url, talk, language="English", sample_rate=RATE), TIMEOUT)
        printed = await run_example(example("realtime"), server)
    [final] = result.of_type("final")  # one utterance: the example prints its transcript and ends
    assert printed == final["text"] + "\n" and final["text"].strip()
