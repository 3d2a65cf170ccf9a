// The model's Web Worker: container decoding and ONNX Runtime Web inference (filled in with model.js).
import * as ort from 'onnxruntime-web/wasm';

self.onmessage = (event) => {
  self.postMessage({ id: event.data && event.data.id, error: `worker: ONNX Runtime Web ${ort.env.versions.web} loaded; model loading is not built yet` });
};
