"""What a computation asks the model for, and the small interface of the model that answers.

A computation (an offline decode, a streaming update) is a generator: it yields each request
(``Encode`` or ``Step``), is sent the answer, and returns its result. It never calls the network
itself, so one driver can run it alone and another can batch the requests of many computations
into one encoder forward and one LLM forward (``_batch``). The engine's drivers see the model
only through ``Model``; tests can give them a fake one.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch

from ._kvcache import KVCache
from ._loops import first_loop, loop_at
from ._prompt import TextEncoder

T = TypeVar("T")


@dataclass(frozen=True)
class Step:
    """One sequence's part of an LLM forward: ``embeds`` after what ``cache`` holds; ids of the last n_logits."""

    embeds: torch.Tensor  # (seq, hidden)
    cache: KVCache
    n_logits: int


@dataclass(frozen=True)
class Encode:
    """Audio embeddings for one attention window of the encoder, from its front-end output.

    ``front`` is the convolution front end of the window's 1 s chunks, already computed (and
    cached by the caller for chunks that are complete): (tokens, d_model). The answer is
    (tokens, hidden): the attention layers and the projection into the LLM.
    """

    front: torch.Tensor  # (tokens, d_model)


Request = Step | Encode
# A computation that needs the network: yields requests, is sent each answer, returns its result.
Steps = Generator[Request, torch.Tensor, T]


class Model(Protocol):
    """What computations and drivers use of a model."""

    @property
    def tokenizer(self) -> TextEncoder: ...
    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def frames_per_chunk(self) -> int: ...  # mel frames per conv chunk (1 s)
    @property
    def frames_per_window(self) -> int: ...  # mel frames per attention window (8 s)
    @property
    def mel_filters(self) -> np.ndarray: ...  # (n_freqs, n_mels)

    def embed(self, token_ids: list[int]) -> torch.Tensor: ...  # (len, hidden)
    def encode_front(
        self, features: torch.Tensor
    ) -> list[torch.Tensor]: ...  # (n_mels, frames) -> per chunk (tokens, d_model)
    def encode_batch(self, requests: Sequence[Encode]) -> list[torch.Tensor]: ...
    def forward_batch(self, steps: Sequence[Step]) -> list[torch.Tensor]: ...
    def new_cache(self) -> KVCache: ...
    def decode_text(self, token_ids: list[int]) -> str: ...


EOS_IDS = (151643, 151645)  # <|endoftext|>, <|im_end|>


def greedy_steps(
    model: Model, next_id: int, cache: KVCache, tokens: list[int], max_new_tokens: int, cut_loops: bool = True
) -> Steps[list[int]]:
    """Append greedy tokens, starting with ``next_id``, until eos or ``max_new_tokens`` in all.

    With ``cut_loops`` it also stops where the tokens first end in a loop (``_loops``), the given
    ``tokens`` included (a streaming draft may already loop), and returns the tokens up to there:
    ``without_loop`` of the result is what the decode keeps. The loop is left in because a
    streaming update uses it as its draft, so the next update verifies it instead of decoding it.
    """
    tokens = list(tokens)
    if cut_loops and (loop := first_loop(tokens)) is not None:
        return tokens[: loop.end]
    while len(tokens) < max_new_tokens and next_id not in EOS_IDS:
        tokens.append(next_id)
        if cut_loops and loop_at(tokens, len(tokens)) is not None:
            break
        if len(tokens) < max_new_tokens:
            next_id = int((yield Step(model.embed([next_id]), cache, 1))[0])
    return tokens


def run(model: Model, computation: Generator[Request, torch.Tensor, T]) -> T:
    """Drive one computation alone: each request is answered as it comes."""
    try:
        request = next(computation)
        while True:
            if isinstance(request, Encode):
                answer = model.encode_batch([request])[0]
            else:
                answer = model.forward_batch([request])[0]
            request = computation.send(answer)
    except StopIteration as stop:
        result: T = stop.value  # the generator's return value (typed Any)
        return result
