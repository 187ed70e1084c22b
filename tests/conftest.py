from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

# The commands' weights cache lives in the Hugging Face home: the tests', not the user's. Set
# before anything imports huggingface_hub, which reads it once.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="asrlive-tests-hf-")

import numpy as np
import pytest
import torch
from transformers import Qwen3ASRForConditionalGeneration, Qwen3ASRForTokenClassification, Qwen3ASRProcessor

from asrlive.engine import AsrModel, load_audio
from asrlive.engine._aligner import Aligner

from . import requires
from .checkpoints import (
    FIXTURES,
    random_aligner,
    random_network,
    stable_network,
    write_hf_aligner,
    write_hf_checkpoint,
    write_original_aligner,
    write_original_checkpoint,
)
from .serving import GAP

EOS = (151643, 151645)
# A test that runs a model (the tiny checkpoints, transformers' reference) takes seconds: it is
# `slow`, left out of the daily loop (`pytest -m "not slow"`) and run in CI.
MODEL_FIXTURES = {
    "checkpoints",
    "stable_checkpoints",
    "load_model",
    "reference",
    "aligners",
    "load_aligner",
    "aligner_reference",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{requires.MARK}(reason): needs a component; reason None when present (tests/requires.py)"
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ["HF_HOME"], ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A missing component skips the test (fails it under CI) before its fixtures are set up."""
    requires.check(item)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The same random weights saved in both layouts: {"hf": dir, "original": dir}."""
    root = tmp_path_factory.mktemp("checkpoints")
    network = random_network(seed=0)
    return {
        "hf": write_hf_checkpoint(network, root / "tiny-hf"),
        "original": write_original_checkpoint(network, root / "tiny-original"),
    }


@pytest.fixture(scope="session")
def stable_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``stable_network`` (its text mostly stays as the audio grows) in both layouts: {"hf": dir, "original": dir}."""
    root = tmp_path_factory.mktemp("stable-checkpoints")
    network = stable_network()
    return {
        "hf": write_hf_checkpoint(network, root / "stable-hf"),
        "original": write_original_checkpoint(network, root / "stable-original"),
    }


@pytest.fixture(scope="session")
def load_model(checkpoints):
    """Engine models by (layout, dtype), loaded once per session through the public loader."""
    cache: dict[tuple[str, str], AsrModel] = {}

    def load(layout: str, dtype: str = "float32") -> AsrModel:
        if (layout, dtype) not in cache:
            cache[layout, dtype] = AsrModel.load(str(checkpoints[layout]), dtype, plain_weights=True)
        return cache[layout, dtype]

    return load


@dataclass
class Reference:
    """transformers' own pipeline on the same weights: the processor and greedy `generate`."""

    processor: Qwen3ASRProcessor
    model: Qwen3ASRForConditionalGeneration
    dtype: torch.dtype

    def token_ids(self, audio: np.ndarray, language: str | None, context: str | None, max_new_tokens: int) -> list[int]:
        inputs = self.processor.apply_transcription_request(audio=audio, language=language, prompt=context)
        inputs = inputs.to(self.dtype)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        generated = out[0, inputs["input_ids"].shape[1] :].tolist()
        if generated and generated[-1] in EOS:
            generated = generated[:-1]
        return generated


@pytest.fixture(scope="session")
def reference(checkpoints):
    cache: dict[str, Reference] = {}

    def get(dtype: str = "float32") -> Reference:
        if dtype not in cache:
            torch_dtype = getattr(torch, dtype)
            model = Qwen3ASRForConditionalGeneration.from_pretrained(checkpoints["hf"], dtype=torch_dtype).eval()
            processor = Qwen3ASRProcessor.from_pretrained(checkpoints["hf"])
            cache[dtype] = Reference(processor, model, torch_dtype)
        return cache[dtype]

    return get


@pytest.fixture(scope="session")
def aligners(tmp_path_factory) -> dict[str, Path]:
    """One tiny forced aligner saved in both layouts: {"hf": dir, "original": dir}."""
    root = tmp_path_factory.mktemp("aligners")
    network = random_aligner(seed=1)
    return {
        "hf": write_hf_aligner(network, root / "aligner-hf"),
        "original": write_original_aligner(network, root / "aligner-original"),
    }


@pytest.fixture(scope="session")
def load_aligner(aligners):
    """Engine aligners by layout (float32), loaded once per session through the public loader."""
    cache: dict[str, Aligner] = {}

    def load(layout: str = "hf") -> Aligner:
        if layout not in cache:
            cache[layout] = Aligner.load(str(aligners[layout]), "float32", plain_weights=True)
        return cache[layout]

    return load


@dataclass
class AlignerReference:
    """transformers' forced-alignment pipeline: the processor's inputs, the token classifier, its decoding."""

    processor: Qwen3ASRProcessor
    model: Qwen3ASRForTokenClassification

    def words(self, audio: np.ndarray, text: str, language: str | None) -> list[tuple[str, float, float]]:
        inputs, units = self.processor.prepare_forced_aligner_inputs(audio, text, language)
        with torch.no_grad():
            logits = self.model(**inputs).logits
        timestamp_id = self.model.config.timestamp_token_id
        [items] = self.processor.decode_forced_alignment(logits, inputs["input_ids"], units, timestamp_id)
        return [(item["text"], item["start_time"], item["end_time"]) for item in items]


@pytest.fixture(scope="session")
def aligner_reference(aligners) -> AlignerReference:
    model = Qwen3ASRForTokenClassification.from_pretrained(aligners["hf"], dtype=torch.float32).eval()
    return AlignerReference(Qwen3ASRProcessor.from_pretrained(aligners["hf"]), model)


@pytest.fixture(scope="session")
def speech() -> dict[str, np.ndarray]:
    """Every fixture clip as 16 kHz mono float32, by name."""
    return {path.stem: load_audio(path) for path in sorted((FIXTURES / "speech").glob("*.wav"))}


@pytest.fixture(scope="session")
def two_utterances(speech) -> np.ndarray:
    """Half a second of silence, two utterances, each followed by a pause long enough to end it."""
    return np.concatenate([GAP[:8000], speech["goforward"], GAP, speech["cards-001"], GAP])


@pytest.fixture
def loopback_ice(monkeypatch) -> None:
    """WebRTC tests: ICE on 127.0.0.1 only (tests/rtc.py)."""
    from .rtc import restrict_ice_to_loopback

    restrict_ice_to_loopback(monkeypatch)


@pytest.fixture
def heard(monkeypatch) -> dict[str, list[np.ndarray]]:
    """The 16 kHz audio each session is fed on the server, by session id (tests/rtc.py)."""
    from .rtc import record_received_audio

    return record_received_audio(monkeypatch)
