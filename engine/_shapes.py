"""Random-weight networks of the true Qwen3-ASR shapes, for speed measurements without weights.

Compute does not depend on the weights' values, so these measure what the real checkpoints cost
(DESIGN.md 5); only the number of decoded tokens must be fixed by the caller.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import Qwen3ASRForConditionalGeneration

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


def random_network(size: str, dtype: torch.dtype, seed: int = 0) -> Qwen3ASRForConditionalGeneration:
    from transformers import Qwen3ASRConfig, Qwen3ASRForConditionalGeneration

    shape = SHAPES[size]
    config = Qwen3ASRConfig(
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
            "vocab_size": 151936,
            "tie_word_embeddings": True,
            "rope_theta": 1_000_000.0,
            "max_position_embeddings": 65536,
        },
    )
    torch.manual_seed(seed)
    network = Qwen3ASRForConditionalGeneration(config)
    # Module.to casts in place; transformers' @wraps-typed to() leaves self unbound in its stubs.
    network.to(dtype)  # type: ignore[arg-type]
    network.eval()  # type: ignore[no-untyped-call]  # transformers' eval() is unannotated; it returns the model
    return network
