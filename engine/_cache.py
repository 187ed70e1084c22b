"""The weights cache: the engine's own layout of a checkpoint (packed, quantized, fused), on disk.

Loading through transformers and converting costs most of a start (0.6B: building the network,
fusing q/k/v and gate/up, oneDNN's reorder or the quantization). The result is written once, as
one safetensors file, and later starts map it (``safetensors`` reads without copies: pages come
from the page cache, shared by every process on the machine that maps the same file).

A file's name is the hash of the checkpoint's path, the format and dtype, then the hash of
everything its contents depend on: the checkpoint (each weight
file's name, size, modification time and safetensors header, and ``config.json``), the weight
format and dtype, the torch version, the CPU's instruction sets (oneDNN's packed layout and the
int4 kernel's differ between AVX2 and AVX512), and this module's ``CACHE_VERSION``. Any change
gives another name, so a stale file is never read. A file that cannot be read back completely
(truncated, a bad header, missing or misshapen tensors) is deleted and rebuilt; the tensors' bytes
themselves are not checksummed (nor are a checkpoint's). Files are written to a temporary name
and renamed, so a crash mid-write leaves no half file under a real name. Writing a file deletes
the files of earlier builds for the same path, format and dtype: the cache holds one file per
checkpoint directory and format, however often a checkpoint changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ._checkpoint import Checkpoint
from ._parts import Parts
from ._store import Reader, Writer

CACHE_VERSION = 1
_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")
_HEADER_LIMIT = 100 << 20  # safetensors' own limit on a header's size
log = logging.getLogger("asrlive.engine")


def default_cache_dir() -> Path:
    """``asrlive/weights`` in the Hugging Face home (``HF_HOME``; by default ``~/.cache/huggingface``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "asrlive" / "weights"


def cached_parts(
    directory: Path, checkpoint: Checkpoint, description: dict[str, str], build: Callable[[], Parts]
) -> Parts:
    """The parts from ``directory`` if a file for exactly this key is there and reads back; else built and stored."""
    key = {**description, **_environment(), "checkpoint": _fingerprint(checkpoint.path)}
    family = _hash({"path": str(checkpoint.path.resolve()), **description})
    path = directory / f"{family}-{_hash(key)}.safetensors"
    if path.is_file():
        parts = _read(path, key)
        if parts is not None:
            log.info("weights read from the cache %s", path)
            return parts
    parts = build()
    _write(path, key, parts)
    for stale in directory.glob(f"{family}-*.safetensors"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return parts


def _hash(value: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:24]


def _read(path: Path, key: dict[str, Any]) -> Parts | None:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)  # mapped, not copied
        with safe_open(path, "pt") as file:
            meta = json.loads(file.metadata()["asrlive"])
        if meta["key"] != key:
            raise ValueError("its key is not this checkpoint's")
        # Formats converted on reading keep nothing of the mapping (Reader); plain and int4 map it.
        return Parts.read(Reader(tensors, meta, copy_tensors=key["weights"] in ("packed", "int8")))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        log.warning("the weights cache file %s is unusable (%s): rebuilding it", path, exc)
        path.unlink(missing_ok=True)
        return None


def _write(path: Path, key: dict[str, Any], parts: Parts) -> None:
    from safetensors.torch import save_file

    out = Writer()
    parts.write(out)
    out.meta["key"] = key
    # A read-only or full disk costs the next start its speed, nothing more.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=".writing-", suffix=".safetensors", dir=path.parent)
    except OSError as exc:
        log.warning("could not write the weights cache %s (%s); the next start converts again", path, exc)
        return
    os.close(descriptor)
    try:
        save_file(out.tensors, temporary, metadata={"asrlive": json.dumps(out.meta)})
        os.replace(temporary, path)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        log.warning("could not write the weights cache %s (%s); the next start converts again", path, exc)
        return
    log.info("weights converted once and cached in %s", path)


def _environment() -> dict[str, str]:
    try:
        flags = set(Path("/proc/cpuinfo").read_text(errors="replace").split())
    except OSError:
        flags = set()
    capability = torch.backends.cpu.get_cpu_capability()
    return {
        "version": str(CACHE_VERSION),
        "torch": torch.__version__,
        "cpu": " ".join([capability, *(flag for flag in _CPU_FLAGS if flag in flags)]),
    }


def _fingerprint(directory: Path) -> str:
    """Each weight file's name, size, mtime and header, and config.json's bytes, hashed."""
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for path in sorted(directory.glob("*.safetensors")):
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        with open(path, "rb") as file:
            digest.update(json.dumps(_header(file), sort_keys=True).encode())
    return digest.hexdigest()


def _header(file: Any) -> dict[str, Any]:
    """A safetensors file's JSON header: 8 bytes of length (little-endian), then the JSON."""
    size = int.from_bytes(file.read(8), "little")
    if not 0 < size <= _HEADER_LIMIT:
        raise ValueError(f"no safetensors header (length {size})")
    header: dict[str, Any] = json.loads(file.read(size))
    return header
