"""The incremental streaming driver (DESIGN.md 3.1-3.4): the same answer as decoding from scratch,
for a bounded amount of work per update.

For one utterance it keeps
- the log-mel frames that are final (``IncrementalMel``);
- the encoder output of every completed 8 s attention window, with the features it was computed
  from: a window is re-encoded only if those features changed (a louder frame moved the clamp
  floor), never because the audio grew;
- the LLM KV cache of ``[prompt prefix, audio tokens of completed windows]``, which later tokens
  cannot change (causal attention);
- the previous hypothesis, used as a draft: one prefill verifies it, greedy decoding continues
  from the first token the model disagrees with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from asrlive._audio import SAMPLE_RATE

from ._features import IncrementalMel
from ._kvcache import KVCache
from ._llm import Step
from ._model import AsrModel, Steps
from ._offline import token_budget
from ._options import DecodingOptions
from ._prompt import PromptIds, build_prompt, parse_answer


@dataclass(frozen=True)
class Hypothesis:
    token_ids: tuple[int, ...]  # generated after the prompt, eos excluded
    language: str | None
    text: str
    accepted: int  # tokens of the previous hypothesis confirmed by the verifying prefill


@dataclass
class _Window:
    features: torch.Tensor  # (n_mels, frames_per_window) the window was encoded from
    embeds: torch.Tensor  # (tokens_per_window, hidden)


class UtteranceDecoder:
    """Incremental state of one utterance: ``append`` audio, ``update`` for the current hypothesis."""

    def __init__(
        self, model: AsrModel, prompt: PromptIds, forced_language: str | None, prefix_cache: KVCache | None = None
    ) -> None:
        self.model = model
        self.forced_language = forced_language
        self.mel = IncrementalMel(model.feature_extractor.mel_filters)
        self.frames_per_window = model.audio_config.n_window_infer
        self._windows: list[_Window] = []
        self._suffix = model.embed(prompt.suffix)
        # The prompt prefix is the same for every utterance of a stream: its KV is copied, not recomputed.
        self._cache = prefix_cache.copy() if prefix_cache is not None else prefix_kv(model, prompt)
        self._prefix_len = len(prompt.prefix)
        self._tokens_per_window = 0  # known after the first completed window
        self._kv_windows = 0  # completed windows whose audio tokens are in the KV cache
        self.draft: list[int] = []
        self.windows_encoded = 0  # completed 8 s windows run through the encoder, re-encodes included

    @property
    def seconds(self) -> float:
        return self.mel.n_samples / SAMPLE_RATE

    def append(self, pcm: np.ndarray) -> None:
        self.mel.append(pcm)

    def truncate(self, n_samples: int) -> None:
        self.mel.truncate(n_samples)

    def update(self, max_new_tokens: int) -> Hypothesis:
        return self.model.run(self.update_steps(max_new_tokens))

    def update_steps(self, max_new_tokens: int) -> Steps[Hypothesis]:
        # 1. Features of the whole utterance; windows whose frames are all final are complete.
        features = self.mel.features()  # (n_mels, frames)
        complete = self.mel.n_final // self.frames_per_window
        # 2. Re-encode only completed windows that are new or whose features changed.
        self._refresh_windows(features, complete)
        # 3. The open window (1-8 s of audio) is encoded afresh every time.
        open_features = features[:, complete * self.frames_per_window :]
        open_embeds = self.model.encode_frames(open_features) if open_features.shape[1] else self._suffix[:0]
        # 4. Back to the causal-invariant prefix, then one prefill: new complete windows, the
        #    open window, the prompt suffix and the draft.
        self._cache.truncate(self._prefix_len + self._kv_windows * self._tokens_per_window)
        draft = self.draft[:max_new_tokens]
        pieces = [w.embeds for w in self._windows[self._kv_windows : complete]]
        pieces += [open_embeds.to(self.model.dtype), self._suffix, self.model.embed(draft)]
        predicted = (yield Step(torch.cat(pieces), self._cache, len(draft) + 1)).tolist()
        self._kv_windows = complete
        # 5. Keep the draft up to the first disagreement and drop the rejected tokens' KV.
        accepted = self._accept(draft, predicted)
        self._cache.truncate(self._cache.length - (len(draft) - accepted))
        # 6. Continue greedily from the model's own choice at the first disagreement.
        tokens = yield from self._continue(predicted[accepted], draft[:accepted], max_new_tokens)
        self.draft = tokens
        language, text = parse_answer(self.model.decode_text(tokens), self.forced_language)
        return Hypothesis(tuple(tokens), language, text, accepted)

    def _refresh_windows(self, features: torch.Tensor, complete: int) -> None:
        size = self.frames_per_window
        del self._windows[complete:]  # the utterance was truncated
        self._kv_windows = min(self._kv_windows, complete)
        for index in range(complete):
            window = features[:, index * size : (index + 1) * size]
            if index < len(self._windows) and torch.equal(self._windows[index].features, window):
                continue
            del self._windows[index:]
            self._kv_windows = min(self._kv_windows, index)
            embeds = self.model.encode_frames(window).to(self.model.dtype)
            self.windows_encoded += 1
            self._tokens_per_window = embeds.shape[0]
            self._windows.append(_Window(window.clone(), embeds))

    def _accept(self, draft: list[int], predicted: list[int]) -> int:
        """How many draft tokens the model itself would have produced."""
        accepted = 0
        while accepted < len(draft) and predicted[accepted] == draft[accepted]:
            accepted += 1
        return accepted

    def _continue(self, next_id: int, tokens: list[int], max_new_tokens: int) -> Steps[list[int]]:
        return self.model.greedy_steps(next_id, self._cache, tokens, max_new_tokens)


def prefix_kv(model: AsrModel, prompt: PromptIds) -> KVCache:
    cache = model.new_cache()
    with torch.inference_mode():
        model.forward(model.embed(prompt.prefix), cache, 0)
    return cache


class StreamTranscriber:
    """The engine side of one stream: an ``UtteranceDecoder`` per open utterance, released at its final."""

    decoder_class = UtteranceDecoder

    def __init__(self, model: AsrModel, options: DecodingOptions | None = None, prompt: PromptIds | None = None):
        self.model = model
        self.options = options = options or DecodingOptions()
        self._prompt = prompt or build_prompt(model.tokenizer, options.context, options.language)
        self._decoders: dict[int, UtteranceDecoder] = {}
        self._prefix_cache: KVCache | None = None  # computed with the first utterance
        self.windows_encoded = 0  # completed 8 s windows encoded over the stream's life

    def transcribe(self, segment: int, audio: np.ndarray, final: bool) -> Hypothesis:
        """Hypothesis for the utterance ``segment`` whose audio so far is ``audio`` (16 kHz mono)."""
        return self.model.run(self.transcribe_steps(segment, audio, final))

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

    def _new_decoder(self) -> UtteranceDecoder:
        if self._prefix_cache is None:
            self._prefix_cache = prefix_kv(self.model, self._prompt)
        return self.decoder_class(self.model, self._prompt, self.options.language, self._prefix_cache)

    @property
    def open_utterances(self) -> int:
        return len(self._decoders)
