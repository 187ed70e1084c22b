"""`asrlive loadtest --soak`: the server's memory over normal sessions and storms of sessions dropped
mid-utterance, read from its /metrics (process_resident_memory_bytes)."""

from __future__ import annotations

import asyncio
import json

import pytest

from asrlive.cli import main
from asrlive.clients._loadtest import metric
from asrlive.clients._soak import HEADER, Sample, SoakOptions, SoakReport

from .serving import TIMEOUT, stream_audio
from .test_cli_serve import CLIP, _asrlive, start_server

SOAK = ["--sessions", "1", "--disconnect-storm", "3", "--storm-every", "2", "--report-every", "2"]


async def _loadtest(url: str, *options: str) -> tuple[int, list[str], str]:
    process = await asyncio.create_subprocess_exec(
        *_asrlive(),
        "loadtest",
        url,
        "--audio",
        str(CLIP),
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 2 * TIMEOUT)
    assert process.returncode is not None
    return process.returncode, out.decode().splitlines(), err.decode()


def _row(line: str) -> tuple[float, float, int, int, int, int]:
    elapsed, rss, open_sessions, done, aborted, errors = line.split()
    return float(elapsed.removesuffix("s")), float(rss), int(open_sessions), int(done), int(aborted), int(errors)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_soak_shows_the_memory_of_a_server_through_disconnect_storms(checkpoints, speech):
    server = await start_server(checkpoints["hf"], "--max-sessions", "8")
    url = server.url.result()
    try:
        code, out, err = await _loadtest(url, *SOAK, "--soak", "0.1")  # 6 s: storms at 0, 2 and 4 s
        assert code == 0, err
        assert out[0] == HEADER
        rows = [_row(line) for line in out[1:-5]]
        summary = out[-5:]
        # A line at 0 s (before any session), one every 2 s, and one once every session has ended.
        assert [elapsed for elapsed, *_ in rows[:4]] == pytest.approx([0, 2, 4, 6], abs=0.6)
        assert all(20 < rss < 20_000 for _, rss, *_ in rows)  # MiB of a real process
        end = rows[-1]
        assert end[2] == 0 and end[5] == 0  # no open session, no error
        assert end[4] >= 6 and end[4] % 3 == 0  # whole storms of 3, dropped mid-utterance
        assert end[3] >= 1  # normal sessions finished
        assert [aborted for *_, aborted, _ in rows] == sorted(aborted for *_, aborted, _ in rows)
        first, last, highest = rows[0][1], end[1], max(rss for _, rss, *_ in rows)
        assert summary[0].startswith(f"soak: {end[0]:.0f} s, 1 sessions at a time ({end[3]} done), storms of 3 ")
        assert summary[0].endswith(f"({end[4]} aborted)")
        assert summary[1].startswith(f"RSS: first {first:.1f} MiB, last {last:.1f} MiB, max {highest:.1f} MiB; ")
        assert summary[2:] == ["open sessions at the end: 0", "lost finals: 0", "errors: 0"]

        # The server still serves a normal session, and has no session left open.
        result = await stream_audio(url, speech["goforward"])
        assert result.types[-1] == "done" and result.of_type("final")
        assert await asyncio.to_thread(metric, url, "asrlive_open_sessions") == 0

        # --json: the lines on stderr, one object on stdout.
        code, out, err = await _loadtest(url, *SOAK, "--soak", "0.05", "--json")
        assert code == 0, err
        [line] = out
        figures = json.loads(line)
        assert figures["aborted"] >= 3 and figures["errors"] == 0 and figures["open_sessions_at_end"] == 0
        assert figures["rss_max_mib"] >= figures["rss_first_mib"] > 20
        assert [s["aborted"] for s in figures["samples"]][-1] == figures["aborted"]
        assert HEADER in err.splitlines()
    finally:
        assert await server.stop() == 0


def _report(*rss: float | None) -> SoakReport:
    samples = tuple(
        Sample(
            elapsed_s=60.0 * i,
            rss_bytes=None if mib is None else mib * 2**20,
            open_sessions=0,
            done=i,
            aborted=30 * i,
            errors=0,
        )
        for i, mib in enumerate(rss)
    )
    return SoakReport(SoakOptions(duration_s=360, sessions=2, storm=30), samples, lost_finals=0, errors=())


def test_growth_over_the_second_half_is_from_the_middle_sample_to_the_last():
    report = _report(566, 607, 625, 636, 642, 656, 657)  # the figures, a sample a minute
    assert report.second_half_growth_mib() == pytest.approx(657 - 636)  # from 180 s to 360 s
    assert report.lines()[1] == "RSS: first 566.0 MiB, last 657.0 MiB, max 657.0 MiB; over the second half +21.0 MiB"
    assert report.figures()["rss_max_mib"] == 657
    assert report.lines()[0] == (
        "soak: 360 s, 2 sessions at a time (6 done), "
        "storms of 30 sessions aborted mid-utterance every 60 s (180 aborted)"
    )


def test_a_server_without_the_memory_figure_is_said_so():
    report = _report(None, None)
    assert report.second_half_growth_mib() is None
    assert report.lines()[1] == "RSS: n/a (the server's /metrics has no process_resident_memory_bytes)"
    assert "n/a" in report.samples[0].line()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--json"], "asrlive loadtest: --json goes with --soak\n"),
        (["--disconnect-storm", "3"], "asrlive loadtest: --disconnect-storm goes with --soak\n"),
        (["--soak", "0"], "asrlive loadtest: --soak must be more than 0 minutes\n"),
        (["--soak", "1", "--disconnect-storm", "-1"], "asrlive loadtest: --disconnect-storm must be 0 or more\n"),
        (
            ["--soak", "1"],
            "asrlive loadtest: cannot read http://127.0.0.1:9/metrics: the soak reads the server's memory there\n",
        ),
    ],
)
def test_soak_options_are_checked_before_anything_runs(options, message, capsys):
    assert main(["loadtest", "127.0.0.1:9", "--audio", str(CLIP), *options]) == 2
    assert capsys.readouterr().err == message
