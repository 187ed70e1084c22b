// The finals of a captioning run, their export as plain text, SubRip (.srt) and WebVTT (.vtt), and
// their place in the caption list. Times are seconds from when Start was pressed: each session's
// times (which start at 0) are shifted by when that session began, so a run that reconnected still
// reads in order. A final may carry its words' times (start's "timestamps": docs/protocol.md): the
// aligner's units are the text's words cleaned to letters, digits and apostrophes (CJK characters
// one by one); wordPieces finds them in the text again.

const CUE_CHARS = 2 * 42; // two lines of 42: the usual subtitle limits
const CUE_SECONDS = 7;
const KEPT = /[\p{L}\p{N}']/u; // what the aligner keeps of a word
const MARK = /\p{M}/u; // combining marks: dropped by the aligner, shown with the letter before them

export class Transcript {
  constructor() {
    this.finals = [];
  }

  add(final, offset) {
    const shifted = (word) => ({ text: word.text, start: offset + word.start, end: offset + word.end });
    const entry = {
      start: offset + final.start,
      end: offset + final.end,
      text: final.text,
      language: final.language,
      words: final.words ? final.words.map(shifted) : null, // null: none asked for, or alignment failed
      wordsError: final.words_error ?? null,
    };
    this.finals.push(entry);
    return entry;
  }

  clear() {
    this.finals = [];
  }

  // Finals with text, on one line each: a caption cue cannot hold a blank line.
  cues() {
    return this.finals
      .map((final) => ({ ...final, text: oneLine(final.text) }))
      .filter((final) => final.text !== "");
  }

  // Subtitle cues: a final with word times is cut at words into cues that fit the limits.
  subtitleCues() {
    return this.cues().flatMap(splitFinal);
  }

  toText() {
    return this.cues().map((cue) => `[${clock(cue.start)}] ${cue.text}\n`).join("");
  }

  toSrt() {
    return this.subtitleCues()
      .map((cue, i) => `${i + 1}\n${timestamp(cue.start, ",")} --> ${timestamp(cue.end, ",")}\n${cue.text}\n`)
      .join("\n");
  }

  toVtt() {
    const cues = this.subtitleCues().map(
      (cue) => `${timestamp(cue.start, ".")} --> ${timestamp(cue.end, ".")}\n${cue.chunks ? karaoke(cue) : cue.text}\n`,
    );
    return ["WEBVTT\n", ...cues].join("\n");
  }

  export(format) {
    const body = { txt: () => this.toText(), srt: () => this.toSrt(), vtt: () => this.toVtt() }[format]();
    const type = format === "vtt" ? "text/vtt" : "text/plain";
    return new Blob([body], { type: `${type};charset=utf-8` });
  }
}

// The text cut into pieces: {text} between words, {text, word} for each unit of `words`, whose
// characters are the text's letters, digits and apostrophes in order. Null when they are not.
export function wordPieces(text, words) {
  const chars = Array.from(text);
  const same = (a, b) => a === b || (a !== undefined && a.toLowerCase() === b.toLowerCase());
  const skip = (i, pattern, wanted) => {
    while (i < chars.length && pattern.test(chars[i]) === wanted) i++;
    return i;
  };
  const pieces = [];
  let i = 0;
  let plain = 0; // where the text between words began
  for (const word of words) {
    const letters = Array.from(word.text);
    if (letters.length === 0) return null;
    i = skip(i, KEPT, false);
    const from = i;
    for (const letter of letters) {
      i = skip(i, KEPT, false);
      if (!same(chars[i], letter)) return null;
      i++;
    }
    i = skip(i, MARK, true);
    if (from > plain) pieces.push({ text: chars.slice(plain, from).join("") });
    pieces.push({ text: chars.slice(from, i).join(""), word });
    plain = i;
  }
  if (skip(i, KEPT, false) < chars.length) return null; // letters no unit accounts for
  if (chars.length > plain) pieces.push({ text: chars.slice(plain).join("") });
  return pieces;
}

// One final (one line of text) as subtitle cues. Without usable word times: one cue, as it is.
// With them: words are added to a cue until one more would take it past CUE_CHARS characters or
// CUE_SECONDS seconds; the cues meet at word times, the first and last keep the final's edges.
export function splitFinal(final) {
  const pieces = final.words && wordPieces(final.text, final.words);
  const whole = { start: final.start, end: final.end, text: final.text };
  if (!pieces || !pieces.some((piece) => piece.word)) return [whole];
  // Chunks: each word with the punctuation and space after it (and the text before the first).
  const chunks = [];
  let before = "";
  for (const piece of pieces) {
    if (piece.word) {
      chunks.push({ before, text: piece.text, after: "", word: piece.word });
      before = "";
    } else if (chunks.length) chunks[chunks.length - 1].after += piece.text;
    else before = piece.text;
  }
  const cues = [];
  let cue = null;
  for (const chunk of chunks) {
    if (cue) {
      const longer = chunkText(cue.chunks.concat(chunk));
      if (Array.from(longer).length > CUE_CHARS || chunk.word.end - cue.start > CUE_SECONDS) {
        cue.end = cue.chunks[cue.chunks.length - 1].word.end;
        cue = null;
      }
    }
    if (!cue) {
      const start = cues.length ? Math.max(chunk.word.start, cues[cues.length - 1].end) : final.start;
      cue = { start, end: final.end, chunks: [] };
      cues.push(cue);
    }
    cue.chunks.push(chunk);
  }
  for (const c of cues) c.text = chunkText(c.chunks);
  return cues;
}

function chunkText(chunks) {
  return chunks.map((chunk) => chunk.before + chunk.text + chunk.after).join("").trim();
}

// A cue's text with a WebVTT timestamp tag before each word after the first (karaoke), where the
// word's start lies inside the cue and after the previous tag.
function karaoke(cue) {
  const ms = (seconds) => Math.round(seconds * 1000);
  let last = ms(cue.start);
  const parts = cue.chunks.map((chunk, i) => {
    const at = ms(chunk.word.start);
    let tag = "";
    if (i > 0 && at > last && at < ms(cue.end)) {
      tag = `<${timestamp(chunk.word.start, ".")}>`;
      last = at;
    }
    return vttEscape(chunk.before) + tag + vttEscape(chunk.text + chunk.after);
  });
  return parts.join("").trim();
}

function vttEscape(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

// The <li> of a final in the caption list. Each word with times is a span whose title gives them;
// a final whose alignment failed gets a small note saying why.
export function finalItem(entry) {
  const item = document.createElement("li");
  item.className = "final";
  item.dataset.start = entry.start;
  item.dataset.end = entry.end;
  const time = document.createElement("time");
  time.textContent = clock(entry.start);
  const text = document.createElement("span");
  text.className = "text";
  const pieces = entry.words && wordPieces(entry.text, entry.words);
  if (pieces) text.append(...pieces.map((piece) => (piece.word ? wordSpan(piece) : piece.text)));
  else text.textContent = entry.text;
  item.append(time, text);
  if (!entry.words && entry.wordsError) {
    const note = document.createElement("small");
    note.className = "note";
    note.textContent = "no word times";
    note.title = `No word times: ${entry.wordsError}`;
    item.append(note);
  }
  return item;
}

function wordSpan(piece) {
  const span = document.createElement("span");
  span.className = "word";
  span.textContent = piece.text;
  span.dataset.start = piece.word.start;
  span.dataset.end = piece.word.end;
  span.title = `${clock(piece.word.start)}–${clock(piece.word.end)}`;
  return span;
}

export function oneLine(text) {
  return text.replace(/\s+/g, " ").trim();
}

// 00:01:02,345 (SRT, separator ",") or 00:01:02.345 (VTT, ".")
export function timestamp(seconds, separator) {
  const ms = Math.max(0, Math.round(seconds * 1000));
  const pad = (n, width) => String(n).padStart(width, "0");
  const h = Math.floor(ms / 3600000);
  const m = Math.floor(ms / 60000) % 60;
  const s = Math.floor(ms / 1000) % 60;
  return `${pad(h, 2)}:${pad(m, 2)}:${pad(s, 2)}${separator}${pad(ms % 1000, 3)}`;
}

// 1:02.3 for the caption list
export function clock(seconds) {
  const tenths = Math.max(0, Math.round(seconds * 10));
  const m = Math.floor(tenths / 600);
  const s = ((tenths % 600) / 10).toFixed(1).padStart(4, "0");
  return `${m}:${s}`;
}
