// The public API of the on-device app (see notes in build.mjs); the model code lands in model.js and worker.js.
const notYet = () => Promise.reject(new Error('klaus.js: the model API is not built yet'));
export const load = notYet;
export const classify = notYet;
export const runTensor = notYet;
export const weightDigests = notYet;
