// Rebuilds everything the on-device app loads into src/klaus/web/ondevice/ (shipped inside the Python package):
//   cd webapp && npm ci && node build.mjs        (or: npm run build)
// Deterministic: the same lock file gives the same bytes (esbuild, node's zlib brotli/gzip, sorted listings).

// ---- The two lists other app files are added to -------------------------------------------------------------------
// Files copied as they are, paths relative to webapp/src/ (the same relative path in the output folder).
export const STATIC_FILES = [
  'index.html', 'app.js', 'concepts.js', 'concepts.json', 'store.js', 'style.css', 'sw.js', 'manifest.webmanifest',
  'icons/icon-192.png', 'icons/icon-512.png', 'icons/icon-maskable-512.png', 'icons/apple-touch-icon.png',
];
// ES modules bundled by esbuild, paths relative to webapp/src/; each becomes one file of the same name in the output.
export const ENTRIES = ['klaus.js', 'worker.js'];
// --------------------------------------------------------------------------------------------------------------------

import { createHash } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { brotliCompressSync, constants, gzipSync } from 'node:zlib';

import * as esbuild from 'esbuild';

const HERE = dirname(fileURLToPath(import.meta.url));
const SRC = join(HERE, 'src');
const OUT = join(HERE, '..', 'src', 'klaus', 'web', 'ondevice');
const ORT_DIST = join(HERE, 'node_modules', 'onnxruntime-web', 'dist');
// The one ONNX Runtime Web variant shipped: wasm with SIMD and threads, no WebGPU/JSEP/JSPI/asyncify.
export const ORT_FILES = ['ort-wasm-simd-threaded.mjs', 'ort-wasm-simd-threaded.wasm'];
// Assets that get a precompressed .br and .gz beside them (already-compressed images do not).
const COMPRESSIBLE = /\.(js|mjs|wasm|html|css|json|webmanifest|txt|svg|map)$/;
// Browsers the bundles target: module workers, BigInt, DecompressionStream.
const TARGET = ['chrome102', 'firefox113', 'safari16.4'];
// License texts for packages whose npm tarball carries none (the text their repositories publish).
const LICENSE_DIR = join(HERE, 'licenses');

function sha256(bytes) {
  return createHash('sha256').update(bytes).digest('hex');
}

function walk(dir) {
  const out = [];
  for (const name of readdirSync(dir).sort()) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) out.push(...walk(path));
    else out.push(path);
  }
  return out;
}

function fail(message) {
  console.error(`build.mjs: error: ${message}`);
  process.exit(1);
}

async function bundle(entry) {
  const source = join(SRC, entry);
  if (!existsSync(source)) fail(`${relative(HERE, source)}: listed in ENTRIES but missing`);
  const result = await esbuild.build({
    entryPoints: [source],
    outfile: join(OUT, entry),
    bundle: true,
    format: 'esm',
    minify: true,
    target: TARGET,
    // ONNX Runtime Web's "extern wasm" build: it loads ort-wasm-simd-threaded.mjs/.wasm from env.wasm.wasmPaths
    // (the app's own files) instead of carrying the glue code inline.
    conditions: ['onnxruntime-web-use-extern-wasm'],
    legalComments: 'none', // every shipped package's license is in THIRD_PARTY_LICENSES.txt
    charset: 'utf8',
    logLevel: 'warning',
    metafile: true,
  });
  return Object.keys(result.metafile.inputs);
}

/** The lock file's packages: {name: {version, dev, license, dir}}. */
function lockedPackages() {
  const lock = JSON.parse(readFileSync(join(HERE, 'package-lock.json'), 'utf8'));
  const out = {};
  for (const [path, info] of Object.entries(lock.packages)) {
    if (!path) continue;
    const name = path.replace(/^.*node_modules\//, '');
    out[name] = { version: info.version, dev: Boolean(info.dev), license: info.license || '', dir: join(HERE, path) };
  }
  return out;
}

/** One text with the license of every package shipped: all non-dev packages of the lock file, which is
 * ONNX Runtime Web's own dependency tree and @noble/hashes (the bundles contain code from a subset of these). */
function licenses(packages) {
  const parts = [
    'Third-party software shipped in the Klaus on-device app (src/klaus/web/ondevice/).',
    'Every runtime package of webapp/package-lock.json, with its license text.',
    'ONNX Runtime Web\'s wasm binary also links third-party C++ code (its ThirdPartyNotices.txt in',
    'https://github.com/microsoft/onnxruntime lists it); the npm package does not carry that file.',
    '',
  ];
  for (const name of Object.keys(packages).sort()) {
    const p = packages[name];
    if (p.dev) continue;
    if (typesOnly(name)) continue;
    const candidates = existsSync(p.dir) ? readdirSync(p.dir).filter((f) => /^(licen[sc]e|copying|notice)/i.test(f)).sort() : [];
    const local = join(LICENSE_DIR, `${name.replace('/', '__')}.txt`);
    let text;
    if (candidates.length) text = candidates.map((f) => readFileSync(join(p.dir, f), 'utf8').trim()).join('\n\n');
    else if (existsSync(local)) text = readFileSync(local, 'utf8').trim();
    else fail(`${name}@${p.version}: no license file in node_modules and none in webapp/licenses/`);
    parts.push('='.repeat(100), `${name} ${p.version} (${p.license})`, '='.repeat(100), text, '');
  }
  return parts.join('\n');
}

/** TypeScript declaration packages (protobufjs depends on them): never bundled, never shipped. */
function typesOnly(name) {
  return name.startsWith('@types/') || name === 'undici-types';
}

function compress(path) {
  const data = readFileSync(path);
  const br = brotliCompressSync(data, {
    params: {
      [constants.BROTLI_PARAM_QUALITY]: 11,
      [constants.BROTLI_PARAM_LGWIN]: 24,
      [constants.BROTLI_PARAM_SIZE_HINT]: data.length,
    },
  });
  writeFileSync(`${path}.br`, br);
  writeFileSync(`${path}.gz`, gzipSync(data, { level: 9 })); // node writes mtime 0: same bytes every time
}

async function main() {
  const packages = lockedPackages();
  for (const name of ['onnxruntime-web', 'esbuild', '@noble/hashes']) {
    const installed = JSON.parse(readFileSync(join(HERE, 'node_modules', name, 'package.json'), 'utf8')).version;
    if (installed !== packages[name].version) fail(`node_modules has ${name} ${installed}, the lock file ${packages[name].version}; run npm ci`);
  }
  rmSync(OUT, { recursive: true, force: true });
  mkdirSync(OUT, { recursive: true });
  const bundled = new Set();
  for (const entry of ENTRIES) for (const input of await bundle(entry)) bundled.add(input);
  for (const file of STATIC_FILES) {
    const source = join(SRC, file);
    if (!existsSync(source)) fail(`${relative(HERE, source)}: listed in STATIC_FILES but missing`);
    mkdirSync(dirname(join(OUT, file)), { recursive: true });
    copyFileSync(source, join(OUT, file));
  }
  for (const file of ORT_FILES) copyFileSync(join(ORT_DIST, file), join(OUT, file));
  writeFileSync(join(OUT, 'THIRD_PARTY_LICENSES.txt'), licenses(packages));
  const originals = walk(OUT);
  for (const path of originals) if (COMPRESSIBLE.test(path)) compress(path);

  const files = {};
  for (const path of walk(OUT)) {
    const data = readFileSync(path);
    files[relative(OUT, path).split('\\').join('/')] = { bytes: data.length, sha256: sha256(data) };
  }
  const npm = {};
  for (const name of Object.keys(packages).sort()) if (!packages[name].dev && !typesOnly(name)) npm[name] = packages[name].version;
  npm.esbuild = packages.esbuild.version;
  const manifest = {
    format: 'klaus-ondevice-assets',
    version: 1,
    // One digest of the whole file list: a cache name that changes whenever any shipped byte does.
    build: sha256(JSON.stringify(files)).slice(0, 16),
    ort_variant: 'wasm-simd-threaded',
    npm,
    bundled_modules: [...bundled].filter((p) => p.includes('node_modules/')).map((p) => p.replace(/^.*node_modules\//, '')).sort(),
    files,
  };
  writeFileSync(join(OUT, 'assets.json'), `${JSON.stringify(manifest, null, 1)}\n`);
  const total = Object.entries(files).filter(([p]) => !/\.(br|gz)$/.test(p)).reduce((s, [, f]) => s + f.bytes, 0);
  console.log(`build.mjs: ${Object.keys(files).length} files (${total} bytes before precompression) in ${relative(process.cwd(), OUT)}`);
}

await main();
