"""The input audio of the OpenAI Realtime API: base64 appends in one of its formats -> 16 kHz float32.

Formats (GA name / beta name, the client's sample rate):

- ``audio/pcm`` / ``pcm16``: 16-bit little-endian PCM, mono, 24 kHz (the only rate the API has);
- ``audio/pcmu`` / ``g711_ulaw``: G.711 µ-law, 8 kHz;
- ``audio/pcma`` / ``g711_alaw``: G.711 A-law, 8 kHz.

G.711 bytes are expanded to 16-bit PCM by a 256-entry table (ITU-T G.711, the µ-law and A-law
decoder output scaled to 16 bits, as every telephony stack does), then the audio takes the very path
of a ``/v1/stream`` client sending ``pcm_s16le`` at that rate: ``AudioDecoder`` (int16 / 32768,
then soxr's streaming resampler to 16 kHz). So the same audio reaches the same ``Session`` as it
would over asrlive's own protocol, sample for sample.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ._protocol import AudioDecoder, Start


@dataclass(frozen=True)
class AudioFormat:
    type: str  # the GA name
    beta: str  # the beta name
    rate: int  # the client's sample rate

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "rate": self.rate} if self.type == "audio/pcm" else {"type": self.type}


PCM = AudioFormat("audio/pcm", "pcm16", 24_000)
PCMU = AudioFormat("audio/pcmu", "g711_ulaw", 8_000)
PCMA = AudioFormat("audio/pcma", "g711_alaw", 8_000)
FORMATS = (PCM, PCMU, PCMA)


def _ulaw_table() -> npt.NDArray[np.int16]:
    """G.711 µ-law: the code's bits are inverted; sign, 3-bit exponent, 4-bit mantissa; the
    magnitude is ((mantissa << 3) + 0x84) << exponent, less the bias 0x84 (a 14-bit value x 4)."""
    code = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent, mantissa = (code >> 4) & 7, code & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(code & 0x80, -magnitude, magnitude).astype("<i2")


def _alaw_table() -> npt.NDArray[np.int16]:
    """G.711 A-law: the even bits are inverted (xor 0x55); sign (1: positive), 3-bit exponent, 4-bit
    mantissa; segment 0 is linear, the others double per segment (a 13-bit value x 8)."""
    code = np.arange(256, dtype=np.int32) ^ 0x55
    exponent, mantissa = (code >> 4) & 7, code & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return np.where(code & 0x80, magnitude, -magnitude).astype("<i2")


ULAW = _ulaw_table()
ALAW = _alaw_table()


def decode_base64(text: str) -> bytes:
    """Strict base64 (the standard alphabet, padded, no whitespace), in linear time; ValueError if not."""
    # validate=True: binascii rejects what is not in the alphabet instead of skipping it. A str with
    # a character outside ASCII fails its ASCII encoding (UnicodeEncodeError is a ValueError).
    return base64.b64decode(text, validate=True)


class InputDecoder:
    """Bytes in one Realtime format, appended in any splits -> 16 kHz mono float32.

    A 16-bit sample split across two appends is carried over. ``flush`` returns the resampler's
    delayed tail and starts afresh (the decoder goes on with the next append).
    """

    def __init__(self, fmt: AudioFormat) -> None:
        self.format = fmt
        self._table = ULAW if fmt is PCMU else ALAW if fmt is PCMA else None
        self._decoder = self._new()
        self._carry = b""

    def _new(self) -> AudioDecoder:
        return AudioDecoder(Start(sample_rate=self.format.rate, encoding="pcm_s16le"))

    def decode(self, data: bytes) -> npt.NDArray[np.float32]:
        if self._table is not None:
            pcm16 = self._table[np.frombuffer(data, dtype=np.uint8)].tobytes()
        else:
            if self._carry:
                data = self._carry + data
            odd = len(data) % 2
            self._carry = data[len(data) - odd :]
            pcm16 = data[: len(data) - odd] if odd else data
        if not pcm16:
            return np.zeros(0, dtype=np.float32)
        samples: npt.NDArray[np.float32] = self._decoder.decode(pcm16)
        return samples

    def flush(self) -> npt.NDArray[np.float32]:
        """The audio still inside the resampler (a half sample carried over is dropped)."""
        tail: npt.NDArray[np.float32] = self._decoder.flush()
        self._decoder = self._new()
        self._carry = b""
        return tail
