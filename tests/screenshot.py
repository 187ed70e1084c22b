"""Take the README's screenshot of the captions page mid-utterance: a real server with the tests'
random-weight model (its text is gibberish), headless Chromium whose microphone plays real speech.

    python -m tests.screenshot docs/captions.png [--width 1000 --height 700]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from asrlive.engine import AsrModel, load_audio
from asrlive.web import AsrServer, ServerOptions

from .checkpoints import FIXTURES, random_network, write_hf_checkpoint
from .test_browser import CHROMIUM, chromium

TIMEOUT_MS = 120_000
SILENCE = 16_000  # 1 s between sentences: each ends its utterance
# A partial on screen with both parts, after a few finals: what the screenshot is for.
MID_UTTERANCE = """
document.querySelectorAll('#finals .final').length >= 3
  && document.querySelector('#partial .stable').textContent.trim().length > 0
  && document.querySelector('#partial .unstable').textContent.trim().length > 0
"""


def microphone_file(directory: Path) -> Path:
    """Short read sentences with pauses, then a long passage: finals first, then a long partial."""
    clips = ["librivox-0880", "cards-003", "librivox-0930", "two-cities"]
    gap = np.zeros(SILENCE, np.float32)
    audio = np.concatenate(
        [piece for name in clips for piece in (load_audio(FIXTURES / "speech" / f"{name}.wav"), gap)]
    )
    path = directory / "speech-48k.wav"
    sf.write(path, soxr.resample(audio, 16_000, 48_000), 48_000, subtype="PCM_16")
    return path


async def take(output: Path, width: int, height: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        model = AsrModel.load(
            str(write_hf_checkpoint(random_network(seed=0), directory / "tiny-hf")), "float32", plain_weights=True
        )
        async with AsrServer(model, ServerOptions(port=0)) as server, chromium(microphone_file(directory)) as browser:
            page = await browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(TIMEOUT_MS)
            await page.goto(server.page_url)  # over the WebSocket transport, the page's default
            await page.fill("#context", "A Tale of Two Cities, Sense and Sensibility")
            await page.click("#toggle")
            await page.wait_for_function(MID_UTTERANCE, polling=50)
            await page.screenshot(path=str(output))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--height", type=int, default=700)
    args = parser.parse_args()
    if not CHROMIUM.exists():
        parser.error(f"needs Chromium at {CHROMIUM}")
    asyncio.run(take(args.output, args.width, args.height))


if __name__ == "__main__":
    main()
