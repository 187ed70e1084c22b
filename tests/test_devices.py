"""Device and weight options of the engine: --device, --quantize int8/int4, oneDNN-packed weights."""

from __future__ import annotations

import pytest
import torch

from asrlive.engine import SAMPLE_RATE, AsrModel, StreamTranscriber, transcribe
from asrlive.engine._model import resolve_device, resolve_dtype
from asrlive.engine._weights import Int4Matrix, Int8Matrix, Matrix, PackedMatrix


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
    explicit = AsrModel.load(str(checkpoints["hf"]), "float32", device="cpu", plain_weights=True)
    assert explicit.device == torch.device("cpu")
    assert transcribe(explicit, clip).token_ids == transcribe(load_model("hf"), clip).token_ids


def _bytes(matrices: list[Matrix]) -> int:
    return sum(m.nbytes for m in matrices)


# (format, its LLM matrices' class, the encoder's, bytes of the LLM against float32 at most)
# (the tests' layers are 64 wide: a float32 scale per row of 64 int8 weights adds 1/64)
QUANTIZED = [("int8", Int8Matrix, Int8Matrix, 0.27), ("int4", Int4Matrix, Int8Matrix, 0.16)]


@pytest.mark.parametrize("scheme, llm_kind, encoder_kind, fraction", QUANTIZED, ids=[q[0] for q in QUANTIZED])
def test_quantized_weights(checkpoints, load_model, speech, scheme, llm_kind, encoder_kind, fraction):
    """Each weight held once, in its quantized form (the encoder at 8 bits), multiplying close to the
    float product, decoding offline and streaming; accuracy against real weights cannot be checked
    here, which is why quantization is off by default."""
    plain = load_model("hf")
    quantized = AsrModel.load(str(checkpoints["hf"]), "float32", quantize=scheme)
    assert quantized.info.weights == scheme
    assert all(isinstance(m, llm_kind) for m in quantized.llm.matrices())
    assert all(isinstance(m, encoder_kind) for m in quantized.encoder.matrices())
    assert _bytes(quantized.llm.matrices()) < fraction * _bytes(plain.llm.matrices())
    torch.manual_seed(0)
    for ours, reference in zip(quantized.llm.matrices()[:4], plain.llm.matrices()[:4], strict=True):
        rows = torch.randn(3, reference.shape[1])
        expected = reference(rows)
        error = (ours(rows) - expected).norm() / expected.norm()
        assert ours.shape == reference.shape and error < 0.15, error
    clip = speech["cards-001"][: 4 * SAMPLE_RATE]
    assert len(transcribe(quantized, clip).token_ids) > 0
    assert len(StreamTranscriber(quantized).transcribe(0, clip, True).token_ids) > 0


def test_the_default_format_on_a_cpu_is_packed(checkpoints, load_model, speech):
    """Offline too (issue 21): oneDNN's layout, one copy of each weight, exact up to float32 rounding."""
    packed = AsrModel.load(str(checkpoints["hf"]), "float32")
    assert packed.info.weights == "packed"
    *layers, head = packed.llm.matrices()
    assert all(isinstance(m, PackedMatrix) for m in [*layers, head, *packed.encoder.matrices()])
    # The tied head is packed too; the lookups keep the table itself (engine/_parts.py).
    assert isinstance(head, PackedMatrix) and torch.equal(head.packed.to_dense()[:10], packed.embed(list(range(10))))
    torch.manual_seed(0)
    for ours, reference in zip(packed.llm.matrices(), load_model("hf").llm.matrices(), strict=True):
        rows = torch.randn(2, reference.shape[1])
        torch.testing.assert_close(ours(rows), reference(rows), rtol=1e-5, atol=1e-5)


def test_unknown_quantization_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="unknown quantization 'int2'"):
        AsrModel.load(str(tmp_path / "missing"), quantize="int2")
