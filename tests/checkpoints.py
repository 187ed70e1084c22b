"""Small random-weight Qwen3-ASR checkpoints, written to disk in both published layouts.

No registry ships Qwen3-ASR weights, so tests build a tiny network with the real architecture,
the real Qwen3 tokenizer plus the ASR tokens at their real ids, and save it the way
``Qwen/Qwen3-ASR-0.6B`` (original) and ``Qwen/Qwen3-ASR-0.6B-hf`` (transformers-native) are saved.
Both directories hold the same weights, so results from either must be identical.
"""

from __future__ import annotations

import json
import lzma
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    Qwen3ASRConfig,
    Qwen3ASRFeatureExtractor,
    Qwen3ASRForConditionalGeneration,
    Qwen3ASRForTokenClassification,
    Qwen3ASRProcessor,
)

FIXTURES = Path(__file__).parent / "fixtures"

# The ASR tokens the checkpoints add after Qwen3's 151669 ids, at their fixed ids.
ASR_TOKENS = {151669: "<|audio_start|>", 151670: "<|audio_end|>", 151676: "<|audio_pad|>", 151705: "<timestamp>"}
ASR_TEXT_ID = 151704  # <asr_text>: added, but not special, so it survives skip_special_tokens
FIRST_ASR_ID, LAST_ASR_ID = 151669, 151705

TINY_AUDIO = {
    "num_mel_bins": 128,
    "encoder_layers": 2,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "d_model": 32,
    "downsample_hidden_size": 8,
    "output_dim": 64,
    "n_window": 50,
    "n_window_infer": 800,
    "activation_function": "gelu",
}
TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 151936,
    "max_position_embeddings": 65536,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "rope_theta": 1000000.0,
}

# A chat template equivalent to the one the *-hf checkpoints ship: the system turn is always
# rendered (empty without context), then the audio, then the (possibly prefilled) assistant turn.
CHAT_TEMPLATE = (
    "<|im_start|>system\n"
    "{% for m in messages if m.role == 'system' %}{% for c in m.content %}{{ c.text }}{% endfor %}{% endfor %}"
    "<|im_end|>\n<|im_start|>user\n"
    "{% for m in messages if m.role == 'user' %}{% for c in m.content if c.type == 'audio' %}"
    "<|audio_start|><|audio_pad|><|audio_end|>{% endfor %}{% endfor %}<|im_end|>\n"
    "{% for m in messages if m.role == 'assistant' %}<|im_start|>assistant\n"
    "{% for c in m.content %}{{ c.text }}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# The forced aligner's prompt, as its *-hf checkpoint renders it: the audio, then every unit followed
# by its two <timestamp> slots; no turns, no spaces.
ALIGNER_CHAT_TEMPLATE = (
    "{% for m in messages %}{% for c in m.content %}"
    "{% if c.type == 'audio' %}<|audio_start|><|audio_pad|><|audio_end|>"
    "{% else %}{{ c.text }}<timestamp><timestamp>{% endif %}"
    "{% endfor %}{% endfor %}"
)
# The published aligner's head and clock: 5000 classes of 80 ms; its vocabulary is padded to 152064.
ALIGNER_CLASSES, ALIGNER_SEGMENT_MS, ALIGNER_VOCAB = 5000, 80, 152064
TIMESTAMP_ID = 151705
_ALIGNER_ROW_STRIDE = 100


def random_network(seed: int = 0, init_std: float = 0.25, eos_boost: float = 2.0) -> Qwen3ASRForConditionalGeneration:
    """A tiny network with weights large enough that its greedy output depends on the audio.

    The <|im_end|> embedding (tied to its output row) is scaled up so that, like a trained model,
    it ends some answers early and not others: both ways out of the decode loop get exercised.
    """
    config = Qwen3ASRConfig(
        audio_config={"model_type": "qwen3_asr_encoder", **TINY_AUDIO},
        text_config={"model_type": "qwen3", **TINY_TEXT},
        initializer_range=init_std,
    )
    config.text_config.initializer_range = init_std
    config.audio_config.initializer_range = init_std
    torch.manual_seed(seed)
    network = Qwen3ASRForConditionalGeneration(config).eval()
    with torch.no_grad():
        network.get_input_embeddings().weight[151645] *= eos_boost
    return network


# How much of each attention layer's output the stable network keeps (see ``stable_network``).
STABLE_ATTENTION_SCALE = 0.003


def stable_network(seed: int = 2, attention_scale: float = STABLE_ATTENTION_SCALE) -> Qwen3ASRForConditionalGeneration:
    """A tiny network whose greedy text, like a trained model's, mostly stays as the audio grows.

    ``random_network`` changes its answer from the first token whenever the audio grows, so a
    streaming draft is rejected at once. Here every attention output projection is scaled down:
    a position's state is then almost only its own token's embedding through the MLPs, and the
    next token is a function of the previous one (a chain through the vocabulary). Attention, the
    only way the audio (or any other context) reaches the text, still moves the logits, in
    proportion to ``attention_scale``: too little to change a link of the chain that wins by a
    margin, enough to decide its few close ones. So as the audio grows the answer keeps its first tokens and changes
    after a close link, or not at all. At 0.1 the first tokens already change; at 0 nothing does.
    """
    network = random_network(seed)
    with torch.no_grad():
        for layer in network.model.language_model.layers:
            layer.self_attn.o_proj.weight *= attention_scale
    return network


def random_aligner(seed: int = 1, init_std: float = 0.25) -> Qwen3ASRForTokenClassification:
    """A tiny forced aligner: the recognizer's architecture with an untied head of timestamp classes."""
    config = Qwen3ASRConfig(
        audio_config={"model_type": "qwen3_asr_encoder", **TINY_AUDIO},
        text_config={"model_type": "qwen3", **TINY_TEXT, "vocab_size": ALIGNER_VOCAB, "tie_word_embeddings": False},
        initializer_range=init_std,
        num_labels=ALIGNER_CLASSES,
        timestamp_token_id=TIMESTAMP_ID,
        token_classification_bias=False,
        tie_word_embeddings=False,
    )
    config.text_config.initializer_range = init_std
    config.audio_config.initializer_range = init_std
    torch.manual_seed(seed)
    network = Qwen3ASRForTokenClassification(config).eval()
    # A random head names one class almost everywhere. Rows on a circle in a random plane of the
    # hidden space read the angle of each position's state instead: classes that move with the
    # context, rise through the clip and sometimes fall back, as the fix-up expects of a real
    # aligner. Only every 100th class has a row (the others score 0, below the best row): like a
    # trained head, the best class then wins by a clear margin, not by a rounding error.
    plane, _ = torch.linalg.qr(torch.randn(TINY_TEXT["hidden_size"], 2))
    rows = torch.arange(0, ALIGNER_CLASSES, _ALIGNER_ROW_STRIDE)
    angles = rows.double() * (2 * math.pi / ALIGNER_CLASSES)
    with torch.no_grad():
        network.score.weight.zero_()
        network.score.weight[rows] = (
            torch.cos(angles)[:, None] * plane[:, 0] + torch.sin(angles)[:, None] * plane[:, 1]
        ).float()
    return network


def _token_entries() -> dict[int, tuple[str, bool]]:
    """id -> (content, special) for every added token of a Qwen3-ASR tokenizer."""
    base = json.loads((FIXTURES / "qwen3-tokenizer" / "tokenizer_config.json").read_text())
    entries = {int(i): (t["content"], t["special"]) for i, t in base["added_tokens_decoder"].items()}
    for token_id in range(FIRST_ASR_ID, LAST_ASR_ID + 1):
        # The real vocabulary has other tokens between the ASR ones; placeholders keep the ids.
        entries[token_id] = (ASR_TOKENS.get(token_id, f"<|asr_reserved_{token_id}|>"), True)
    entries[ASR_TEXT_ID] = ("<asr_text>", False)
    return entries


def _tokenizer_config() -> dict:
    entries = _token_entries()
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 65536,
        "audio_token": "<|audio_pad|>",
        "audio_bos_token": "<|audio_start|>",
        "audio_eos_token": "<|audio_end|>",
        "added_tokens_decoder": {
            str(i): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for i, (content, special) in sorted(entries.items())
        },
    }


def _tokenizer_json() -> dict:
    data = json.loads(lzma.decompress((FIXTURES / "qwen3-tokenizer" / "tokenizer.json.xz").read_bytes()))
    data["added_tokens"] = [
        {
            "id": i,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": special,
        }
        for i, (content, special) in sorted(_token_entries().items())
    ]
    return data


def write_original_tokenizer(directory: Path) -> None:
    """``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json``, as the original checkpoints ship."""
    model = _tokenizer_json()["model"]
    (directory / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=1), encoding="utf-8")


def write_hf_checkpoint(network: Qwen3ASRForConditionalGeneration, directory: Path) -> Path:
    """The transformers-native layout: ``save_pretrained`` of the model and of its processor."""
    directory.mkdir(parents=True, exist_ok=True)
    network.save_pretrained(directory)
    _save_processor(directory, CHAT_TEMPLATE)
    return directory


def write_hf_aligner(network: Qwen3ASRForTokenClassification, directory: Path) -> Path:
    """The aligner's transformers-native layout (``Qwen3ASRForTokenClassification``), its clock in the processor."""
    directory.mkdir(parents=True, exist_ok=True)
    network.save_pretrained(directory)
    _save_processor(directory, ALIGNER_CHAT_TEMPLATE, timestamp_segment_time=ALIGNER_SEGMENT_MS)
    return directory


def _save_processor(directory: Path, chat_template: str, **kwargs: float) -> None:
    staging = directory / "_tokenizer_src"
    staging.mkdir()
    (staging / "tokenizer.json").write_text(json.dumps(_tokenizer_json(), ensure_ascii=False), encoding="utf-8")
    (staging / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config()), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(staging)
    processor = Qwen3ASRProcessor(Qwen3ASRFeatureExtractor(), tokenizer, chat_template=chat_template, **kwargs)
    processor.save_pretrained(directory)
    for f in staging.iterdir():
        f.unlink()
    staging.rmdir()


def write_original_checkpoint(network: Qwen3ASRForConditionalGeneration, directory: Path) -> Path:
    """The layout of ``Qwen/Qwen3-ASR-*``: nested thinker config, ``thinker.*`` weight names."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in network.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embeddings, stored once
        state[_original_name(name)] = tensor.detach().clone().contiguous()
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(_original_config(), indent=1), encoding="utf-8")
    _write_original_extras(directory)
    return directory


def write_original_aligner(network: Qwen3ASRForTokenClassification, directory: Path) -> Path:
    """The layout of ``Qwen/Qwen3-ForcedAligner-0.6B``: a forced-aligner thinker, ``thinker.lm_head`` of classes."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {_original_name(name): w.detach().clone().contiguous() for name, w in network.state_dict().items()}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    config = _original_config()
    config["thinker_config"]["model_type"] = "qwen3_forced_aligner"
    config["thinker_config"]["classify_num"] = ALIGNER_CLASSES
    config["thinker_config"]["text_config"].update(vocab_size=ALIGNER_VOCAB, tie_word_embeddings=False)
    config.update(timestamp_token_id=TIMESTAMP_ID, timestamp_segment_time=ALIGNER_SEGMENT_MS)
    (directory / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    _write_original_extras(directory)
    return directory


def _write_original_extras(directory: Path) -> None:
    write_original_tokenizer(directory)
    (directory / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "feature_extractor_type": "WhisperFeatureExtractor",
                "feature_size": 128,
                "sampling_rate": 16000,
                "hop_length": 160,
                "n_fft": 400,
                "chunk_length": 30,
                "padding_side": "right",
                "padding_value": 0.0,
                "return_attention_mask": True,
                "dither": 0.0,
                "processor_class": "Qwen3ASRProcessor",
            }
        ),
        encoding="utf-8",
    )


def _original_name(name: str) -> str:
    for new, old in (
        ("model.multi_modal_projector.linear_1.", "thinker.audio_tower.proj1."),
        ("model.multi_modal_projector.linear_2.", "thinker.audio_tower.proj2."),
        ("model.audio_tower.", "thinker.audio_tower."),
        ("model.language_model.", "thinker.model."),
        ("score.", "thinker.lm_head."),
    ):
        if name.startswith(new):
            return old + name[len(new) :]
    raise AssertionError(f"unexpected parameter {name}")


def _original_config() -> dict:
    """Field names and extras as in the published original config.json."""
    audio = {
        "model_type": "qwen3_asr_audio_encoder",
        **TINY_AUDIO,
        "max_source_positions": 1500,
        "conv_chunksize": 500,
        "dropout": 0.0,
        "dtype": "bfloat16",
    }
    text = {
        "model_type": "qwen3",
        **{k: v for k, v in TINY_TEXT.items() if k != "rope_theta"},
        "rope_theta": 1000000.0,
        "rope_scaling": {
            "interleaved": True,
            "mrope_interleaved": True,
            "mrope_section": [2, 3, 3],
            "rope_type": "default",
            "type": "default",
        },
        "attention_bias": False,
        "use_cache": True,
        "dtype": "bfloat16",
    }
    return {
        "architectures": ["Qwen3ASRForConditionalGeneration"],
        "model_type": "qwen3_asr",
        "support_languages": ["Chinese", "English"],
        "thinker_config": {
            "model_type": "qwen3_asr_thinker",
            "audio_config": audio,
            "text_config": text,
            "audio_token_id": 151676,
            "audio_start_token_id": 151669,
            "audio_end_token_id": 151670,
            "dtype": "bfloat16",
        },
        "dtype": "bfloat16",
    }
