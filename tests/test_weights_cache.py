"""The weights cache (engine/_cache.py): the engine's layout on disk, read back exactly, rebuilt when broken."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from asrlive.engine import SAMPLE_RATE, AsrModel, DecodingOptions, transcribe
from asrlive.engine._aligner import Aligner

FORMATS = [("float32", None, True), ("float32", None, False), ("float32", "int8", False), ("float32", "int4", False)]
IDS = ["plain", "packed", "int8", "int4"]


def _load(checkpoint: Path, cache: Path, quantize: str | None = None, plain: bool = False) -> AsrModel:
    return AsrModel.load(str(checkpoint), "float32", quantize=quantize, plain_weights=plain, weights_cache=cache)


def _files(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.safetensors"))


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, target)
    return target


@pytest.mark.parametrize("dtype, quantize, plain", FORMATS, ids=IDS)
def test_a_cached_model_transcribes_exactly_as_the_converted_one(checkpoints, speech, tmp_path, dtype, quantize, plain):
    cache = tmp_path / "cache"
    built = _load(checkpoints["hf"], cache, quantize, plain)
    [written] = _files(cache)
    mapped = _load(checkpoints["hf"], cache, quantize, plain)
    assert _files(cache) == [written] and mapped.info == built.info
    clip = speech["librivox-0870"][: 4 * SAMPLE_RATE]
    options = DecodingOptions(max_new_tokens=12, cut_loops=False)
    assert transcribe(mapped, clip, options).token_ids == transcribe(built, clip, options).token_ids
    torch.manual_seed(0)
    for ours, theirs in zip(mapped.llm.matrices(), built.llm.matrices(), strict=True):
        rows = torch.randn(2, ours.shape[1])
        assert ours.kind == theirs.kind and torch.equal(ours(rows), theirs(rows))


def test_plain_weights_from_the_cache_are_transformers_bits(checkpoints, load_model, speech, tmp_path):
    cache = tmp_path / "cache"
    _load(checkpoints["original"], cache, plain=True)
    mapped = _load(checkpoints["original"], cache, plain=True)
    clip = speech["cards-005"]
    options = DecodingOptions(max_new_tokens=10, cut_loops=False)
    assert transcribe(mapped, clip, options).token_ids == transcribe(load_model("original"), clip, options).token_ids


def test_each_format_and_checkpoint_has_its_own_file(checkpoints, tmp_path):
    cache = tmp_path / "cache"
    _load(checkpoints["hf"], cache)
    _load(checkpoints["hf"], cache, "int8")
    _load(checkpoints["original"], cache)
    assert len(_files(cache)) == 3


def test_a_changed_checkpoint_replaces_its_file(checkpoints, tmp_path):
    checkpoint, cache = _copy(checkpoints["hf"], tmp_path), tmp_path / "cache"
    _load(checkpoint, cache)
    [old] = _files(cache)
    weights = next(checkpoint.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # a new download
    _load(checkpoint, cache)
    [new] = _files(cache)
    assert new != old and new.name.split("-")[0] == old.name.split("-")[0]  # same checkpoint and format


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_broken_file_is_rebuilt(checkpoints, speech, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    good = _load(checkpoints["hf"], cache, plain=True)
    [path] = _files(cache)
    data = path.read_bytes()
    broken = {"truncated": data[: len(data) // 2], "garbage": b"\xff" * 64 + data[64:], "empty": b""}[damage]
    path.write_bytes(broken)
    with caplog.at_level(logging.WARNING, logger="asrlive.engine"):
        rebuilt = _load(checkpoints["hf"], cache, plain=True)
    assert "is unusable" in caplog.text and "rebuilding it" in caplog.text
    assert _files(cache) == [path] and path.read_bytes() == data  # written again, whole
    clip = speech["cards-001"]
    options = DecodingOptions(max_new_tokens=6, cut_loops=False)
    assert transcribe(rebuilt, clip, options).token_ids == transcribe(good, clip, options).token_ids


def test_an_unwritable_cache_only_costs_speed(checkpoints, tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="asrlive.engine"):
        model = _load(checkpoints["hf"], blocker / "cache")
    assert model.info.weights == "packed" and "could not write the weights cache" in caplog.text


def test_the_aligner_is_cached_too(aligners, tmp_path):
    cache = tmp_path / "cache"
    built = Aligner.load(str(aligners["hf"]), "float32", weights_cache=cache)
    mapped = Aligner.load(str(aligners["hf"]), "float32", weights_cache=cache)
    assert len(_files(cache)) == 1 and mapped.timing == built.timing
    torch.manual_seed(0)
    rows = torch.randn(3, built.llm.head.shape[1])
    assert torch.equal(mapped.llm.head(rows), built.llm.head(rows))
