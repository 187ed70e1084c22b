"""Checkpoints load from a directory or the Hugging Face cache, in both layouts; failures explain themselves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from asrlive.engine import AsrModel, ModelLoadError
from asrlive.engine._checkpoint import load_network, read_checkpoint
from asrlive.engine._weights import PlainMatrix

from .checkpoints import write_original_tokenizer


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, target)
    return target


def test_both_layouts_load_the_same_weights(load_model, checkpoints):
    hf, original = load_model("hf"), load_model("original")
    assert (hf.info.layout, original.info.layout) == ("hf", "original")
    networks = [load_network(read_checkpoint(checkpoints[layout]), torch.float32) for layout in ("hf", "original")]
    hf_state, original_state = (network.state_dict() for network in networks)
    assert hf_state.keys() == original_state.keys()
    for name, tensor in hf_state.items():
        assert torch.equal(tensor, original_state[name]), name


def test_original_tokenizer_files_give_the_same_ids(load_model):
    text = "<|im_start|>system\nNorland Park, 1811 — 诺兰公园<|im_end|>\n<|audio_start|><|audio_pad|><asr_text>"
    hf_ids = load_model("hf").tokenizer.encode(text, add_special_tokens=False)
    original_ids = load_model("original").tokenizer.encode(text, add_special_tokens=False)
    assert hf_ids == original_ids
    assert [151669, 151676, 151704] == hf_ids[-3:]


@pytest.mark.parametrize("dtype, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_dtype_choice(load_model, dtype, expected):
    model = load_model("original", dtype)
    assert model.dtype == expected
    matrices = [*model.llm.matrices(), *model.encoder.matrices()]
    assert all(isinstance(m, PlainMatrix) for m in matrices)  # the tests' models multiply plainly
    assert {m.weight.dtype for m in matrices if isinstance(m, PlainMatrix)} == {expected}


def test_loads_from_the_hugging_face_cache(checkpoints, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--Qwen--Qwen3-ASR-0.6B" / "snapshots" / "0123abcd"
    shutil.copytree(checkpoints["original"], snapshot)
    (tmp_path / "models--Qwen--Qwen3-ASR-0.6B" / "refs").mkdir()
    (tmp_path / "models--Qwen--Qwen3-ASR-0.6B" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    model = AsrModel.load("Qwen/Qwen3-ASR-0.6B", "float32")

    assert model.info.path == snapshot
    assert model.info.layout == "original"


def test_hub_id_missing_offline_says_how_to_get_it(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as err:
        AsrModel.load("Qwen/Qwen3-ASR-1.7B")
    message = str(err.value)
    assert "'Qwen/Qwen3-ASR-1.7B' is not in the Hugging Face cache" in message
    assert str(tmp_path) in message
    assert "hf download Qwen/Qwen3-ASR-1.7B" in message
    assert "--model" in message


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/dir", "not-a-repo-id"])
def test_neither_directory_nor_hub_id(name):
    with pytest.raises(ModelLoadError, match="neither a checkpoint directory nor a Hugging Face id"):
        AsrModel.load(name)


def _break_config(directory: Path) -> None:
    (directory / "config.json").write_text('{"model_type": "qwen3_asr", "thinker_config": ')


def _wrong_model_type(directory: Path) -> None:
    (directory / "config.json").write_text(json.dumps({"model_type": "whisper"}))


def _truncate_weights(directory: Path) -> None:
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])


def _drop_a_tensor(directory: Path) -> None:
    state = load_file(directory / "model.safetensors")
    del state["thinker.audio_tower.proj2.weight"]
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


def _drop_weights(directory: Path) -> None:
    (directory / "model.safetensors").unlink()


def _drop_tokenizer(directory: Path) -> None:
    (directory / "merges.txt").unlink()


def _tokenizer_without_asr_tokens(directory: Path) -> None:
    write_original_tokenizer(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items() if int(k) < 151669}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "damage, message",
    [
        (_break_config, "config.json is not valid JSON"),
        (_wrong_model_type, "describes a 'whisper' model, not a Qwen3-ASR one"),
        (_truncate_weights, "could not be read .*truncated or corrupt"),
        (_drop_a_tensor, r"do not match its config.json: 1 missing keys \(e.g. model.multi_modal_projector"),
        (_drop_weights, r"has no \*.safetensors weight files"),
        (_drop_tokenizer, r"has no tokenizer \(tokenizer.json, or vocab.json \+ merges.txt\)"),
        (_tokenizer_without_asr_tokens, r"maps the ASR token <\|audio_start\|> to id \d+, but Qwen3-ASR needs 151669"),
    ],
)
def test_damaged_checkpoint_gets_a_clear_error(checkpoints, tmp_path, damage, message):
    directory = _copy(checkpoints["original"], tmp_path)
    damage(directory)
    with pytest.raises(ModelLoadError, match=message):
        AsrModel.load(str(directory), "float32")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json: it is not a Qwen3-ASR checkpoint"):
        AsrModel.load(str(tmp_path))


def test_unknown_dtype_is_refused(checkpoints):
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        AsrModel.load(str(checkpoints["hf"]), "float16")
