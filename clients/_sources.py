"""Audio sources for live streams: async iterators of 16 kHz mono float32 chunks.

The microphone is captured with sounddevice (PortAudio) at the device's native rate, because
many devices offer nothing else, and resampled to 16 kHz here with soxr's streaming resampler,
so the server receives exactly what it transcribes. The capture callback runs on PortAudio's
thread: it only copies the block and hands it to the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import soxr

from asrlive._audio import SAMPLE_RATE

CHUNK_S = 0.1
NO_INPUT = "no audio input device was found: is a microphone connected, and can this user open it?"


class MicrophoneError(Exception):
    """No usable capture: PortAudio missing, no input device, or the device refused to open."""


async def file_chunks(
    audio: np.ndarray, realtime: bool, stop: asyncio.Event | None = None
) -> AsyncIterator[np.ndarray]:
    """100 ms chunks of ``audio`` (16 kHz), at real-time pace or as fast as the network takes them."""
    chunk = round(CHUNK_S * SAMPLE_RATE)
    loop = asyncio.get_running_loop()
    began = loop.time()
    for begin in range(0, audio.size, chunk):
        if stop is not None and stop.is_set():
            return
        if realtime:  # pace by the clock, not by sleeps, so the pace does not drift
            await asyncio.sleep(max(0.0, began + begin / SAMPLE_RATE - loop.time()))
        else:
            await asyncio.sleep(0)
        yield audio[begin : begin + chunk]


def _sounddevice() -> Any:
    try:
        import sounddevice
    except (OSError, ImportError) as exc:  # the module loads libportaudio when imported
        raise MicrophoneError(
            f"cannot load PortAudio through sounddevice ({exc}). Install PortAudio: Debian/Ubuntu "
            "`apt-get install libportaudio2`, Fedora `dnf install portaudio`, macOS `brew install portaudio`."
        ) from None
    return sounddevice


@dataclass(frozen=True)
class InputDevice:
    index: int
    name: str
    sample_rate: int
    channels: int


def input_devices() -> list[InputDevice]:
    sd = _sounddevice()
    return [
        InputDevice(d["index"], d["name"], round(d["default_samplerate"]), d["max_input_channels"])
        for d in sd.query_devices()
        if d["max_input_channels"] > 0
    ]


def find_input_device(spec: str | None) -> InputDevice:
    """By index, by (part of) its name, or PortAudio's default input when ``spec`` is None."""
    devices = input_devices()
    if not devices:
        raise MicrophoneError(NO_INPUT)
    if spec is None:
        default = _sounddevice().default.device[0]
        return next((d for d in devices if d.index == default), devices[0])
    if spec.isdigit():
        matches = [d for d in devices if d.index == int(spec)]
    else:
        matches = [d for d in devices if spec.lower() in d.name.lower()]
    if len(matches) != 1:
        names = "; ".join(f"{d.index}: {d.name}" for d in devices)
        problem = "no input device matches" if not matches else "several input devices match"
        raise MicrophoneError(f"{problem} {spec!r}; the input devices are {names}")
    return matches[0]


async def microphone(
    device: InputDevice, stop: asyncio.Event, on_overflow: Callable[[], None] | None = None
) -> AsyncIterator[np.ndarray]:
    """Capture until ``stop`` is set; what was captured before the stop is all delivered."""
    sd = _sounddevice()
    loop = asyncio.get_running_loop()
    blocks: asyncio.Queue[np.ndarray | None] = asyncio.Queue()
    resampler = soxr.ResampleStream(device.sample_rate, SAMPLE_RATE, 1, dtype="float32")

    def callback(indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        if status.input_overflow and on_overflow is not None:
            loop.call_soon_threadsafe(on_overflow)
        mono = indata.mean(axis=1, dtype=np.float32)  # (frames, channels) -> (frames,)
        loop.call_soon_threadsafe(blocks.put_nowait, mono)

    try:
        stream = sd.InputStream(
            device=device.index,
            samplerate=device.sample_rate,
            channels=min(device.channels, 2),
            dtype="float32",
            blocksize=round(CHUNK_S * device.sample_rate),
            callback=callback,
        )
    except sd.PortAudioError as exc:
        raise MicrophoneError(f"cannot open {device.name!r} at {device.sample_rate} Hz: {exc}") from None
    stopping = asyncio.create_task(stop.wait())
    stopping.add_done_callback(lambda _: blocks.put_nowait(None))
    with stream:
        while (block := await blocks.get()) is not None:
            yield resampler.resample_chunk(block)
    stopping.cancel()
    await asyncio.sleep(0)  # let the callbacks' last hand-overs run
    while not blocks.empty():  # blocks that arrived between the stop and the stream's close
        if (block := blocks.get_nowait()) is not None:
            yield resampler.resample_chunk(block)
    yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)
