"""A virtual microphone for tests: a PulseAudio null sink whose monitor PortAudio captures.

PortAudio (ALSA host API, PulseAudio's ALSA plugin) lists the ``pulse`` device; what is played
into the sink with ``paplay`` is what the microphone hears, sample for sample and in real time.
A stream of silence keeps playing into the sink: without it the idle sink runs with 2 s of
latency and a capture opened meanwhile starts up to 2 s late. The daemon is private to the test
(its own runtime directory), so it needs no login session, no D-Bus and no sound card.
Needs Debian's pulseaudio, pulseaudio-utils, libasound2-plugins and libportaudio2 (`.ci/run`
installs them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SINK = "asrlive_test_mic"
STARTUP_S = 10.0


def missing_tools() -> list[str]:
    return [tool for tool in ("pulseaudio", "pactl", "pacat", "paplay") if shutil.which(tool) is None]


@contextmanager
def virtual_microphone(runtime_dir: Path) -> Iterator[dict[str, str]]:
    """Yields the environment a client needs to reach the daemon (``XDG_RUNTIME_DIR``)."""
    runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir), "PULSE_RUNTIME_PATH": str(runtime_dir / "pulse")}
    daemon = [
        "pulseaudio",
        "--daemonize=yes",
        "--exit-idle-time=-1",
        "-n",  # no default.pa: only the modules named here
        "--load=module-native-protocol-unix",
        f"--log-target=file:{runtime_dir / 'pulseaudio.log'}",
    ]
    subprocess.run(daemon, env=env, check=True, stdin=subprocess.DEVNULL, timeout=STARTUP_S)
    silence = None
    try:
        _until(lambda: _pactl(env, "info").returncode == 0, "the PulseAudio daemon to answer")
        sink = f"sink_name={SINK} rate=16000 channels=1"
        _pactl(env, "load-module", "module-null-sink", sink, check=True)
        _pactl(env, "set-default-source", f"{SINK}.monitor", check=True)
        keep_alive = ["pacat", "--playback", f"--device={SINK}", "--rate=16000", "--channels=1", "--format=s16le"]
        keep_alive += ["--raw", "--latency-msec=20", "/dev/zero"]
        silence = subprocess.Popen(keep_alive, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        _until(lambda: _pactl(env, "list", "short", "sink-inputs").stdout.strip() != "", "the silence stream")
        yield env
    finally:
        if silence is not None:
            silence.kill()
            silence.wait(STARTUP_S)
        subprocess.run(["pulseaudio", "--kill"], env=env, stdin=subprocess.DEVNULL, timeout=STARTUP_S, check=False)


def play_command(wav: Path) -> list[str]:
    """The command that speaks ``wav`` into the virtual microphone (returns when it has played)."""
    return ["paplay", f"--device={SINK}", str(wav)]


def _pactl(env: dict[str, str], *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["pactl", *args],
        env=env,
        capture_output=True,
        text=True,
        check=check,
        timeout=STARTUP_S,
        stdin=subprocess.DEVNULL,
    )


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + STARTUP_S
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)
