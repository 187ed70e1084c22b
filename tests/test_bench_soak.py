"""``asrlive bench soak``: a server in a child process, the soak against it, SIGTERM at the end."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from asrlive.cli import main

ROOT = Path(__file__).resolve().parents[1]

# The child serves the tests' tiny network instead of one of the true shapes (as tiny_benches does
# in process for the other benches); everything else is the bench's own child.
TINY_CHILD = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import asrlive._bench_stream
from tests.checkpoints import random_network
asrlive._bench_stream.random_network = lambda size, dtype: random_network().to(dtype)
from asrlive._bench_soak import serve
serve(sys.argv[1:])
"""


@pytest.fixture
def tiny_child(monkeypatch):
    from asrlive import _bench_soak

    real = _bench_soak.server_argv

    def argv(options):
        return [sys.executable, "-c", TINY_CHILD, *real(options)[3:]]  # past "python -m asrlive._bench_soak"

    monkeypatch.setattr(_bench_soak, "server_argv", argv)


SHORT = ["bench", "soak", "--minutes", "0.15", "--sessions", "1", "--disconnect-storm", "2", "--storm-every", "4"]
SHORT += ["--report-every", "3", "--dtype", "float32"]


@pytest.mark.slow
def test_bench_soak_prints_the_memory_curve_and_stops_the_server_cleanly(tiny_child, capsys):
    assert main(SHORT) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["elapsed", "RSS", "MiB", "open", "done", "aborted", "errors"]
    samples = [line.split() for line in lines if re.match(r"\s*\d+s ", line)]
    assert len(samples) >= 3  # the start, at least one every 3 s of 9, the settled end
    assert all(float(sample[1]) > 0 for sample in samples)  # the child's RSS, read from its /metrics
    assert samples[-1][2] == "0" and int(samples[-1][4]) >= 2  # no open session; a storm aborted
    summary = lines[len(samples) + 1 :]
    assert summary[0].startswith("model: Qwen3-ASR 0.6B shapes, random weights, float32")
    assert summary[1].startswith("soak: ") and "storms of 2 sessions aborted mid-utterance every 4 s" in summary[1]
    memory = r"RSS: first [\d.]+ MiB, last [\d.]+ MiB, max [\d.]+ MiB; over the second half [-+][\d.]+ MiB"
    assert re.fullmatch(memory, summary[2])
    assert summary[3:] == [
        "open sessions at the end: 0",
        "lost finals: 0",
        "errors: 0",
        "server: stopped by SIGTERM, exit code 0",
    ]
    assert "starting a server of a random-weight 0.6B network" in err


@pytest.mark.slow
def test_bench_soak_json(tiny_child, capsys):
    assert main([*SHORT, "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["model"]["size"] == "0.6B" and report["model"]["packed_weights"] is True
    assert report["server_exit_code"] == 0 and report["errors"] == 0 and report["lost_finals"] == 0
    assert report["open_sessions_at_end"] == 0 and report["aborted"] >= 2
    assert all(sample["rss_mib"] > 0 for sample in report["samples"])
    assert "RSS MiB" in err  # the lines go to stderr


def test_bench_soak_refuses_bad_numbers(capsys):
    assert main(["bench", "soak", "--minutes", "0"]) != 0
    assert "--minutes" in capsys.readouterr().err
