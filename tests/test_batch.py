"""Batched inference: the ragged LLM forward and the lockstep driver of many streams' work."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from transformers import DynamicCache, Qwen3ASRForConditionalGeneration

from asrlive.engine import SAMPLE_RATE, AsrModel, DecodingOptions, StreamTranscriber, run_batch
from asrlive.engine._checkpoint import load_network, read_checkpoint
from asrlive.engine._steps import Step

PROMPTS = [
    DecodingOptions(),
    DecodingOptions(language="English"),
    DecodingOptions(context="Chapter three. Mister Ruggles."),
    DecodingOptions(language="German", context="Protokoll"),
    DecodingOptions(language="French"),
]


def _cache_argument(module: torch.nn.Module) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns); older releases know only it."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _transformers_pass(network: Qwen3ASRForConditionalGeneration, embeds: torch.Tensor, cache: DynamicCache) -> int:
    language_model = network.model.language_model
    kwargs = {_cache_argument(language_model): cache}
    hidden = language_model(inputs_embeds=embeds[None], use_cache=True, **kwargs)
    return int(network.lm_head(hidden.last_hidden_state[0, -1:]).argmax(-1)[0])


def test_one_sequence_is_bit_identical_to_transformers(load_model, checkpoints):
    model = load_model("hf")
    # transformers' own network on the same file (the engine keeps none of its modules).
    network = load_network(read_checkpoint(checkpoints["hf"]), torch.float32)
    torch.manual_seed(1)
    hidden = model.hidden_size
    ours, theirs = model.new_cache(), DynamicCache(config=network.config.text_config)
    # Prefill into an empty cache, prefill after a cache, then decode steps.
    with torch.inference_mode():
        for rows in (37, 12, 1, 1, 1):
            embeds = torch.randn(rows, hidden)
            assert int(model.forward(embeds, ours, 1)[0]) == _transformers_pass(network, embeds, theirs)
            for index, reference in enumerate(theirs.layers):
                keys, values = ours.layer(index)  # (kv heads, length, head_dim)
                assert torch.equal(keys, reference.keys[0]) and torch.equal(values, reference.values[0])


def _clips(speech) -> list[np.ndarray]:
    names = sorted(speech)
    return [speech[names[i % len(names)]][: (3 + i) * SAMPLE_RATE] for i in range(len(PROMPTS))]


def _each_alone(model: AsrModel, clips) -> list[tuple[int, ...]]:
    pairs = zip(PROMPTS, clips, strict=True)
    return [StreamTranscriber(model, options).transcribe(0, clip, True).token_ids for options, clip in pairs]


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_batched_streams_get_their_own_results(load_model, checkpoints, speech, packed):
    """Five streams with different prompts and audio lengths, batched: each gets what it gets alone,
    partial after partial (the verified drafts and truncated caches of a stream stay its own)."""
    model = AsrModel.load(str(checkpoints["hf"]), "float32") if packed else load_model("hf")
    assert model.info.weights == ("packed" if packed else "plain")
    clips = _clips(speech)
    alone = [StreamTranscriber(model, options) for options in PROMPTS]
    together = [StreamTranscriber(model, options) for options in PROMPTS]
    for seconds in (1.5, 2.5, 3.0):
        pieces = [clip[: int(seconds * SAMPLE_RATE)] for clip in clips]
        expected = [t.transcribe(0, piece, False) for t, piece in zip(alone, pieces, strict=True)]
        computations = [t.transcribe_steps(0, piece, False) for t, piece in zip(together, pieces, strict=True)]
        got = run_batch(model, computations)
        assert [h.token_ids for h in got] == [h.token_ids for h in expected]
        assert [h.accepted for h in got] == [h.accepted for h in expected]
    finals = run_batch(model, [t.transcribe_steps(0, clip, True) for t, clip in zip(together, clips, strict=True)])
    assert [h.token_ids for h in finals] == _each_alone(model, clips)
    assert len({h.token_ids for h in finals}) == len(PROMPTS), "the streams' answers differ from each other"


def test_a_failing_stream_leaves_the_batch_running(load_model, speech):
    model = load_model("hf")
    clip = next(iter(speech.values()))[: 2 * SAMPLE_RATE]

    def broken():
        yield Step(torch.zeros(3, 7), model.new_cache(), 1)  # wrong hidden size: the forward fails

    def bad_audio():
        raise ValueError("no audio")
        yield  # a generator that fails before its first step

    good = StreamTranscriber(model)
    results = run_batch(model, [bad_audio(), good.transcribe_steps(0, clip, True)])
    assert isinstance(results[0], ValueError)
    assert results[1].token_ids == StreamTranscriber(model).transcribe(0, clip, True).token_ids
    results = run_batch(model, [broken(), StreamTranscriber(model).transcribe_steps(0, clip, True)])
    assert all(isinstance(r, RuntimeError) for r in results), "a failed forward fails the streams in it"
