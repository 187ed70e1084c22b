"""asrlive: real-time streaming speech transcription with Qwen3-ASR."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("asrlive")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
