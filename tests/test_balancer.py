"""Three ``asrlive serve`` replicas behind a real HAProxy on loopback, with the live client: sessions
spread by readiness, a full replica's refusal is retried elsewhere, and a replica stopped with
SIGTERM mid-utterance gives its sessions their finals, whose clients go on on the others with no
final lost and no audio transcribed twice."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field

import numpy as np
import pytest

from asrlive.clients import LiveOptions, LiveStream
from asrlive.clients._loadtest import metric
from asrlive.engine import SAMPLE_RATE, AsrModel, DecodingOptions

from .balancer import BACKEND, HAProxy, haproxy_missing
from .requires import requires
from .serving import GAP, TIMEOUT, eventually, offline_token_ids
from .test_cli_serve import ServerProcess, start_server
from .test_live_client import _paced

pytestmark = [pytest.mark.asyncio, requires(haproxy_missing())]

MAX_SESSIONS = 3


@dataclass
class Client:
    """One live client through the balancer, its events, and the task that runs it."""

    name: str
    audio: np.ndarray
    url: str
    events: list[dict] = field(default_factory=list)

    def start(self) -> None:
        options = LiveOptions(self.url, retry_delays_s=(0.1,), connect_timeout_s=TIMEOUT)
        self.live = LiveStream(options, self.events.append)
        # 100 ms chunks every 25 ms: four times real time, so that every client is still talking
        # when a replica goes away.
        self.task = asyncio.create_task(asyncio.wait_for(self.live.run(_paced(self.audio, 0.025)), 4 * TIMEOUT))

    def states(self) -> list[str]:
        return [e["state"] for e in self.events if e["type"] == "status"]

    def finals(self) -> list[dict]:
        return [e for e in self.events if e["type"] == "final"]

    def talking(self) -> bool:
        """Inside an utterance: its speech has started and its final has not come."""
        started = {e["segment"] for e in self.events if e["type"] == "speech_started"}
        ended = {e["segment"] for e in self.events if e["type"] == "final"}
        return bool(started - ended)


async def _open_sessions(replicas: list[ServerProcess]) -> list[int]:
    readings = [asyncio.to_thread(metric, r.url.result(), "asrlive_open_sessions") for r in replicas]
    return [int(value or 0) for value in await asyncio.wait_for(asyncio.gather(*readings), TIMEOUT)]


async def _listening(client: Client, sessions: int = 1) -> None:
    await eventually(lambda: client.states().count("listening") >= sessions)


async def test_replicas_behind_haproxy(checkpoints, speech, tmp_path):
    model_dir = checkpoints["hf"]
    talk = np.concatenate([speech["librivox-0870"], GAP, speech["librivox-0920"], GAP, speech["goforward"], GAP] * 2)
    starting = [start_server(model_dir, "--max-sessions", str(MAX_SESSIONS)) for _ in range(3)]
    replicas = list(await asyncio.wait_for(asyncio.gather(*starting), 3 * TIMEOUT))
    ports = [int(r.url.result().rsplit(":", 1)[1].split("/")[0]) for r in replicas]
    try:
        async with HAProxy(ports, tmp_path) as balancer:
            clients = [Client(f"c{i}", np.roll(talk, i * SAMPLE_RATE // 3), balancer.url) for i in range(6)]
            await _scenario(balancer, replicas, clients)
        stopped = replicas[0].process.returncode
    finally:
        for replica in replicas:
            await replica.stop()
    assert stopped == 0, "\n".join(replicas[0].log)
    _assert_whole(clients, AsrModel.load(str(model_dir), "float32", plain_weights=True))


async def _scenario(balancer: HAProxy, replicas: list[ServerProcess], clients: list[Client]) -> None:
    """The numbered steps; the figures the closing note reports are asserted at each."""
    r0, r1, r2 = balancer.names

    # 1. Three clients one after another: least connections puts one on each replica.
    for client in clients[:3]:
        client.start()
        await _listening(client)
    assert await _open_sessions(replicas) == [1, 1, 1]

    # 2. With r1 and r2 out of the balancer and r0's check paused (a balancer that has not seen r0
    #    fill up yet), two more clients fill r0 and the sixth is sent there too: refused as
    #    server_full, it retries; once the check runs again r0 is DOWN (503 full), and the retry
    #    lands on a replica with room.
    for name in (r1, r2):
        await balancer.command(f"disable server {BACKEND}/{name}")
    await balancer.command(f"disable health {BACKEND}/{r0}")
    for client in clients[3:5]:
        client.start()
        await _listening(client)
    assert await _open_sessions(replicas) == [3, 1, 1]
    late = clients[5]
    late.start()
    await eventually(lambda: "retrying" in late.states())
    assert "server_full" in next(e["reason"] for e in late.events if e.get("state") == "retrying")
    await balancer.command(f"enable health {BACKEND}/{r0}")
    await balancer.until(lambda states: states[r0].startswith("DOWN"))
    for name in (r1, r2):
        await balancer.command(f"enable server {BACKEND}/{name}")
    await _listening(late)
    assert await _open_sessions(replicas) in ([3, 2, 1], [3, 1, 2])

    # 4. SIGTERM to r0 while one of its clients is inside an utterance: its three sessions drain
    #    (finals, done: shutdown), r0 answers /readyz 503 meanwhile, and the clients reconnect
    #    through the balancer to r1 and r2, which have exactly three free slots.
    await eventually(lambda: clients[4].talking())
    replicas[0].process.send_signal(signal.SIGTERM)
    await balancer.until(lambda states: states[r0].startswith("DOWN"))
    await asyncio.wait_for(replicas[0].process.wait(), TIMEOUT)
    await asyncio.wait_for(asyncio.gather(*(client.task for client in clients)), 4 * TIMEOUT)
    moved = [client.name for client in clients if client.live.sessions == 2]
    # r0's sessions: the fourth and fifth clients, and the one of the first three it got in step 1.
    assert len(moved) == MAX_SESSIONS and {"c3", "c4"} <= set(moved) and "c5" not in moved, moved
    for client in (c for c in clients if c.name in moved):
        shutdown = [e for e in client.events if e["type"] == "status" and e["state"] == "reconnecting"]
        assert shutdown and "shutdown" in shutdown[0]["reason"], client.events


def _assert_whole(clients: list[Client], model: AsrModel) -> None:
    """Every client: done after its finish; every final the offline transcription of its span of the
    capture; spans in order and disjoint (nothing transcribed twice); each new session starts
    exactly where the last final before it ended (nothing lost, nothing resent)."""
    for client in clients:
        assert client.events[-1]["type"] == "done" and client.events[-1]["reason"] == "finish", client.name
        finals = client.finals()
        assert len(finals) >= 6, client.name  # six utterances; a cut one may give two finals
        for final in finals:
            assert final["token_ids"] == offline_token_ids(model, client.audio, final, DecodingOptions())
        for before, after in zip(finals, finals[1:], strict=False):
            assert before["end"] <= after["start"], client.name
        starts = client.live.session_starts
        for start in starts[1:]:
            last = max(f["end"] for f in finals if f["end"] * SAMPLE_RATE <= start + 1)
            assert start == round(last * SAMPLE_RATE), client.name
