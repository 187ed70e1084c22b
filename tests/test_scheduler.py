"""The server's scheduler on a fake engine: continuous batching, counted in rounds, never timed.

The fake model answers every round's LLM forward at once (or, gated, when the test lets the round
go); a fake transcriber takes a planned number of steps per job and records what it was asked.
Sessions are real: real speech goes through the VAD, as in the server. The last test runs the
real engine (the tiny random-weight model) in a real server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import math
import threading
import typing
import weakref
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from asrlive.clients import connect
from asrlive.engine import DecodingOptions, StreamTranscriber
from asrlive.engine._steps import Step
from asrlive.streaming import SAMPLE_RATE, Final, Partial, Session, SessionOptions, SpeechStopped
from asrlive.web._inference import Message, Round
from asrlive.web._metrics import Metrics
from asrlive.web._scheduler import Scheduler, Stream

from .serving import GAP, TIMEOUT, eventually, offline_token_ids, running_server

PARTIALS = SessionOptions(partial_interval_ms=500)
FINALS_ONLY = SessionOptions(partials=False)


class FakeModel:
    """Answers each LLM forward with token 7. Gated, a round starts only when the test allows it."""

    def __init__(self, gated: bool) -> None:
        self.rounds: list[list[str]] = []  # per round, the tag of each step in it
        self.entered = 0  # rounds started (perhaps waiting at the gate)
        self._allowed = 0.0 if gated else math.inf
        self._gate = threading.Condition()

    def allow(self, rounds: float = 1) -> None:
        with self._gate:
            self._allowed += rounds
            self._gate.notify_all()

    def hold(self) -> None:
        """Gate the rounds from the next one on (call it while nothing is in flight)."""
        with self._gate:
            self._allowed = 0

    def encode_batch(self, requests):
        return [torch.zeros(1, 1) for _ in requests]

    def forward_batch(self, steps):
        with self._gate:
            self.entered += 1
            self._gate.wait_for(lambda: self._allowed > 0, TIMEOUT)
            self._allowed -= 1
        self.rounds.append([step.embeds for step in steps])  # the fake transcriber's tag
        return [torch.tensor([7]) for _ in steps]

    def rounds_with(self, tag: str) -> list[int]:
        return [number for number, tags in enumerate(self.rounds) if tag in tags]


@dataclass(frozen=True)
class FakeHypothesis:
    token_ids: tuple[int, ...]
    text: str
    language: str | None = None


@dataclass
class FakeTranscriber:
    """A stream's engine: each job takes ``steps[final]`` rounds; ``fail_at`` fails its computation there."""

    name: str
    steps: dict[bool, int]
    fail_at: int | None = None
    jobs: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    released: list[int] = field(default_factory=list)

    def transcribe_steps(self, segment, audio, final):
        tag = f"{self.name} {'final' if final else 'partial'} {segment}/{audio.size}"
        self.jobs.append(tag)
        try:
            for step in range(self.steps[final]):
                if step == self.fail_at:
                    raise RuntimeError(f"{self.name} failed")
                yield Step(tag, None, 1)  # the fake model reads only the tag
        except GeneratorExit:
            self.cancelled.append(tag)
            raise
        return FakeHypothesis((7,), tag)

    def release(self, segment: int) -> None:
        self.released.append(segment)


class Client:
    """What a connection does with its stream: feed the session, forward its events, keep the results."""

    def __init__(self, harness: Harness, name: str, options: SessionOptions, steps=None, fail_at=None) -> None:
        self.harness = harness
        self.session = Session(options)
        self.stream = Stream(self.session, DecodingOptions(context=name), self)
        self.events: list = []
        self.results: list = []  # the jobs whose results were delivered
        self.failures: list[BaseException] = []
        harness.plans[name] = (steps or {False: 3, True: 2}, fail_at)
        self.name = name

    @property
    def engine(self) -> FakeTranscriber:
        return self.harness.transcribers[self.name]

    def feed(self, audio: np.ndarray) -> None:
        for begin in range(0, audio.size, 1600):
            self.events += self.session.feed(audio[begin : begin + 1600])
        self.harness.scheduler.wake()

    def finish(self) -> None:
        self.events += self.session.finish()
        self.harness.scheduler.wake()

    def on_result(self, job, events) -> None:
        self.results.append(job)
        self.harness.delivered.append((self.name, job))
        self.events += events

    def on_failure(self, error: BaseException) -> None:
        self.failures.append(error)

    def of_type(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]


@dataclass
class Harness:
    scheduler: Scheduler
    model: FakeModel
    plans: dict = field(default_factory=dict)
    transcribers: dict[str, FakeTranscriber] = field(default_factory=dict)  # the last one made, by name
    made: list[str] = field(default_factory=list)  # the name (decoding context) of each transcriber, as made
    delivered: list = field(default_factory=list)  # (client name, job), in the order results came

    def make(self, model, decoding: DecodingOptions) -> FakeTranscriber:
        self.made.append(decoding.context)
        steps, fail_at = self.plans[decoding.context]
        transcriber = self.transcribers[decoding.context] = FakeTranscriber(decoding.context, steps, fail_at)
        return transcriber

    def client(self, name: str, options: SessionOptions, add: bool = True, **plan) -> Client:
        client = Client(self, name, options, **plan)
        if add:
            self.scheduler.add(client.stream)
        return client

    async def round_started(self, index: int) -> None:
        """Wait until round ``index`` (of ``model.rounds``) has started: gated, the thread waits there."""
        await eventually(lambda: self.model.entered > index)


@asynccontextmanager
async def running(max_batch: int = 8, gated: bool = False):
    model = FakeModel(gated)
    harness = Harness(None, model)  # the scheduler, which needs the harness's factory, comes next
    harness.scheduler = Scheduler(model, Metrics(), max_batch, harness.make)
    harness.scheduler.start()
    try:
        yield harness
    finally:
        model.allow(math.inf)
        await asyncio.wait_for(harness.scheduler.stop(), TIMEOUT)


def _speech_then_silence(speech, name: str) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([GAP, speech[name]]), GAP


@pytest.mark.asyncio
async def test_a_final_joins_at_the_next_round_while_a_long_partial_runs(speech):
    async with running(gated=True) as harness:
        talker = harness.client("talker", PARTIALS, steps={False: 40, True: 2})
        closing = harness.client("closing", FINALS_ONLY)
        closing.feed(np.concatenate([GAP, speech["cards-001"]]))  # an utterance, not closed yet
        talker.feed(np.concatenate([GAP, speech["librivox-0870"][: 2 * SAMPLE_RATE]]))
        await harness.round_started(0)  # it runs the talker's partial, held at the gate
        closing.feed(GAP)  # its utterance closes: a final is queued
        await eventually(lambda: closing.stream.in_flight)
        harness.model.allow(math.inf)
        await eventually(lambda: closing.of_type(Final) and talker.of_type(Partial))
    partial, final = talker.engine.jobs[0], closing.engine.jobs[0]
    assert harness.model.rounds_with(final) == [1, 2]  # the round after the one it arrived in
    assert harness.model.rounds_with(partial) == list(range(40))
    assert [name for name, _ in harness.delivered] == ["closing", "talker"]


@pytest.mark.asyncio
async def test_a_stale_partial_is_cancelled_and_its_result_never_delivered(speech):
    async with running(gated=True) as harness:
        client = harness.client("one", PARTIALS, steps={False: 40, True: 2})
        speaking, silence = _speech_then_silence(speech, "librivox-0880")
        client.feed(speaking[: 3 * SAMPLE_RATE])
        await harness.round_started(0)
        partial_job = client.stream.work.job
        client.feed(np.concatenate([speaking[3 * SAMPLE_RATE :], silence]))  # the utterance closes
        await eventually(lambda: client.stream.in_flight and client.stream.work.job.final)
        harness.model.allow(math.inf)
        await eventually(lambda: client.of_type(Final))
        client.finish()
        await asyncio.wait_for(client.stream.drained.wait(), TIMEOUT)
    partial, final = client.engine.jobs
    assert not partial_job.final and client.engine.cancelled == [partial]
    assert harness.model.rounds_with(partial) == [0] and harness.model.rounds_with(final) == [1, 2]
    assert [job.final for job in client.results] == [True] and client.of_type(Partial) == []


@pytest.mark.asyncio
async def test_finals_are_admitted_before_partials_when_slots_are_few(speech):
    async with running(max_batch=1) as harness:
        speaking, silence = _speech_then_silence(speech, "cards-002")
        clients = [harness.client(name, PARTIALS, add=False) for name in ("a", "b", "c")]
        clients[0].feed(speaking)  # a partial is due
        for client in clients[1:]:
            client.feed(np.concatenate([speaking, silence]))  # a final is queued (and a partial was due)
        for client in clients:
            harness.scheduler.add(client.stream)
        await eventually(lambda: len(harness.delivered) == 3)
    assert [(name, job.final) for name, job in harness.delivered] == [("b", True), ("c", True), ("a", False)]
    assert all(len(tags) == 1 for tags in harness.model.rounds)  # one computation at a time


@pytest.mark.asyncio
async def test_partials_take_turns_when_slots_are_few(speech):
    async with running(max_batch=1) as harness:
        speaking, _ = _speech_then_silence(speech, "librivox-0870")
        a, b, c = clients = [harness.client(name, PARTIALS, add=False) for name in ("a", "b", "c")]
        for client in (a, b):
            client.feed(speaking[: 2 * SAMPLE_RATE])
        for client in clients:
            harness.scheduler.add(client.stream)
        await eventually(lambda: len(harness.delivered) == 2)
        c.feed(speaking[: 2 * SAMPLE_RATE])
        for client in (a, b):
            client.feed(speaking[2 * SAMPLE_RATE : 3 * SAMPLE_RATE])
        await eventually(lambda: len(harness.delivered) == 5)
    # After a and b, c's turn comes first, though it is last in line.
    assert [name for name, _ in harness.delivered] == ["a", "b", "c", "a", "b"]


@pytest.mark.asyncio
async def test_a_stream_removed_mid_computation_is_cancelled_without_a_callback(speech):
    async with running(gated=True) as harness:
        leaving = harness.client("leaving", PARTIALS, steps={False: 40, True: 2})
        staying = harness.client("staying", FINALS_ONLY)
        leaving.feed(np.concatenate([GAP, speech["librivox-0870"][: 2 * SAMPLE_RATE]]))
        await harness.round_started(0)
        harness.scheduler.remove(leaving.stream)
        assert harness.scheduler.streams == 1 and not leaving.stream.in_flight
        staying.feed(np.concatenate(_speech_then_silence(speech, "cards-003")))
        harness.model.allow(math.inf)
        await eventually(lambda: staying.of_type(Final))
    (partial,) = leaving.engine.jobs
    assert leaving.engine.cancelled == [partial] and harness.model.rounds_with(partial) == [0]
    assert leaving.results == [] and leaving.failures == []


@pytest.mark.asyncio
async def test_a_removed_streams_transcriber_is_dropped_by_the_inference_thread_at_once(speech):
    async with running(gated=True) as harness:
        leaving = harness.client("leaving", PARTIALS, steps={False: 40, True: 2})
        staying = harness.client("staying", FINALS_ONLY)
        leaving.feed(np.concatenate([GAP, speech["librivox-0870"][: 2 * SAMPLE_RATE]]))
        await harness.round_started(0)  # its partial runs, held at the gate
        engine = weakref.ref(harness.transcribers.pop("leaving"))  # from now on only the thread holds it
        assert engine() is not None and engine().jobs
        gc.disable()  # dropped, not left to the garbage collector
        try:
            harness.scheduler.remove(leaving.stream)
            harness.model.allow(math.inf)
            await eventually(lambda: engine() is None)
        finally:
            gc.enable()
        staying.feed(np.concatenate(_speech_then_silence(speech, "cards-003")))  # the others carry on
        await eventually(lambda: staying.of_type(Final))
    assert harness.made == ["leaving", "staying"]
    assert leaving.results == [] and leaving.failures == [] and len(staying.results) == 1


@pytest.mark.asyncio
async def test_a_decoding_change_makes_a_new_transcriber_from_the_next_job_admitted(speech):
    """The change comes after the job was admitted but before the thread took it: the job keeps the
    options it was admitted with; the stream's next job has a new transcriber, made with the new ones."""
    async with running(gated=True) as harness:
        busy = harness.client("busy", PARTIALS, steps={False: 40, True: 2})
        busy.feed(np.concatenate([GAP, speech["librivox-0870"][: 2 * SAMPLE_RATE]]))
        await harness.round_started(0)  # the thread waits at the gate, its inbox unread
        client = harness.client("one", PARTIALS)
        speaking = np.concatenate([GAP, speech["librivox-0880"]])
        client.feed(speaking[: 2 * SAMPLE_RATE])
        await eventually(lambda: client.stream.in_flight)  # admitted with context "one"
        harness.plans["two"] = ({False: 3, True: 2}, None)
        client.stream.decoding = DecodingOptions(context="two")
        harness.model.allow(math.inf)
        await eventually(lambda: len(client.results) == 1)
        client.feed(speaking[2 * SAMPLE_RATE : 3 * SAMPLE_RATE])
        await eventually(lambda: len(client.results) == 2)
    one, two = harness.transcribers["one"], harness.transcribers["two"]
    assert harness.made == ["busy", "one", "two"]
    assert [partial.text for partial in client.of_type(Partial)] == [*one.jobs, *two.jobs]
    assert [tag.split()[0] for tag in (*one.jobs, *two.jobs)] == ["one", "two"]
    assert one.cancelled == [] and two.cancelled == []


def test_the_event_loop_and_the_inference_thread_exchange_only_frozen_messages():
    """A guard: every message class (both ways) is a frozen dataclass, and none carries a ``Stream``."""
    kinds = [*typing.get_args(Message), Round]
    assert {kind.__name__ for kind in kinds} >= {"Admit", "Compute", "Cancel", "Release", "Forget", "Stop", "Round"}
    for kind in kinds:
        assert dataclasses.is_dataclass(kind) and kind.__dataclass_params__.frozen, kind
        assert not any("Stream" in str(f.type) or "Work" in str(f.type) for f in dataclasses.fields(kind)), kind


@pytest.mark.asyncio
async def test_a_failing_computation_fails_only_its_stream(speech):
    async with running() as harness:
        failing = harness.client("failing", PARTIALS, fail_at=1)
        healthy = harness.client("healthy", PARTIALS)
        speaking, silence = _speech_then_silence(speech, "librivox-0880")
        for client in (failing, healthy):
            client.feed(speaking[: 2 * SAMPLE_RATE])
        await eventually(lambda: failing.failures and healthy.results)
        for client in (failing, healthy):
            client.feed(np.concatenate([speaking[2 * SAMPLE_RATE :], silence]))
            client.finish()
        await asyncio.wait_for(healthy.stream.drained.wait(), TIMEOUT)
    assert [str(e) for e in failing.failures] == ["failing failed"] and failing.results == []
    assert len(failing.engine.jobs) == 1  # a failed stream gets no more work
    assert healthy.failures == [] and len(healthy.of_type(Final)) == 1


@pytest.mark.asyncio
async def test_a_speculative_final_needs_no_second_computation_and_its_state_is_released(speech):
    """The first speculation completes before its utterance closes, the second while it closes;
    either way its result is the final, and the engine is told to forget the utterance."""
    options = SessionOptions(partials=False, speculative_finals=True)
    pause = int(0.4 * SAMPLE_RATE)  # past the speculation point (pad_ms), short of closing (end_silence_ms)
    async with running(gated=True) as harness:
        harness.model.allow(math.inf)
        client = harness.client("one", options)
        speaking, silence = _speech_then_silence(speech, "cards-001")
        client.feed(np.concatenate([speaking, silence[:pause]]))
        await eventually(lambda: len(client.results) == 1)  # held: no event yet
        assert client.of_type(Final) == [] and client.of_type(SpeechStopped) == []
        harness.model.hold()
        client.feed(silence[pause:])  # closes the utterance: its final comes out of feed()
        assert client.of_type(Final) and client.stream.session.finalized == 0
        await eventually(lambda: client.engine.released == [0])

        speaking, silence = _speech_then_silence(speech, "cards-003")
        client.feed(np.concatenate([speaking, silence[:pause]]))
        await harness.round_started(len(harness.model.rounds))  # the speculation runs, held at the gate
        client.feed(silence[pause:])
        assert len(client.of_type(Final)) == 1 and client.stream.in_flight  # its final: still being computed
        harness.model.allow(math.inf)
        client.finish()
        await asyncio.wait_for(client.stream.drained.wait(), TIMEOUT)
        await eventually(lambda: client.engine.released == [0, 1])
    assert [(job.speculative, job.final) for job in client.results] == [(True, False)] * 2
    finals = client.of_type(Final)
    assert [(f.segment, f.start, f.end) for f in finals] == [(j.segment, j.start, j.end) for j in client.results]
    assert len(client.engine.jobs) == 2 and client.engine.cancelled == []


@pytest.mark.asyncio
async def test_busy_time_and_batch_sizes_are_counted_per_round(speech):
    async with running() as harness:
        clients = [harness.client(name, PARTIALS) for name in ("a", "b")]
        for client in clients:
            client.feed(np.concatenate(_speech_then_silence(speech, "cards-005")))
            client.finish()
        for client in clients:
            await asyncio.wait_for(client.stream.drained.wait(), TIMEOUT)
    registry = harness.scheduler.metrics.registry
    assert registry.get_sample_value("asrlive_batch_streams_count") == len(harness.model.rounds)
    assert registry.get_sample_value("asrlive_batch_streams_sum") == sum(map(len, harness.model.rounds))
    assert registry.get_sample_value("asrlive_inference_seconds_total") > 0


@pytest.mark.asyncio
async def test_a_real_server_gives_a_speculative_result_as_the_final_and_forgets_the_utterance(load_model, speech):
    """Audio stops 400 ms after the speech (past pad_ms, short of end_silence_ms) until the engine
    has answered the speculation; then the silence closes the utterance on exactly its bounds."""
    model = load_model("hf")
    jobs: list[tuple[int, bool]] = []  # (samples, final) of every job the engine completed
    transcribers: list[StreamTranscriber] = []

    class Recording(StreamTranscriber):
        def transcribe_steps(self, segment, audio, final):
            hypothesis = yield from super().transcribe_steps(segment, audio, final)
            jobs.append((audio.size, final))
            return hypothesis

    def make(model, decoding):
        transcribers.append(Recording(model, decoding))
        return transcribers[-1]

    speaking = np.concatenate([GAP, speech["cards-001"], GAP[: int(0.4 * SAMPLE_RATE)]])
    async with running_server(model, make) as server:
        async with connect(server.url, timeout=TIMEOUT, partials=False) as stream:
            for begin in range(0, speaking.size, SAMPLE_RATE // 10):
                await stream.send_audio(speaking[begin : begin + SAMPLE_RATE // 10])
            await eventually(lambda: jobs)
            await stream.send_audio(GAP)
            await stream.finish()
            events = await asyncio.wait_for(_events(stream), TIMEOUT)
        await eventually(lambda: transcribers[0].open_utterances == 0)
    (final,) = [e for e in events if e["type"] == "final"]
    assert jobs == [(round((final["end"] - final["start"]) * SAMPLE_RATE), False)]  # one computation
    audio = np.concatenate([speaking, GAP])
    assert final["token_ids"] == offline_token_ids(model, audio, final, DecodingOptions())


async def _events(stream) -> list[dict]:
    return [event async for event in stream]
