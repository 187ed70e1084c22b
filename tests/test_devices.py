"""Device and weight options of the engine: --device, --quantize int8, MKL-packed weights."""

from __future__ import annotations

import pytest
import torch

from asrlive.engine import SAMPLE_RATE, AsrModel, StreamTranscriber, transcribe
from asrlive.engine._model import resolve_device, resolve_dtype


def test_auto_is_the_cpu_without_cuda():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_cuda_says_so(name):
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["tpu", "gpu0", "mps"])
def test_unknown_devices_are_refused(name):
    with pytest.raises(ValueError, match="cpu, cuda or cuda:N"):
        resolve_device(name)


def test_dtype_policy_on_a_gpu_is_bf16():
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float32", torch.device("cuda")) == torch.float32


def test_explicit_cpu_device_is_the_default_path(checkpoints, load_model, speech):
    clip = speech["cards-001"][: 3 * SAMPLE_RATE]
    explicit = AsrModel.load(str(checkpoints["hf"]), "float32", device="cpu")
    assert explicit.device == torch.device("cpu")
    assert transcribe(explicit, clip).token_ids == transcribe(load_model("hf"), clip).token_ids


def test_int8_weights(checkpoints, load_model, speech):
    """Weight-only int8 (torchao) stores a quarter of float32's bytes and decodes; its accuracy
    against real weights cannot be checked here, which is why it is off by default."""
    plain = load_model("hf")
    quantized = AsrModel.load(str(checkpoints["hf"]), "float32", quantize="int8")
    assert quantized.decode_weight_bytes() < 0.3 * plain.decode_weight_bytes()
    assert not quantized.pack_weights(), "int8 products do not go through MKL-packed float32 weights"
    clip = speech["cards-001"][: 4 * SAMPLE_RATE]
    offline = transcribe(quantized, clip)
    assert len(offline.token_ids) > 0
    streamed = StreamTranscriber(quantized).transcribe(0, clip, True)
    assert len(streamed.token_ids) > 0


def test_unknown_quantization_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        AsrModel.load(str(tmp_path / "missing"), quantize="int4")
