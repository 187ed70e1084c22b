"""The captions page end to end: a real headless Chromium (Debian's ``chromium``, driven by
Playwright with the system binary) whose microphone is a real speech WAV, against a real server.

What is compared, and why it can be exact. Chromium's fake capture device plays the WAV (two
utterances and pauses, 48 kHz 16-bit, made from the 16 kHz fixtures) from its beginning, and loops
it; the page runs until the first pass's two finals are shown, then Stop sends ``finish``. The
audio the server transcribes is not the fixture's samples: over the WebSocket the page resamples
48 kHz -> 16 kHz itself (AudioWorklet) and rounds to 16 bits; over WebRTC the browser encodes Opus
and the server decodes and resamples it (soxr). Neither path can give back the fixture's samples,
so token equality with a transcription of the fixture would be luck. What is exact is this: the
test records the 16 kHz audio each session was fed on the server (tests/rtc.py), sends that same
audio to the same server over the WebSocket protocol (``/v1/stream``, 32-bit floats: no rounding),
and the finals the page shows (times and text) must equal those finals exactly; the exported
.srt must parse and hold the same cues. That the recorded audio is the WAV is checked separately,
by its correlation with the fixture once aligned. The model has random weights: its text is
gibberish, but deterministic, so any difference in audio or in the page's handling of events would
show as different tokens.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import srt
import webvtt
from playwright.async_api import Browser, Page, async_playwright
from scipy.signal import correlate

from asrlive.clients._transcript import timestamp

from .requires import requires
from .rtc import open_sessions
from .serving import TIMEOUT, eventually, running_server, stream_audio

CHROMIUM = Path("/usr/bin/chromium")
SAMPLE_RATE = 16_000
MS = 1000 * TIMEOUT  # Playwright's timeouts are in milliseconds

pytestmark = [
    pytest.mark.asyncio,
    requires(None if CHROMIUM.exists() else "needs Debian's chromium at /usr/bin/chromium"),
    pytest.mark.usefixtures("loopback_ice"),
]

# Every partial the page shows, as [stable, unstable]: they come and go faster than a test polls.
WATCH_PARTIALS = """
window.partialsShown = [];
document.addEventListener("DOMContentLoaded", () => {
  const partial = document.getElementById("partial");
  new MutationObserver(() => {
    const [stable, unstable] = [...partial.children].map((span) => span.textContent);
    if (stable || unstable) window.partialsShown.push([stable, unstable]);
  }).observe(partial, { subtree: true, childList: true, characterData: true });
});
"""


@pytest.fixture(scope="module")
def microphone(two_utterances, tmp_path_factory) -> Path:
    """The fake capture device's file: 48 kHz 16-bit mono, a rate Chromium plays as it is."""
    path = tmp_path_factory.mktemp("microphone") / "speech-48k.wav"
    sf.write(path, soxr.resample(two_utterances, SAMPLE_RATE, 48_000), 48_000, subtype="PCM_16")
    return path


@asynccontextmanager
async def chromium(wav: Path):
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            timeout=MS,
            args=[
                "--use-fake-ui-for-media-stream",  # grant the microphone without asking
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}",
                "--allow-loopback-in-peer-connection",  # ICE on 127.0.0.1 (see restrict_ice_to_loopback)
                "--autoplay-policy=no-user-gesture-required",
            ],
        )
        try:
            yield browser
        finally:
            await browser.close()


async def open_page(browser: Browser, server, transport: str) -> Page:
    page = await browser.new_page(accept_downloads=True)
    page.set_default_timeout(MS)
    await page.add_init_script(WATCH_PARTIALS)
    await page.goto(server.page_url)
    await page.select_option("#transport", transport)
    await page.wait_for_function("document.getElementById('language').options.length > 30")
    return page


async def finals_shown(page: Page) -> list[tuple[float, float, str]]:
    rows = await page.eval_on_selector_all(
        "#finals .final",
        "items => items.map(i => [i.dataset.start, i.dataset.end, i.querySelector('.text').textContent])",
    )
    return [(float(start), float(end), text) for start, end, text in rows]


async def export(page: Page, format: str) -> str:
    async with page.expect_download() as download:
        await page.click(f"[data-export={format}]")
    path = await (await download.value).path()
    return Path(path).read_text(encoding="utf-8")


def similarity(heard: np.ndarray, spoken: np.ndarray) -> float:
    """Correlation of the loudness contours (20 ms frames) of the heard audio's first pass and the
    spoken audio, at their best alignment: Opus keeps the contour, not the waveform."""
    heard_contour, spoken_contour = _contour(heard[: spoken.size]), _contour(spoken)
    lags = correlate(heard_contour - heard_contour.mean(), spoken_contour - spoken_contour.mean(), mode="full")
    lag = int(np.argmax(lags)) - (spoken_contour.size - 1)
    a, b = (heard_contour[lag:], spoken_contour) if lag >= 0 else (heard_contour, spoken_contour[-lag:])
    n = min(a.size, b.size)
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


def _contour(audio: np.ndarray, frame: int = SAMPLE_RATE // 50) -> np.ndarray:
    frames = audio[: audio.size // frame * frame].reshape(-1, frame)
    return np.log(np.sqrt((frames**2).mean(axis=1)) + 1e-4)


@pytest.mark.parametrize("transport", ["websocket", "webrtc"])
async def test_live_captions_equal_the_servers_finals(load_model, heard, two_utterances, microphone, transport):
    async with running_server(load_model("hf")) as server, chromium(microphone) as browser:
        page = await open_page(browser, server, transport)
        await page.click("#toggle")
        await page.wait_for_function("document.getElementById('state').dataset.state === 'listening'")
        await page.wait_for_function("document.querySelectorAll('#finals .final').length >= 2")
        await page.click("#toggle")  # stop: finish, the last finals, done
        await page.wait_for_function("document.getElementById('state').dataset.state === 'idle'")
        session = await page.get_attribute("#session", "data-session")
        shown = await finals_shown(page)
        partials = await page.evaluate("window.partialsShown")
        subtitles = list(srt.parse(await export(page, "srt")))
        captions = webvtt.from_string(await export(page, "vtt"))
        text = await export(page, "txt")
        await page.close()
        await eventually(lambda: not server.peers and open_sessions(server) == 0)
        audio = np.concatenate(heard[session])
        replay = await stream_audio(server.url, audio, encoding="pcm_f32le")
    finals = replay.of_type("final")
    assert len(finals) >= 2 and shown == [(f["start"], f["end"], f["text"]) for f in finals]
    assert partials, "no partial was shown"
    cues = [f for f in finals if f["text"].strip()]
    assert [s.content for s in subtitles] == [" ".join(f["text"].split()) for f in cues]
    assert [(s.start, s.end) for s in subtitles] == [(_ms(f["start"]), _ms(f["end"])) for f in cues]
    assert [(c.start, c.end, c.text) for c in captions] == [
        (timestamp(f["start"], "."), timestamp(f["end"], "."), " ".join(f["text"].split())) for f in cues
    ]
    assert [line.split("] ", 1)[1] for line in text.splitlines()] == [s.content for s in subtitles]
    assert similarity(audio, two_utterances) > 0.9  # the microphone was the WAV


@pytest.mark.parametrize("transport", ["websocket", "webrtc"])
async def test_a_page_closed_mid_utterance_leaves_nothing_open(load_model, microphone, transport):
    async with running_server(load_model("hf")) as server, chromium(microphone) as browser:
        page = await open_page(browser, server, transport)
        await page.click("#toggle")
        await page.wait_for_function("document.getElementById('partial').dataset.segment !== undefined")
        assert open_sessions(server) == 1
        await page.close()
        await eventually(lambda: not server.peers and open_sessions(server) == 0 and not server.scheduler.streams)
        health = await asyncio.wait_for(stream_audio(server.url, np.zeros(SAMPLE_RATE, np.float32)), TIMEOUT)
    assert health.close_code == 1000  # the server goes on serving


def _ms(seconds: float) -> timedelta:
    return timedelta(milliseconds=round(seconds * 1000))
