"""A decode that loops is cut (engine/_loops.py): the rule on its own, then on a checkpoint edited to loop,
offline, streaming, through the server and the command line."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen3ASRForConditionalGeneration, Qwen3ASRProcessor

from asrlive._cli_serve import _server_options
from asrlive._local import stream_audio
from asrlive.cli import _build_parser, main
from asrlive.engine import SAMPLE_RATE, AsrModel, DecodingOptions, StreamTranscriber, transcribe
from asrlive.engine._loops import MAX_PERIOD, Loop, first_loop, loop_at, span, without_loop
from asrlive.engine._offline import piece_steps, token_budget
from asrlive.engine._prompt import build_prompt
from asrlive.engine._steps import EOS_IDS, Encode, Step, Steps, greedy_steps, run
from asrlive.streaming import Session, SessionOptions

from .checkpoints import FIXTURES, random_network, write_hf_checkpoint
from .conftest import Reference
from .serving import GAP, running_server
from .serving import stream_audio as stream_to_server

T = TypeVar("T")

NO, PING, PONG = 902, 29998, 77622  # " no", " ping", " pong"
# Tokens the random network writes after a few others on CLIP (an edited embedding changes nothing before
# its token's first occurrence): the first leads into " ping pong ..." (period 2), the second into " no no ..."
INTO_PING, INTO_NO = 124899, 103647
CLIP = "librivox-0930"  # 3.3 s: a budget of 56 tokens, room for a prefix and 40 tokens of loop
# language -> (the token that starts the loop, its period): what the edited network writes on CLIP
LOOPS = {None: (PING, 2), "English": (NO, 1)}


# --- the rule ---------------------------------------------------------------------------------


def test_spans():
    assert [span(p) for p in (1, 2, 8, 9, 16)] == [40, 40, 40, 45, 80]


@pytest.mark.parametrize(
    "tokens",
    [
        [5, 902, 902, 902, 7],  # "no no no"
        [5, *[902, 11] * 5, 7],  # "no, no, no, no, no,"
        [5, *[9] * 39],  # 39 times the same token: one short of the span
        [1, *[2, 3, 4, 5, 6, 7, 8, 9, 10, 11] * 4, 1],  # a sentence four times: not five copies
        [*[2, 3] * 19, 2, 4, *[2, 3] * 19],  # two long runs, neither of 40
    ],
)
def test_speech_like_repetitions_are_not_cut(tokens):
    assert first_loop(tokens) is None
    assert without_loop(tokens) == tokens


def test_a_single_token_repeated_40_times_is_kept_once():
    tokens = [1, 2, *[9] * 45]
    assert first_loop(tokens) == Loop(end=42, period=1)
    assert without_loop(tokens) == [1, 2, 9]


def test_a_pattern_is_kept_once_from_where_it_started_repeating():
    # "x a b c a b c ...": the repetition starts at a, so "x a b c" is kept; period 3 needs 40 tokens.
    tokens = [7, *[1, 2, 3] * 20]
    assert first_loop(tokens) == Loop(end=41, period=3)
    assert without_loop(tokens) == [7, 1, 2, 3]


def test_the_shortest_period_wins_and_long_periods_need_five_copies():
    assert first_loop([4] * 40) == Loop(40, 1)  # also of period 2, 3, ...
    sentence = list(range(100, 116))  # 16 tokens
    assert first_loop(sentence * 5) == Loop(80, 16)
    assert first_loop(sentence * 4 + sentence[:15]) is None
    assert first_loop(list(range(200, 217)) * 6) is None, "a period above MAX_PERIOD is never a loop"


def _loops_by_definition(tokens: list[int]) -> Loop | None:
    """The rule as DESIGN.md says it, by brute force: the first length whose last span(p) ids have period p."""
    for end in range(1, len(tokens) + 1):
        for period in range(1, MAX_PERIOD + 1):
            size = span(period)
            if size <= end and all(tokens[i] == tokens[i - period] for i in range(end - size + period, end)):
                return Loop(end, period)
    return None


ids = st.integers(1, 4)  # a small alphabet: repetitions happen by chance too
loopy = st.builds(
    lambda head, pattern, repeats, tail: head + pattern * repeats + tail,
    st.lists(ids, max_size=30),
    st.lists(ids, min_size=1, max_size=MAX_PERIOD + 2),
    st.integers(0, 45),
    st.lists(ids, max_size=10),
)


@settings(max_examples=200, deadline=None)
@given(loopy)
def test_the_rule_is_its_definition(tokens):
    loop = first_loop(tokens)
    assert loop == _loops_by_definition(tokens)
    kept = without_loop(tokens)
    assert kept == (tokens if loop is None else tokens[: loop.kept])
    assert first_loop(kept) is None, "what is kept never loops"
    if loop is not None:
        assert loop_at(tokens, loop.end) == loop
        # Kept: what precedes the repeating stretch and its first copy of the pattern; what is
        # dropped repeats that copy, and the stretch reaches no further back.
        start = loop.kept - loop.period
        assert tokens[loop.kept : loop.end] == tokens[start : loop.end - loop.period]
        assert start == 0 or tokens[start - 1] != tokens[start - 1 + loop.period]


class _Embedder:
    def embed(self, token_ids: list[int]) -> torch.Tensor:
        return torch.zeros(len(token_ids), 1)


def _greedy(model_says: list[int], accepted: int, budget: int, cut: bool) -> list[int]:
    """``greedy_steps`` over a "model" whose greedy answer is ``model_says``, the first ``accepted``
    ids given as a verified draft (a streaming update); what the decode keeps."""
    steps = greedy_steps(_Embedder(), model_says[accepted], None, model_says[:accepted], budget, cut)  # type: ignore[arg-type]
    answers = iter(model_says[accepted + 1 :])
    try:
        next(steps)
        while True:
            steps.send(torch.tensor([next(answers)]))
    except StopIteration as stop:
        tokens: list[int] = stop.value
    return without_loop(tokens) if cut else tokens


@settings(max_examples=200, deadline=None)
@given(loopy, st.integers(1, 120), st.booleans(), st.data())
def test_any_accepted_draft_gives_generate_cut_by_the_rule(tokens, budget, eos, data):
    """Offline (nothing accepted) and streaming (any verified prefix) keep the same ids: what greedy
    decoding to eos or the budget gives (``generate``), cut by the rule; with the cut off, exactly that."""
    model_says = [*tokens, EOS_IDS[1]] if eos else [*tokens, *[5] * 200]
    generate = model_says[: min(budget, model_says.index(EOS_IDS[1]) if eos else budget)]
    accepted = data.draw(st.integers(0, len(generate)))
    for cut in (True, False):
        assert _greedy(model_says, accepted, budget, cut) == (without_loop(generate) if cut else generate)


# --- a network that loops ---------------------------------------------------------------------


def looping_network() -> Qwen3ASRForConditionalGeneration:
    """The tests' random network, edited so that " ping" -> " pong" -> " ping" ... and " no" -> " no" ...

    Three hidden dimensions (61-63) are reserved: every layer's output rows there are zeroed, so the
    final state holds the current token's embedding there and nothing else, and every embedding is
    zero there except the five below. The embeddings are tied to the head, so in an ordinary context
    the three loop tokens (zero elsewhere) score exactly 0, below the best random logit: they come only
    from a token that points at them. The final norm's weight -1 in dimension 62 makes the head's form
    indefinite, which a period of 2 needs (with a positive one a token is its own best successor).
    """
    network = random_network(seed=0)
    big = 16.0
    with torch.no_grad():
        lm = network.model.language_model
        embeddings = lm.embed_tokens.weight
        embeddings[:, 61:64] = 0
        for layer in lm.layers:
            layer.self_attn.o_proj.weight[61:64] = 0
            layer.mlp.down_proj.weight[61:64] = 0
        embeddings[[NO, PING, PONG]] = 0
        embeddings[PING, 61:63] = torch.tensor([big, big])  # scores " pong" 2 big^2, itself 0
        embeddings[PONG, 61:63] = torch.tensor([big, -big])  # scores " ping" 2 big^2, itself 0
        embeddings[NO, 63] = big  # scores itself big^2
        embeddings[INTO_PING, 61:63] = torch.tensor([big / 2, -big / 2])
        embeddings[INTO_NO, 63] = big / 2
        lm.norm.weight[62] = -1.0
    return network


@pytest.fixture(scope="module")
def loop_checkpoint(tmp_path_factory) -> Path:
    return write_hf_checkpoint(looping_network(), tmp_path_factory.mktemp("looping") / "tiny-loops")


@pytest.fixture(scope="module")
def loop_model(loop_checkpoint) -> AsrModel:
    return AsrModel.load(str(loop_checkpoint), "float32", plain_weights=True)


@pytest.fixture(scope="module")
def loop_reference(loop_checkpoint) -> Reference:
    """transformers' processor and greedy ``generate`` on the looping weights."""
    network = Qwen3ASRForConditionalGeneration.from_pretrained(loop_checkpoint, dtype=torch.float32).eval()
    return Reference(Qwen3ASRProcessor.from_pretrained(loop_checkpoint), network, torch.float32)


@pytest.fixture(scope="module")
def clip(speech) -> np.ndarray:
    return speech[CLIP]


class _Counting:
    """The model, counting the LLM forwards (prefills and decode steps) asked of it."""

    def __init__(self, model: AsrModel) -> None:
        self.model = model
        self.forwards = 0

    def encode_batch(self, requests: Sequence[Encode]) -> list[torch.Tensor]:
        return self.model.encode_batch(requests)

    def forward_batch(self, steps: Sequence[Step]) -> list[torch.Tensor]:
        self.forwards += 1
        return self.model.forward_batch(steps)


def _forwards(model: AsrModel, computation: Steps[T]) -> tuple[T, int]:
    """Run a computation alone; its result and how many LLM forwards it made."""
    counting = _Counting(model)
    return run(counting, computation), counting.forwards  # type: ignore[arg-type]  # only these two are used


@pytest.mark.slow
@pytest.mark.parametrize("language", LOOPS)
def test_offline_stops_at_the_loop_and_keeps_one_copy(loop_model, loop_reference, clip, language):
    first, period = LOOPS[language]
    budget = token_budget(clip.size / SAMPLE_RATE, DecodingOptions())
    prompt = build_prompt(loop_model.tokenizer, "", language)
    runs = {
        cut: _forwards(loop_model, piece_steps(loop_model, prompt, clip, DecodingOptions(language, cut_loops=cut)))
        for cut in (True, False)
    }
    uncut, forwards = runs[False]
    start = uncut.index(first)  # the loop: the pattern from here to the budget
    assert len(uncut) == forwards == budget and start > 2
    assert uncut[start:] == (uncut[start : start + period] * budget)[: budget - start]
    cut, forwards = runs[True]
    assert cut == uncut[: start + period], "the ids before the loop and one copy of its pattern"
    assert forwards == start + span(period), "one forward per id up to where the loop is first recognized"
    # transformers' generate on the same weights, cut by the same rule.
    expected = loop_reference.token_ids(clip, language, None, budget)
    assert expected == uncut
    assert transcribe(loop_model, clip, DecodingOptions(language)).token_ids == without_loop(expected) == cut


def _events(model: AsrModel, audio: np.ndarray, options: DecodingOptions) -> list[dict]:
    transcriber = StreamTranscriber(model, options)
    return [e.to_json() for e in stream_audio(Session(SessionOptions(partial_interval_ms=400)), transcriber, audio)]


def _offline_of(model: AsrModel, audio: np.ndarray, event: dict, options: DecodingOptions) -> list[int]:
    end = event["audio_end"] if event["type"] == "partial" else event["end"]
    piece = audio[round(event["start"] * SAMPLE_RATE) : round(end * SAMPLE_RATE)]
    return transcribe(model, piece, options).token_ids


@pytest.mark.slow
@pytest.mark.parametrize("language, cut", [(None, True), ("English", True), (None, False)])
def test_streaming_equals_offline(loop_model, loop_reference, clip, language, cut):
    audio = np.concatenate([GAP, clip, GAP])
    options = DecodingOptions(language, cut_loops=cut)
    events = [e for e in _events(loop_model, audio, options) if e["type"] in ("partial", "final")]
    assert [e["type"] for e in events].count("final") == 1 and len(events) >= 8
    for event in events:
        assert event["token_ids"] == _offline_of(loop_model, audio, event, options), event
    final = next(e for e in events if e["type"] == "final")
    piece = audio[round(final["start"] * SAMPLE_RATE) : round(final["end"] * SAMPLE_RATE)]
    generated = loop_reference.token_ids(piece, language, None, token_budget(piece.size / SAMPLE_RATE, options))
    assert final["token_ids"] == (without_loop(generated) if cut else generated)
    if cut:
        # Cut where a loop was recognized: the ids end with the first copy of a loop's pattern.
        assert sum(e["token_ids"][-2:] == [PING, PONG] or e["token_ids"][-1:] == [NO] for e in events) >= 2
    else:
        assert any(first_loop(e["token_ids"]) for e in events), "some update ran on in a loop"


@pytest.mark.slow
def test_a_draft_that_loops_is_cut_without_decoding_it_again(loop_model, clip):
    """The previous update's loop comes back as its draft: verified in one prefill, cut there by the rule."""
    transcriber = StreamTranscriber(loop_model)
    first, forwards = _forwards(loop_model, transcriber.transcribe_steps(0, clip, final=False))
    again, forwards_again = _forwards(loop_model, transcriber.transcribe_steps(0, clip, final=False))
    start, period = first.token_ids.index(PING), 2
    assert len(first.token_ids) == start + period and forwards == start + span(period)
    assert again.token_ids == first.token_ids and forwards_again == 1
    assert again.accepted == start + span(period)


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.parametrize("cut", [True, False])
async def test_server_results_equal_offline(loop_model, clip, cut):
    audio = np.concatenate([GAP, clip, GAP])
    options = DecodingOptions("English", cut_loops=cut)
    async with running_server(loop_model, decoding=DecodingOptions(cut_loops=cut)) as server:
        result = await stream_to_server(server.url, audio, pace=0.01, language="English")
    finals, partials = result.of_type("final"), result.of_type("partial")
    assert len(finals) == 1 and partials
    for event in finals + partials:
        assert event["token_ids"] == _offline_of(loop_model, audio, event, options), event
    # On this audio the final's answer loops: cut after " ping pong", or left to run to the budget.
    assert (finals[0]["token_ids"][-3:] == [INTO_PING, PING, PONG]) == cut
    assert (first_loop(finals[0]["token_ids"]) is not None) == (not cut)


@pytest.mark.slow
def test_transcribe_command(loop_checkpoint, capsys):
    path = str(FIXTURES / "speech" / f"{CLIP}.wav")
    answers = []
    for flags in ([], ["--no-loop-cut"]):
        argv = ["transcribe", path, "--model", str(loop_checkpoint), "--dtype", "float32", "--format", "json"]
        assert main(argv + flags) == 0
        answers.append(json.loads(capsys.readouterr().out)["token_ids"])
    cut, uncut = answers
    assert first_loop(uncut) is not None and cut == without_loop(uncut)


def test_serve_flag():
    parse = _build_parser().parse_args
    assert _server_options(parse(["serve"])).decoding == DecodingOptions()
    assert _server_options(parse(["serve", "--no-loop-cut"])).decoding == DecodingOptions(cut_loops=False)
