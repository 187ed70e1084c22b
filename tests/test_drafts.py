"""Drafts accepted wholly and in part: the streaming engine's verify-then-extend path (DESIGN.md 3.4)
on a test network whose text mostly stays as the audio grows.

The random test networks change their whole answer whenever the audio grows, so each update's
draft is rejected at its first token and accepting a draft, or cutting it back at the first
disagreement, is never exercised. ``stable_network`` (tests/checkpoints.py) keeps a prefix of its
answer and changes after it, or not at all: here updates accept their draft wholly and in part,
and every one of them must still be token-identical to `generate` on the same audio.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import Qwen3ASRForConditionalGeneration, Qwen3ASRProcessor

from asrlive._local import stream_audio
from asrlive.engine import SAMPLE_RATE, AsrModel, DecodingOptions, Hypothesis, StreamTranscriber, transcribe
from asrlive.engine._incremental import UtteranceDecoder
from asrlive.engine._steps import Steps
from asrlive.streaming import Session, SessionOptions

from . import serving
from .conftest import Reference
from .serving import GAP, running_server

# A fixed budget under 40 tokens: the stable network's chain often runs to the cap, and an answer
# this short is never cut as a loop, so the engine's answer is `generate`'s as it is.
MAX_NEW_TOKENS = 32
PARTIAL_INTERVAL_MS = 500  # in process, 12 updates on `talk`, each checked against `generate`

Expected = Callable[[np.ndarray, str | None], list[int]]  # token ids for (audio, language)


@dataclass(frozen=True)
class Update:
    """One streaming update as the engine ran it: the utterance audio it saw, its draft, its answer."""

    audio: np.ndarray
    draft: tuple[int, ...]
    hypothesis: Hypothesis

    @property
    def whole(self) -> bool:
        return bool(self.draft) and self.hypothesis.accepted == len(self.draft)

    @property
    def partial(self) -> bool:
        return 0 < self.hypothesis.accepted < len(self.draft)


def recording_transcriber(updates: list[Update]) -> type[StreamTranscriber]:
    """A StreamTranscriber whose utterance decoders append each update they complete to ``updates``."""

    class RecordingDecoder(UtteranceDecoder):
        def update_steps(self, max_new_tokens: int) -> Steps[Hypothesis]:
            draft = tuple(self.draft[:max_new_tokens])  # what the update verifies, cut as update_steps cuts it
            hypothesis = yield from super().update_steps(max_new_tokens)
            updates.append(Update(self.mel.samples.copy(), draft, hypothesis))
            return hypothesis

    class Recording(StreamTranscriber):
        decoder_class = RecordingDecoder

    return Recording


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@pytest.fixture(scope="module")
def stable_models(stable_checkpoints: dict[str, Path]) -> dict[str, AsrModel]:
    """The engine on the stable network, by layout: float32 and transformers' own products, as conftest loads the
    random one, so that its logits are bit for bit those of `generate`."""
    return {
        layout: AsrModel.load(str(path), "float32", plain_weights=True) for layout, path in stable_checkpoints.items()
    }


@pytest.fixture(scope="module")
def expected(stable_checkpoints: dict[str, Path]) -> Expected:
    """transformers' greedy `generate` on the stable network: token ids for (audio, language), memoized."""
    path = stable_checkpoints["hf"]
    network = Qwen3ASRForConditionalGeneration.from_pretrained(path, dtype=torch.float32)  # in eval mode
    reference = Reference(Qwen3ASRProcessor.from_pretrained(path), network, torch.float32)
    answers: dict[tuple[bytes, str | None], list[int]] = {}

    def token_ids(audio: np.ndarray, language: str | None) -> list[int]:
        key = (audio.tobytes(), language)
        if key not in answers:
            answers[key] = reference.token_ids(audio, language, None, MAX_NEW_TOKENS)
        return answers[key]

    return token_ids


@pytest.fixture(scope="module")
def talk(speech: dict[str, np.ndarray]) -> np.ndarray:
    """Two utterances of real speech (2.8 s and 3.0 s), each followed by a pause that ends it."""
    return np.concatenate([GAP, speech["goforward"], GAP, speech["librivox-0880"], GAP])


def check_updates(updates: list[Update], language: str | None, expected: Expected) -> None:
    """Every update is `generate` on its audio, and it kept its draft exactly up to the first disagreement."""
    assert updates
    for n, update in enumerate(updates):
        tokens = update.hypothesis.token_ids
        where = f"update {n} on {update.audio.size / SAMPLE_RATE} s"
        assert list(tokens) == expected(update.audio, language), where
        assert update.hypothesis.accepted == common_prefix(update.draft, tokens), where


def check_events(
    events: list[dict[str, Any]], audio: np.ndarray, model: AsrModel, options: DecodingOptions, expected: Expected
) -> None:
    """Partials are `generate` on their utterance's audio so far; finals are that and offline transcription."""
    results = [e for e in events if e["type"] in ("partial", "final")]
    for event in results:
        end = event["audio_end"] if event["type"] == "partial" else event["end"]
        piece = audio[round(event["start"] * SAMPLE_RATE) : round(end * SAMPLE_RATE)]
        where = f"{event['type']} of segment {event['segment']} at {end} s"
        assert event["token_ids"] == expected(piece, options.language), where
        if event["type"] == "final":
            offline = transcribe(model, piece, options)
            assert (event["token_ids"], event["text"]) == (offline.token_ids, offline.text), where
    assert [e["segment"] for e in results if e["type"] == "final"] == [0, 1]


@pytest.mark.parametrize("language", [None, "English"])
def test_offline_transcription_equals_generate(
    speech: dict[str, np.ndarray], stable_models: dict[str, AsrModel], expected: Expected, language: str | None
) -> None:
    clips = {
        "cards-001": speech["cards-001"],
        "goforward": speech["goforward"],
        "librivox-0880": speech["librivox-0880"],
        "two-cities-12s": speech["two-cities"][: 12 * SAMPLE_RATE],  # a completed 8 s window and an open one
    }
    options = DecodingOptions(language=language, max_new_tokens=MAX_NEW_TOKENS)
    for name, audio in clips.items():
        for layout, model in stable_models.items():
            assert transcribe(model, audio, options).token_ids == expected(audio, language), f"{name}, {layout}"
    answers = {tuple(expected(audio, language)) for audio in clips.values()}
    assert len(answers) > 1, "the stable network's answer still depends on the audio"


@pytest.mark.parametrize("language", [None, "English"])
def test_streamed_drafts_accepted_wholly_and_in_part_stay_exact(
    talk: np.ndarray, stable_models: dict[str, AsrModel], expected: Expected, language: str | None
) -> None:
    model = stable_models["hf"]
    options = DecodingOptions(language=language, max_new_tokens=MAX_NEW_TOKENS)
    updates: list[Update] = []
    transcriber = recording_transcriber(updates)(model, options)
    session = Session(SessionOptions(partial_interval_ms=PARTIAL_INTERVAL_MS))
    events = [e.to_json() for e in stream_audio(session, transcriber, talk)]

    check_updates(updates, language, expected)
    assert sum(u.whole for u in updates) >= 2, "drafts accepted whole"
    assert sum(u.partial for u in updates) >= 2, "drafts accepted in part, then decoded on"
    check_events(events, talk, model, options, expected)
    # The session shows as solid the text two hypotheses agree on: with a stable answer, some.
    assert any(e["stable"] for e in events if e["type"] == "partial")


@pytest.mark.asyncio
async def test_server_results_equal_the_reference(
    talk: np.ndarray, stable_models: dict[str, AsrModel], expected: Expected
) -> None:
    """Real speech over /v1/stream, in real time, to a server running the stable network. Its partials
    come when the engine is free, so which drafts it verifies depends on timing: the test above counts
    wholes and parts on the same audio; here every result and every update must be exact."""
    model = stable_models["hf"]
    updates: list[Update] = []
    options = DecodingOptions(max_new_tokens=MAX_NEW_TOKENS)
    session = SessionOptions(partial_interval_ms=PARTIAL_INTERVAL_MS)
    async with running_server(model, recording_transcriber(updates), decoding=options, session=session) as server:
        # In real time (100 ms frames): at 5x real time this server computed only the finals, so no drafts.
        result = await serving.stream_audio(server.url, talk, pace=0.1)

    assert result.close_code == 1000 and result.types[-1] == "done"
    check_events(result.events, talk, model, options, expected)
    check_updates(updates, None, expected)
    # On this speech the stable network never changes its first tokens: an update with a draft accepts some.
    assert any(u.hypothesis.accepted for u in updates), "the server's updates verified drafts"
