// The service worker: after the first visit the app, ONNX Runtime Web, the model container and the
// concept data load from this device's cache, so the app opens and classifies with the network off.
//
// The page registers `sw.js?cache=NAME`, NAME taken from version.json: klaus-<app version>-<assets
// build digest>-<model sha256 prefix>. A new app, asset build or model gives a new NAME, hence a new
// worker script URL: the browser installs it, it fills a fresh cache from version.json's file list,
// takes over, and deletes every older klaus-* cache. Responses are served cache first; version.json
// itself always goes to the network (offline, the page keeps the installed worker).
//
// Every response it serves carries COOP/COEP (and CORP), so a static host that sends no such headers
// still gives a cross-origin isolated page (wasm threads) from the second load on.

const CACHE = new URL(self.location.href).searchParams.get('cache') || '';
const VALID = /^klaus-[\w.-]+$/;
const SCOPE = new URL(self.registration.scope);

self.addEventListener('install', (event) => {
  event.waitUntil(install());
});

self.addEventListener('activate', (event) => {
  event.waitUntil(activate());
});

self.addEventListener('fetch', (event) => {
  const request = event.request;
  if (request.method !== 'GET' || !VALID.test(CACHE)) return;
  const url = new URL(request.url);
  if (url.origin !== SCOPE.origin || !url.pathname.startsWith(SCOPE.pathname)) return;
  if (url.pathname === `${SCOPE.pathname}version.json`) return; // always the network's answer
  event.respondWith(answer(request));
});

async function install() {
  if (!VALID.test(CACHE)) throw new Error(`sw.js: bad cache name ${JSON.stringify(CACHE)}`);
  const response = await fetch(new URL('version.json', SCOPE), { cache: 'no-store' });
  if (!response.ok) throw new Error(`version.json: HTTP ${response.status}`);
  const version = await response.json();
  if (!version || version.cache !== CACHE) throw new Error('version.json changed while installing; the next visit retries');
  if (!Array.isArray(version.files) || !version.files.every((f) => typeof f === 'string' && !f.includes('..'))) {
    throw new Error('version.json: bad file list');
  }
  const cache = await caches.open(CACHE);
  try {
    // 'no-cache': revalidate with the server (ETag), so files the page has just loaded cost a 304, not a second download.
    await cache.addAll(version.files.map((file) => new Request(new URL(file, SCOPE), { cache: 'no-cache' })));
  } catch (err) {
    await caches.delete(CACHE); // half a cache would serve a broken app offline
    throw err;
  }
  await self.skipWaiting();
}

async function activate() {
  for (const name of await caches.keys()) {
    if (name.startsWith('klaus-') && name !== CACHE) await caches.delete(name);
  }
  await self.clients.claim();
}

async function answer(request) {
  const cache = await caches.open(CACHE);
  const key = request.mode === 'navigate' ? new URL('./', SCOPE).href : request;
  const hit = await cache.match(key, { ignoreSearch: true, ignoreVary: true });
  if (hit) return isolated(hit);
  try {
    return isolated(await fetch(request));
  } catch (err) {
    if (request.mode === 'navigate') {
      const page = await cache.match(new URL('index.html', SCOPE).href, { ignoreVary: true });
      if (page) return isolated(page);
    }
    throw err;
  }
}

/** The response with the cross-origin isolation headers added where missing (same-origin responses only). */
function isolated(response) {
  if (response.type !== 'basic' && response.type !== 'default') return response;
  const headers = new Headers(response.headers);
  const wanted = {
    'Cross-Origin-Opener-Policy': 'same-origin',
    'Cross-Origin-Embedder-Policy': 'require-corp',
    'Cross-Origin-Resource-Policy': 'same-origin',
  };
  let changed = false;
  for (const [name, value] of Object.entries(wanted)) {
    if (!headers.has(name)) {
      headers.set(name, value);
      changed = true;
    }
  }
  if (!changed) return response;
  return new Response(response.body, { status: response.status, statusText: response.statusText, headers });
}
