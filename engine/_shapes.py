"""Random-weight networks of the true Qwen3-ASR shapes, for speed measurements without weights.

Compute does not depend on the weights' values, so these measure what the real checkpoints cost
(DESIGN.md 5); only the number of decoded tokens must be fixed by the caller.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from transformers import Qwen3ASRConfig, Qwen3ASRForConditionalGeneration, Qwen3ASRForTokenClassification

SHAPES = {
    "0.6B": {
        "audio": {"d_model": 896, "encoder_layers": 18, "encoder_attention_heads": 14, "encoder_ffn_dim": 3584},
        "text": {"hidden_size": 1024, "intermediate_size": 3072},
    },
    "1.7B": {
        "audio": {"d_model": 1024, "encoder_layers": 24, "encoder_attention_heads": 16, "encoder_ffn_dim": 4096},
        "text": {"hidden_size": 2048, "intermediate_size": 6144},
    },
}


# Qwen3-ForcedAligner-0.6B: the 1.7B recognizer's encoder, the 0.6B LLM, a head of 5000 classes of
# 80 ms, the vocabulary padded to 152064 and not tied to the head.
ALIGNER_SHAPE = {"audio": SHAPES["1.7B"]["audio"], "text": SHAPES["0.6B"]["text"]}
ALIGNER_CLASSES, ALIGNER_SEGMENT_MS = 5000, 80.0


def random_network(size: str, dtype: torch.dtype, seed: int = 0) -> Qwen3ASRForConditionalGeneration:
    from transformers import Qwen3ASRForConditionalGeneration

    torch.manual_seed(seed)
    network = Qwen3ASRForConditionalGeneration(_config(SHAPES[size], vocab=151936, tied=True))
    return _placed(network, dtype)


def random_aligner_network(dtype: torch.dtype, seed: int = 0) -> Qwen3ASRForTokenClassification:
    from transformers import Qwen3ASRForTokenClassification

    config = _config(ALIGNER_SHAPE, vocab=152064, tied=False)
    config.num_labels = ALIGNER_CLASSES
    torch.manual_seed(seed)
    network = Qwen3ASRForTokenClassification(config)  # type: ignore[no-untyped-call]  # its __init__ is unannotated
    return _placed(network, dtype)


def _config(shape: dict[str, dict[str, int]], vocab: int, tied: bool) -> Qwen3ASRConfig:
    from transformers import Qwen3ASRConfig

    return Qwen3ASRConfig(
        audio_config={
            "model_type": "qwen3_asr_encoder",
            **shape["audio"],
            "output_dim": shape["text"]["hidden_size"],
            "num_mel_bins": 128,
            "n_window": 50,
            "n_window_infer": 800,
            "downsample_hidden_size": 480,
        },
        text_config={
            "model_type": "qwen3",
            **shape["text"],
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": vocab,
            "tie_word_embeddings": tied,
            "rope_theta": 1_000_000.0,
            "max_position_embeddings": 65536,
        },
        tie_word_embeddings=tied,
    )


N = TypeVar("N", bound="torch.nn.Module")


def _placed(network: N, dtype: torch.dtype) -> N:
    # Module.to casts in place; transformers' @wraps-typed to() leaves self unbound in its stubs.
    network.to(dtype)
    network.eval()
    return network
