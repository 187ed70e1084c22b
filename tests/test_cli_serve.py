"""`asrlive serve` and `asrlive loadtest` as a user runs them: console scripts, a signal, exit codes."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys

import pytest

from asrlive.clients import connect
from asrlive.clients._loadtest import metric

from .checkpoints import FIXTURES
from .serving import CHUNK, TIMEOUT

pytestmark = pytest.mark.asyncio

CLIP = FIXTURES / "speech" / "goforward.wav"


def _asrlive() -> list[str]:
    script = shutil.which("asrlive")
    return [script] if script else [sys.executable, "-m", "asrlive"]


class ServerProcess:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.log: list[str] = []
        self.url: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode().rstrip()
            self.log.append(line)
            if "asrlive: listening on " in line and not self.url.done():
                self.url.set_result(line.split()[3])

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), TIMEOUT)
        await asyncio.wait_for(self._reader, TIMEOUT)
        return code


async def received_seconds(url: str) -> float:
    seconds = await asyncio.to_thread(metric, url, "asrlive_audio_seconds_total")
    return seconds or 0.0


async def eventually_async(read, condition, timeout: float = TIMEOUT) -> None:
    """Poll an async reading every 50 ms until ``condition`` holds, for at most ``timeout`` seconds."""

    async def poll() -> None:
        while not condition(await read()):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout)


async def start_server(model_dir, *options: str) -> ServerProcess:
    command = [*_asrlive(), "serve", "--model", str(model_dir), "--dtype", "float32", "--port", "0", *options]
    process = await asyncio.create_subprocess_exec(*command, stderr=asyncio.subprocess.PIPE)
    server = ServerProcess(process)
    try:
        await asyncio.wait_for(asyncio.shield(server.url), TIMEOUT)
    except TimeoutError:
        process.kill()
        raise AssertionError("the server did not start:\n" + "\n".join(server.log)) from None
    return server


async def test_sigterm_finishes_open_utterances(checkpoints, speech):
    server = await start_server(checkpoints["original"])
    audio = speech["librivox-0870"]
    events = []
    async with connect(server.url.result(), timeout=TIMEOUT) as stream:
        for begin in range(0, 5 * 16_000, CHUNK):  # mid-sentence: no finish, no pause
            await stream.send_audio(audio[begin : begin + CHUNK])
        incoming = aiter(stream)
        while not events or events[-1]["type"] != "speech_started":
            events.append(await asyncio.wait_for(anext(incoming), TIMEOUT))
        # Every frame has arrived once the server has counted 5 s of audio.
        await eventually_async(lambda: received_seconds(server.url.result()), lambda seconds: seconds > 4.999)
        server.process.send_signal(signal.SIGTERM)
        events += [event async for event in incoming]
        close_code = stream.close_code
    assert await server.stop() == 0
    stopped = [e for e in events if e["type"] == "speech_stopped"]
    # Protocol §5: `lag` may come at any time, even between the last final and `done`.
    kinds = [e["type"] for e in events if e["type"] != "lag"]
    events = [e for e in events if e["type"] != "lag"]
    assert kinds[-2:] == ["final", "done"] and stopped[-1]["reason"] == "finish"
    assert events[-1]["reason"] == "shutdown" and close_code == 1001
    assert events[-2]["end"] == stopped[-1]["end"] == pytest.approx(5.0, abs=0.05)
    assert any("shutting down: finishing 1 open sessions" in line for line in server.log)
    # One line per session at info level: who, language, audio, finals, how it ended.
    session_line = r"asrlive.server: s\d+: 127\.0\.0\.1:\d+, language auto, 5\.0 s of audio, 1 finals, ended: shutdown$"
    assert any(re.search(session_line, line) for line in server.log), server.log


async def test_loadtest_against_a_served_model(checkpoints):
    server = await start_server(checkpoints["hf"], "--max-sessions", "2")
    loadtest = await asyncio.create_subprocess_exec(
        *_asrlive(),
        "loadtest",
        server.url.result().replace("ws://", "http://").replace("/v1/stream", "/"),  # the page's address works too
        "--sessions",
        "3",
        "--audio",
        str(CLIP),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(loadtest.communicate(), TIMEOUT)
    assert await server.stop() == 0
    report = out.decode().splitlines()
    # Three clients for two sessions: one is refused, and the report says so (exit 1).
    assert loadtest.returncode == 1, err.decode()
    assert report[0].startswith("sessions: 3,")
    assert report[2].startswith("final latency (end of speech -> final): p50 ") and "(2 finals)" in report[2]
    assert report[3].startswith("real-time factor (engine busy / wall time): 0.")
    assert report[4] == "errors: 1 (server_full)"


async def test_serve_reports_a_missing_model_and_a_busy_port(checkpoints, tmp_path):
    async def run(*options: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(*_asrlive(), "serve", *options, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
        return process.returncode, err.decode()

    code, err = await run("--model", str(tmp_path / "nothing"))
    assert code == 2 and "cannot load the model" in err
    server = await start_server(checkpoints["hf"])
    port = server.url.result().split(":")[2].split("/")[0]
    # The port is checked before the model loads: a missing model is not reached.
    code, err = await run("--model", str(tmp_path / "nothing"), "--port", port)
    assert await server.stop() == 0
    assert code == 2 and err == f"asrlive serve: cannot listen on 127.0.0.1:{port}: the port is in use\n"
    listening = [line for line in server.log if "listening" in line]
    assert listening == [f"asrlive: listening on {server.url.result()} (captions page: http://127.0.0.1:{port}/)"]


async def test_serve_checks_the_allowed_origins_before_loading(tmp_path):
    command = [*_asrlive(), "serve", "--model", str(tmp_path / "nothing"), "--allowed-origins", "https://a.example, b"]
    process = await asyncio.create_subprocess_exec(*command, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    assert process.returncode == 2
    assert err.decode() == "asrlive serve: --allowed-origins: 'b' is no origin (scheme://host or scheme://host:port)\n"
