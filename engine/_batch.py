"""Continuous batching of many computations: every round runs one batched encoder forward and one
ragged LLM forward over whatever each computation is waiting for.

A computation (``_steps``) joins the batch at any round and leaves it when it returns, fails, or
is cancelled; nobody waits for a whole batch to finish (the way vLLM's scheduler batches).
Within a round the encoder goes first, so a computation whose window was just encoded has its
prefill in the same round's LLM forward.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ._steps import Encode, Model, Request, Step, Steps


@dataclass(frozen=True)
class Finished:
    key: Hashable
    result: Any  # the computation's return value, or the exception it raised


class ContinuousBatch:
    """Computations in flight, keyed by the caller; ``step()`` advances all of them by one round."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._computations: dict[Hashable, Steps[Any]] = {}
        self._waiting: dict[Hashable, Request] = {}
        self._done: list[Finished] = []  # finished on being added or sent an answer, not yet reported
        self.rounds = 0

    def __len__(self) -> int:
        return len(self._computations)

    def __contains__(self, key: object) -> bool:
        return key in self._computations

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._computations))

    def add(self, key: Hashable, computation: Steps[Any]) -> None:
        """Start ``computation``: it runs until its first request, which the next round answers."""
        if key in self._computations:
            raise KeyError(f"a computation with key {key!r} is already in the batch")
        self._computations[key] = computation
        with torch.inference_mode():
            self._advance(key, computation.__next__)

    def cancel(self, key: Hashable) -> bool:
        """Drop a computation between two rounds (its generator is closed); False if it was not running."""
        computation = self._computations.pop(key, None)
        self._waiting.pop(key, None)
        if computation is None:
            return False
        computation.close()
        return True

    def step(self) -> list[Finished]:
        """One round: the encoder over every waiting window, then the LLM over every waiting step."""
        with torch.inference_mode():
            self._answer([k for k, r in self._waiting.items() if isinstance(r, Encode)], self.model.encode_batch)
            self._answer([k for k, r in self._waiting.items() if isinstance(r, Step)], self.model.forward_batch)
        self.rounds += 1
        done, self._done = self._done, []
        return done

    def _answer(self, keys: list[Hashable], forward: Callable[[list[Any]], Sequence[torch.Tensor]]) -> None:
        if not keys:
            return
        requests = [self._waiting.pop(key) for key in keys]
        try:
            outputs = forward(requests)
        except Exception as exc:  # a forward that fails fails every computation in it, and only those
            for key in keys:
                self._finish(key, exc)
            return
        for key, output in zip(keys, outputs, strict=True):
            self._advance(key, partial(self._computations[key].send, output))

    def _advance(self, key: Hashable, resume: Callable[[], Request]) -> None:
        try:
            self._waiting[key] = resume()
        except StopIteration as stop:
            self._finish(key, stop.value)
        except Exception as exc:  # one computation's failure is its own: report it, keep the batch going
            self._finish(key, exc)

    def _finish(self, key: Hashable, result: Any) -> None:
        self._computations.pop(key, None)
        self._waiting.pop(key, None)
        self._done.append(Finished(key, result))


def run_batch(model: Model, computations: Sequence[Steps[Any]]) -> list[Any]:
    """Each computation's result, or the exception it raised (which leaves the others running)."""
    batch = ContinuousBatch(model)
    results: dict[Hashable, Any] = {}
    for index, computation in enumerate(computations):
        batch.add(index, computation)
    finished = batch.step()  # also reports computations that finished on being added
    while len(batch):
        finished += batch.step()
    for item in finished:
        results[item.key] = item.result
    return [results[index] for index in range(len(computations))]
