// The public API of Klaus in the browser (an ES module): load a model, classify photos, all on the device.
//   const model = await load('./model.klausweb');
//   const {predictions, elapsed_ms, network_ms} = await classify(model, file, {top: 5, crops: 1});
// The model is verified, decoded and run in a Web Worker (worker.js), so the page never blocks. Results have the
// shape of `klaus classify --json`. Errors are Error objects with one line naming the file or photo and the problem.

const RPC = Symbol('klaus.rpc');

function baseUrl() {
  return (globalThis.document && document.baseURI) || (globalThis.location && globalThis.location.href) || undefined;
}

/** A request/response channel to one worker; progress messages go to ``onProgress``. */
function connect(worker) {
  let next = 1;
  const pending = new Map();
  worker.onmessage = (event) => {
    const { id, result, error, progress } = event.data || {};
    const entry = pending.get(id);
    if (!entry) return;
    if (progress !== undefined) {
      if (entry.onProgress) entry.onProgress(progress);
      return;
    }
    pending.delete(id);
    if (error !== undefined) entry.reject(new Error(error));
    else entry.resolve(result);
  };
  worker.onerror = (event) => {
    const message = `klaus: the model worker failed (${(event && event.message) || 'script error'})`;
    for (const entry of pending.values()) entry.reject(new Error(message));
    pending.clear();
  };
  return {
    call(op, args, onProgress) {
      const id = next++;
      return new Promise((resolve, reject) => {
        pending.set(id, { resolve, reject, onProgress });
        worker.postMessage({ id, op, args });
      });
    },
    close() {
      worker.terminate();
      for (const entry of pending.values()) entry.reject(new Error('klaus: the model was closed'));
      pending.clear();
    },
  };
}

/** Threads ONNX Runtime Web may use: up to 4 when the page is cross-origin isolated (wasm threads need
 * SharedArrayBuffer), else 1. */
export function defaultThreads() {
  const isolated = globalThis.crossOriginIsolated === true;
  const cores = (globalThis.navigator && navigator.hardwareConcurrency) || 1;
  return isolated ? Math.min(4, cores) : 1;
}

/** Fetch, verify and decode a web container in a Web Worker and build its ONNX Runtime Web session.
 * Resolves to {name, meta, preprocess, labels, classes, sha256, decodeMs, sessionMs, threads, ...}: decodeMs is
 * container bytes to decoded weights (hashes, every check, decoding), sessionMs from then until the session is
 * ready (what is left of compiling ONNX Runtime's wasm, which starts as soon as the download ends, plus creating
 * the session); ``timings`` splits both.
 * ``sessionOptions`` (plain values) override ONNX Runtime Web's session options, for benchmarks. */
export async function load(url = './model.klausweb', { threads, onProgress, sessionOptions } = {}) {
  const worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module', name: 'klaus-model' });
  const rpc = connect(worker);
  const absolute = new URL(url, baseUrl()).href;
  try {
    const info = await rpc.call('load', { url: absolute, threads: threads || defaultThreads(), sessionOptions }, onProgress);
    return Object.freeze({ ...info, url: absolute, [RPC]: rpc, close: () => rpc.close() });
  } catch (err) {
    rpc.close();
    throw err;
  }
}

function channel(model) {
  if (!model || !model[RPC]) throw new Error('klaus: not a model returned by load()');
  return model[RPC];
}

/** Top-``top`` predictions for one photo (a Blob or File), 1 or 10 crops:
 * {predictions: [{rank, index, wnid, label, probability, hierarchy}], elapsed_ms, network_ms}. */
export async function classify(model, imageBlob, { top = 5, crops = 1 } = {}) {
  if (!(top >= 1)) throw new Error('klaus: top must be >= 1');
  if (crops !== 1 && crops !== 10) throw new Error(`klaus: crops must be 1 or 10, got ${crops}`);
  const label = (imageBlob && imageBlob.name) || 'photo';
  if (!(imageBlob instanceof Blob)) throw new Error(`${label}: not a file or Blob`);
  const { probabilities, elapsed_ms, network_ms } = await channel(model).call('classify', { blob: imageBlob, crops, label });
  for (const p of probabilities) {
    if (!Number.isFinite(p)) throw new Error(`${label}: the model ${model.name} gives NaN or infinite scores for this photo`);
  }
  return { predictions: ranked(model, probabilities, top), elapsed_ms, network_ms };
}

/** klaus.runtime.Classifier.top: a stable sort by descending probability (ties: lower index first). */
function ranked(model, probabilities, top) {
  const order = Array.from(probabilities.keys()).sort((a, b) => probabilities[b] - probabilities[a] || a - b);
  return order.slice(0, Math.min(top, probabilities.length)).map((index, i) => {
    const row = model.labels[index];
    return {
      rank: i + 1,
      index,
      wnid: row ? row.wnid : '',
      label: row ? row.name : `class ${index}`,
      probability: probabilities[index],
      hierarchy: row ? [...row.hierarchy] : [],
    };
  });
}

/** Probabilities (N x classes, Float32Array) for an already preprocessed input of shape ``dims``. */
export async function runTensor(model, data, dims) {
  if (!(data instanceof Float32Array)) throw new Error('klaus: runTensor needs a Float32Array');
  return channel(model).call('runTensor', { data, dims: [...dims] });
}

/** {tensor name: SHA-256 hex of its decoded float32 little-endian bytes}, as Python's decoded_weights() gives. */
export async function weightDigests(model) {
  return channel(model).call('weightDigests', {});
}
