// One streaming session over either transport. Both speak protocol v1 (docs/protocol.md):
//  - WebSocketSession: /v1/stream, the microphone through an AudioWorklet as 16 kHz 16-bit frames;
//  - RtcSession: /v1/rtc, the microphone as a WebRTC track, events over a data channel.
// The page sees the same events from both: handlers.event(event) for each, then
// handlers.closed({code, reason}) once.

const SAMPLE_RATE = 16000;
const CHUNK_SAMPLES = 1600; // 100 ms frames
const SENT_KEPT = 3000; // send times remembered for the latency readout (5 minutes of frames)
const ICE_GATHERING_MS = 3000;

export function endpoint(path) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const token = new URLSearchParams(location.search).get("token");
  const query = token ? `?token=${encodeURIComponent(token)}` : "";
  return `${scheme}//${location.host}${path}${query}`;
}

export function openMicrophone(deviceId) {
  // The model wants the voice as it is: browser voice processing changes words at the edges.
  const audio = { echoCancellation: false, noiseSuppression: false, autoGainControl: false, channelCount: 1 };
  if (deviceId) audio.deviceId = { exact: deviceId };
  return navigator.mediaDevices.getUserMedia({ audio });
}

// settings: {language, context, timestamps}; "timestamps" is sent only when asked for.
function startMessage(settings, extra) {
  const { language, context, timestamps } = settings;
  const words = timestamps ? { timestamps: true } : {};
  return JSON.stringify({ type: "start", protocol: 1, language, context, ...words, ...extra });
}

class Session {
  constructor(stream, settings, handlers) {
    this.stream = stream;
    this.settings = settings;
    this.handlers = handlers;
    this.finishing = false;
    this.closed = false;
  }

  deliver(event) {
    if (event.type === "ready") this.ready = true;
    this.handlers.event(event);
  }

  ended(code, reason) {
    if (this.closed) return;
    this.closed = true;
    this.release();
    this.handlers.closed({ code, reason });
  }

  openSocket(path, start) {
    this.ws = new WebSocket(endpoint(path));
    this.ws.binaryType = "arraybuffer";
    this.ws.onopen = () => this.ws.send(start);
    this.ws.onmessage = (message) => this.received(JSON.parse(message.data));
    this.ws.onclose = (close) => this.ended(close.code, close.reason);
  }

  received(event) {
    this.deliver(event);
  }

  finish() {
    if (this.ws && this.ws.readyState === WebSocket.OPEN && this.ready) {
      this.ws.send(JSON.stringify({ type: "finish" }));
    } else if (this.ws) {
      this.ws.close(); // nothing was started: nothing to wait for
    }
  }

  // Leave at once (the page is going away): the server forgets the session.
  abort() {
    if (this.ws) this.ws.close();
    this.release();
  }
}

export class WebSocketSession extends Session {
  async start() {
    this.pending = [];
    this.sent = 0; // samples
    this.sentAt = []; // [samples sent so far, when]
    this.context = new AudioContext(); // the device's rate: the worklet resamples to 16 kHz
    await this.context.audioWorklet.addModule("/pcm-worklet.js");
    const source = this.context.createMediaStreamSource(this.stream);
    this.worklet = new AudioWorkletNode(this.context, "pcm16k", {
      processorOptions: { inputRate: this.context.sampleRate, chunkSamples: CHUNK_SAMPLES },
    });
    this.worklet.port.onmessage = (message) => this.audio(message.data);
    source.connect(this.worklet).connect(this.context.destination); // silent output keeps it running
    this.openSocket("/v1/stream", startMessage(this.settings, { sample_rate: SAMPLE_RATE, encoding: "pcm_s16le" }));
  }

  audio(buffer) {
    if (this.finishing || this.closed) return;
    if (!this.ready) {
      this.pending.push(buffer); // sent once the server is ready: the first words are not lost
      return;
    }
    this.send(buffer);
  }

  send(buffer) {
    this.sent += buffer.byteLength / 2;
    this.sentAt.push([this.sent, performance.now()]);
    if (this.sentAt.length > 2 * SENT_KEPT) this.sentAt.splice(0, SENT_KEPT);
    this.ws.send(buffer);
  }

  received(event) {
    this.deliver(event);
    if (event.type === "ready") {
      for (const buffer of this.pending) this.send(buffer);
      this.pending = [];
    }
  }

  // Milliseconds from sending the audio up to `seconds` to now.
  latency(seconds) {
    const sample = Math.round(seconds * SAMPLE_RATE);
    const sent = this.sentAt.find(([total]) => total >= sample);
    return sent ? performance.now() - sent[1] : null;
  }

  stop() {
    if (this.finishing) return;
    this.finishing = true;
    this.release();
    this.finish();
  }

  release() {
    if (this.context && this.context.state !== "closed") this.context.close();
  }
}

export class RtcSession extends Session {
  async start() {
    this.pc = new RTCPeerConnection({ iceServers: [] }); // the server is reached directly: no STUN
    const [track] = this.stream.getAudioTracks();
    this.sender = this.pc.addTransceiver(track, { direction: "sendonly" }).sender;
    // Negotiated in the offer, id 0: the server opens the same channel (protocol section 13).
    this.channel = this.pc.createDataChannel("events", { negotiated: true, id: 0 });
    this.channel.onmessage = (message) => this.received(JSON.parse(message.data));
    this.pc.onconnectionstatechange = () => {
      if (this.pc.connectionState === "connected") this.connectedAt = performance.now();
    };
    await this.pc.setLocalDescription(await this.pc.createOffer());
    await gathered(this.pc);
    this.openSocket("/v1/rtc", startMessage(this.settings, { sdp: this.pc.localDescription.sdp }));
  }

  received(event) {
    if (event.type === "answer") {
      this.pc.setRemoteDescription({ type: "answer", sdp: event.sdp }).catch((error) => this.ended(0, error.message));
      return;
    }
    this.deliver(event);
    if (event.type === "done") this.pc.close(); // tells the server every event arrived
  }

  // Approximate: the server's clock starts with the first audio it decodes, about when ICE connects.
  latency(seconds) {
    return this.connectedAt ? performance.now() - (this.connectedAt + seconds * 1000) : null;
  }

  stop() {
    if (this.finishing) return;
    this.finishing = true;
    if (this.sender) this.sender.replaceTrack(null);
    this.finish();
  }

  release() {
    if (this.pc && this.pc.signalingState !== "closed") this.pc.close();
  }
}

function gathered(pc) {
  // Non-trickle: the offer goes out with every candidate in it (a LAN or loopback is quick).
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ICE_GATHERING_MS);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") {
        clearTimeout(timer);
        resolve();
      }
    });
  });
}
