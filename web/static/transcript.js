// The finals of a captioning run, and their export as plain text, SubRip (.srt) and WebVTT (.vtt).
// Times are seconds from when Start was pressed: each session's times (which start at 0) are
// shifted by when that session began, so a run that reconnected still reads in order.

export class Transcript {
  constructor() {
    this.finals = [];
  }

  add(final, offset) {
    const entry = {
      start: offset + final.start,
      end: offset + final.end,
      text: final.text,
      language: final.language,
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

  toText() {
    return this.cues().map((cue) => `[${clock(cue.start)}] ${cue.text}\n`).join("");
  }

  toSrt() {
    return this.cues()
      .map((cue, i) => `${i + 1}\n${timestamp(cue.start, ",")} --> ${timestamp(cue.end, ",")}\n${cue.text}\n`)
      .join("\n");
  }

  toVtt() {
    const cues = this.cues().map((cue) => `${timestamp(cue.start, ".")} --> ${timestamp(cue.end, ".")}\n${cue.text}\n`);
    return ["WEBVTT\n", ...cues].join("\n");
  }

  export(format) {
    const body = { txt: () => this.toText(), srt: () => this.toSrt(), vtt: () => this.toVtt() }[format]();
    const type = format === "vtt" ? "text/vtt" : "text/plain";
    return new Blob([body], { type: `${type};charset=utf-8` });
  }
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
