"""The incremental decoder driven by a fake model, in milliseconds: which encoder and LLM work an
update asks for, that caches are reused and not recomputed, and that an update abandoned at any
point leaves the decoder exact. The fake model's answer depends on every embedding in its cache,
in order, so any mistake in what the decoder feeds it changes the tokens."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from asrlive.engine._encoder import _after_convs
from asrlive.engine._incremental import UtteranceDecoder
from asrlive.engine._kvcache import KVCache
from asrlive.engine._prompt import PromptIds
from asrlive.engine._steps import EOS_IDS, Encode, Request, Step, greedy_steps, run

HIDDEN = 4
PROMPT = PromptIds(prefix=[1, 2, 3], suffix=[4, 5])
RATE = 16_000


class FakeModel:
    """A deterministic stand-in for AsrModel (the engine's ``Model`` protocol)."""

    tokenizer = None
    dtype = torch.float64
    device = torch.device("cpu")
    frames_per_chunk = 100
    frames_per_window = 800
    mel_filters = np.random.default_rng(0).random((201, 128)).astype(np.float32) / 100

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.fronts = 0  # chunks through the front end

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor(token_ids, dtype=torch.float64)[:, None]
        return torch.cat([ids.cos(), ids.sin(), (ids / 7).cos(), (ids / 3).sin()], dim=1)  # (n, HIDDEN)

    def encode_front(self, features: torch.Tensor) -> list[torch.Tensor]:
        chunks = features.split(self.frames_per_chunk, dim=1)
        self.fronts += len(chunks)
        # (n_mels, frames) -> (tokens, 2): a token per conv output, from its chunk's frames
        return [c.double().mean(0)[: _after_convs(c.shape[1])][:, None].repeat(1, 2) for c in chunks]

    def encode_batch(self, requests: Sequence[Encode]) -> list[torch.Tensor]:
        self.requests += requests
        # Attention over the window: every token sees the window's mean.
        return [torch.cat([r.front, r.front.mean(0, keepdim=True).expand_as(r.front)], dim=1) for r in requests]

    def forward_batch(self, steps: Sequence[Step]) -> list[torch.Tensor]:
        self.requests += steps
        out = []
        for step in steps:
            start = step.cache.reserve(step.embeds.shape[0])
            keys, _ = step.cache.write(0, start, step.embeds[None], step.embeds[None])  # (1, length, HIDDEN)
            step.cache.commit(step.embeds.shape[0])
            # A causal "model": row i's id hashes everything up to it, position included.
            weights = torch.arange(1, keys.shape[1] + 1, dtype=torch.float64)[:, None].sqrt()
            sums = (keys[0] * weights).cumsum(0)[-step.embeds.shape[0] :].sum(1)  # (n,)
            ids = 1000 + (sums.abs() * 1e4).long() % 40
            ids[(sums.abs() * 1e4).long() % 23 == 0] = EOS_IDS[1]
            out.append(ids[len(ids) - step.n_logits :])
        return out

    def new_cache(self) -> KVCache:
        return KVCache(1, 1, HIDDEN, torch.float64)

    def decode_text(self, token_ids: list[int]) -> str:
        return " ".join(map(str, token_ids))


def _from_scratch(model: FakeModel, decoder: UtteranceDecoder, max_new_tokens: int) -> tuple[int, ...]:
    """What decoding the whole utterance afresh gives: all windows encoded, one prefill, greedy steps."""
    features = decoder.mel.features()
    fronts = model.encode_front(features)
    windows = [torch.cat(fronts[i : i + 8]) for i in range(0, len(fronts), 8)]
    audio = model.encode_batch([Encode(w) for w in windows])
    cache = model.new_cache()
    embeds = torch.cat([model.embed(PROMPT.prefix), *audio, model.embed(PROMPT.suffix)])
    first = int(model.forward_batch([Step(embeds, cache, 1)])[0][0])
    return tuple(run(model, greedy_steps(model, first, cache, [], max_new_tokens)))


def _speechlike(seconds: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.1 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(t)) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def test_every_update_equals_decoding_from_scratch():
    model = FakeModel()
    audio = _speechlike(19.5)
    decoder = UtteranceDecoder(model, PROMPT, None)  # type: ignore[arg-type]  # the fake is a Model
    for end in np.arange(0.7, 19.5, 0.6):
        decoder.append(audio[decoder.mel.n_samples : int(end * RATE)])
        got = decoder.update(30)
        assert got.token_ids == _from_scratch(model, decoder, 30), f"at {end:.1f} s"


def test_complete_chunks_and_windows_are_computed_once():
    model = FakeModel()
    audio = _speechlike(17.0)
    decoder = UtteranceDecoder(model, PROMPT, None)  # type: ignore[arg-type]
    updates = 0
    for end in range(1, 18):
        decoder.append(audio[decoder.mel.n_samples : end * RATE])
        decoder.update(20)
        updates += 1
    # 17 s: 16 complete chunks once each, plus at most the chunk still filling at each update.
    assert decoder.chunks_computed <= 16 + updates
    assert decoder.windows_encoded == 2
    encodes = [r for r in model.requests if isinstance(r, Encode)]
    assert max(r.front.shape[0] for r in encodes) == 104, "no request spans more than one 8 s window"


def test_a_louder_frame_recomputes_only_what_it_changed():
    model = FakeModel()
    audio = _speechlike(12.0)
    audio[: 9 * RATE] *= 1e-3  # quiet speech fills the first window ...
    audio[int(10.5 * RATE) : int(10.6 * RATE)] *= 20  # ... then a loud frame moves its clamp floor
    decoder = UtteranceDecoder(model, PROMPT, None)  # type: ignore[arg-type]
    for end in (9.0, 10.0, 12.0):
        decoder.append(audio[decoder.mel.n_samples : int(end * RATE)])
        assert decoder.update(20).token_ids == _from_scratch(model, decoder, 20)
    assert decoder.windows_encoded >= 2, "the completed window was re-encoded after the floor moved"


@pytest.mark.parametrize("abandon_at", range(6))
def test_an_update_abandoned_at_any_request_leaves_the_decoder_exact(abandon_at):
    model = FakeModel()
    audio = _speechlike(10.0)
    decoder = UtteranceDecoder(model, PROMPT, None)  # type: ignore[arg-type]
    decoder.append(audio[: 6 * RATE])
    decoder.update(25)
    decoder.append(audio[6 * RATE : 9 * RATE])
    update = decoder.update_steps(25)
    request = next(update)
    for _ in range(abandon_at):
        answer = model.encode_batch([request])[0] if isinstance(request, Encode) else model.forward_batch([request])[0]
        try:
            request = update.send(answer)
        except StopIteration:
            break
    update.close()
    decoder.append(audio[9 * RATE :])
    assert decoder.update(25).token_ids == _from_scratch(model, decoder, 25)
