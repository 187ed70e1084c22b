"""The command line starts fast and the client side runs on a client-only install (no torch)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import pytest

from asrlive.clients import STREAM_PATH, LiveOptions, LiveStream, StreamFailed, stream_url
from asrlive.web import STREAM_PATH as SERVER_STREAM_PATH

from .checkpoints import FIXTURES
from .serving import TIMEOUT, running_server

SERVER_ONLY = (
    "torch",
    "transformers",
    "safetensors",
    "aiortc",
    "prometheus_client",
    "huggingface_hub",
    "starlette",
    "h11",
)
SERVER_TOP = {"torch", "transformers", "aiortc", "starlette", "h11"}  # none of them may load on the client side

# Run in a fresh interpreter where the server extra's modules cannot be imported, as after
# `pip install asrlive` without `[server]`; report the exit code and what got imported.
_CLIENT_ONLY = """
import contextlib, io, json, sys
for name in {blocked!r}:
    sys.modules[name] = None
from asrlive.cli import main
err = io.StringIO()
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(err):
    try:
        code = main({argv!r})
    except SystemExit as exit:
        code = exit.code
print(json.dumps({{"code": code, "out": out.getvalue(), "err": err.getvalue(),
                  "imported": sorted(m.split(".")[0] for m in sys.modules if sys.modules[m] is not None)}}))
"""


def _client_only(argv: list[str]) -> dict:
    script = _CLIENT_ONLY.format(blocked=SERVER_ONLY, argv=argv)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(proc.stdout)


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["transcribe", "--help"], ["stream", "--help"]])
def test_help_needs_no_server_modules(argv):
    result = _client_only(argv)
    assert result["code"] == 0 and "usage: asrlive" in result["out"]
    assert not set(result["imported"]) & SERVER_TOP


def test_client_commands_run_without_the_server_extra(tmp_path):
    missing = tmp_path / "missing.wav"
    result = _client_only(["stream", str(missing), "--server", "http://127.0.0.1:9"])
    assert result["code"] == 2 and result["err"] == f"asrlive stream: {missing}: no such file\n"
    result = _client_only(["mic", "--output", str(tmp_path / "no-such-folder" / "x.srt")])
    assert result["code"] == 2 and "the folder" in result["err"] and "does not exist" in result["err"]
    assert not set(result["imported"]) & SERVER_TOP


@pytest.mark.asyncio
async def test_the_soak_runs_without_the_server_extra(load_model):
    clip = str(FIXTURES / "speech" / "goforward.wav")
    soak = ["--soak", "0.05", "--disconnect-storm", "2", "--storm-every", "1", "--report-every", "1"]
    async with running_server(load_model("hf")) as server:
        result = await asyncio.to_thread(_client_only, ["loadtest", server.url, "--audio", clip, *soak])
    assert result["code"] == 0, result["err"]
    assert "RSS: first " in result["out"] and "errors: 0" in result["out"]
    assert not set(result["imported"]) & SERVER_TOP


@pytest.mark.parametrize("command", [["serve"], ["transcribe", "x.wav"], ["bench", "stream"]])
def test_model_commands_name_the_missing_extra(command):
    result = _client_only(command)
    assert result["code"] == 2
    assert "pip install 'asrlive[server]'" in result["err"] and "Traceback" not in result["err"]


def test_importing_the_client_loads_no_model_code():
    script = "import sys, asrlive.clients; print(sorted({m.split('.')[0] for m in sys.modules}))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert not set(eval(proc.stdout)) & SERVER_TOP


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("ws://127.0.0.1:8765/v1/stream", "ws://127.0.0.1:8765/v1/stream"),
        ("http://127.0.0.1:8765/", "ws://127.0.0.1:8765/v1/stream"),
        ("http://127.0.0.1:8765", "ws://127.0.0.1:8765/v1/stream"),
        ("127.0.0.1:8765", "ws://127.0.0.1:8765/v1/stream"),
        ("https://asr.example:443/?token=x", "wss://asr.example:443/v1/stream?token=x"),
        ("wss://host/custom/path", "wss://host/custom/path"),
    ],
)
def test_server_addresses_as_people_write_them(given, url):
    assert stream_url(given) == url


@pytest.mark.parametrize("given", ["ftp://host/", "http://", "ws:///v1/stream", ""])
def test_what_is_no_server_address(given):
    with pytest.raises(ValueError, match="is not a server address"):
        stream_url(given)


def test_client_and_server_agree_on_the_path():
    assert STREAM_PATH == SERVER_STREAM_PATH


@pytest.mark.asyncio
async def test_a_wrong_path_is_named_at_once_not_retried(load_model, speech):
    events: list[dict] = []

    async def audio():
        yield speech["goforward"]

    async with running_server(load_model("hf")) as server:
        options = LiveOptions(f"http://127.0.0.1:{server.port}/v2/stream", max_attempts=5)
        with pytest.raises(StreamFailed, match=r"/v2/stream is not a streaming endpoint .*ws://HOST:PORT/v1/stream"):
            await asyncio.wait_for(LiveStream(options, events.append).run(audio()), TIMEOUT)
    assert [e["state"] for e in events if e["type"] == "status"] == ["connecting"]


def test_piped_stderr_stays_quiet(checkpoints):
    """No progress bars off a terminal, no library warnings (the original layout's generation flags)."""
    script = shutil.which("asrlive")
    command = [script] if script else [sys.executable, "-m", "asrlive"]
    clip = FIXTURES / "speech" / "goforward.wav"
    model = str(checkpoints["original"])
    proc = subprocess.run(
        [*command, "transcribe", str(clip), "--model", model, "--dtype", "float32", "--max-new-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip()
    assert proc.stderr == ""
