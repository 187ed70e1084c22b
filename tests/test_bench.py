"""`asrlive bench`: options and their errors, the figures' JSON, and the load generator's counts.

True-shape benches are heavy (a 0.6B network takes seconds and gigabytes to build): one
`bench engine` run at those shapes; `bench stream` and `bench serve` run end to end on the
tests' tiny network, which exercises the same code at a fraction of the cost.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from asrlive._bench_serve import HEADER, ServeRow
from asrlive._bench_stream import JobTiming, Setup, StreamResult, dump_json
from asrlive.cli import main
from asrlive.clients._loadtest import FRAME, ClientRecord, LoadReport, note_event, sent_time

from .checkpoints import random_aligner as tiny_aligner
from .checkpoints import random_network as tiny_network

BENCHES = [["bench", "engine"], ["bench", "align"], ["bench", "stream"], ["bench", "serve"], ["bench", "soak"]]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
SETUP = Setup("0.6B", "bfloat16", "cpu", "", 2, None, "plain")


@no_cuda
@pytest.mark.parametrize("bench", BENCHES)
def test_cuda_without_cuda_is_refused_naming_the_flag(bench, capsys):
    assert main([*bench, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asrlive bench: --device cuda: ") and "no CUDA device" in err


@pytest.mark.parametrize("bench", BENCHES)
def test_an_unknown_device_is_refused(bench, capsys):
    assert main([*bench, "--device", "tpu"]) == 2
    assert capsys.readouterr().err.startswith("asrlive bench: --device tpu: unknown device 'tpu'; use auto")


@pytest.mark.parametrize("bench", BENCHES)
def test_int4_without_torchao_says_how_to_get_it(bench, monkeypatch, capsys):
    # As on a machine without the package (an entry of None makes the import fail).
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization.utils", None)
    assert main([*bench, "--quantize", "int4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asrlive bench: --quantize int4 needs the torchao package")
    assert "pip install torchao" in err and "Traceback" not in err


@pytest.mark.parametrize("bench", BENCHES)
def test_quantize_names_int8_and_int4(bench, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*bench, "--quantize", "int2"])
    err = capsys.readouterr().err
    assert (
        exit.value.code == 2
        and "argument --quantize: invalid choice: 'int2'" in err
        and "int8" in err
        and "int4" in err
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "serve", "--sessions", "1,x"], "--sessions 1,x: not a comma-separated list of numbers"),
        (["bench", "serve", "--sessions", "0,4"], "--sessions 0,4: give one or more numbers, each at least 1"),
        (["bench", "serve", "--batch", ""], "--batch : give one or more numbers, each at least 1"),
        (["bench", "stream", "--positions", "10,-1"], "--positions 10,-1: give one or more numbers, each at least 0"),
        (["bench", "stream", "--duration", "0"], "--duration must be at least 1"),
        (["bench", "engine", "--repeats", "0"], "--repeats must be at least 1"),
    ],
)
def test_bad_numbers_are_named(argv, message, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err == f"asrlive bench: {message}\n"


@pytest.mark.parametrize("bench", BENCHES)
def test_every_bench_takes_the_device_and_json_options(bench, capsys):
    with pytest.raises(SystemExit):
        main([*bench, "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "--device DEVICE" in usage and "--quantize {int8,int4}" in usage and "--json" in usage
    assert "--plain-weights" in usage
    assert "Off by default: their accuracy cannot be checked without real weights" in usage


def test_stream_table_keeps_its_lines_and_json_has_the_same_figures():
    timings = (JobTiming(9.0, False, 1.0), JobTiming(11.0, False, 3.0), JobTiming(29.0, False, 2.0))
    result = StreamResult(SETUP, 60.0, 1000, (*timings, JobTiming(40.0, True, 0.6)), {10.0: 8.0, 30.0: None})
    lines = result.table().splitlines()
    # What scripts read: the model line, the table, the real-time factor line.
    assert lines[0] == "model: Qwen3-ASR 0.6B shapes, random weights, bfloat16, 2 threads, plain weights (F.linear)"
    assert lines[4:7] == [
        " position  asrlive update  official update  official / asrlive",
        "      10s           2.00s            8.00s                4.0x",
        "      30s           2.00s          skipped                   -",
    ]
    assert "asrlive real-time factor: 0.11 (7 s of compute for 60 s of audio)" in lines
    figures = json.loads(dump_json(result.as_json()))
    assert figures["model"] == SETUP.fields()
    assert (figures["partials"], figures["finals"], figures["real_time_factor"]) == (3, 1, pytest.approx(6.6 / 60))
    assert figures["positions"] == [
        {"position_s": 10.0, "asrlive_update_s": 2.0, "official_update_s": 8.0, "official_over_asrlive": 4.0,
         "official_real_time_factor": 4.0},
        {"position_s": 30.0, "asrlive_update_s": 2.0, "official_update_s": None, "official_over_asrlive": None,
         "official_real_time_factor": None},
    ]  # fmt: skip
    assert figures["update_cost_300_over_30"] is None  # a run shorter than 300 s


def test_the_model_line_says_where_it_ran():
    gpu = Setup("1.7B", "bfloat16", "cuda:0", "NVIDIA H200", 16, None, "plain")
    assert (
        gpu.line() == "Qwen3-ASR 1.7B shapes, random weights, bfloat16, cuda:0 (NVIDIA H200), plain weights (F.linear)"
    )
    cpu = Setup("0.6B", "float32", "cpu", "", 2, "int4", "int4")
    assert cpu.line() == "Qwen3-ASR 0.6B shapes, random weights, float32, 2 threads, int4 weights (LLM; encoder int8)"


def _load_report(final_latencies: tuple[float, ...], final_positions: tuple[float, ...]) -> LoadReport:
    return LoadReport(
        sessions=2,
        wall_seconds=31.0,
        audio_seconds=60.0,
        partial_latencies=(0.5, 1.5),
        final_latencies=final_latencies,
        final_positions=final_positions,
        finals=len(final_latencies),
        lost_finals=1,
        errors=("missing_final",),
        busy_seconds=15.5,
    )


def test_serve_row_splits_final_latency_by_position_and_counts_lost_finals():
    row = ServeRow(8, 2, _load_report((1.0, 2.0, 3.0, 5.0), (0.1, 0.5, 0.6, 0.9)))
    figures = json.loads(dump_json(row.figures()))
    assert figures["final_p50_first_half_s"] == 1.5 and figures["final_p50_second_half_s"] == 4.0
    assert (figures["rtf"], figures["lost_finals"], figures["errors"]) == (0.5, 1, 1)
    assert figures["error_codes"] == ["missing_final"]
    assert len(row.line().split()) == 13 and HEADER.split()[-3:] == ["half", "lost", "errors"]
    assert row.line().split()[2] == "-" and ServeRow(8, 2, row.report, timestamps=True).line().split()[2] == "words"
    empty = ServeRow(1, 1, _load_report((), ()))
    assert empty.figures()["final_p50_s"] is None and "n/a" in empty.line()


def test_the_audio_at_a_time_is_the_frame_holding_its_last_sample():
    sent_at = np.arange(10, dtype=np.float64)  # frame i left at i seconds
    assert sent_time(sent_at, FRAME / 16000) == 0  # the end of frame 0 is its last sample
    assert sent_time(sent_at, (FRAME + 1) / 16000) == 1
    assert sent_time(sent_at, 1.0 + 1e-12) == 9  # a float a hair above the boundary of frame 10
    assert sent_time(sent_at, 60.0) == 9  # past the end: the last frame
    assert sent_time(sent_at, 0.0) == 0


def _record(*events: dict) -> ClientRecord:
    record = ClientRecord(accepted=True)
    for event in events:
        note_event(record, event, 5.0, np.zeros(100), 10.0)
    return record


def test_lost_finals():
    started, stopped = {"type": "speech_started", "segment": 0}, {"type": "speech_stopped", "segment": 0}
    final = {"type": "final", "segment": 0, "end": 2.5}
    second = {"type": "speech_started", "segment": 1}
    done = {"type": "done", "segments": 2}
    complete = _record(started, stopped, final, done)
    assert complete.lost_finals == 0 and complete.final_positions == [0.25] and complete.final_latencies == [5.0]
    assert _record(started, stopped, final, second, done).lost_finals == 1  # an utterance without its final
    assert _record(started, stopped).lost_finals == 1  # no `done`: what it owed is lost
    assert _record(started, stopped, final).lost_finals == 1  # no `done`, nothing announced open
    assert ClientRecord().lost_finals == 0  # refused: owed nothing


@pytest.fixture
def tiny_benches(monkeypatch):
    """The benches build the tests' tiny network instead of one of the true shapes."""

    def build(size: str, dtype: torch.dtype):
        return tiny_network().to(dtype)

    monkeypatch.setattr("asrlive._bench_stream.random_network", build)
    monkeypatch.setattr("asrlive._bench_align.random_aligner_network", lambda dtype: tiny_aligner().to(dtype))


@pytest.mark.slow
def test_bench_stream_json(tiny_benches, capsys):
    argv = ["bench", "stream", "--duration", "12", "--positions", "10", "--dtype", "float32", "--json"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    [run] = json.loads(out)["runs"]
    assert run["model"]["device"] == "cpu" and run["model"]["quantize"] is None
    assert run["duration_s"] == 12 and run["partials"] > 0 and run["finals"] > 0
    [position] = run["positions"]
    assert position["position_s"] == 10 and position["official_update_s"] > 0
    assert "official algorithm at 10 s" in err


@pytest.mark.slow
def test_bench_serve_json(tiny_benches, capsys):
    argv = ["bench", "serve", "--sessions", "2", "--batch", "2", "--duration", "5", "--dtype", "float32", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["packed_weights"] is True  # as the server keeps them on a CPU
    [row] = report["rows"]
    assert (row["batch"], row["sessions"], row["errors"], row["lost_finals"]) == (2, 2, 0, 0)
    assert row["finals"] >= 2 and row["final_p50_s"] > 0
    assert set(row) >= {"final_p50_first_half_s", "final_p50_second_half_s", "partial_p95_s", "rtf"}


@pytest.mark.slow
def test_bench_serve_with_timestamps_runs_each_row_twice(tiny_benches, capsys):
    argv = ["bench", "serve", "--sessions", "1", "--batch", "2", "--duration", "5", "--dtype", "float32"]
    assert main([*argv, "--timestamps", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(row["sessions"], row["timestamps"]) for row in rows] == [(1, False), (1, True)]
    assert all(row["errors"] == row["lost_finals"] == 0 and row["finals"] >= 1 for row in rows)


@pytest.mark.slow
def test_bench_align_json(tiny_benches, capsys):
    assert main(["bench", "align", "--repeats", "1", "--dtype", "float32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["repeats"] == 1 and report["words_per_second"] == 2.5
    assert "Qwen3-ForcedAligner-0.6B shapes" in report["model"]
    assert [row["audio_s"] for row in report["rows"]] == [2, 5, 10, 30]
    for row in report["rows"]:
        assert row["words"] == round(2.5 * row["audio_s"])
        assert row["prompt_rows"] == 2 + 13 * row["audio_s"] + 3 * row["words"]  # audio tokens, units, slots
        assert 0 < row["encoder_ms"] < row["total_ms"] and row["llm_ms"] > 0
        assert row["ms_per_audio_s"] == pytest.approx(row["total_ms"] / row["audio_s"])


@pytest.mark.slow
def test_bench_engine_json_at_the_true_shapes(capsys):
    assert main(["bench", "engine", "--repeats", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["size"] == "0.6B" and report["repeats"] == 1
    figures = report["figures"]
    assert list(figures) == [
        "memory_floor", "one_row_products", "linear_reference", "decode_1_stream", "decode_4_streams",
        "decode_8_streams", "prefill_60_rows", "prefill_120_rows", "encoder_1s", "encoder_4s", "encoder_8s",
    ]  # fmt: skip
    assert figures["memory_floor"]["ratio_to_memory_floor"] == 1
    assert all(f["ms"] > 0 and len(f["runs_ms"]) == 1 for key, f in figures.items() if key != "memory_floor")
    expected_format = "packed" if report["model"]["device"] == "cpu" else "plain"
    assert report["model"]["weights"] == expected_format
    assert f"113 matrices, {expected_format}" in figures["one_row_products"]["label"]  # 28 layers x 4 fused, head
    # The bytes a step reads: the fused matrices at float32, the tied head included once.
    assert figures["one_row_products"]["gb_s"] == pytest.approx(
        report["weight_bytes"] / figures["one_row_products"]["ms"] / 1e6
    )
    assert report["weight_bytes"] > 1e9 and report["read_bandwidth_gb_s"] > 0 and report["default_format"] == {}
    assert report["resident_mib"] > 1000 and report["build_s"] > 0
    assert [t["limit"] for t in report["targets"]] == [1.5]
