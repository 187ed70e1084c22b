"""Find a Qwen3-ASR checkpoint and load it, whichever of the two published layouts it uses.

Two kinds share the layouts: the speech recognizers (``Qwen3ASRForConditionalGeneration``) and the
forced aligner (``Qwen/Qwen3-ForcedAligner-0.6B``, ``Qwen3ASRForTokenClassification``: the same
encoder and LLM, a head of timestamp classes instead of the vocabulary).

Layouts (DESIGN.md 2):
- original (``Qwen/Qwen3-ASR-0.6B``): ``config.json`` nests ``thinker_config.{audio_config,text_config}``,
  weights are ``thinker.audio_tower.*`` (projector as ``proj1``/``proj2``), ``thinker.model.*``,
  ``thinker.lm_head.weight``; tokenizer as ``vocab.json`` + ``merges.txt``.
- transformers-native (``*-hf``): flat config and the key names of ``Qwen3ASRForConditionalGeneration``.

The aligner's original layout marks its thinker ``qwen3_forced_aligner`` with ``classify_num``
classes and keeps ``timestamp_token_id`` and ``timestamp_segment_time`` (ms per class) at the top;
its head ``thinker.lm_head`` becomes ``score``. The native layout names the architecture
``Qwen3ASRForTokenClassification``, counts the classes in ``id2label`` and leaves the segment time
to the processor (``processor_config.json``, default 80 ms in transformers).

The original layout is converted while loading (config dict and key renames); no file is rewritten.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch

from ._options import KNOWN_MODELS

if TYPE_CHECKING:
    from transformers import Qwen3ASRConfig, Qwen3ASRForConditionalGeneration, Qwen3ASRForTokenClassification

Layout = Literal["original", "hf"]
Kind = Literal["asr", "aligner"]

# Only what inference needs: no training states, no other framework's weights.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja"]

# Regexes applied by `from_pretrained(key_mapping=...)` to the original layout's names.
# Order matters: the projector lives under the audio tower in the original layout.
_ORIGINAL_KEY_MAPPING = {
    r"^thinker\.audio_tower\.proj1\.": "model.multi_modal_projector.linear_1.",
    r"^thinker\.audio_tower\.proj2\.": "model.multi_modal_projector.linear_2.",
    r"^thinker\.audio_tower\.": "model.audio_tower.",
    r"^thinker\.model\.": "model.language_model.",
    r"^thinker\.lm_head\.": "lm_head.",
}
_ORIGINAL_ALIGNER_KEY_MAPPING = {**_ORIGINAL_KEY_MAPPING, r"^thinker\.lm_head\.": "score."}
# transformers' processor default, for a native aligner checkpoint whose processor config does not say.
DEFAULT_SEGMENT_MS = 80.0

# Fields of the original thinker config that do not describe the network.
_MROPE_KEYS = ("mrope_interleaved", "interleaved", "mrope_section", "type")


class ModelLoadError(RuntimeError):
    """A checkpoint could not be found or read; the message says what was tried and what to do."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory on disk and the layout its files use."""

    path: Path
    layout: Layout
    config: dict[str, Any]  # already in the transformers-native (flat) form
    kind: Kind = "asr"
    segment_ms: float | None = None  # the aligner's milliseconds per timestamp class


def resolve_model_dir(model: str) -> Path:
    """A local directory as is; otherwise a hub id, from the local cache first, then a download."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelLoadError(
            f"Model {model!r} is neither a checkpoint directory nor a Hugging Face id "
            f"(such as {' or '.join(KNOWN_MODELS)})."
        )
    return _from_hub(model)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set, so no download was attempted"
    else:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
        except RepositoryNotFoundError:
            raise ModelLoadError(
                f"The Hugging Face hub has no model {repo_id!r} (or it is private). "
                f"Known Qwen3-ASR models: {', '.join(KNOWN_MODELS)}."
            ) from None
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
            reason = f"the download failed: {_first_line(exc)}"
    raise ModelLoadError(
        f"Model {repo_id!r} is not in the Hugging Face cache ({_hub_cache_dir()}) and {reason}.\n"
        f"Either download it on a machine with internet access (`hf download {repo_id}`) and copy "
        f"the cache folder here, or point --model at a local checkpoint directory."
    )


def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_checkpoint(path: Path) -> Checkpoint:
    """Read ``config.json``, tell the layout and the kind apart and return the config in flat form."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json: it is not a Qwen3-ASR checkpoint directory.")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON ({exc}); the checkpoint is corrupt.") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "qwen3_asr":
        found = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise ModelLoadError(f"{config_file} describes a {found!r} model, not a Qwen3-ASR one ('qwen3_asr').")
    if isinstance(raw.get("thinker_config"), dict):
        return _original_checkpoint(path, raw)
    if "audio_config" in raw and "text_config" in raw:
        if "Qwen3ASRForTokenClassification" in (raw.get("architectures") or ()):
            return Checkpoint(path, "hf", raw, "aligner", _processor_segment_ms(path))
        return Checkpoint(path, "hf", raw)
    raise ModelLoadError(f"{config_file} has neither 'thinker_config' nor 'audio_config'/'text_config'.")


def _original_checkpoint(path: Path, raw: dict[str, Any]) -> Checkpoint:
    thinker = raw["thinker_config"]
    flat = _flatten_original_config(thinker)
    if "classify_num" not in thinker and thinker.get("model_type") != "qwen3_forced_aligner":
        return Checkpoint(path, "original", flat)
    fields = {name: raw.get(name, thinker.get(name)) for name in ("classify_num", "timestamp_token_id")}
    segment_ms = raw.get("timestamp_segment_time", thinker.get("timestamp_segment_time"))
    missing = [name for name, value in [*fields.items(), ("timestamp_segment_time", segment_ms)] if value is None]
    if missing:
        raise ModelLoadError(
            f"{path / 'config.json'} describes a forced aligner without {', '.join(missing)}: "
            "the checkpoint is incomplete."
        )
    flat["num_labels"] = fields["classify_num"]
    flat["timestamp_token_id"] = fields["timestamp_token_id"]
    return Checkpoint(path, "original", flat, "aligner", float(segment_ms))


def _processor_segment_ms(path: Path) -> float:
    processor_file = path / "processor_config.json"
    if not processor_file.is_file():
        return DEFAULT_SEGMENT_MS
    try:
        value = json.loads(processor_file.read_text(encoding="utf-8")).get("timestamp_segment_time", DEFAULT_SEGMENT_MS)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ModelLoadError(f"{processor_file} is not a JSON object ({exc}); the checkpoint is corrupt.") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ModelLoadError(f"{processor_file} has an unusable timestamp_segment_time {value!r}.")
    return float(value)


def _flatten_original_config(thinker: dict[str, Any]) -> dict[str, Any]:
    audio = dict(thinker["audio_config"])
    audio["model_type"] = "qwen3_asr_encoder"
    # Positions restart in every 1 s conv chunk, so only one chunk's worth of them exists.
    audio["max_position_embeddings"] = _tokens_per_chunk(audio.get("n_window", 50))
    text = dict(thinker["text_config"])
    text["model_type"] = "qwen3"
    rope = text.get("rope_scaling")
    if isinstance(rope, dict):
        # Interleaved MRoPE with equal positions on all three axes is plain 1-D RoPE.
        text["rope_scaling"] = {k: v for k, v in rope.items() if k not in _MROPE_KEYS}
    flat = {"model_type": "qwen3_asr", "audio_config": audio, "text_config": text}
    for key in ("audio_token_id", "initializer_range"):
        if key in thinker:
            flat[key] = thinker[key]
    flat["tie_word_embeddings"] = text.get("tie_word_embeddings", True)
    return flat


def _tokens_per_chunk(n_window: int) -> int:
    frames = 2 * n_window
    for _ in range(3):  # three stride-2 convolutions
        frames = (frames - 1) // 2 + 1
    return frames


def load_network(checkpoint: Checkpoint, dtype: torch.dtype) -> Qwen3ASRForConditionalGeneration:
    """Build ``Qwen3ASRForConditionalGeneration`` from a recognizer checkpoint's weights, strictly."""
    from transformers import Qwen3ASRForConditionalGeneration

    check_kind(checkpoint, "asr")
    return cast("Qwen3ASRForConditionalGeneration", _load(checkpoint, dtype, Qwen3ASRForConditionalGeneration))


def load_aligner_network(checkpoint: Checkpoint, dtype: torch.dtype) -> Qwen3ASRForTokenClassification:
    """Build ``Qwen3ASRForTokenClassification`` from a forced-aligner checkpoint's weights, strictly."""
    from transformers import Qwen3ASRForTokenClassification

    check_kind(checkpoint, "aligner")
    return cast("Qwen3ASRForTokenClassification", _load(checkpoint, dtype, Qwen3ASRForTokenClassification))


def check_kind(checkpoint: Checkpoint, kind: Kind) -> None:
    """A recognizer given as the aligner, or the other way round, is told apart before any weight is read."""
    if checkpoint.kind == kind:
        return
    if kind == "asr":
        raise ModelLoadError(
            f"{checkpoint.path} is the Qwen3 forced aligner, not a speech recognizer: give it as --aligner, "
            "and a Qwen3-ASR model as --model."
        )
    raise ModelLoadError(
        f"{checkpoint.path} is a speech recognizer, not the Qwen3 forced aligner "
        "(such as Qwen/Qwen3-ForcedAligner-0.6B): give it as --model, and the aligner as --aligner."
    )


def network_config(checkpoint: Checkpoint) -> Qwen3ASRConfig:
    """transformers' config of the network, from the checkpoint's (flat) config."""
    from transformers import Qwen3ASRConfig

    try:
        return Qwen3ASRConfig(**{k: v for k, v in checkpoint.config.items() if k != "model_type"})
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"config.json of {checkpoint.path} is not a valid Qwen3-ASR config: {exc}") from None


def _load(checkpoint: Checkpoint, dtype: torch.dtype, network_class: Any) -> Any:
    weights = sorted(checkpoint.path.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(f"{checkpoint.path} has no *.safetensors weight files.")
    config = network_config(checkpoint)
    mapping = None
    if checkpoint.layout == "original":
        mapping = _ORIGINAL_ALIGNER_KEY_MAPPING if checkpoint.kind == "aligner" else _ORIGINAL_KEY_MAPPING
    try:
        model, info = network_class.from_pretrained(
            checkpoint.path, config=config, dtype=dtype, key_mapping=mapping, output_loading_info=True
        )
    except Exception as exc:  # safetensors, torch and transformers each raise their own types
        raise ModelLoadError(
            f"The weights in {checkpoint.path} could not be read ({type(exc).__name__}: {_first_line(exc)}). "
            "The files may be truncated or corrupt: delete them and download the model again."
        ) from exc
    _check_loading_info(checkpoint.path, info)
    model.eval()
    return model


def _check_loading_info(path: Path, info: dict[str, Any]) -> None:
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            problems.append(f"{len(keys)} {kind.replace('_', ' ')} (e.g. {', '.join(keys[:3])})")
    if problems:
        raise ModelLoadError(
            f"The weights in {path} do not match its config.json: {'; '.join(problems)}. "
            "The checkpoint is incomplete or mixed from different models."
        )
