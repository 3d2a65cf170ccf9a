// The model's Web Worker: downloads and verifies the web container, decodes the weights, runs ONNX Runtime Web
// (wasm, SIMD, threads when the page is cross-origin isolated) and classifies photos, so the page never blocks.
// Messages: {id, op, args} in; {id, result} | {id, error} | {id, progress} out. klaus.js is the only client.
import * as ort from 'onnxruntime-web/wasm';

import { MAX_FILE_BYTES, ModelError, assembleModel, decodeTensor, decodeWeights, readContainer, sha256Hex } from './model.js';
import { decodeImage, toTensor } from './preprocess.js';

let state = null; // {model, session, inputName, outputName, fixedBatch, where}
let queue = Promise.resolve(); // ONNX Runtime runs one inference at a time per session

const now = () => performance.now();
const round3 = (x) => Math.round(x * 1000) / 1000;

function fileName(url) {
  try {
    const path = new URL(url, self.location.href).pathname;
    return decodeURIComponent(path.slice(path.lastIndexOf('/') + 1)) || url;
  } catch {
    return String(url);
  }
}

/** The container's bytes, at most MAX_FILE_BYTES, reporting progress. */
async function download(url, where, progress) {
  let response;
  try {
    response = await fetch(url, { credentials: 'same-origin' });
  } catch (err) {
    throw new ModelError(`${where}: cannot download (${err.message || err})`);
  }
  if (!response.ok) throw new ModelError(`${where}: cannot download (HTTP ${response.status})`);
  const total = Number(response.headers.get('content-length')) || 0;
  if (total > MAX_FILE_BYTES) throw new ModelError(`${where}: file is ${total} bytes, larger than the ${MAX_FILE_BYTES}-byte limit`);
  const reader = response.body.getReader();
  const parts = [];
  let loaded = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    loaded += value.length;
    if (loaded > MAX_FILE_BYTES) {
      reader.cancel();
      throw new ModelError(`${where}: file is larger than the ${MAX_FILE_BYTES}-byte limit`);
    }
    parts.push(value);
    progress({ phase: 'download', loaded, total });
  }
  const out = new Uint8Array(loaded);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Refuse a graph input the preprocessing cannot feed (klaus.preprocess.check_input_shape). */
function checkInput(meta, preprocess, where) {
  if (!meta || !Array.isArray(meta.shape) || !meta.shape.length) return null;
  const dims = meta.shape.map((d) => (typeof d === 'number' && d > 0 ? d : null));
  const s = preprocess.input_size;
  const wanted = preprocess.layout === 'NCHW' ? [null, 3, s, s] : [null, s, s, 3];
  const made = preprocess.layout === 'NCHW' ? `(N, 3, ${s}, ${s})` : `(N, ${s}, ${s}, 3)`;
  const text = `(${dims.map((d) => (d === null ? '?' : d)).join(', ')})`;
  if (dims.length !== 4 || dims.slice(1).some((d, i) => d !== null && d !== wanted[i + 1])) {
    throw new ModelError(`${where}: input '${meta.name}' has shape ${text}, but the preprocessing makes ${made}`);
  }
  return dims[0];
}

// The smallest model ONNX Runtime accepts (one Identity node, opset 13), to initialize the wasm runtime early.
const IDENTITY_MODEL = new Uint8Array([
  0x08, 0x08, 0x3a, 0x2f, 0x0a, 0x10, 0x0a, 0x01, 0x78, 0x12, 0x01, 0x79, 0x22, 0x08, 0x49, 0x64, 0x65, 0x6e, 0x74,
  0x69, 0x74, 0x79, 0x12, 0x01, 0x67, 0x5a, 0x0b, 0x0a, 0x01, 0x78, 0x12, 0x06, 0x0a, 0x04, 0x08, 0x01, 0x12, 0x00,
  0x62, 0x0b, 0x0a, 0x01, 0x79, 0x12, 0x06, 0x0a, 0x04, 0x08, 0x01, 0x12, 0x00, 0x42, 0x04, 0x0a, 0x00, 0x10, 0x0d,
]);

function configure(threads) {
  ort.env.wasm.numThreads = threads;
  ort.env.wasm.proxy = false;
  ort.env.wasm.wasmPaths = {
    mjs: new URL('./ort-wasm-simd-threaded.mjs', import.meta.url).href,
    wasm: new URL('./ort-wasm-simd-threaded.wasm', import.meta.url).href,
  };
  ort.env.logLevel = 'error';
}

/** Initialize ONNX Runtime Web (fetch and compile its wasm, start its threads) with a one-node model; resolves to
 * the milliseconds it took. Failures surface when the real session is created. */
async function warmUp(threads) {
  configure(threads);
  const t0 = now();
  try {
    const s = await ort.InferenceSession.create(IDENTITY_MODEL, { executionProviders: ['wasm'] });
    await s.release();
  } catch {
    // reported by the real session
  }
  return now() - t0;
}

const ops = {
  async load({ url, threads, sessionOptions = {} }, progress) {
    const where = fileName(url);
    const isolated = self.crossOriginIsolated === true;
    const n = isolated ? Math.max(1, Math.min(threads | 0 || 1, 16)) : 1;
    // ONNX Runtime's wasm is fetched, compiled and started (its threads too) while the container downloads and
    // its weights are decoded: its first start costs more than the decoding, so it begins first.
    const warm = warmUp(n);
    const t0 = now();
    const bytes = await download(url, where, progress);
    const t1 = now();
    progress({ phase: 'verify', loaded: bytes.length, total: bytes.length });
    const sha256 = await sha256Hex(bytes);
    const th = now();
    const model = await readContainer(bytes, where);
    const tv = now();
    progress({ phase: 'decode' });
    const weights = await decodeWeights(model);
    const td = now();
    const graph = assembleModel(model.graph, weights);
    weights.clear();
    const t2 = now();
    progress({ phase: 'session' });
    const warmMs = await warm;
    const tw = now();
    // Idle intra-op threads sleep instead of spinning: between photos the worker decodes and resizes the next one,
    // and a spinning thread would take a core from it (and a phone's battery). ONNX Runtime Web's own session
    // defaults otherwise. bench/browser_network.py measures the alternatives (spinning, batch fixed at 1, memory
    // arena and pattern, other optimization levels; BENCHMARKS.md, On the phone).
    let session;
    try {
      session = await ort.InferenceSession.create(graph, {
        executionProviders: ['wasm'],
        graphOptimizationLevel: 'all',
        logSeverityLevel: 3,
        extra: { session: { intra_op: { allow_spinning: '0' } } },
        ...sessionOptions,
      });
    } catch (err) {
      throw new ModelError(`${where}: ONNX Runtime Web cannot load the model (${String(err.message || err).split('\n')[0]})`);
    }
    const t3 = now();
    const inputName = session.inputNames[0];
    const inputMeta = Array.isArray(session.inputMetadata) ? session.inputMetadata[0] : null;
    const fixedBatch = checkInput(inputMeta && { ...inputMeta, name: inputName }, model.preprocess, where);
    state = { model, session, inputName, outputName: session.outputNames[0], fixedBatch, where };
    return {
      name: model.name,
      meta: { ...model.meta },
      preprocess: model.preprocess,
      labels: model.labels,
      classes: model.labels.length,
      output: model.output,
      sha256,
      bytes: bytes.length,
      threads: n,
      crossOriginIsolated: isolated,
      downloadMs: round3(t1 - t0),
      decodeMs: round3(t2 - t1),
      sessionMs: round3(t3 - t2),
      timings: { hash: round3(th - t1), verify: round3(tv - th), decode: round3(td - tv), assemble: round3(t2 - td),
        waitWasm: round3(tw - t2), warmUp: round3(warmMs), session: round3(t3 - tw) },
      ortVersion: ort.env.versions.web,
    };
  },

  async classify({ blob, crops = 1, label = 'photo' }) {
    const { model } = need();
    const t0 = now();
    const img = await decodeImage(blob, model.preprocess, crops, { label });
    const tensor = toTensor(img, model.preprocess, crops);
    const { probs, networkMs } = await run(tensor.data, tensor.dims);
    const classes = probs.length / crops;
    let mean = probs;
    if (crops > 1) {
      // numpy's float32 mean over the crops axis: sum in float32 crop by crop, then divide.
      mean = new Float32Array(classes);
      for (let c = 0; c < crops; c++) for (let i = 0; i < classes; i++) mean[i] += probs[c * classes + i];
      for (let i = 0; i < classes; i++) mean[i] /= crops;
    }
    return { probabilities: mean, elapsed_ms: round3(now() - t0), network_ms: round3(networkMs) };
  },

  async runTensor({ data, dims }) {
    const { probs } = await run(data, dims);
    return probs;
  },

  async weightDigests() {
    const { model } = need();
    const out = {};
    for (const t of model.tensors) {
      const values = await decodeTensor(t);
      out[t.name] = await sha256Hex(new Uint8Array(values.buffer, values.byteOffset, values.byteLength));
    }
    return out;
  },
};

function need() {
  if (!state) throw new Error('no model is loaded in this worker');
  return state;
}

/** Class probabilities (N x classes, float32) for a preprocessed batch; softmax when the model gives logits
 * (klaus.runtime.softmax: float32 shift, float64 exp and sum, float32 result). */
function run(data, dims) {
  const job = queue.then(async () => {
    const { session, inputName, outputName, fixedBatch, model, where } = need();
    const n = dims[0];
    const per = data.length / n;
    const step = fixedBatch || n;
    const rows = [];
    let networkMs = 0;
    for (let start = 0; start < n; start += step) {
      const real = Math.min(step, n - start);
      const batch = new Float32Array(step * per);
      batch.set(data.subarray(start * per, (start + real) * per));
      for (let r = real; r < step; r++) batch.copyWithin(r * per, (real - 1) * per, real * per);
      const feed = { [inputName]: new ort.Tensor('float32', batch, [step, ...dims.slice(1)]) };
      const t0 = now();
      let out;
      try {
        out = await session.run(feed, [outputName]);
      } catch (err) {
        throw new ModelError(`${where}: ONNX Runtime Web failed (${String(err.message || err).split('\n')[0]})`);
      }
      networkMs += now() - t0;
      const raw = out[outputName];
      const values = raw.data;
      const width = values.length / step;
      for (let r = 0; r < real; r++) rows.push(values.slice(r * width, (r + 1) * width));
      raw.dispose();
    }
    const classes = rows[0].length;
    const probs = new Float32Array(n * classes);
    rows.forEach((row, r) => probs.set(model.output === 'probabilities' ? row : softmax(row), r * classes));
    return { probs, networkMs };
  });
  queue = job.catch(() => {});
  return job;
}

function softmax(logits) {
  let max = -Infinity;
  for (const v of logits) if (v > max) max = v; // a NaN logit makes every probability NaN, as in numpy
  const e = new Float64Array(logits.length);
  let sum = 0;
  for (let i = 0; i < logits.length; i++) {
    e[i] = Math.exp(Math.fround(logits[i] - max));
    sum += e[i];
  }
  return Float32Array.from(e, (v) => v / sum);
}

self.onmessage = async (event) => {
  const { id, op, args } = event.data || {};
  const progress = (p) => self.postMessage({ id, progress: p });
  try {
    if (!(op in ops)) throw new Error(`unknown operation ${op}`);
    const result = await ops[op](args || {}, progress);
    const transfer = result instanceof Float32Array ? [result.buffer] : result && result.probabilities ? [result.probabilities.buffer] : [];
    self.postMessage({ id, result }, transfer);
  } catch (err) {
    self.postMessage({ id, error: String((err && err.message) || err).split('\n')[0] });
  }
};
