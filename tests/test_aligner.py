"""Qwen3-ForcedAligner: loading both layouts, words identical to transformers' pipeline, refusals, `asrlive align`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from asrlive.cli import main
from asrlive.engine import AsrModel, ModelLoadError, load_audio
from asrlive.engine._align_text import UnsupportedLanguage
from asrlive.engine._aligner import Aligner, AlignmentError

from .checkpoints import ALIGNER_CLASSES, ALIGNER_SEGMENT_MS, FIXTURES

SPEECH = FIXTURES / "speech"


def _clip(name: str) -> tuple[np.ndarray, str]:
    return load_audio(SPEECH / f"{name}.wav"), (SPEECH / f"{name}.txt").read_text(encoding="utf-8").strip()


# Clips under 1 s, between 1 and 8 s (one encoder window) and over 8 s (several), with texts that
# exercise the units: punctuation and apostrophes, CJK characters among Latin words, digits.
CASES = {
    "under 1 s, CJK among Latin": ("cards-001", 0.75, "Ten of 梅花, clubs!", "English"),
    "1-8 s, punctuation": ("librivox-0870", None, None, "English"),
    "1-8 s, Chinese mixed": ("goforward", None, "向前走 ten meters，然后 stop。", "Chinese"),
    "over 8 s": ("two-cities", None, None, "en"),
    "over 8 s, detect": ("two-cities", 12.5, "It was the best of times, it was the worst of times; it's 1859.", None),
}


@pytest.mark.parametrize("layout", ["hf", "original"])
@pytest.mark.parametrize("case", CASES)
def test_words_equal_transformers_pipeline(load_aligner, aligner_reference, layout, case):
    name, seconds, text, language = CASES[case]
    audio, transcript = _clip(name)
    if seconds is not None:
        audio = audio[: round(seconds * 16000)]
    text = text if text is not None else transcript
    expected = aligner_reference.words(audio, text, language)
    words = load_aligner(layout).align(audio, text, language)
    assert [(w.text, w.start, w.end) for w in words] == expected
    assert len(words) >= 3
    starts = [w.start for w in words]
    assert starts == sorted(starts), "the fix-up makes the times monotonic"


def test_the_checkpoint_gives_its_clock(load_aligner):
    for layout in ("hf", "original"):
        timing = load_aligner(layout).timing
        assert (timing.classes, timing.segment_ms, timing.timestamp_id) == (ALIGNER_CLASSES, ALIGNER_SEGMENT_MS, 151705)
        assert timing.max_seconds == 400.0


def test_text_without_alignable_units_gives_no_words(load_aligner, aligner_reference):
    audio, _ = _clip("cards-002")
    with pytest.raises(ValueError, match="empty"):  # transformers' fix-up takes max() of no timestamps
        aligner_reference.words(audio, "… — ?! ", "English")
    assert load_aligner().align(audio, "… — ?! ", "English") == []
    assert load_aligner().alignment(audio, "", None).words == ()


def test_refusals_come_before_any_model_work(load_aligner):
    aligner = load_aligner()
    audio, _ = _clip("cards-001")
    with pytest.raises(UnsupportedLanguage, match=r"does not support Arabic.*English \(en\)"):
        aligner.align(audio, "hello", "ar")
    with pytest.raises(AlignmentError, match=r"the text has 20 words but 0.50 s of audio has only 7 slots of 80 ms"):
        aligner.align(audio[:8000], " ".join(["word"] * 20), "English")
    long = np.zeros(400 * 16000 + 1, dtype=np.float32)
    with pytest.raises(AlignmentError, match=r"at most 400 s \(5000 classes of 80 ms\)"):
        aligner.align(long, "hello", "English")
    failed = aligner.alignment(audio, "hello", "Arabic")
    assert failed.words is None and "does not support Arabic" in failed.error


def test_each_kind_loads_only_where_it_belongs(aligners, checkpoints):
    for layout in ("hf", "original"):
        wrong = "is the Qwen3 forced aligner, not a speech recognizer: give it as --aligner"
        with pytest.raises(ModelLoadError, match=wrong):
            AsrModel.load(str(aligners[layout]), "float32")
        with pytest.raises(ModelLoadError, match="is a speech recognizer, not the Qwen3 forced aligner"):
            Aligner.load(str(checkpoints[layout]), "float32")


def test_original_aligner_without_its_clock_is_refused(aligners, tmp_path):
    broken = tmp_path / "aligner"
    broken.mkdir()
    for file in aligners["original"].iterdir():
        (broken / file.name).symlink_to(file)
    config = json.loads((aligners["original"] / "config.json").read_text())
    del config["timestamp_segment_time"]
    (broken / "config.json").unlink()
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="forced aligner without timestamp_segment_time"):
        Aligner.load(str(broken), "float32")


def test_align_command_prints_the_words(aligners, load_aligner, tmp_path, capsys):
    audio, text = _clip("librivox-0880")
    args = ["align", str(SPEECH / "librivox-0880.wav"), "--text", text, "--language", "en"]
    args += ["--aligner", str(aligners["original"]), "--dtype", "float32"]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out)
    words = load_aligner("hf").align(audio, text, "English")
    assert record == {
        "file": str(SPEECH / "librivox-0880.wav"),
        "language": "English",
        "duration": round(audio.size / 16000, 6),
        "text": text,
        "words": [w.to_json() for w in words],
    }
    text_file = tmp_path / "transcript.txt"
    text_file.write_text(text, encoding="utf-8")
    output = tmp_path / "words.txt"
    args = ["align", str(SPEECH / "librivox-0880.wav"), "--text-file", str(text_file), "--language", "English"]
    assert main([*args, "--aligner", str(aligners["hf"]), "--format", "text", "--output", str(output)]) == 0
    lines = output.read_text(encoding="utf-8").splitlines()
    assert lines == [f"{w.start:.3f}\t{w.end:.3f}\t{w.text}" for w in words]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--language", "Arabic"], "--language Arabic: the forced aligner does not support Arabic"),
        (["--language", "Klingon"], "--language Klingon: unknown language 'Klingon'"),
        (["--text-file", "/nonexistent/words.txt"], "--text-file /nonexistent/words.txt: no such file"),
    ],
)
def test_align_command_refuses_before_loading(extra, message, capsys):
    args = ["align", str(SPEECH / "cards-001.wav"), "--aligner", "/nonexistent/aligner"]
    args += extra if "--text-file" in extra else ["--text", "ten of clubs", *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_align_command_says_when_the_text_cannot_fit(aligners, capsys):
    args = ["align", str(SPEECH / "cards-001.wav"), "--text", "word " * 200, "--aligner", str(aligners["hf"])]
    assert main(args) == 2
    assert "the text has 200 words but 1.10 s of audio has only 14 slots of 80 ms" in capsys.readouterr().err


def test_an_asr_checkpoint_as_aligner_is_a_clear_error(checkpoints, capsys):
    args = ["align", str(SPEECH / "cards-001.wav"), "--text", "ten", "--aligner", str(checkpoints["hf"])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot load the aligner" in err and "is a speech recognizer, not the Qwen3 forced aligner" in err
