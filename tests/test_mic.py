"""`asrlive mic` as a user runs it, with a real (virtual) microphone: PortAudio capturing speech.

The microphone is a PulseAudio null sink (tests/audio_device.py); the speech is played into it
in real time while the command streams what it captures to a server on a loopback port.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import numpy as np
import pytest
import soundfile

from asrlive import cli

from .audio_device import missing_tools, play_command, virtual_microphone
from .requires import requires
from .serving import GAP, TIMEOUT, DroppingProxy, eventually, running_server
from .test_cli_serve import _asrlive

needs_pulseaudio = requires(
    f"no virtual microphone: missing {', '.join(missing_tools())} (see .ci/run)" if missing_tools() else None
)


@pytest.fixture
def microphone_env(tmp_path):
    with virtual_microphone(tmp_path / "pulse") as env:
        yield env


def heard(server) -> tuple[int, float]:
    """The newest open session's (utterances begun, seconds of audio): how far the speech has come."""
    streams = server.scheduler._streams
    if not streams:
        return 0, 0.0
    session = streams[-1].session
    return session.segments, session.position / 16_000


class Mic:
    """The command in a subprocess; its stdout lines (the finals) as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append(raw.decode().rstrip("\n"))

    async def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(self.process.wait(), TIMEOUT)
        await asyncio.wait_for(self._reader, TIMEOUT)
        assert self.process.stderr is not None
        return code, (await self.process.stderr.read()).decode()


@needs_pulseaudio
@pytest.mark.asyncio
async def test_mic_captions_speech_through_a_dropped_connection_and_ctrl_c_flushes_the_last_final(
    load_model, speech, microphone_env, tmp_path
):
    """Two utterances are spoken into the microphone. The connection is cut during the first: the
    command reconnects and resends what it captured, so the first final still spans the whole
    utterance. Ctrl-C comes during the second: its final still arrives and is written."""
    first, second = speech["goforward"], speech["librivox-0920"]
    wav = tmp_path / "speech.wav"
    soundfile.write(wav, np.concatenate([first, GAP, second]), 16_000, subtype="PCM_16")
    output = tmp_path / "captions.jsonl"  # one record per final, with its times
    async with running_server(load_model("hf")) as server, DroppingProxy(server.port) as proxy:
        command = [*_asrlive(), "mic", "--server", proxy.url(), "--device", "pulse", "--output", str(output)]
        pipes = {"stdout": asyncio.subprocess.PIPE, "stderr": asyncio.subprocess.PIPE}
        mic = Mic(await asyncio.create_subprocess_exec(*command, env=microphone_env, **pipes))
        await eventually(lambda: server.scheduler.streams)  # connected and capturing
        player = await asyncio.create_subprocess_exec(*play_command(wav), env=microphone_env)
        await eventually(lambda: heard(server)[0] >= 1)  # the first utterance (2.8 s) is being spoken
        proxy.drop()
        await eventually(lambda: mic.lines)  # the first utterance's final
        await eventually(lambda: heard(server)[0] >= 2)  # the second utterance (6 s) has begun
        began = heard(server)[1]
        await eventually(lambda: heard(server)[1] >= began + 1.5)
        code, errors = await mic.stop()
        await asyncio.wait_for(player.wait(), TIMEOUT)
    assert code == 0, errors
    assert proxy.connections == 2 and "reconnecting, audio is kept" in errors
    finals = [json.loads(line) for line in output.read_text().splitlines()]
    assert [" ".join(f["text"].split()) for f in finals] == mic.lines and len(finals) == 2
    spoken = [f["end"] - f["start"] for f in finals]
    assert abs(spoken[0] - first.size / 16_000) < 1.0  # the whole first utterance was heard, once
    assert spoken[1] < second.size / 16_000 - 2.0  # the second was cut by Ctrl-C, yet has its final
    assert 0.8 < finals[1]["start"] - finals[0]["end"] < 2.5  # the pause between them


@needs_pulseaudio
@pytest.mark.asyncio
async def test_mic_lists_the_virtual_device(microphone_env):
    command = [*_asrlive(), "mic", "--list-devices"]
    process = await asyncio.create_subprocess_exec(*command, env=microphone_env, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(process.communicate(), TIMEOUT)
    assert process.returncode == 0 and "pulse" in out.decode()


def test_mic_without_portaudio_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # as if the module could not load
    assert cli.main(["mic"]) == 2
    assert "PortAudio" in capsys.readouterr().err


def _portaudio_missing() -> str:
    try:
        import sounddevice  # noqa: F401
    except OSError as exc:
        return str(exc)
    return ""


@requires(f"PortAudio cannot load: {_portaudio_missing()} (see .ci/run)" if _portaudio_missing() else None)
def test_mic_with_an_unknown_device_names_the_devices(capsys):
    assert cli.main(["mic", "--device", "no-such-microphone-anywhere"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asrlive mic: ") and ("no input device matches" in err or "no audio input device" in err)
