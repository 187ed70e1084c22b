"""The weights a loaded network keeps: embedding table, encoder and LLM, each weight once.

They are taken over from transformers' network right after loading (``Parts.of``: the matrices
converted to the format the engine multiplies with, the network then dropped), or read back from
the weights cache (``Parts.read``), which skips transformers' model classes altogether.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ._checkpoint import ModelLoadError
from ._encoder import Encoder
from ._llm import LeanLM
from ._store import Reader, Writer
from ._weights import encoder_format

if TYPE_CHECKING:
    from transformers import Qwen3ASRForConditionalGeneration, Qwen3ASRForTokenClassification


@dataclass(frozen=True)
class Parts:
    embedding: torch.Tensor  # (vocab, hidden): the lookup table of token embeddings
    encoder: Encoder
    llm: LeanLM

    @classmethod
    def of(
        cls,
        network: Qwen3ASRForConditionalGeneration | Qwen3ASRForTokenClassification,
        head: torch.nn.Linear,
        weights: str,
        device: torch.device,
    ) -> Parts:
        """Take the weights over in the format ``weights`` (``_weights``); the network is not kept."""
        # Inference only: no caller, inside torch.inference_mode or not, should build autograd graphs.
        network.requires_grad_(False)
        network.to(device)  # type: ignore[arg-type]  # transformers' @wraps-typed to() leaves self unbound
        if getattr(head, "bias", None) is not None:  # (torch types a Linear's bias as always present)
            raise ModelLoadError("the output layer has a bias, which Qwen3-ASR checkpoints do not have")
        body = network.model
        embedding = _lookup_table(body.language_model.embed_tokens.weight, weights)
        encoder = Encoder.of(body.audio_tower, body.multi_modal_projector, encoder_format(weights))
        return cls(embedding, encoder, LeanLM.of(body.language_model, head, weights))

    def write(self, out: Writer) -> None:
        out.tensor("embedding", self.embedding)
        self.encoder.write(out)
        self.llm.write(out)

    @classmethod
    def read(cls, source: Reader) -> Parts:
        return cls(source.tensor("embedding"), Encoder.read(source), LeanLM.read(source))


def _lookup_table(table: torch.Tensor, weights: str) -> torch.Tensor:
    """The embedding table for lookups: (vocab, hidden).

    With plain weights it is the tied head itself (one tensor). In the other formats the head is
    its own matrix (packed: 0.6x the time of a plain one-row product over the 152k rows), so the
    table is a second copy: kept in bfloat16 where that is exact (the published checkpoints store
    bfloat16, so it always is for them), at half float32's memory; beside a quantized head always.
    """
    if weights == "plain" or table.dtype == torch.bfloat16:
        return table
    compact = table.to(torch.bfloat16)
    exact = weights in ("int8", "int4") or torch.equal(compact.to(table.dtype), table)
    return compact if exact else table
