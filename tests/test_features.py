"""Incremental log-mel: bit-identical to the reference feature extractor on every prefix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen3ASRFeatureExtractor

from asrlive.engine._features import IncrementalMel

EXTRACTOR = Qwen3ASRFeatureExtractor()


def _reference(audio: np.ndarray) -> torch.Tensor:
    out = EXTRACTOR(audio, sampling_rate=16000, padding=True, return_attention_mask=True, return_tensors="pt")
    return out["input_features"][0, :, : int(out["attention_mask"].sum())]


@pytest.fixture(scope="module")
def quiet_then_loud(speech) -> np.ndarray:
    """Near-silence, then speech 40 dB louder: the running maximum jumps mid-stream."""
    clip = speech["two-cities"][: 12 * 16000]
    return np.concatenate([0.01 * clip[: 4 * 16000], clip[4 * 16000 :]]).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_every_prefix_matches_the_extractor(quiet_then_loud, seed):
    rng = np.random.default_rng(seed)
    mel = IncrementalMel(EXTRACTOR.mel_filters)
    fed = 0
    while fed < quiet_then_loud.size:
        step = int(rng.choice([1, 159, 160, 161, 480, 1600, 7999, 8000]))
        mel.append(quiet_then_loud[fed : fed + step])
        fed = min(quiet_then_loud.size, fed + step)
        if rng.random() < 0.15 or fed == quiet_then_loud.size:
            assert torch.equal(mel.features(), _reference(quiet_then_loud[:fed])), f"after {fed} samples"


def test_truncate_then_grow_again(quiet_then_loud):
    mel = IncrementalMel(EXTRACTOR.mel_filters)
    mel.append(quiet_then_loud)
    for cut in (150_000, 64_321, 8_000, 7_999, 200):
        mel.truncate(cut)
        assert torch.equal(mel.features(), _reference(quiet_then_loud[:cut])), f"truncated to {cut}"
    mel.append(quiet_then_loud[200:90_000])
    assert torch.equal(mel.features(), _reference(quiet_then_loud[:90_000]))


def test_final_frames_never_change(quiet_then_loud):
    mel = IncrementalMel(EXTRACTOR.mel_filters)
    mel.append(quiet_then_loud[:50_000])
    frozen, count = torch.cat(mel._final, dim=1).clone(), mel.n_final
    mel.append(quiet_then_loud[50_000:])
    assert count == (50_000 - 200) // 160 + 1
    assert torch.equal(torch.cat(mel._final, dim=1)[:, :count], frozen)
