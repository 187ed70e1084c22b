"""Word times on the captions page (start's ``"timestamps": true``), in a real headless Chromium.

No model and no aligner: ``web/static/transcript.js`` is imported into a blank page served with the
page's files, and its functions are called on made-up finals; and the whole page runs against a
fake server (Playwright answers ``/v1/languages`` and plays the server's side of ``/v1/stream``),
which says it has an aligner, reads the start message and sends finals with words. What is checked
is what the browser produced: the pieces units are mapped to, the caption list's DOM, the .srt and
.vtt text (parsed by ``srt`` and ``webvtt``, as test_browser.py does).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import pytest
import pytest_asyncio
import srt
import webvtt
from playwright.async_api import Browser, Page, WebSocketRoute, async_playwright

from asrlive.clients._transcript import timestamp

from .requires import requires

CHROMIUM = Path("/usr/bin/chromium")
MS = 60_000  # Playwright's timeouts are in milliseconds
CUE_CHARS, CUE_SECONDS = 84, 7.0
KEPT = re.compile(r"[\w']")  # enough for the tests' texts: letters, digits, apostrophes (and _)
TAG = re.compile(r"<(\d\d:\d\d:\d\d\.\d\d\d)>")

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.slow,  # a Chromium process, like the other browser tests
    requires(None if CHROMIUM.exists() else "needs Debian's chromium at /usr/bin/chromium"),
]


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@pytest.fixture(scope="module")
def static_server():
    """The page's files over HTTP on loopback (a secure context: the microphone may be opened)."""
    directory = str(resources.files("asrlive.web").joinpath("static"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=directory))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest_asyncio.fixture
async def browser():
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            timeout=MS,
            args=["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"],
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest_asyncio.fixture
async def blank(browser: Browser, static_server: str) -> Page:
    """A page with the stylesheet and an empty caption list, on the origin of the page's modules."""
    page = await browser.new_page()
    page.set_default_timeout(MS)
    html = '<!doctype html><meta charset="utf-8"><link rel="stylesheet" href="/style.css"><ol id="finals"></ol>'
    await page.route(f"{static_server}/blank", lambda route: route.fulfill(body=html, content_type="text/html"))
    await page.goto(f"{static_server}/blank")
    return page


async def call(page: Page, body: str, arg=None):
    """Run ``body`` with ``m`` the transcript.js module and ``arg`` the argument; its return value."""
    return await page.evaluate(f"async (arg) => {{ const m = await import('/transcript.js'); {body} }}", arg)


def pieces(result: list[dict] | None) -> list[str] | None:
    """wordPieces' answer as strings: a word's piece in [brackets], the text between as it is."""
    return None if result is None else [f"[{p['text']}]" if p.get("word") else p["text"] for p in result]


def units(text: str) -> list[str]:
    """What the aligner makes of a text with spaces: each word cleaned to letters, digits, apostrophes."""
    return [cleaned for word in text.split() if (cleaned := "".join(KEPT.findall(word)))]


def timed(names: list[str], start: float, step: float, length: float) -> list[dict]:
    return [
        {"text": name, "start": round(start + i * step, 3), "end": round(start + i * step + length, 3)}
        for i, name in enumerate(names)
    ]


# The mapping of units onto the text ---------------------------------------------------------------


async def test_units_are_found_in_the_text_between_punctuation_and_spaces(blank):
    cases = [
        ("¿Qué tal? Don't—stop, well-known 3.5!", ["Qué", "tal", "Don't", "stop", "wellknown", "35"]),
        ("你好，世界。", ["你", "好", "世", "界"]),
        ("I can’t.", ["I", "cant"]),  # a curly apostrophe is dropped by the aligner, kept in the text
        ("hello World", ["Hello", "world"]),  # case aside
        ("नमस्ते दुनिया", ["नमसत", "दनय"]),  # combining vowel signs: dropped, shown with their letter
        ("😀 ok 𠀀!", ["ok", "𠀀"]),  # characters outside the BMP count once
        ("...", []),
    ]
    got = [
        pieces(await call(blank, "return m.wordPieces(arg[0], arg[1].map((text) => ({text})));", case))
        for case in cases
    ]
    assert got == [
        ["¿", "[Qué]", " ", "[tal]", "? ", "[Don't]", "—", "[stop]", ", ", "[well-known]", " ", "[3.5]", "!"],
        ["[你]", "[好]", "，", "[世]", "[界]", "。"],
        ["[I]", " ", "[can’t]", "."],
        ["[hello]", " ", "[World]"],
        ["[नमस्ते]", " ", "[दुनिया]"],
        ["😀 ", "[ok]", " ", "[𠀀]", "!"],
        ["..."],
    ]


async def test_units_that_do_not_spell_the_text_map_to_nothing(blank):
    cases = [
        ("Hello world", ["Hello"]),  # a word no unit accounts for
        ("Hello world", ["Hello", "world", "again"]),  # a unit past the text
        ("Hello world", ["Hello", "word"]),  # a different word
        ("Hello world", ["world", "Hello"]),  # out of order
        ("Hello world", ["Hello", "", "world"]),  # an empty unit has no place
    ]
    got = [await call(blank, "return m.wordPieces(arg[0], arg[1].map((text) => ({text})));", case) for case in cases]
    assert got == [None] * len(cases)


# The caption list ---------------------------------------------------------------------------------


RENDER = """
const transcript = new m.Transcript();
const list = document.getElementById("finals");
for (const [final, offset] of arg) list.append(m.finalItem(transcript.add(final, offset)));
return [...list.children].map((item) => ({
  start: item.dataset.start,
  text: item.querySelector(".text").textContent,
  words: [...item.querySelectorAll(".text .word")].map((w) => [w.textContent, w.title, w.dataset.start, w.dataset.end]),
  note: item.querySelector(".note") && item.querySelector(".note").title,
}));
"""


async def test_a_worded_final_shows_each_words_times_on_hover(blank):
    text = "Well, hello there — 你好!"
    words = [
        {"text": t, "start": s, "end": e}
        for t, s, e in [
            ("Well", 1.0, 1.2),
            ("hello", 2.3, 2.8),
            ("there", 2.9, 3.25),
            ("你", 3.4, 3.5),
            ("好", 3.5, 3.7),
        ]
    ]
    finals = [
        [{"start": 0.9, "end": 4.0, "text": text, "words": words}, 60],  # a second session, 60 s in
        [{"start": 5.0, "end": 6.0, "text": "Bonjour.", "words": None, "words_error": "unsupported language"}, 60],
        [{"start": 7.0, "end": 8.0, "text": "Hello world", "words": [{"text": "Hullo", "start": 7, "end": 7.5}]}, 60],
        [{"start": 9.0, "end": 10.0, "text": "No times asked."}, 60],
    ]
    shown = await call(blank, RENDER, finals)
    assert shown[0] == {
        "start": "60.9",
        "text": text,  # the text as it is: the spans only wrap its words
        "words": [
            ["Well", "1:01.0–1:01.2", "61", "61.2"],
            ["hello", "1:02.3–1:02.8", "62.3", "62.8"],
            ["there", "1:02.9–1:03.3", "62.9", "63.25"],
            ["你", "1:03.4–1:03.5", "63.4", "63.5"],
            ["好", "1:03.5–1:03.7", "63.5", "63.7"],
        ],
        "note": None,
    }
    assert shown[1] == {"start": "65", "text": "Bonjour.", "words": [], "note": "No word times: unsupported language"}
    assert shown[2] == {"start": "67", "text": "Hello world", "words": [], "note": None}  # units that do not fit
    assert shown[3] == {"start": "69", "text": "No times asked.", "words": [], "note": None}
    plain = await blank.eval_on_selector(".word", "w => getComputedStyle(w).backgroundColor")
    await blank.hover(".word >> nth=1")
    hovered = await blank.eval_on_selector(".word >> nth=1", "w => getComputedStyle(w).backgroundColor")
    assert plain == "rgba(0, 0, 0, 0)" and hovered != plain  # a highlight under the pointer


# Subtitles ----------------------------------------------------------------------------------------


EXPORT = """
const transcript = new m.Transcript();
for (const [final, offset] of arg) transcript.add(final, offset);
return [transcript.toSrt(), transcript.toVtt(), transcript.toText()];
"""


async def test_finals_without_words_export_as_before(blank):
    finals = [
        [{"start": 0.5, "end": 2.25, "text": " Hello\n  world. "}, 0],
        [{"start": 3, "end": 3.5, "text": "   "}, 0],
        [{"start": 0, "end": 1.0005, "text": "a < b & c", "words": None, "words_error": "alignment failed"}, 3600],
    ]
    srt_text, vtt_text, txt = await call(blank, EXPORT, finals)
    assert srt_text == (
        "1\n00:00:00,500 --> 00:00:02,250\nHello world.\n\n2\n01:00:00,000 --> 01:00:01,001\na < b & c\n"
    )
    assert vtt_text == (
        "WEBVTT\n\n00:00:00.500 --> 00:00:02.250\nHello world.\n\n01:00:00.000 --> 01:00:01.001\na < b & c\n"
    )
    assert txt == "[0:00.5] Hello world.\n[60:00.0] a < b & c\n"


def _long_final() -> tuple[str, list[dict]]:
    """Forty words with punctuation, 0.3 s apart: about 260 characters in 12 s."""
    names = [f"{word}{i}" for i, word in enumerate(["alpha", "bravo", "charlie", "delta", "echo"] * 8)]
    text = " ".join(name + ("," if i % 7 == 6 else "") for i, name in enumerate(names)) + "."
    return text, timed(names, 0.4, 0.3, 0.25)


def _check_cues(cues: list[tuple[float, float, str]], final: dict, offset: float) -> None:
    """The cues of one worded final: its text cut at words; each cue within the limits and as long as
    they allow (greedy); the cuts at word times, the outer edges the final's."""
    words = [{**w, "start": w["start"] + offset, "end": w["end"] + offset} for w in final["words"]]
    assert " ".join(text for _, _, text in cues) == " ".join(final["text"].split())
    assert cues[0][0] == pytest.approx(final["start"] + offset) and cues[-1][1] == pytest.approx(final["end"] + offset)
    first = 0
    for i, (start, end, text) in enumerate(cues):
        count = len(units(text))
        inside, after = words[first : first + count], words[first + count : first + count + 1]
        assert [w["text"] for w in inside] == units(text)
        if i > 0:
            assert start == pytest.approx(inside[0]["start"])
        if after:
            assert end == pytest.approx(inside[-1]["end"])
            longer = f"{text} {cues[i + 1][2].split()[0]}"
            assert len(longer) > CUE_CHARS or after[0]["end"] - start > CUE_SECONDS  # the next word did not fit
        assert len(text) <= CUE_CHARS and (count == 1 or inside[-1]["end"] - start <= CUE_SECONDS)
        first += count
    assert first == len(words)


def _srt_cues(text: str) -> list[tuple[float, float, str]]:
    return [(s.start.total_seconds(), s.end.total_seconds(), s.content) for s in srt.parse(text)]


async def test_a_long_worded_final_is_cut_into_cues_at_word_times(blank):
    text, words = _long_final()
    long_final = {"start": 0.2, "end": 12.5, "text": text, "words": words}
    short = timed(["Short", "and", "sweet"], 0.2, 0.5, 0.4)
    short_final = {"start": 0.1, "end": 2.0, "text": "Short, and sweet.", "words": short}
    plain = {"start": 3.0, "end": 4.0, "text": "No words here."}
    srt_text, vtt_text, txt = await call(blank, EXPORT, [[long_final, 10], [plain, 10], [short_final, 30]])
    cues = _srt_cues(srt_text)
    assert len(cues) == 6  # 4 + 1 + 1
    _check_cues(cues[:4], long_final, 10)
    assert [text for _, _, text in cues[:4]] == [
        "alpha0 bravo1 charlie2 delta3 echo4 alpha5 bravo6, charlie7 delta8 echo9 alpha10",  # 80: " bravo11" is 88
        "bravo11 charlie12 delta13, echo14 alpha15 bravo16 charlie17 delta18 echo19 alpha20,",
        "bravo21 charlie22 delta23 echo24 alpha25 bravo26 charlie27, delta28 echo29 alpha30",
        "bravo31 charlie32 delta33 echo34, alpha35 bravo36 charlie37 delta38 echo39.",
    ]
    assert [(start, end) for start, end, _ in cues[:4]] == [(10.2, 13.65), (13.7, 16.65), (16.7, 19.65), (19.7, 22.5)]
    assert cues[4:] == [(13.0, 14.0, "No words here."), (30.1, 32.0, "Short, and sweet.")]  # short: one cue
    assert txt.splitlines()[0] == f"[0:10.2] {text}"  # the plain text keeps one line per final
    vtt = [(c.start, c.end) for c in webvtt.from_string(vtt_text)]
    assert vtt == [(timestamp(start, "."), timestamp(end, ".")) for start, end, _ in cues]


async def test_cjk_and_slow_speech_are_cut_by_duration(blank):
    chars = "今天天气很好我们去公园散步吧" * 3  # 42 characters, 0.5 s apart: 21 s, few characters
    cjk = {"start": 1.0, "end": 22.0, "text": chars + "。", "words": timed(list(chars), 1.0, 0.5, 0.4)}
    slow = {
        "start": 0.0,
        "end": 30.0,
        "text": "one two three four five six seven",
        "words": timed("one two three four five six seven".split(), 0.5, 4.0, 1.0),
    }
    srt_text, _, _ = await call(blank, EXPORT, [[cjk, 0], [slow, 100]])
    cues = _srt_cues(srt_text)
    cjk_cues = [c for c in cues if c[0] < 100]
    assert "".join(c[2] for c in cjk_cues) == cjk["text"]
    assert [len(c[2]) for c in cjk_cues] == [14, 14, 14 + 1]  # 7 s each; the full stop stays with the last
    assert [(c[0], c[1]) for c in cjk_cues] == [(1.0, 7.9), (8.0, 14.9), (15.0, 22.0)]
    assert [c[2] for c in cues if c[0] >= 100] == ["one two", "three four", "five six", "seven"]
    assert [(c[0], c[1]) for c in cues if c[0] >= 100] == [(100, 105.5), (108.5, 113.5), (116.5, 121.5), (124.5, 130)]


async def test_vtt_cues_carry_a_timestamp_tag_before_each_word_after_the_first(blank):
    text, words = _long_final()
    words[5]["start"] = words[4]["start"]  # the same start twice: no second tag at the same time
    escaped = timed(["Is", "1", "2", "Yes", "no"], 13.1, 0.25, 0.2)  # "<" and "&" in a cue with tags
    finals = [
        [{"start": 0.2, "end": 12.5, "text": text, "words": words}, 0],
        [{"start": 13.0, "end": 14.5, "text": "Is 1 < 2? Yes & no.", "words": escaped}, 0],
        [{"start": 15.0, "end": 16.0, "text": "Late word", "words": timed(["Late", "word"], 15.0, 1.0, 0.4)}, 0],
    ]
    srt_text, vtt_text, _ = await call(blank, EXPORT, finals)
    captions = webvtt.from_string(vtt_text)
    subtitles = _srt_cues(srt_text)
    assert len(captions) == len(subtitles) == 6
    for caption, (_, _, content) in zip(captions, subtitles, strict=True):
        raw = caption.raw_text
        tags = TAG.findall(raw)
        assert tags == sorted(set(tags)) and all(caption.start < tag < caption.end for tag in tags)
        assert TAG.sub("", raw).replace("&lt;", "<").replace("&amp;", "&") == content
    first = captions[0].raw_text
    assert first.startswith(
        "alpha0 <00:00:00.700>bravo1 <00:00:01.000>charlie2 <00:00:01.300>delta3 "
        "<00:00:01.600>echo4 alpha5 <00:00:02.200>bravo6, <00:00:02.500>charlie7"
    )
    assert len(TAG.findall(first)) == len(first.split()) - 2  # every word after the first, but alpha5
    assert captions[4].raw_text == (
        "Is <00:00:13.350>1 &lt; <00:00:13.600>2? <00:00:13.850>Yes &amp; <00:00:14.100>no."
    )
    assert captions[5].raw_text == "Late word"  # "word" starts where the cue ends: no tag


# The whole page against a fake server --------------------------------------------------------------


class FakeServer:
    """``/v1/languages`` and ``/v1/stream`` as a server answers them: with an aligner when
    ``timestamps``; each session is sent ``finals`` once it is ready."""

    def __init__(self, timestamps: bool | None, finals: list[dict]):
        self.timestamps, self.finals = timestamps, finals
        self.starts: list[dict] = []
        self.audio_bytes = 0

    async def install(self, page: Page) -> None:
        languages = {"languages": ["Chinese", "English"]}
        if self.timestamps is not None:
            languages["timestamps"] = self.timestamps
        await page.route("**/v1/languages", lambda route: route.fulfill(json=languages))
        await page.route_web_socket(re.compile(r"/v1/stream(\?.*)?$"), self.session)

    def session(self, ws: WebSocketRoute) -> None:
        def received(message: str | bytes) -> None:
            if isinstance(message, bytes):
                self.audio_bytes += len(message)
                return
            event = json.loads(message)
            if event["type"] == "start":
                self.starts.append(event)
                timestamps = bool(event.get("timestamps"))
                ws.send(json.dumps({"type": "ready", "session": f"fake-{len(self.starts)}", "timestamps": timestamps}))
                for final in self.finals:
                    ws.send(json.dumps({"type": "final", "segment": 0, "language": "English", **final}))
            elif event["type"] == "finish":
                ws.send(json.dumps({"type": "done"}))
                asyncio.ensure_future(ws.close(code=1000, reason="done"))

        ws.on_message(received)


async def open_page(browser: Browser, base: str, server: FakeServer) -> Page:
    page = await browser.new_page(accept_downloads=True)
    page.set_default_timeout(MS)
    await server.install(page)
    await page.goto(base + "/")
    await page.wait_for_function("document.getElementById('language').options.length > 2")
    return page


async def export(page: Page, format: str) -> str:
    async with page.expect_download() as download:
        await page.click(f"[data-export={format}]")
    return Path(await (await download.value).path()).read_text(encoding="utf-8")


async def test_the_page_asks_for_word_times_and_shows_and_exports_them(browser, static_server):
    text, words = _long_final()
    finals = [
        {"start": 0.2, "end": 12.5, "text": text, "words": words},
        {"start": 13.0, "end": 14.0, "text": "Bonjour.", "words": None, "words_error": "unsupported language"},
    ]
    server = FakeServer(True, finals)
    page = await open_page(browser, static_server, server)
    assert await page.is_visible("#timestamps") and await page.is_checked("#timestamps")
    await page.click("#toggle")
    await page.wait_for_function("document.querySelectorAll('#finals .final').length === 2")
    assert await page.is_disabled("#timestamps")  # like the other settings, while running
    titles = await page.eval_on_selector_all("#finals .word", "spans => spans.map((s) => [s.textContent, s.title])")
    shown = await page.eval_on_selector_all("#finals .text", "spans => spans.map((s) => s.textContent)")
    note = await page.get_attribute("#finals .note", "title")
    await page.hover("#finals .word >> nth=3")
    hovered = await page.eval_on_selector("#finals .word >> nth=3", "w => getComputedStyle(w).backgroundColor")
    await page.click("#toggle")
    await page.wait_for_function("document.getElementById('state').dataset.state === 'idle'")
    assert not await page.is_disabled("#timestamps")
    subtitles = _srt_cues(await export(page, "srt"))
    captions = webvtt.from_string(await export(page, "vtt"))
    await page.close()
    [start] = server.starts
    assert start["timestamps"] is True and start["type"] == "start" and start["encoding"] == "pcm_s16le"
    assert shown == [text, "Bonjour."]
    assert titles[:3] == [["alpha0", "0:00.4–0:00.7"], ["bravo1", "0:00.7–0:01.0"], ["charlie2", "0:01.0–0:01.3"]]
    assert len(titles) == len(words) and note == "No word times: unsupported language"
    assert hovered != "rgba(0, 0, 0, 0)"
    assert len(subtitles) == 5 and subtitles[4] == (13.0, 14.0, "Bonjour.")
    _check_cues(subtitles[:4], finals[0], 0)
    assert [TAG.sub("", c.raw_text) for c in captions] == [c[2] for c in subtitles]
    assert all(TAG.search(c.raw_text) for c in captions[:4]) and not TAG.search(captions[4].raw_text)


async def test_word_times_are_offered_only_by_a_server_with_an_aligner_and_only_asked_when_checked(
    browser, static_server
):
    finals = [{"start": 0.5, "end": 1.5, "text": "Hello there."}]
    for timestamps, check in [(None, None), (False, None), (True, False)]:
        server = FakeServer(timestamps, finals)
        page = await open_page(browser, static_server, server)
        assert await page.is_visible("#timestamps") == bool(timestamps)
        if check is not None:
            await page.set_checked("#timestamps", check)
        await page.click("#toggle")
        await page.wait_for_function("document.querySelectorAll('#finals .final').length === 1")
        await page.click("#toggle")
        await page.wait_for_function("document.getElementById('state').dataset.state === 'idle'")
        srt_text = await export(page, "srt")
        await page.close()
        [start] = server.starts
        assert "timestamps" not in start, timestamps
        assert srt_text == "1\n00:00:00,500 --> 00:00:01,500\nHello there.\n"
