// The captions page: controls, states, captions, latency, export. A "run" lasts from Start to Stop
// and may span several sessions: a lost connection or a busy server is retried with backoff.

import { RtcSession, WebSocketSession, openMicrophone } from "./sessions.js";
import { Transcript, finalItem } from "./transcript.js";

const $ = (id) => document.getElementById(id);
const ui = {
  toggle: $("toggle"),
  transport: $("transport"),
  language: $("language"),
  microphone: $("microphone"),
  context: $("context"),
  timestamps: $("timestamps"),
  timestampsField: $("timestamps-field"),
  state: $("state"),
  detected: $("detected"),
  latency: $("latency"),
  session: $("session"),
  message: $("message"),
  captions: $("captions"),
  finals: $("finals"),
  partial: $("partial"),
};
const STATE_LABELS = {
  idle: "idle",
  connecting: "connecting…",
  listening: "listening",
  busy: "server busy",
  reconnecting: "reconnecting…",
  stopping: "finishing…",
  error: "error",
};
const FATAL_CLOSE_CODES = new Set([4400, 4401]); // retrying the same request cannot help
const BUSY_ERRORS = new Set(["server_busy", "server_full"]);
const MAX_RETRY_S = 30;

const transcript = new Transcript();
let run = null; // {stream, session, startedAt, sessions, retries, stopping, timer}

function setState(state, detail) {
  ui.state.dataset.state = state;
  ui.state.textContent = detail ? `${STATE_LABELS[state]} · ${detail}` : STATE_LABELS[state];
}

function showMessage(text, kind = "error") {
  ui.message.textContent = text;
  ui.message.className = kind;
  ui.message.hidden = false;
}

function hideMessage() {
  ui.message.hidden = true;
}

function setRunning(running) {
  ui.toggle.textContent = running ? "Stop" : "Start";
  ui.toggle.classList.toggle("running", running);
  const controls = [ui.transport, ui.language, ui.microphone, ui.context, ui.timestamps];
  for (const control of controls) control.disabled = running;
}

async function start() {
  hideMessage();
  if (!window.isSecureContext || !navigator.mediaDevices) {
    setState("error");
    showMessage(
      "The microphone needs a secure page: open it as http://localhost:PORT/ on the server's machine, " +
        "or run asrlive serve --certfile/--keyfile and open https://HOST:PORT/.",
    );
    return;
  }
  run = { startedAt: performance.now(), sessions: 0, retries: 0, stopping: false };
  setRunning(true);
  setState("connecting");
  try {
    run.stream = await openMicrophone(ui.microphone.value);
  } catch (error) {
    fail(`No microphone: ${error.message}`);
    return;
  }
  listMicrophones(); // labels are only readable once access is granted
  connect();
}

function connect() {
  if (!run || run.stopping) return;
  const settings = {
    language: ui.language.value === "auto" ? null : ui.language.value,
    context: ui.context.value,
    timestamps: !ui.timestampsField.hidden && ui.timestamps.checked,
  };
  const Kind = ui.transport.value === "webrtc" ? RtcSession : WebSocketSession;
  const session = new Kind(run.stream, settings, {
    event: (event) => onEvent(session, event),
    closed: (close) => onClosed(session, close),
  });
  // Session times start at 0: later sessions of the run are placed after the time already passed.
  session.offset = run.sessions++ === 0 ? 0 : (performance.now() - run.startedAt) / 1000;
  run.session = session;
  session.start().catch((error) => session.ended(0, error.message));
}

function stop() {
  if (!run) return;
  run.stopping = true;
  clearTimeout(run.timer);
  for (const track of run.stream ? run.stream.getTracks() : []) track.stop();
  if (run.session && !run.session.closed) {
    setState("stopping");
    run.session.stop();
  } else {
    finishRun();
  }
}

function finishRun(state = "idle") {
  if (run && run.stream) for (const track of run.stream.getTracks()) track.stop();
  run = null;
  setRunning(false);
  setState(state);
  clearPartial();
}

function fail(text) {
  finishRun("error");
  showMessage(text);
}

function onEvent(session, event) {
  if (!run || session !== run.session) return;
  if (event.type === "ready") {
    run.retries = 0;
    setState("listening");
    hideMessage();
    ui.session.textContent = `session ${event.session} · ${ui.transport.selectedOptions[0].text}`;
    ui.session.dataset.session = event.session;
    if (event.language) ui.detected.textContent = event.language;
  } else if (event.type === "partial") {
    showPartial(event);
    showLatency(session, event.audio_end);
  } else if (event.type === "final") {
    addFinal(transcript.add(event, session.offset), event);
    showLatency(session, event.end);
  } else if (event.type === "lag") {
    showMessage(`The server is ${event.seconds.toFixed(1)} s behind the audio.`, "info");
  } else if (event.type === "error") {
    run.lastError = event;
    if (!BUSY_ERRORS.has(event.code)) showMessage(`${event.code}: ${event.message}`);
  }
}

function onClosed(session, close) {
  if (!run || session !== run.session) return;
  if (run.stopping) {
    finishRun();
    return;
  }
  const error = run.lastError;
  run.lastError = null;
  if (FATAL_CLOSE_CODES.has(close.code)) {
    fail(error ? `${error.code}: ${error.message}` : `closed: ${close.code} ${close.reason}`);
    return;
  }
  const delay = Math.min(MAX_RETRY_S, 2 ** run.retries++);
  setState(close.code === 1013 ? "busy" : "reconnecting", `retry in ${delay} s`);
  clearPartial();
  run.timer = setTimeout(connect, delay * 1000);
}

function showPartial(event) {
  ui.partial.dataset.segment = event.segment;
  ui.partial.querySelector(".stable").textContent = event.stable;
  ui.partial.querySelector(".unstable").textContent = event.unstable;
  scrollDown();
}

function clearPartial(segment) {
  if (segment !== undefined && ui.partial.dataset.segment !== String(segment)) return;
  delete ui.partial.dataset.segment;
  ui.partial.querySelector(".stable").textContent = "";
  ui.partial.querySelector(".unstable").textContent = "";
}

function addFinal(entry, event) {
  clearPartial(event.segment);
  if (event.language) ui.detected.textContent = event.language;
  ui.finals.append(finalItem(entry));
  scrollDown();
}

function showLatency(session, seconds) {
  const ms = session.latency(seconds);
  if (ms !== null) ui.latency.textContent = `${Math.max(0, Math.round(ms))} ms`;
}

function scrollDown() {
  ui.captions.scrollTop = ui.captions.scrollHeight;
}

async function listMicrophones() {
  if (!navigator.mediaDevices) return;
  const chosen = ui.microphone.value;
  const devices = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === "audioinput");
  ui.microphone.replaceChildren(new Option("Default microphone", ""));
  devices.forEach((device, i) => {
    if (device.deviceId && device.deviceId !== "default") {
      ui.microphone.append(new Option(device.label || `Microphone ${i + 1}`, device.deviceId));
    }
  });
  ui.microphone.value = [...ui.microphone.options].some((o) => o.value === chosen) ? chosen : "";
}

async function listLanguages() {
  const response = await fetch("/v1/languages");
  const { languages, timestamps } = await response.json();
  ui.timestampsField.hidden = !timestamps; // the server has a forced aligner
  for (const name of languages) ui.language.append(new Option(name, name));
}

function download(format) {
  const url = URL.createObjectURL(transcript.export(format));
  const link = document.createElement("a");
  link.href = url;
  link.download = `transcript-${new Date().toISOString().slice(0, 19).replace(/[:T]/g, "-")}.${format}`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

ui.toggle.addEventListener("click", () => (run ? stop() : start()));
for (const button of document.querySelectorAll("[data-export]")) {
  button.addEventListener("click", () => download(button.dataset.export));
}
$("clear").addEventListener("click", () => {
  transcript.clear();
  ui.finals.replaceChildren();
});
// A page that goes away closes its session at once, so the server frees it.
window.addEventListener("pagehide", () => run && run.session && run.session.abort());
if (navigator.mediaDevices) navigator.mediaDevices.addEventListener("devicechange", listMicrophones);
listMicrophones();
listLanguages().catch((error) => showMessage(`Cannot list languages: ${error.message}`));
