"""The inference thread's second batch: the texts of finals aligned on their audio (word timestamps).

A final of a session that asked for word times is delivered with its words, so its computation
does not end with the recognizer's hypothesis: the hypothesis waits here while the forced aligner
(a second network) runs ``alignment_steps`` on the job's audio. Alignments batch among themselves
like transcriptions do (one encoder forward over every waiting window, one LLM forward over
every waiting prompt per round), and the thread alternates one round of each batch, so an
alignment delays the partials of other streams by at most one of its rounds.

An alignment that fails (the aligner raised) fails only the words: the final goes out with
``words: null`` and the reason, never without its text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from asrlive._words import Alignment
from asrlive.engine import Hypothesis
from asrlive.engine._aligner import Aligner, alignment_steps
from asrlive.engine._batch import ContinuousBatch, Finished

if TYPE_CHECKING:
    from asrlive.engine._steps import Steps

log = logging.getLogger("asrlive.server")


@dataclass(frozen=True)
class Aligned:
    """A hypothesis with the words of its text, timed from its job's start."""

    hypothesis: Hypothesis
    alignment: Alignment


class AlignStage:
    """Hypotheses waiting for their words, keyed as the transcription batch keys them."""

    def __init__(self, aligner: Aligner) -> None:
        self._batch = ContinuousBatch(aligner)
        self._aligner = aligner
        self._waiting: dict[Hashable, Hypothesis] = {}
        self._direct: set[Hashable] = set()

    def __len__(self) -> int:
        """Alignments waiting (one may finish as it is admitted: the next step reports it)."""
        return len(self._waiting) + len(self._direct)

    def add(self, key: Hashable, computation: Steps[Any]) -> None:
        """An alignment of its own (not a final's hypothesis): its result is reported as it is."""
        self._direct.add(key)
        self._batch.add(key, computation)

    def admit(self, finished: list[Finished], audio_of: Callable[[Hashable], np.ndarray | None]) -> list[Finished]:
        """Start aligning every finished hypothesis whose key has audio to align; the rest as they were."""
        passed = []
        for item in finished:
            audio = None if isinstance(item.result, BaseException) else audio_of(item.key)
            if audio is None:
                passed.append(item)
                continue
            hypothesis: Hypothesis = item.result
            self._waiting[item.key] = hypothesis
            self._batch.add(item.key, alignment_steps(self._aligner, audio, hypothesis.text, hypothesis.language))
        return passed

    def cancel(self, key: Hashable) -> None:
        if self._waiting.pop(key, None) is not None or key in self._direct:
            self._direct.discard(key)
            self._batch.cancel(key)

    def step(self) -> list[Finished]:
        """One round of the aligner; the hypotheses whose words are done, as ``Aligned``."""
        done = []
        for item in self._batch.step():
            if item.key in self._direct:
                self._direct.discard(item.key)
                done.append(item)
                continue
            hypothesis = self._waiting.pop(item.key)
            alignment = item.result
            if isinstance(alignment, BaseException):
                log.error("word alignment failed; the final goes out without words", exc_info=alignment)
                alignment = Alignment(None, f"the aligner failed: {type(alignment).__name__}")
            done.append(Finished(item.key, Aligned(hypothesis, alignment)))
        return done
