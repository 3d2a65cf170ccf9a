// The on-device app: pick photos (files, a folder, the camera), walk them one after another through
// the model (decoded and run in a Web Worker by klaus.js, so this thread never blocks), show each
// photo's top-5 with their WordNet hierarchy and the network's milliseconds, keep the results in
// IndexedDB, and filter them by any WordNet concept with the rules of `klaus search`.
//
// Everything here builds DOM with textContent (no innerHTML), and the page's CSP allows no inline
// script or style. window.klaus = {load, classify, runTensor, weightDigests, ready} lets tests
// and other pages script the model.

import * as api from './klaus.js';
import { Concepts, DEFAULT_MIN_PROB, labelRecords, rank, resolve, suggestions } from './concepts.js';
import { Store } from './store.js';

const THUMB_SIDE = 192;
const IMAGE_NAME = /\.(jpe?g|jfif|png|webp|gif|bmp|avif|tiff?|hei[cf])$/i;
const HEIC = /\.hei[cf]$/i;
const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ the model

const params = new URLSearchParams(location.search);
const threadParam = Number.parseInt(params.get('threads') ?? '', 10);
const loadOptions = { onProgress: showProgress };
if (Number.isInteger(threadParam) && threadParam >= 1 && threadParam <= 16) loadOptions.threads = threadParam;

const marks = { start: performance.now() };
const ready = api.load('./model.klausweb', loadOptions);
ready.catch(() => {}); // shown in the status line below; callers of window.klaus.ready still see the error
window.klaus = {
  load: api.load,
  classify: api.classify,
  runTensor: api.runTensor,
  weightDigests: api.weightDigests,
  ready,
  marks, // performance.now() of page start, model ready and first result (bench/browser.py reads them)
};

const concepts = Concepts.load('./concepts.json');
concepts.catch(() => {});

const PHASES = {
  download: 'Downloading the model…',
  verify: 'Verifying the model’s checksums…',
  decode: 'Decoding the weights…',
  session: 'Starting ONNX Runtime…',
};

/** klaus.js reports {phase, loaded?, total?} while it loads the model. */
function showProgress(progress) {
  const status = $('model-status');
  if (!status || !progress || typeof progress.phase !== 'string') return;
  let text = PHASES[progress.phase] || 'Loading the model…';
  if (progress.phase === 'download' && Number.isFinite(progress.loaded) && progress.total > 0) {
    text = `Downloading the model… ${Math.min(100, Math.round((progress.loaded / progress.total) * 100))} %`;
  }
  status.textContent = text;
}

function describeModel(model) {
  const parts = [model.name || 'model'];
  if (Number.isFinite(model.decodeMs)) parts.push(`decoded in ${Math.round(model.decodeMs)} ms`);
  if (Number.isFinite(model.sessionMs)) parts.push(`session ${Math.round(model.sessionMs)} ms`);
  if (Number.isInteger(model.threads)) parts.push(`${model.threads} thread${model.threads === 1 ? '' : 's'}`);
  return parts.join(' · ');
}

// ------------------------------------------------------------------ state

const state = {
  store: null,
  records: [], // walk order
  cards: new Map(), // id -> article
  urls: new Map(), // id -> thumbnail object URL
  queue: [],
  walking: false,
  stop: false,
  walk: { started: 0, done: 0, errors: 0, skipped: 0 },
  crops: 1,
  model: null,
  labels: null,
  closures: null,
};

// ------------------------------------------------------------------ walking photos

function looksLikeImage(file) {
  return (file.type && file.type.startsWith('image/')) || IMAGE_NAME.test(file.name);
}

/** Queue files; from a folder only image files are taken (sidecars and notes are not photos). */
function enqueue(fileList, { fromFolder = false } = {}) {
  const files = [...fileList].filter((f) => !fromFolder || looksLikeImage(f));
  if (fromFolder) files.sort((a, b) => (a.webkitRelativePath || a.name).localeCompare(b.webkitRelativePath || b.name));
  if (!files.length) {
    $('walk-status').textContent = fromFolder ? 'No photos in that folder.' : 'No files chosen.';
    return;
  }
  state.queue.push(...files);
  if (!state.walking) walk();
  else showWalk();
}

async function walk() {
  state.walking = true;
  state.stop = false;
  state.walk = { started: performance.now(), done: 0, errors: 0, skipped: 0 };
  $('stop').hidden = false;
  showWalk();
  let model;
  try {
    model = await ready;
  } catch (err) {
    $('walk-status').textContent = `Cannot classify: ${oneLine(err)}`;
    state.queue.length = 0;
    finishWalk();
    return;
  }
  while (state.queue.length && !state.stop) {
    const file = state.queue.shift();
    await walkOne(model, file);
    showWalk();
  }
  state.queue.length = 0;
  finishWalk();
}

function finishWalk() {
  state.walking = false;
  $('stop').hidden = true;
  showWalk();
}

function photoName(file) {
  return file.webkitRelativePath || file.name || 'photo';
}

async function walkOne(model, file) {
  const name = photoName(file);
  const crops = state.crops;
  const key = [name, file.size, file.lastModified, crops, model.sha256 || ''].join('|');
  if (await state.store.has(key)) {
    state.walk.skipped += 1;
    return;
  }
  const record = {
    name, size: file.size, type: file.type || '', lastModified: file.lastModified, key,
    model: model.sha256 || '', crops, at: Date.now(), thumb: null, error: null, predictions: null,
    elapsed_ms: null, network_ms: null,
  };
  const thumb = thumbnail(file).catch(() => null); // decoded by the browser while the worker classifies
  try {
    const result = await api.classify(model, file, { top: 5, crops });
    record.predictions = result.predictions;
    record.elapsed_ms = result.elapsed_ms;
    record.network_ms = result.network_ms;
    record.thumb = await thumb;
  } catch (err) {
    record.error = photoError(file, name, err);
  }
  const stored = await state.store.add(record);
  state.records.push(stored);
  if (stored.error) state.walk.errors += 1;
  state.walk.done += 1;
  if (!marks.firstResult) marks.firstResult = performance.now();
  addCard(stored, true);
  applySearch();
}

function oneLine(err) {
  const text = err && err.message ? err.message : String(err);
  return text.split('\n')[0];
}

/** One line naming the photo and the problem; HEIC gets the reason and what to do instead. */
function photoError(file, name, err) {
  if (HEIC.test(file.name) || /hei[cf]/i.test(file.type)) {
    return `${name}: this browser cannot decode HEIC photos; export them as JPEG (on an iPhone: Settings › Camera › Formats › Most Compatible), or open this page in Safari`;
  }
  const text = oneLine(err);
  return text.includes(file.name) ? text : `${name}: ${text}`;
}

/** A small JPEG of the photo for the list (decoded at reduced size; the photo itself is not stored). */
async function thumbnail(file) {
  const size = await imageSize(file);
  if (!size) return null;
  const scale = Math.min(1, THUMB_SIDE / Math.max(size.width, size.height));
  const width = Math.max(1, Math.round(size.width * scale));
  const height = Math.max(1, Math.round(size.height * scale));
  const bitmap = await createImageBitmap(file, {
    resizeWidth: width, resizeHeight: height, resizeQuality: 'medium', imageOrientation: 'from-image',
  });
  try {
    if (typeof OffscreenCanvas !== 'undefined') {
      const canvas = new OffscreenCanvas(width, height);
      canvas.getContext('2d').drawImage(bitmap, 0, 0);
      return await canvas.convertToBlob({ type: 'image/jpeg', quality: 0.8 });
    }
    const canvas = document.createElement('canvas');
    canvas.width = width;
    canvas.height = height;
    canvas.getContext('2d').drawImage(bitmap, 0, 0);
    return await new Promise((resolve) => canvas.toBlob(resolve, 'image/jpeg', 0.8));
  } finally {
    bitmap.close();
  }
}

/** The upright size from the browser's header parse (an <img> load event does not decode the pixels). */
function imageSize(file) {
  return new Promise((resolve) => {
    const url = URL.createObjectURL(file);
    const img = new Image();
    img.onload = () => {
      URL.revokeObjectURL(url);
      resolve(img.naturalWidth && img.naturalHeight ? { width: img.naturalWidth, height: img.naturalHeight } : null);
    };
    img.onerror = () => {
      URL.revokeObjectURL(url);
      resolve(null);
    };
    img.src = url;
  });
}

function showWalk() {
  const { done, errors, skipped, started } = state.walk;
  const total = state.records.length;
  const status = $('walk-status');
  if (!total && !state.walking) {
    status.textContent = 'No photos walked yet.';
    return;
  }
  const parts = [`${total} photo${total === 1 ? '' : 's'} walked`];
  if (started && done) {
    const seconds = (performance.now() - started) / 1000;
    parts.push(`${(done / seconds).toFixed(1)} photos/s`);
  }
  if (state.walking) parts.push(`${state.queue.length} to go`);
  if (errors) parts.push(`${errors} could not be read`);
  if (skipped) parts.push(`${skipped} already walked`);
  status.textContent = parts.join(' · ');
}

// ------------------------------------------------------------------ cards

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function pct(p) {
  return `${(p * 100).toFixed(1)}%`;
}

function ms(v) {
  return Number.isFinite(v) ? `${v < 10 ? v.toFixed(1) : Math.round(v)} ms` : '—';
}

function addCard(record, newest) {
  const card = el('article', record.error ? 'photo failed' : 'photo');
  card.dataset.id = String(record.id);
  if (record.error) {
    card.append(el('p', 'error', record.error));
  } else {
    const figure = el('div', 'thumb');
    if (record.thumb) {
      const img = el('img');
      const url = URL.createObjectURL(record.thumb);
      state.urls.set(record.id, url);
      img.src = url;
      img.alt = '';
      img.decoding = 'async';
      img.loading = 'lazy';
      figure.append(img);
    }
    const body = el('div', 'body');
    body.append(el('h2', 'name', record.name));
    const other = state.model && record.model && state.model.sha256 && record.model !== state.model.sha256;
    const timing = `network ${ms(record.network_ms)} · total ${ms(record.elapsed_ms)} · ${record.crops === 10 ? '10 crops' : '1 crop'}`;
    body.append(el('p', 'timing', other ? `${timing} · another model` : timing));
    const list = el('ol', 'top5');
    for (const p of record.predictions || []) {
      const item = el('li', 'prediction');
      item.dataset.index = String(p.index);
      const line = el('div', 'line');
      line.append(el('span', 'prob', pct(p.probability)), el('span', 'label', p.label));
      const bar = el('span', 'bar');
      bar.style.width = `${Math.max(0, Math.min(100, p.probability * 100)).toFixed(1)}%`;
      item.append(line, bar, el('p', 'hierarchy', (p.hierarchy || []).join(' › ')));
      list.append(item);
    }
    body.append(list);
    card.append(figure, body);
  }
  state.cards.set(record.id, card);
  const box = $('photos');
  if (newest) box.prepend(card);
  else box.append(card);
}

function renderAll() {
  for (const url of state.urls.values()) URL.revokeObjectURL(url);
  state.urls.clear();
  state.cards.clear();
  $('photos').replaceChildren();
  for (const record of [...state.records].reverse()) addCard(record, false);
  applySearch();
}

// ------------------------------------------------------------------ search

let searchTimer = 0;

function scheduleSearch() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(applySearch, 120);
}

async function applySearch() {
  const query = $('search').value;
  const status = $('search-status');
  const box = $('photos');
  if (!query.trim()) {
    box.classList.remove('filtered');
    for (const card of state.cards.values()) {
      card.hidden = false;
      card.style.order = '';
      card.querySelectorAll('.prediction.match').forEach((li) => li.classList.remove('match'));
    }
    status.textContent = '';
    return;
  }
  let table;
  try {
    table = await concepts;
    await ready;
  } catch (err) {
    status.textContent = `Search is unavailable: ${oneLine(err)}`;
    return;
  }
  if ($('search').value !== query) return; // typed on meanwhile
  const labels = state.labels ?? labelRecords(await ready);
  const resolved = resolve(table, labels, query, state.closures ?? undefined);
  if (!resolved.classes.size) {
    const close = suggestions(table, query);
    status.textContent = `No class or WordNet concept called “${query.trim()}”${close.length ? ` (did you mean: ${close.join(', ')}?)` : ''}.`;
    box.classList.add('filtered');
    for (const card of state.cards.values()) card.hidden = true;
    return;
  }
  const hits = rank(state.records, resolved, DEFAULT_MIN_PROB);
  const order = new Map(hits.map((hit, i) => [hit.record.id, i]));
  box.classList.add('filtered');
  for (const [id, card] of state.cards) {
    const position = order.get(id);
    card.hidden = position === undefined;
    card.style.order = position === undefined ? '' : String(position);
    card.querySelectorAll('.prediction').forEach((li) => {
      li.classList.toggle('match', position !== undefined && resolved.classes.has(Number(li.dataset.index)));
    });
  }
  const named = resolved.concepts.map((c) => `${c.name} (${c.classes} class${c.classes === 1 ? '' : 'es'})`).join(', ');
  const walked = state.records.filter((r) => r.predictions).length;
  status.textContent = `${named}: ${hits.length} of ${walked} photo${walked === 1 ? '' : 's'}`;
}

// ------------------------------------------------------------------ offline and updates

async function registerServiceWorker() {
  const status = $('offline-status');
  if (!('serviceWorker' in navigator) || !window.isSecureContext) {
    status.textContent = 'Offline use needs https or localhost; the app still classifies here while online.';
    return;
  }
  const hadController = Boolean(navigator.serviceWorker.controller);
  navigator.serviceWorker.addEventListener('controllerchange', () => {
    if (hadController) $('update').hidden = false;
  });
  if (!navigator.onLine) {
    if (hadController) status.textContent = 'Offline: the app runs from this device’s cache.';
    return;
  }
  let version;
  try {
    const response = await fetch('version.json', { cache: 'no-store' });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    version = await response.json();
  } catch {
    // Offline (or the server is gone): the installed worker keeps serving the cached app.
    if (hadController) status.textContent = 'Offline: the app runs from this device’s cache.';
    return;
  }
  if (!version || typeof version.cache !== 'string' || !/^[\w.-]+$/.test(version.cache)) return;
  try {
    await navigator.serviceWorker.register(`sw.js?cache=${encodeURIComponent(version.cache)}`, { scope: './' });
    await navigator.serviceWorker.ready;
    status.textContent = 'Works offline: the app and the model are saved on this device.';
  } catch (err) {
    status.textContent = `Offline use is unavailable: ${oneLine(err)}`;
  }
}

// ------------------------------------------------------------------ start

async function start() {
  const folderInput = $('pick-folder');
  if ('webkitdirectory' in folderInput) $('folder-button').hidden = false;
  if (window.matchMedia && window.matchMedia('(pointer: coarse)').matches) $('camera-button').hidden = false;

  $('pick-files').addEventListener('change', (e) => {
    enqueue(e.target.files);
    e.target.value = '';
  });
  folderInput.addEventListener('change', (e) => {
    enqueue(e.target.files, { fromFolder: true });
    e.target.value = '';
  });
  $('pick-camera').addEventListener('change', (e) => {
    enqueue(e.target.files);
    e.target.value = '';
  });
  $('ten-crops').addEventListener('change', (e) => {
    state.crops = e.target.checked ? 10 : 1;
  });
  $('stop').addEventListener('click', () => {
    state.stop = true;
  });
  $('search').addEventListener('input', scheduleSearch);
  $('reload').addEventListener('click', () => location.reload());
  $('clear').addEventListener('click', async () => {
    state.stop = true;
    state.queue.length = 0;
    await state.store.clear();
    state.records = [];
    renderAll();
    showWalk();
  });

  state.store = await Store.open();
  state.records = await state.store.all();
  renderAll();
  showWalk();
  if (!state.store.persistent) {
    $('offline-status').textContent = 'This browser keeps no results across reloads here (private window?).';
  }

  ready.then(
    async (model) => {
      state.model = model;
      state.labels = labelRecords(model);
      marks.ready = performance.now();
      $('model-status').textContent = describeModel(model);
      try {
        state.closures = (await concepts).closures(state.labels);
      } catch {
        state.closures = null;
      }
      renderAll();
    },
    (err) => {
      $('model-status').textContent = `The model cannot be loaded: ${oneLine(err)}`;
      $('model-status').classList.add('error');
    },
  );
  // After the model has loaded: the worker's install then finds every file in the HTTP cache.
  ready.finally(registerServiceWorker).catch(() => {});
}

if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
else start();
