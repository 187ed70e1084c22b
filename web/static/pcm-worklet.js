// AudioWorklet: microphone audio at the AudioContext's rate -> 16 kHz mono signed 16-bit PCM,
// posted to the page in chunks (protocol v1's pcm_s16le). The browser gives the device's rate
// (often 48 kHz); not every browser can run a context at 16 kHz, so the resampling is done here:
// a windowed-sinc low-pass evaluated at each output instant (works for any ratio).

const OUT_RATE = 16000;
const ZERO_CROSSINGS = 16; // kernel half-length, in periods of the lower rate: ~70 dB stop band

function kernel(x, cutoff, halfWidth) {
  // Low-pass impulse response at offset x (input samples), Blackman-windowed.
  if (Math.abs(x) >= halfWidth) return 0;
  const t = Math.PI * cutoff * x;
  const sinc = t === 0 ? 1 : Math.sin(t) / t;
  const w = Math.PI * (x / halfWidth + 1);
  return cutoff * sinc * (0.42 - 0.5 * Math.cos(w) + 0.08 * Math.cos(2 * w));
}

class Pcm16kProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { inputRate, chunkSamples } = options.processorOptions;
    this.step = inputRate / OUT_RATE; // input samples per output sample
    // Below the lower Nyquist rate, with a margin for the transition band.
    this.cutoff = Math.min(1, 1 / this.step) * 0.92;
    this.halfWidth = ZERO_CROSSINGS * Math.max(1, this.step);
    this.history = new Float32Array(0); // input samples from index `base` on
    this.base = 0;
    this.position = 0; // the next output instant, in input samples
    this.chunkSamples = chunkSamples;
    this.chunk = new Int16Array(chunkSamples);
    this.filled = 0;
  }

  append(samples) {
    const joined = new Float32Array(this.history.length + samples.length);
    joined.set(this.history);
    joined.set(samples, this.history.length);
    this.history = joined;
  }

  output(value) {
    this.chunk[this.filled++] = Math.max(-32768, Math.min(32767, Math.round(value * 32768)));
    if (this.filled === this.chunkSamples) {
      this.port.postMessage(this.chunk.buffer, [this.chunk.buffer]); // transferred: the array is now empty
      this.chunk = new Int16Array(this.chunkSamples);
      this.filled = 0;
    }
  }

  resample() {
    const end = this.base + this.history.length;
    while (this.position + this.halfWidth < end) {
      const first = Math.max(this.base, Math.ceil(this.position - this.halfWidth));
      const last = Math.floor(this.position + this.halfWidth);
      let sum = 0;
      let weights = 0;
      for (let i = first; i <= last; i++) {
        const h = kernel(i - this.position, this.cutoff, this.halfWidth);
        sum += this.history[i - this.base] * h;
        weights += h;
      }
      this.output(weights ? sum / weights : 0); // unit gain at DC for every phase
      this.position += this.step;
    }
    const keep = Math.max(this.base, Math.floor(this.position - this.halfWidth));
    this.history = this.history.slice(keep - this.base);
    this.base = keep;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    const mono = new Float32Array(channels[0].length);
    for (const channel of channels) {
      for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / channels.length;
    }
    this.append(mono);
    this.resample();
    return true;
  }
}

registerProcessor("pcm16k", Pcm16kProcessor);
