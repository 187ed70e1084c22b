"""Running the pending work of many streams together: their LLM forwards go in one batch.

Each stream's work is a ``Steps`` computation (it yields the forwards it needs). The driver
advances all of them in lockstep: the first forwards (prefills of different lengths) run as one
ragged batch, then the decode steps of every stream still decoding run as one batch per token,
streams dropping out as they finish. Encoders run per stream as each computation reaches them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from ._llm import Step
from ._model import AsrModel, Steps


@torch.inference_mode()
def run_batch(model: AsrModel, computations: Sequence[Steps[Any]]) -> list[Any]:
    """Each computation's result, or the exception it raised (which leaves the others running)."""
    results: list[Any] = [None] * len(computations)
    waiting: dict[int, Step] = {}

    def advance(index: int, resume: Callable[[], Step]) -> None:
        try:
            waiting[index] = resume()
        except StopIteration as stop:
            results[index] = stop.value
        except Exception as exc:  # one stream's failure is its own: report it, keep the batch going
            results[index] = exc

    for index, computation in enumerate(computations):
        advance(index, computation.__next__)
    while waiting:
        indices = list(waiting)
        steps = [waiting.pop(index) for index in indices]
        try:
            outputs = model.forward_batch(steps)
        except Exception as exc:
            for index in indices:
                results[index] = exc
            continue
        for index, output in zip(indices, outputs, strict=True):
            advance(index, partial(computations[index].send, output))
    return results
