"""The `asrlive transcribe` contract: arguments, JSON records, exit codes and messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from asrlive.cli import main
from asrlive.engine import DecodingOptions, load_audio, transcribe

from .checkpoints import FIXTURES
from .requires import import_required

CLIP = FIXTURES / "speech" / "librivox-0880.wav"
OTHER = FIXTURES / "speech" / "cards-003.wav"


def _records(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines()]


def test_json_records_equal_the_engine(checkpoints, load_model, capsys):
    code = main(
        [
            "transcribe",
            str(CLIP),
            str(OTHER),
            "--model",
            str(checkpoints["original"]),
            "--dtype",
            "float32",
            "--language",
            "en",
            "--context",
            "Sussex",
            "--max-new-tokens",
            "12",
            "--format",
            "json",
            "--plain-weights",  # transformers' products, bit for bit, as the fixture's model
        ]
    )
    assert code == 0
    records = _records(capsys.readouterr().out)
    assert [r["file"] for r in records] == [str(CLIP), str(OTHER)]
    for record, path in zip(records, (CLIP, OTHER), strict=True):
        audio = load_audio(path)
        expected = transcribe(load_model("original"), audio, DecodingOptions("English", "Sussex", 12))
        assert set(record) == {"file", "language", "text", "duration", "token_ids"}
        assert record["token_ids"] == expected.token_ids
        assert record["text"] == expected.text
        assert record["language"] == "English"
        assert record["duration"] == pytest.approx(audio.size / 16000)


def test_split_file_lists_its_segments(checkpoints, tmp_path, capsys):
    code = main(
        [
            "transcribe",
            str(FIXTURES / "speech" / "two-cities.wav"),
            "--model",
            str(checkpoints["hf"]),
            "--dtype",
            "float32",
            "--max-new-tokens",
            "5",
            "--max-segment-seconds",
            "20",
            "--format",
            "json",
        ]
    )
    assert code == 0
    [record] = _records(capsys.readouterr().out)
    segments = record["segments"]
    assert len(segments) == 3
    assert segments[0]["start"] == 0 and segments[-1]["end"] == pytest.approx(record["duration"])
    assert all(s["end"] - s["start"] <= 20 for s in segments)
    assert record["token_ids"] == [t for s in segments for t in s["token_ids"]]


def test_text_format_and_a_bad_file_among_good_ones(checkpoints, tmp_path, capsys):
    broken = tmp_path / "broken.mp3"
    broken.write_bytes(b"\x00" * 64)
    code = main(["transcribe", str(broken), str(CLIP), "--model", str(checkpoints["hf"]), "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    assert code == 1
    assert f"{broken}: cannot decode audio" in err
    assert out.startswith(f"{CLIP}: ")  # the good file is still transcribed


def test_usage_errors(checkpoints, capsys):
    assert main(["transcribe", str(CLIP), "--model", str(checkpoints["hf"]), "--language", "Elvish"]) == 2
    assert "unknown language 'Elvish'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["transcribe", str(CLIP), "--format", "xml"])


def test_console_script_without_weights_or_network(tmp_path):
    """A fresh machine: no cache, hub unreachable. One clear message, no traceback, exit 2."""
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "cache"), HF_ENDPOINT="http://127.0.0.1:9")
    env.pop("HF_HUB_OFFLINE", None)
    script = shutil.which("asrlive") or sys.exit("the asrlive console script is not installed")
    proc = subprocess.run([script, "transcribe", str(CLIP)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert "'Qwen/Qwen3-ASR-0.6B' is not in the Hugging Face cache" in proc.stderr
    assert "the download failed" in proc.stderr
    assert "hf download Qwen/Qwen3-ASR-0.6B" in proc.stderr


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
MODEL_COMMANDS = [["transcribe", str(CLIP)], ["serve", "--port", "0"]]


@no_cuda
@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_cuda_without_cuda_is_refused_before_the_model_loads(command, tmp_path, capsys):
    assert main([*command, "--model", str(tmp_path / "nothing"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"asrlive {command[0]}: --device cuda: ") and "no CUDA device" in err
    assert "cannot load the model" not in err  # the missing model was never looked for


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_int4_without_torchao_is_refused_before_the_model_loads(command, tmp_path, monkeypatch, capsys):
    for name in ("torchao", "torchao.quantization", "torchao.quantization.utils"):
        monkeypatch.setitem(sys.modules, name, None)  # as on a machine without the package
    assert main([*command, "--model", str(tmp_path / "nothing"), "--quantize", "int4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"asrlive {command[0]}: --quantize int4 needs the torchao package")
    assert "pip install torchao" in err and "cannot load the model" not in err


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_transcribe_on_the_cpu_with_quantized_weights(checkpoints, capsys, scheme):
    import_required("torchao", "asrlive[int4]")
    model = str(checkpoints["hf"])
    options = ["--dtype", "float32", "--max-new-tokens", "4", "--format", "json", "--device", "cpu"]
    assert main(["transcribe", str(CLIP), "--model", model, *options, "--quantize", scheme]) == 0
    [record] = _records(capsys.readouterr().out)
    assert 0 < len(record["token_ids"]) <= 4  # quantized weights round differently: only the answer's shape is known
