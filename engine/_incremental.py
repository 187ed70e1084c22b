"""The incremental streaming driver (DESIGN.md 3.1-3.4): the same answer as decoding from scratch,
for a bounded amount of work per update.

For one utterance it keeps
- the log-mel frames that are final (``IncrementalMel``);
- the encoder's front end (convolutions) of every complete 1 s chunk, with the features it was
  computed from: a chunk is recomputed only if those features changed (a louder frame moved the
  clamp floor), never because the audio grew;
- the encoder output of every completed 8 s attention window, kept while none of its chunks
  changed;
- the LLM KV cache of ``[prompt prefix, audio tokens of completed windows]``, which later tokens
  cannot change (causal attention);
- the previous hypothesis, used as a draft: one prefill verifies it, greedy decoding continues
  from the first token the model disagrees with. Where the previous decode was cut at a loop
  (``_loops``), the draft holds the loop as decoded up to the cut: verified again, it is found
  again without a decode step. The rule is applied to the accepted draft as to new tokens, so
  the cut falls where decoding from scratch puts it.

An update yields its encoder windows and LLM forwards (``_steps``) so that a driver can batch them
with other streams'. Abandoned at any yield, it leaves this state valid for the next update.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from asrlive._audio import SAMPLE_RATE

from ._features import IncrementalMel
from ._kvcache import KVCache
from ._loops import without_loop
from ._offline import token_budget
from ._options import DecodingOptions
from ._prompt import PromptIds, build_prompt, parse_answer
from ._steps import Encode, Model, Step, Steps, greedy_steps, run


@dataclass(frozen=True)
class Hypothesis:
    token_ids: tuple[int, ...]  # generated after the prompt, eos excluded
    language: str | None
    text: str
    accepted: int  # tokens of the previous draft (hypothesis, loop included) confirmed by the verifying prefill


@dataclass(frozen=True)
class _Chunk:
    features: torch.Tensor  # (n_mels, frames_per_chunk) the front end was computed from
    front: torch.Tensor  # (tokens, d_model)


class UtteranceDecoder:
    """Incremental state of one utterance: ``append`` audio, ``update`` for the current hypothesis."""

    def __init__(
        self,
        model: Model,
        prompt: PromptIds,
        forced_language: str | None,
        prefix_cache: KVCache | None = None,
        cut_loops: bool = True,
    ) -> None:
        self.model = model
        self.forced_language = forced_language
        self.cut_loops = cut_loops
        self.mel = IncrementalMel(model.mel_filters)
        self.frames_per_chunk = model.frames_per_chunk
        self.frames_per_window = model.frames_per_window
        self._chunks: list[_Chunk] = []  # front end of complete chunks, in order
        self._windows: list[torch.Tensor] = []  # (tokens_per_window, hidden) of completed windows, in order
        self._suffix = model.embed(prompt.suffix)
        # The prompt prefix is the same for every utterance of a stream: its KV is copied, not recomputed.
        self._cache = prefix_cache.copy() if prefix_cache is not None else prefix_kv(model, prompt)
        self._prefix_len = len(prompt.prefix)
        self._kv_windows = 0  # completed windows whose audio tokens are in the KV cache
        self.draft: list[int] = []  # the previous update's tokens, a loop it was cut at included
        self.windows_encoded = 0  # completed 8 s windows run through the encoder, re-encodes included
        self.chunks_computed = 0  # 1 s chunks run through the front end, the open one included

    @property
    def seconds(self) -> float:
        return self.mel.n_samples / SAMPLE_RATE

    def append(self, pcm: np.ndarray) -> None:
        self.mel.append(pcm)

    def truncate(self, n_samples: int) -> None:
        self.mel.truncate(n_samples)

    def update(self, max_new_tokens: int) -> Hypothesis:
        return run(self.model, self.update_steps(max_new_tokens))

    def update_steps(self, max_new_tokens: int) -> Steps[Hypothesis]:
        # 1. Features of the whole utterance; chunks and windows whose frames are all final are complete.
        features = self.mel.features()  # (n_mels, frames)
        per_window = self.frames_per_window // self.frames_per_chunk
        complete = self.mel.n_final // self.frames_per_window
        # 2. Front end of complete chunks, kept unless their features changed; completed windows
        #    are re-encoded only when one of their chunks changed.
        self._refresh_chunks(features, complete)
        for index in range(len(self._windows), complete):
            window = yield Encode(self._front(index * per_window, (index + 1) * per_window))
            self._windows.append(window)
            self.windows_encoded += 1
        # 3. The open window (up to 8 s): cached chunks plus the chunk still filling.
        open_front = self._open_front(features, complete * per_window)
        open_embeds = (yield Encode(open_front)) if open_front.shape[0] else self._suffix[:0]
        # 4. Back to the causal-invariant prefix, then one prefill: new complete windows, the
        #    open window, the prompt suffix and the draft.
        self._cache.truncate(self._prefix_len + sum(w.shape[0] for w in self._windows[: self._kv_windows]))
        draft = self.draft[:max_new_tokens]
        pieces = [*self._windows[self._kv_windows : complete], open_embeds, self._suffix, self.model.embed(draft)]
        predicted = (yield Step(torch.cat(pieces), self._cache, len(draft) + 1)).tolist()
        self._kv_windows = complete
        # 5. Keep the draft up to the first disagreement and drop the rejected tokens' KV.
        accepted = self._accept(draft, predicted)
        self._cache.truncate(self._cache.length - (len(draft) - accepted))
        # 6. Continue greedily from the model's own choice at the first disagreement.
        tokens = yield from self._continue(predicted[accepted], draft[:accepted], max_new_tokens)
        self.draft = tokens
        if self.cut_loops:
            tokens = without_loop(tokens)
        language, text = parse_answer(self.model.decode_text(tokens), self.forced_language)
        return Hypothesis(tuple(tokens), language, text, accepted)

    def _refresh_chunks(self, features: torch.Tensor, complete_windows: int) -> None:
        """Bring the front-end cache up to the complete chunks; forget windows built on a changed chunk."""
        size = self.frames_per_chunk
        complete = self.mel.n_final // size
        changed = next(
            (
                i
                for i, chunk in enumerate(self._chunks[:complete])
                if not torch.equal(chunk.features, _chunk(features, i, size))
            ),
            min(len(self._chunks), complete),
        )
        del self._chunks[changed:]
        if complete > changed:
            fronts = self.model.encode_front(features[:, changed * size : complete * size])
            self._chunks += [_Chunk(_chunk(features, changed + i, size).clone(), f) for i, f in enumerate(fronts)]
            self.chunks_computed += len(fronts)
        # A window is valid while all of its chunks are; the KV cache holds only valid windows.
        per_window = self.frames_per_window // size
        valid = min(changed // per_window, complete_windows)
        if valid < len(self._windows):
            del self._windows[valid:]
        self._kv_windows = min(self._kv_windows, valid)

    def _front(self, first: int, end: int) -> torch.Tensor:
        return torch.cat([chunk.front for chunk in self._chunks[first:end]])

    def _open_front(self, features: torch.Tensor, first: int) -> torch.Tensor:
        """Front end of the open window: its complete chunks from the cache, the rest computed now."""
        cached = self._chunks[first:]
        computed_from = (first + len(cached)) * self.frames_per_chunk
        fresh = self.model.encode_front(features[:, computed_from:]) if features.shape[1] > computed_from else []
        self.chunks_computed += len(fresh)
        return torch.cat([c.front for c in cached] + fresh) if cached or fresh else features.new_zeros(0)

    def _accept(self, draft: list[int], predicted: list[int]) -> int:
        """How many draft tokens the model itself would have produced."""
        accepted = 0
        while accepted < len(draft) and predicted[accepted] == draft[accepted]:
            accepted += 1
        return accepted

    def _continue(self, next_id: int, tokens: list[int], max_new_tokens: int) -> Steps[list[int]]:
        return greedy_steps(self.model, next_id, self._cache, tokens, max_new_tokens, self.cut_loops)


def _chunk(features: torch.Tensor, index: int, size: int) -> torch.Tensor:
    return features[:, index * size : (index + 1) * size]


def prefix_kv(model: Model, prompt: PromptIds) -> KVCache:
    cache = model.new_cache()
    with torch.inference_mode():
        model.forward_batch([Step(model.embed(prompt.prefix), cache, 0)])
    return cache


class StreamTranscriber:
    """The engine side of one stream: an ``UtteranceDecoder`` per open utterance, released at its final."""

    decoder_class = UtteranceDecoder

    def __init__(self, model: Model, options: DecodingOptions | None = None, prompt: PromptIds | None = None):
        self.model = model
        self.options = options = options or DecodingOptions()
        self._prompt = prompt or build_prompt(model.tokenizer, options.context, options.language)
        self._decoders: dict[int, UtteranceDecoder] = {}
        self._prefix_cache: KVCache | None = None  # computed with the first utterance
        self.windows_encoded = 0  # completed 8 s windows encoded over the stream's life

    def transcribe(self, segment: int, audio: np.ndarray, final: bool) -> Hypothesis:
        """Hypothesis for the utterance ``segment`` whose audio so far is ``audio`` (16 kHz mono)."""
        return run(self.model, self.transcribe_steps(segment, audio, final))

    def transcribe_steps(self, segment: int, audio: np.ndarray, final: bool) -> Steps[Hypothesis]:
        """``transcribe`` as a computation that yields its LLM forwards (to be batched with others')."""
        decoder = self._decoders.get(segment)
        if decoder is None:
            decoder = self._decoders[segment] = self._new_decoder()
        # A final may end before the newest partial's audio (trailing silence, a cut at the
        # maximum length): same start, so the state is cut back rather than rebuilt.
        decoder.truncate(audio.size)
        decoder.append(audio[decoder.mel.n_samples :])
        encoded_before = decoder.windows_encoded
        hypothesis = yield from decoder.update_steps(token_budget(audio.size / SAMPLE_RATE, self.options))
        self.windows_encoded += decoder.windows_encoded - encoded_before
        if final:
            del self._decoders[segment]
        return hypothesis

    def release(self, segment: int) -> None:
        """Forget the state of utterance ``segment`` (its final came from elsewhere, or it was abandoned)."""
        self._decoders.pop(segment, None)

    def _new_decoder(self) -> UtteranceDecoder:
        if self._prefix_cache is None:
            self._prefix_cache = prefix_kv(self.model, self._prompt)
        options = self.options
        return self.decoder_class(self.model, self._prompt, options.language, self._prefix_cache, options.cut_loops)

    @property
    def open_utterances(self) -> int:
        return len(self._decoders)
