// The web container reader (docs/format.md, "Web container"): every field is checked before it is used, as
// klaus.format checks a .klaus file, then the weights are decoded bit-identically to the Python decoder and put
// back into the ONNX skeleton. Any problem is one ModelError whose message names the file and the problem.
import { sha256 as nobleSha256 } from '@noble/hashes/sha2.js';

export const MAGIC = 'KLAUSWEB';
export const VERSION = 1;
export const MAX_HEADER_BYTES = 16 << 20;
export const MAX_FILE_BYTES = 2 ** 31;
export const MAX_DECOMPRESSED_BYTES = 64 << 20;
const MAX_TENSOR_ELEMENTS = 2n ** 31n;
const MAX_DEPTH = 64; // label hierarchy
const MAX_JSON_DEPTH = 900; // Python's json.loads fails near its recursion limit (1000)
const MAX_SUBGRAPH_DEPTH = 16;
const MIN_OPSET = 7n;
const MAX_OPSET = 23n;
const ALLOWED_DOMAINS = ['', 'ai.onnx'];
const CONTENT_KEY = 'content_sha256';
const REQUIRED_META = [CONTENT_KEY, 'format', 'format_version', 'model_name', 'source', 'license', 'creator',
  'klaus_version', 'preprocess', 'output', 'recipe'];
const READ_VERSIONS = ['1', '2']; // the .klaus version the container was made from
const OUTPUT_KINDS = ['logits', 'probabilities'];
const CODECS = ['raw-f32', 'raw-f16', 'palette-png'];
const RAW_ITEMSIZE = { 'raw-f32': 4, 'raw-f16': 2 };
const HEADER_KEYS = ['graph', 'labelset', 'meta', 'tensors'];
const TENSOR_KEYS = ['bits', 'codec', 'dims', 'dtype', 'name', 'palette', 'payload', 'scale_axis', 'scales', 'sha256'];
// Python's re `^(n\d{8})?$`: \d is any Unicode decimal digit and `$` also matches before a final newline.
const WNID = /^(?:n\p{Nd}{8})?\n?$/u;
const HEX64 = /^[0-9a-f]{64}$/;

/** A container that breaks a rule; the message is one line naming the file. */
export class ModelError extends Error {
  constructor(message) {
    super(message);
    this.name = 'ModelError';
  }
}

// ------------------------------------------------------------------------------------------------ JSON as Python

class JsonSyntax extends Error {}

/** JSON parsed as Python's json.loads parses it: integers (no fraction or exponent) become BigInt, other numbers
 * Number (NaN, Infinity, -Infinity accepted), strings must not hold raw control characters, duplicate keys keep the
 * last value, objects have no prototype. Throws JsonSyntax. */
export function parsePyJson(text) {
  let i = 0;
  const n = text.length;
  const number = /-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?/y;
  const skip = () => {
    while (i < n) {
      const c = text.charCodeAt(i);
      if (c === 32 || c === 9 || c === 10 || c === 13) i++;
      else break;
    }
  };
  const string = () => {
    i++; // opening quote
    let out = '';
    let start = i;
    for (;;) {
      if (i >= n) throw new JsonSyntax('unterminated string');
      const c = text.charCodeAt(i);
      if (c === 34) {
        out += text.slice(start, i);
        i++;
        return out;
      }
      if (c < 0x20) throw new JsonSyntax('invalid control character in a string');
      if (c === 92) {
        out += text.slice(start, i);
        const e = text[i + 1];
        const simple = { '"': '"', '\\': '\\', '/': '/', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t' }[e];
        if (simple !== undefined) {
          out += simple;
          i += 2;
        } else if (e === 'u') {
          const hex = text.slice(i + 2, i + 6);
          if (!/^[0-9a-fA-F]{4}$/.test(hex)) throw new JsonSyntax('invalid \\uXXXX escape');
          out += String.fromCharCode(parseInt(hex, 16)); // UTF-16 pairs join by themselves, lone halves stay
          i += 6;
        } else {
          throw new JsonSyntax('invalid escape');
        }
        start = i;
        continue;
      }
      i++;
    }
  };
  const value = (depth) => {
    if (depth > MAX_JSON_DEPTH) throw new JsonSyntax('nested too deeply');
    const c = text[i];
    if (c === '"') return string();
    if (c === '{') {
      i++;
      const obj = Object.create(null);
      skip();
      if (text[i] === '}') {
        i++;
        return obj;
      }
      for (;;) {
        if (text[i] !== '"') throw new JsonSyntax('expected a property name');
        const key = string();
        skip();
        if (text[i] !== ':') throw new JsonSyntax("expected ':'");
        i++;
        skip();
        obj[key] = value(depth + 1);
        skip();
        if (text[i] === '}') {
          i++;
          return obj;
        }
        if (text[i] !== ',') throw new JsonSyntax("expected ',' or '}'");
        i++;
        skip();
      }
    }
    if (c === '[') {
      i++;
      const arr = [];
      skip();
      if (text[i] === ']') {
        i++;
        return arr;
      }
      for (;;) {
        arr.push(value(depth + 1));
        skip();
        if (text[i] === ']') {
          i++;
          return arr;
        }
        if (text[i] !== ',') throw new JsonSyntax("expected ',' or ']'");
        i++;
        skip();
      }
    }
    for (const [word, result] of [['null', null], ['true', true], ['false', false]]) {
      if (text.startsWith(word, i)) {
        i += word.length;
        return result;
      }
    }
    number.lastIndex = i;
    const m = number.exec(text);
    if (m) {
      i += m[0].length;
      if (m[1] === undefined && m[2] === undefined) {
        if (m[0].replace('-', '').length > 4300) throw new JsonSyntax('integer too long'); // Python's digit limit
        return BigInt(m[0]);
      }
      return Number(m[0]);
    }
    for (const [word, result] of [['NaN', NaN], ['Infinity', Infinity], ['-Infinity', -Infinity]]) {
      if (text.startsWith(word, i)) {
        i += word.length;
        return result;
      }
    }
    throw new JsonSyntax('expecting a value');
  };
  skip();
  const result = value(0);
  skip();
  if (i !== n) throw new JsonSyntax('extra data');
  return result;
}

function compareCodePoints(a, b) {
  const ia = a[Symbol.iterator]();
  const ib = b[Symbol.iterator]();
  for (;;) {
    const x = ia.next();
    const y = ib.next();
    if (x.done || y.done) return (x.done ? 0 : 1) - (y.done ? 0 : 1);
    const d = x.value.codePointAt(0) - y.value.codePointAt(0);
    if (d) return d;
  }
}

const ESCAPES = { '"': '\\"', '\\': '\\\\', '\b': '\\b', '\f': '\\f', '\n': '\\n', '\r': '\\r', '\t': '\\t' };

function quote(s) {
  // eslint-disable-next-line no-control-regex
  return `"${s.replace(/["\\\u0000-\u001f]/g, (c) => ESCAPES[c] || `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`)}"`;
}

/** Python's json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False) for the values a valid
 * container holds: strings, BigInt integers, booleans, null, lists and objects. Any other number makes the
 * input non-canonical (a valid file never holds one where this is used), so it throws JsonSyntax. */
export function canonicalJson(value) {
  if (value === null) return 'null';
  if (value === true) return 'true';
  if (value === false) return 'false';
  if (typeof value === 'bigint') return value.toString();
  if (typeof value === 'string') return quote(value);
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (typeof value === 'object') {
    const keys = Object.keys(value).sort(compareCodePoints);
    return `{${keys.map((k) => `${quote(k)}:${canonicalJson(value[k])}`).join(',')}}`;
  }
  throw new JsonSyntax('a non-integer number');
}

const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
/** Whether ``v`` is an object whose keys are exactly ``keys`` (sorted). */
const hasKeys = (v, keys) => {
  if (!isObject(v)) return false;
  const own = Object.keys(v).sort();
  return own.length === keys.length && own.every((k, i) => k === keys[i]);
};
const isInt = (v) => typeof v === 'bigint';

/** The type name Python would report for a parsed JSON value. */
function pyType(v) {
  if (v === null) return 'NoneType';
  if (typeof v === 'boolean') return 'bool';
  if (typeof v === 'bigint') return 'int';
  if (typeof v === 'number') return 'float';
  if (typeof v === 'string') return 'str';
  return Array.isArray(v) ? 'list' : 'dict';
}

/** Python's repr of a parsed JSON value, shortened as klaus.preprocess._show does. */
function show(v) {
  let text;
  if (typeof v === 'string') text = `'${v}'`;
  else if (typeof v === 'bigint') text = v.toString();
  else if (typeof v === 'number') text = Number.isFinite(v) ? (Number.isInteger(v) ? v.toFixed(1) : String(v)) : (Number.isNaN(v) ? 'nan' : (v > 0 ? 'inf' : '-inf'));
  else if (typeof v === 'boolean') text = v ? 'True' : 'False';
  else if (v === null) text = 'None';
  else if (Array.isArray(v)) text = `[${v.map(show).join(', ')}]`;
  else text = `{${Object.keys(v).map((k) => `'${k}': ${show(v[k])}`).join(', ')}}`;
  return text.length <= 40 ? text : `${text.slice(0, 37)}...`;
}

// ------------------------------------------------------------------------------------------------ bytes

/** SHA-256 as lowercase hex of one or more byte arrays taken as one; the browser's own digest where the page is a
 * secure context, @noble/hashes elsewhere (plain-http LAN pages have no crypto.subtle). */
export async function sha256Hex(...parts) {
  let digest;
  const subtle = globalThis.crypto && globalThis.crypto.subtle;
  if (subtle) {
    const data = parts.length === 1 ? parts[0] : concat(parts);
    digest = new Uint8Array(await subtle.digest('SHA-256', data));
  } else {
    const h = nobleSha256.create();
    for (const p of parts) h.update(p);
    digest = h.digest();
  }
  let hex = '';
  for (const b of digest) hex += b.toString(16).padStart(2, '0');
  return hex;
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((s, p) => s + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/** Inflate ``data`` ('gzip' or 'deflate' = zlib) to exactly ``expected`` bytes. Memory grows with what the stream
 * really gives (a small stream that only declares a large size costs little), and the stream is cancelled as soon
 * as it gives more than ``expected``. Throws Error(problem) on a corrupt, short or long stream. */
export async function inflateExactly(data, format, expected) {
  let out = new Uint8Array(Math.min(expected, Math.max(4 * data.length, 1 << 16)));
  let got = 0;
  const stream = new Blob([data]).stream().pipeThrough(new DecompressionStream(format));
  const reader = stream.getReader();
  try {
    for (;;) {
      let step;
      try {
        step = await reader.read();
      } catch (err) {
        throw new Error(`corrupt data (${firstLine(err)})`);
      }
      if (step.done) break;
      const chunk = step.value;
      if (got + chunk.length > expected) throw new Error(`decompresses to more than ${expected} bytes`);
      if (got + chunk.length > out.length) {
        const grown = new Uint8Array(Math.min(expected, Math.max(2 * out.length, got + chunk.length)));
        grown.set(out.subarray(0, got));
        out = grown;
      }
      out.set(chunk, got);
      got += chunk.length;
    }
  } finally {
    reader.cancel().catch(() => {});
  }
  if (got !== expected) throw new Error(`decompresses to ${got} bytes, expected ${expected}`);
  return out.length === expected ? out : out.slice(0, expected);
}

function firstLine(err) {
  const text = String((err && err.message) || err || 'error').trim().split('\n')[0];
  return text || 'error';
}

// IEEE half -> double, exact (every finite half is a float32 and a double).
const HALF = new Float64Array(65536);
for (let h = 0; h < 65536; h++) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) HALF[h] = sign * frac * 2 ** -24;
  else if (exp === 31) HALF[h] = frac ? NaN : sign * Infinity;
  else HALF[h] = sign * (1024 + frac) * 2 ** (exp - 25);
}

function halves(bytes) {
  const out = new Float32Array(bytes.length >> 1);
  for (let i = 0, j = 0; i < out.length; i++, j += 2) out[i] = HALF[bytes[j] | (bytes[j + 1] << 8)];
  return out;
}

const allFinite = (values) => values.every(Number.isFinite);

// ------------------------------------------------------------------------------------------------ PNG index maps

const PNG_SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
const CRC_TABLE = new Uint32Array(256);
for (let n = 0; n < 256; n++) {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  CRC_TABLE[n] = c >>> 0;
}

function crc32(bytes, start, end) {
  let c = 0xffffffff;
  for (let i = start; i < end; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

const u32be = (b, at) => ((b[at] << 24) | (b[at + 1] << 16) | (b[at + 2] << 8) | b[at + 3]) >>> 0;
const chunkName = (b, at) => String.fromCharCode(b[at], b[at + 1], b[at + 2], b[at + 3]);
const pyBytes = (name) => `b'${name.replace(/[^\x20-\x7e]|'|\\/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`)}'`;

/** Structure and CRCs of a plain grayscale index map, as codecs._walk_png checks them. */
function walkPng(data) {
  if (data.length < 8 || PNG_SIGNATURE.some((b, i) => data[i] !== b)) throw new Error('index map is not a PNG (bad signature)');
  let pos = 8;
  let header = null;
  let seenEnd = false;
  const idat = [];
  while (pos < data.length) {
    if (pos + 12 > data.length) throw new Error('index map PNG is truncated');
    const length = u32be(data, pos);
    const kind = chunkName(data, pos + 4);
    const end = pos + 12 + length;
    if (length > data.length || end > data.length) throw new Error('index map PNG is truncated');
    if (crc32(data, pos + 4, pos + 8 + length) !== u32be(data, pos + 8 + length)) {
      throw new Error(`index map PNG chunk ${pyBytes(kind)} fails its CRC`);
    }
    if (header === null && kind !== 'IHDR') throw new Error('index map PNG does not start with IHDR');
    if (kind === 'IHDR') {
      if (header !== null || length !== 13) throw new Error('index map PNG has a malformed IHDR');
      const b = pos + 8;
      header = { width: u32be(data, b), height: u32be(data, b + 4), depth: data[b + 8], color: data[b + 9],
        compression: data[b + 10], filter: data[b + 11], interlace: data[b + 12] };
    } else if (kind === 'IDAT') {
      idat.push(data.subarray(pos + 8, pos + 8 + length));
    } else if (kind === 'IEND') {
      seenEnd = true;
      if (end !== data.length) throw new Error('index map PNG has data after IEND');
    } else if (!(data[pos + 4] >= 0x61 && data[pos + 4] <= 0x7a)) {
      throw new Error(`index map PNG has an unsupported critical chunk ${pyBytes(kind)}`);
    }
    pos = end;
  }
  if (header === null || !idat.length || !seenEnd) throw new Error('index map PNG is truncated (missing IHDR, IDAT or IEND)');
  const { depth, color, compression, filter, interlace } = header;
  if (color !== 0 || ![1, 2, 4, 8].includes(depth) || compression !== 0 || filter !== 0 || interlace !== 0) {
    throw new Error(`index map PNG must be 1/2/4/8-bit grayscale, not interlaced (got depth ${depth}, color type ${color})`);
  }
  return { ...header, idat: idat.length === 1 ? idat[0] : concat(idat) };
}

/** The index map of a rows x cols tensor, validated as codecs.decode_png_indices does; one byte per index. */
export async function decodePngIndices(data, rows, cols, bits) {
  return (await pngIndices(data, rows, cols, bits)).indices;
}

/** {indices, max}: the index map (one byte per index, checked against 2^bits) and its largest index. */
async function pngIndices(data, rows, cols, bits) {
  const png = walkPng(data);
  if (png.height !== rows || png.width !== cols) throw new Error(`index map is ${png.width}x${png.height}, expected ${cols}x${rows}`);
  if (png.depth < bits) throw new Error(`index map has bit depth ${png.depth}, too small for ${bits}-bit indices`);
  const stride = Math.ceil((cols * png.depth) / 8);
  const expected = rows * (1 + stride);
  let raw;
  try {
    raw = await inflateExactly(png.idat, 'deflate', expected);
  } catch (err) {
    throw new Error(`index map PNG data is corrupt or holds the wrong number of scanline bytes, expected ${expected} (${err.message})`);
  }
  const out = new Uint8Array(rows * cols);
  if (png.depth === 8) {
    // One byte per index: each scanline is unfiltered straight into its row of the output, the row above it
    // being the previous output row.
    const zero = new Uint8Array(stride);
    for (let y = 0; y < rows; y++) {
      const at = y * (1 + stride);
      unfilter(raw[at], raw, at + 1, out, y * cols, y ? out : zero, y ? (y - 1) * cols : 0, stride);
    }
  } else {
    let prev = new Uint8Array(stride);
    let line = new Uint8Array(stride);
    for (let y = 0; y < rows; y++) {
      const at = y * (1 + stride);
      unfilter(raw[at], raw, at + 1, line, 0, prev, 0, stride);
      unpack(line, png.depth, cols, out, y * cols);
      [prev, line] = [line, prev];
    }
  }
  const max = largest(out);
  if (max >= 1 << bits) throw new Error(`index map holds indices >= 2^${bits}`);
  return { indices: out, max };
}

function largest(values) {
  let max = 0;
  for (let i = 0; i < values.length; i++) if (values[i] > max) max = values[i];
  return max;
}

/** PNG's filter ``kind`` undone for one scanline of ``n`` bytes: src[s..] filtered, prev[p..] the line above
 * (zeros for the first), the result to line[d..]. Uint8Array stores take the sum modulo 256. */
function unfilter(kind, src, s, line, d, prev, p, n) {
  switch (kind) {
    case 0:
      line.set(src.subarray(s, s + n), d);
      break;
    case 1:
      line[d] = src[s];
      for (let i = 1; i < n; i++) line[d + i] = src[s + i] + line[d + i - 1];
      break;
    case 2:
      for (let i = 0; i < n; i++) line[d + i] = src[s + i] + prev[p + i];
      break;
    case 3:
      line[d] = src[s] + (prev[p] >> 1);
      for (let i = 1; i < n; i++) line[d + i] = src[s + i] + ((line[d + i - 1] + prev[p + i]) >> 1);
      break;
    case 4:
      // Paeth: with left a, up b, up-left c and p = a + b - c: |p - a| = |b - c|, |p - b| = |a - c|,
      // |p - c| = |(b - c) + (a - c)|. The first byte has a = c = 0, so it predicts b.
      line[d] = src[s] + prev[p];
      for (let i = 1; i < n; i++) {
        const a = line[d + i - 1];
        const b = prev[p + i];
        const c = prev[p + i - 1];
        const da = b - c;
        const db = a - c;
        const dc = da + db;
        const pa = da < 0 ? -da : da;
        const pb = db < 0 ? -db : db;
        const pc = dc < 0 ? -dc : dc;
        line[d + i] = src[s + i] + (pa <= pb && pa <= pc ? a : pb <= pc ? b : c);
      }
      break;
    default:
      throw new Error(`index map PNG cannot be decoded (unknown filter type ${kind})`);
  }
}

function unpack(line, depth, cols, out, at) {
  const mask = (1 << depth) - 1;
  let x = 0;
  for (let byte = 0; x < cols; byte++) {
    const v = line[byte];
    for (let shift = 8 - depth; shift >= 0 && x < cols; shift -= depth, x++) out[at + x] = (v >> shift) & mask;
  }
}

// ------------------------------------------------------------------------------------------------ ONNX wire format

class WireError extends Error {}

const VARINT = 0;
const FIXED64 = 1;
const LENGTH = 2;
const FIXED32 = 5;

function readVarint(data, pos) {
  let value = 0n;
  let shift = 0n;
  for (;;) {
    if (pos >= data.length) throw new WireError('truncated varint');
    const byte = data[pos++];
    value |= BigInt(byte & 0x7f) << shift;
    if (byte < 0x80) return [value, pos];
    shift += 7n;
    if (shift >= 70n) throw new WireError('varint longer than 10 bytes');
  }
}

/** [field number, wire type, value] of each field of one message, lazily (as onnxwire.fields): BigInt for varint
 * and fixed fields, a subarray for length-delimited ones. */
function* fields(data) {
  let pos = 0;
  while (pos < data.length) {
    let key;
    [key, pos] = readVarint(data, pos);
    const number = key >> 3n;
    const wire = Number(key & 7n);
    if (number === 0n) throw new WireError('field number 0');
    if (wire === VARINT) {
      let value;
      [value, pos] = readVarint(data, pos);
      yield [number, wire, value];
    } else if (wire === FIXED64 || wire === FIXED32) {
      const width = wire === FIXED64 ? 8 : 4;
      if (pos + width > data.length) throw new WireError('truncated fixed-width field');
      let value = 0n;
      for (let i = width - 1; i >= 0; i--) value = (value << 8n) | BigInt(data[pos + i]);
      yield [number, wire, value];
      pos += width;
    } else if (wire === LENGTH) {
      let length;
      [length, pos] = readVarint(data, pos);
      if (BigInt(pos) + length > BigInt(data.length)) throw new WireError('length-delimited field runs past the end');
      yield [number, wire, data.subarray(pos, pos + Number(length))];
      pos += Number(length);
    } else {
      throw new WireError(`unsupported wire type ${wire}`);
    }
  }
}

function wireText(value) {
  if (!(value instanceof Uint8Array)) throw new WireError('expected a string');
  try {
    return utf8.decode(value);
  } catch {
    throw new WireError('a string is not valid UTF-8');
  }
}

function signed64(v) {
  const x = v & ((1n << 64n) - 1n);
  return x >= 1n << 63n ? x - (1n << 64n) : x;
}

function* messages(data, number) {
  for (const [n, wire, value] of fields(data)) if (n === number && wire === LENGTH) yield value;
}

const pyRepr = (s) => `'${s}'`;

/** The checks klaus.onnxwire.read_skeleton makes: standard operator domains and opsets 7..23 only, no local
 * functions, no external tensor data anywhere (subgraphs included), at least one node. Returns the names the
 * nodes take as inputs (subgraphs included), which every stored tensor must be one of. */
export function checkSkeleton(blob, where) {
  const fail = (problem) => new ModelError(`${where}: ${problem}`);
  let nodes = 0;
  const consumed = new Set();
  const tensor = (data) => {
    for (const [n, , value] of fields(data)) {
      if (n === 8n) wireText(value);
      else if (n === 13n || (n === 14n && value === 1n)) throw fail('graph refers to external tensor data');
    }
  };
  const sparse = (data) => {
    for (const [n, , value] of fields(data)) if ((n === 1n || n === 2n) && value instanceof Uint8Array) tensor(value);
  };
  const valueInfo = (data) => {
    for (const [n, , value] of fields(data)) {
      if (n === 1n) wireText(value);
      else if (n === 2n && value instanceof Uint8Array) {
        for (const t of messages(value, 1n)) {
          for (const [tn, , tv] of fields(t)) {
            if (tn === 2n && tv instanceof Uint8Array) {
              for (const d of messages(tv, 1n)) {
                for (const [dn, , dv] of fields(d)) {
                  if (dn === 1n && typeof dv === 'bigint') break;
                  if (dn === 2n) {
                    wireText(dv);
                    break;
                  }
                }
              }
            }
          }
        }
      }
    }
  };
  const graph = (data, depth) => {
    if (depth > MAX_SUBGRAPH_DEPTH) throw fail(`graph nests subgraphs more than ${MAX_SUBGRAPH_DEPTH} deep`);
    for (const [n, wire, value] of fields(data)) {
      if (wire !== LENGTH) continue;
      if (n === 1n) node(value, depth);
      else if (n === 5n) tensor(value);
      else if (n === 15n) sparse(value);
      else if (n === 11n || n === 12n) valueInfo(value);
    }
  };
  const attribute = (data, depth) => {
    for (const [n, wire, value] of fields(data)) {
      if (wire !== LENGTH) continue;
      if (n === 6n || n === 11n) graph(value, depth + 1);
      else if (n === 5n || n === 10n) tensor(value);
      else if (n === 22n || n === 23n) sparse(value);
    }
  };
  const node = (data, depth) => {
    nodes += 1;
    let name = '';
    let op = '';
    let domain = '';
    for (const [n, wire, value] of fields(data)) {
      if (n === 1n) consumed.add(wireText(value));
      else if (n === 3n) name = wireText(value);
      else if (n === 4n) op = wireText(value);
      else if (n === 7n) domain = wireText(value);
      else if (n === 5n && wire === LENGTH) attribute(value, depth);
    }
    if (!ALLOWED_DOMAINS.includes(domain)) {
      throw fail(`node ${pyRepr(name)} uses operator domain ${pyRepr(domain)} (operator ${op}); only standard ONNX is allowed`);
    }
  };
  let sawGraph = false;
  try {
    const top = [...fields(blob)];
    for (const [n, , value] of top) {
      if (n === 8n && value instanceof Uint8Array) {
        let domain = '';
        let version = 0n;
        for (const [on, , ov] of fields(value)) {
          if (on === 1n) domain = wireText(ov);
          else if (on === 2n && typeof ov === 'bigint') version = signed64(ov);
        }
        if (!ALLOWED_DOMAINS.includes(domain)) throw fail(`graph imports operator domain ${pyRepr(domain)}; only standard ONNX is allowed`);
        if (version < MIN_OPSET || version > MAX_OPSET) throw fail(`graph uses opset ${version}, supported ${MIN_OPSET}..${MAX_OPSET}`);
      }
    }
    if (top.some(([n]) => n === 25n)) throw fail('graph defines local functions, which Klaus does not allow');
    for (const [n, wire, value] of top) {
      if (n === 7n && wire === LENGTH) {
        graph(value, 0);
        sawGraph = true;
      }
    }
  } catch (err) {
    if (err instanceof WireError) throw fail(`graph is not a valid ONNX protobuf (${err.message})`);
    throw err;
  }
  if (!sawGraph || nodes === 0) throw fail('graph holds no nodes');
  return consumed;
}

function varintBytes(value) {
  const out = [];
  let v = value;
  while (v >= 0x80) {
    out.push((v % 0x80) | 0x80);
    v = Math.floor(v / 0x80);
  }
  out.push(v);
  return out;
}

/** The skeleton with ``weights`` (name -> {dims, values: Float32Array}) added as float32 initializers: one more
 * ModelProto.graph field (7) holding only GraphProto.initializer fields (5); protobuf merges it into the graph. */
export function assembleModel(skeleton, weights) {
  const tensors = [];
  let graphLength = 0;
  const encoder = new TextEncoder();
  for (const [name, { dims, values }] of weights) {
    const head = [];
    for (const d of dims) head.push(0x08, ...varintBytes(d)); // dims (1), varint
    head.push(0x10, 0x01); // data_type (2) = FLOAT
    const nameBytes = encoder.encode(name);
    head.push(0x42, ...varintBytes(nameBytes.length), ...nameBytes); // name (8)
    head.push(0x4a, ...varintBytes(values.byteLength)); // raw_data (9)
    const length = head.length + values.byteLength;
    const prefix = [0x2a, ...varintBytes(length)]; // GraphProto.initializer (5)
    tensors.push({ prefix, head, values });
    graphLength += prefix.length + length;
  }
  const graphPrefix = [0x3a, ...varintBytes(graphLength)]; // ModelProto.graph (7)
  const out = new Uint8Array(skeleton.length + graphPrefix.length + graphLength);
  out.set(skeleton, 0);
  let at = skeleton.length;
  out.set(graphPrefix, at);
  at += graphPrefix.length;
  for (const { prefix, head, values } of tensors) {
    out.set(prefix, at);
    at += prefix.length;
    out.set(head, at);
    at += head.length;
    out.set(new Uint8Array(values.buffer, values.byteOffset, values.byteLength), at); // little-endian hosts only
    at += values.byteLength;
  }
  return out;
}

// ------------------------------------------------------------------------------------------------ preprocess

const INTERPOLATIONS = ['nearest', 'bilinear', 'bicubic', 'lanczos', 'box', 'hamming'];
const PREPROCESS_DEFAULTS = { input_size: 224n, resize: 'shorter', crop_ratio: 0.875, interpolation: 'bicubic',
  mean: [127, 127, 127], std: [128, 128, 128], channel_order: 'RGB', layout: 'NCHW' };

/** klaus.preprocess.Preprocess.from_dict: missing fields take defaults, unknown fields and bad values are refused. */
export function preprocessFromDict(d) {
  const bad = (problem) => new Error(`invalid preprocess metadata: ${problem}`);
  if (!isObject(d)) throw bad(`expected an object, got ${pyType(d)}`);
  const unknown = Object.keys(d).filter((k) => !Object.hasOwn(PREPROCESS_DEFAULTS, k)).map(pyRepr).sort(compareCodePoints);
  if (unknown.length) throw bad(`unknown field(s) ${unknown.join(', ')}`);
  const v = { ...PREPROCESS_DEFAULTS, ...d };
  const real = (name, value) => {
    const ok = (typeof value === 'number' || typeof value === 'bigint') && Number.isFinite(Number(value));
    if (!ok) throw bad(`'${name}' must be a finite number, got ${show(value)}`);
    return Number(value);
  };
  const choice = (name, value, choices) => {
    if (typeof value !== 'string' || !choices.includes(value)) throw bad(`'${name}' must be one of ${choices.join(', ')}; got ${show(value)}`);
    return value;
  };
  const triple = (name, value, positive) => {
    if (!Array.isArray(value) || value.length !== 3) throw bad(`'${name}' must be a list of 3 numbers, got ${show(value)}`);
    const out = value.map((x) => real(name, x));
    if (positive && Math.min(...out) <= 0) throw bad(`'${name}' values must be > 0, got ${show(value)}`);
    return out;
  };
  if (!isInt(v.input_size) || v.input_size < 1n || v.input_size > 4096n) throw bad(`'input_size' must be an integer in 1..4096, got ${show(v.input_size)}`);
  const resize = choice('resize', v.resize, ['shorter', 'stretch']);
  const ratio = real('crop_ratio', v.crop_ratio);
  if (!(ratio >= 0.1 && ratio <= 1.0)) throw bad(`'crop_ratio' must be in 0.1..1.0, got ${show(ratio)}`);
  return {
    input_size: Number(v.input_size),
    resize,
    crop_ratio: ratio,
    interpolation: choice('interpolation', v.interpolation, INTERPOLATIONS),
    channel_order: choice('channel_order', v.channel_order, ['RGB', 'BGR']),
    layout: choice('layout', v.layout, ['NCHW', 'NHWC']),
    mean: triple('mean', v.mean, false),
    std: triple('std', v.std, true),
  };
}

// ------------------------------------------------------------------------------------------------ the container

/** Parse and check a web container; nothing in it is used before it is checked. ``where`` names the file in
 * messages. Returns the model record: {name, meta, preprocess, output, labels, graph (skeleton bytes), tensors}. */
export async function readContainer(buffer, where) {
  const fail = (problem) => new ModelError(`${where}: ${problem}`);
  const data = buffer instanceof Uint8Array ? buffer : new Uint8Array(buffer);
  if (data.length > MAX_FILE_BYTES) throw fail(`file is ${data.length} bytes, larger than the ${MAX_FILE_BYTES}-byte limit`);
  if (data.length < 16 || String.fromCharCode(...data.subarray(0, 8)) !== MAGIC) throw fail('not a Klaus web container (bad magic)');
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const version = view.getUint32(8, true);
  if (version !== VERSION) throw fail(`web container version ${version} is not supported (reads version ${VERSION}); rebuild it with klaus export --web`);
  const headerLength = view.getUint32(12, true);
  if (headerLength < 2 || headerLength > MAX_HEADER_BYTES || 16 + headerLength > data.length) {
    throw fail(`header length ${headerLength} does not fit the file (${data.length} bytes, header at most ${MAX_HEADER_BYTES})`);
  }
  const area = data.subarray(16 + headerLength);
  const header = parseCanonical(data.subarray(16, 16 + headerLength), fail, 'header');
  if (!hasKeys(header, HEADER_KEYS)) {
    throw fail(`header must be an object with exactly the keys ${HEADER_KEYS.join(', ')}`);
  }
  const blob = blobReader(header, area, fail);

  const meta = readMeta(header.meta, fail);
  const { labelRows, synsetRows } = await readLabelset(header.labelset, blob, fail);
  await checkContent(meta, labelRows, synsetRows, fail);
  let preprocess;
  try {
    preprocess = preprocessFromDict(loads(meta.preprocess, fail, 'meta.preprocess'));
  } catch (err) {
    if (err instanceof ModelError) throw err;
    throw fail(err.message);
  }
  const labels = readLabels(labelRows, synsetRows, fail);
  const { skeleton: graph, consumed } = await readGraph(header.graph, blob, fail, where);
  const tensors = readTensors(header.tensors, blob, fail);
  // Tensor names are the one field no digest covers (in a .klaus file too): a renamed tensor would leave its
  // node without a weight, so every name must be a node input of the graph.
  for (const t of tensors) if (!consumed.has(t.name)) throw fail(`tensor ${pyRepr(t.name)} is not an input of any node of the graph`);
  blob.checkTiling();
  const model = { name: meta.model_name, meta, preprocess, output: meta.output, labels, graph, tensors, where };
  await checkTensorDigests(model);
  return model;
}

function parseCanonical(bytes, fail, what) {
  let text;
  try {
    text = utf8.decode(bytes);
  } catch {
    throw fail(`${what} is not valid UTF-8`);
  }
  let value;
  try {
    value = parsePyJson(text);
  } catch (err) {
    if (!(err instanceof JsonSyntax)) throw err;
    throw fail(`${what} is not valid JSON (${err.message})`);
  }
  let canonical;
  try {
    canonical = canonicalJson(value);
  } catch (err) {
    if (!(err instanceof JsonSyntax)) throw err;
    throw fail(`${what} is not canonical JSON (it holds ${err.message})`);
  }
  if (canonical !== text) throw fail(`${what} is not canonical JSON (sorted keys, no spaces, no escapes beyond JSON's)`);
  return value;
}

function loads(text, fail, what) {
  if (typeof text !== 'string') throw fail(`${what} is not text`);
  try {
    return parsePyJson(text);
  } catch (err) {
    if (!(err instanceof JsonSyntax)) throw err;
    throw fail(`${what} is not valid JSON`);
  }
}

/** Hands out blobs by [offset, length] and, at the end, checks that they tile the data area. */
function blobReader(header, area, fail) {
  const taken = [];
  const get = (range, what) => {
    if (!Array.isArray(range) || range.length !== 2 || !range.every(isInt) || range.some((v) => v < 0n)) {
      throw fail(`${what} must be [offset, length] with non-negative integers`);
    }
    const [offset, length] = range.map(Number);
    if (range[0] + range[1] > BigInt(area.length)) throw fail(`${what} [${offset}, ${length}] runs past the end of the file`);
    taken.push([offset, length, what]);
    return area.subarray(offset, offset + length);
  };
  const checkTiling = () => {
    taken.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    let position = 0;
    for (const [offset, length, what] of taken) {
      if (offset < position) throw fail(`${what} overlaps another blob`);
      if (offset > position) throw fail(`bytes ${position}..${offset} of the data area belong to no blob`);
      position = offset + length;
    }
    if (position !== area.length) throw fail(`bytes ${position}..${area.length} of the data area belong to no blob`);
  };
  return { get, checkTiling };
}

function readMeta(rows, fail) {
  if (!Array.isArray(rows) || !rows.every((r) => Array.isArray(r) && r.length === 2 && r.every((v) => typeof v === 'string'))) {
    throw fail('meta must be a list of [key, value] text pairs');
  }
  for (let i = 1; i < rows.length; i++) {
    if (compareCodePoints(rows[i - 1][0], rows[i][0]) >= 0) throw fail('meta keys must be unique and in increasing order');
  }
  const meta = Object.create(null);
  for (const [k, v] of rows) meta[k] = v;
  const missing = REQUIRED_META.filter((k) => !(k in meta));
  if (missing.length) throw fail(`meta table lacks ${missing.join(', ')}`);
  if (meta.format !== 'klaus' || !READ_VERSIONS.includes(meta.format_version)) {
    throw fail(`meta says format ${pyRepr(meta.format)} v${meta.format_version}, expected klaus v${READ_VERSIONS.join(' or v')}`);
  }
  if (!OUTPUT_KINDS.includes(meta.output)) throw fail(`meta.output must be one of ('logits', 'probabilities'), got ${pyRepr(meta.output)}`);
  if (!isObject(loads(meta.recipe, fail, 'meta.recipe'))) throw fail('meta.recipe is not a JSON object');
  return meta;
}

function checkGzipBlob(entry, codec, keys, blob, fail, what) {
  if (!hasKeys(entry, keys)) throw fail(`${what} must be an object with exactly the keys ${keys.join(', ')}`);
  if (entry.codec !== codec) throw fail(`${what} codec ${pyRepr(String(entry.codec))} is not supported (the web container uses ${pyRepr(codec)})`);
  if (!isInt(entry.size) || entry.size < 1n || entry.size > BigInt(MAX_DECOMPRESSED_BYTES)) {
    throw fail(`${what} size must be an integer in 1..${MAX_DECOMPRESSED_BYTES}`);
  }
  const bytes = blob.get([entry.offset, entry.length], `${what} blob`);
  // One gzip member, method 8, no optional header fields, mtime 0: DecompressionStream checks the rest (CRC-32,
  // length); only the XFL and OS bytes, which say nothing about the content, are left unchecked.
  if (bytes.length < 18 || bytes[0] !== 0x1f || bytes[1] !== 0x8b || bytes[2] !== 8 || bytes.subarray(3, 8).some((b) => b !== 0)) {
    throw fail(`${what} is not a plain gzip member (magic, method 8, no header flags, mtime 0)`);
  }
  return { bytes, size: Number(entry.size) };
}

async function gunzip(bytes, size, fail, what) {
  try {
    return await inflateExactly(bytes, 'gzip', size);
  } catch (err) {
    throw fail(`${what} is not valid gzip data of its declared size (${err.message})`);
  }
}

async function readLabelset(entry, blob, fail) {
  const { bytes, size } = checkGzipBlob(entry, 'json+gzip', ['codec', 'length', 'offset', 'size'], blob, fail, 'labelset');
  const value = parseCanonical(await gunzip(bytes, size, fail, 'labelset'), fail, 'labelset JSON');
  const bad = fail("labelset JSON must be an object with exactly 'labels' ([idx, wnid, name, words] rows, idx an integer) and 'synsets' ([wnid, name, parent] rows)");
  if (!hasKeys(value, ['labels', 'synsets'])) throw bad;
  const { labels, synsets } = value;
  if (!Array.isArray(labels) || !Array.isArray(synsets)) throw bad;
  if (!labels.every((r) => Array.isArray(r) && r.length === 4 && isInt(r[0]))) throw bad;
  if (!synsets.every((r) => Array.isArray(r) && r.length === 3 && typeof r[0] === 'string')) throw bad;
  for (let i = 1; i < labels.length; i++) if (labels[i - 1][0] > labels[i][0]) throw fail('labelset labels must be in idx order');
  for (let i = 1; i < synsets.length; i++) if (compareCodePoints(synsets[i - 1][0], synsets[i][0]) > 0) throw fail('labelset synsets must be in wnid order');
  for (const r of labels) {
    if (!Array.isArray(r[3]) || !r[3].every((w) => typeof w === 'string')) throw fail(`labels row ${r[0]} words must be a JSON list of strings`);
  }
  // v1's cells: words as canonical JSON text.
  const labelRows = labels.map(([idx, wnid, name, words]) => [idx, wnid, name, canonicalJson(words)]);
  return { labelRows, synsetRows: synsets };
}

async function checkContent(meta, labelRows, synsetRows, fail) {
  for (const [table, rows] of [['labels', labelRows], ['synsets', synsetRows]]) {
    if (rows.some((row) => row.some((v) => typeof v !== 'string' && typeof v !== 'bigint'))) {
      throw fail(`${table} table holds a value that is neither text nor an integer`);
    }
  }
  const metaRows = Object.keys(meta).sort(compareCodePoints).filter((k) => k !== CONTENT_KEY).map((k) => [k, meta[k]]);
  const text = canonicalJson([metaRows, labelRows, synsetRows]);
  if ((await sha256Hex(new TextEncoder().encode(text))) !== meta[CONTENT_KEY]) {
    throw fail('metadata or label checksum mismatch (file is corrupt)');
  }
}

function readLabels(labelRows, synsetRows, fail) {
  const tree = new Map();
  for (const [wnid, name, parent] of synsetRows) {
    if (![wnid, name, parent].every((v) => typeof v === 'string') || !WNID.test(wnid) || !wnid || !WNID.test(parent)) {
      throw fail('synsets table holds a malformed row');
    }
    if (tree.has(wnid)) throw fail(`synset ${wnid} is listed twice`);
    tree.set(wnid, [name, parent]);
  }
  for (const [wnid, [, parent]] of tree) if (parent && !tree.has(parent)) throw fail(`synset ${wnid} names a missing parent ${parent}`);
  const rows = [];
  labelRows.forEach(([idx, wnid, name, words], expected) => {
    if (idx !== BigInt(expected)) throw fail(`labels must be numbered 0..n-1 without gaps (found ${idx} at ${expected})`);
    if (typeof wnid !== 'string' || !WNID.test(wnid) || typeof name !== 'string' || !name) throw fail(`labels row ${idx} has a bad wnid or name`);
    const path = wnid ? pathToRoot(tree, wnid, fail) : [];
    rows.push({ index: expected, wnid, name, words: JSON.parse(words), path, hierarchy: path.map((w) => tree.get(w)[0]) });
  });
  const seen = new Set();
  for (const r of rows) {
    if (seen.has(r.name)) throw fail(`label name ${pyRepr(r.name)} is used twice; names must be unique`);
    seen.add(r.name);
  }
  return rows;
}

function pathToRoot(tree, wnid, fail) {
  if (!tree.has(wnid)) throw fail(`label ${wnid} is missing from the synsets table`);
  const path = [wnid];
  while (tree.get(path[path.length - 1])[1]) {
    path.push(tree.get(path[path.length - 1])[1]);
    if (path.length > MAX_DEPTH) throw fail(`synset hierarchy above ${wnid} is cyclic or deeper than ${MAX_DEPTH}`);
  }
  return path.reverse();
}

async function readGraph(entry, blob, fail, where) {
  const keys = ['codec', 'length', 'offset', 'sha256', 'size'];
  const { bytes, size } = checkGzipBlob(entry, 'onnx+gzip', keys, blob, fail, 'graph');
  if (typeof entry.sha256 !== 'string' || !HEX64.test(entry.sha256)) throw fail('graph sha256 must be 64 lowercase hex digits');
  const skeleton = await gunzip(bytes, size, fail, 'graph');
  if ((await sha256Hex(skeleton)) !== entry.sha256) throw fail('graph checksum mismatch (file is corrupt)');
  return { skeleton, consumed: checkSkeleton(skeleton, where) };
}

function readTensors(entries, blob, fail) {
  if (!Array.isArray(entries)) throw fail('tensors must be a list');
  const names = new Set();
  return entries.map((t, ordinal) => {
    if (!hasKeys(t, TENSOR_KEYS)) {
      throw fail(`tensors row ${ordinal} must be an object with exactly the keys ${TENSOR_KEYS.join(', ')}`);
    }
    if (typeof t.name !== 'string' || !t.name) throw fail(`tensors table row ${ordinal} has a bad ordinal or name`);
    if (names.has(t.name)) throw fail(`tensor ${pyRepr(t.name)} is listed twice; names must be unique`);
    names.add(t.name);
    const what = `tensor ${pyRepr(t.name)}`;
    const { dims } = t;
    if (!Array.isArray(dims) || dims.length > 8 || !dims.every((d) => isInt(d) && d >= 0n)) {
      throw fail(`${what}: dims must be a list of at most 8 non-negative integers`);
    }
    const size = dims.reduce((a, b) => a * b, 1n);
    if (size > MAX_TENSOR_ELEMENTS) throw fail(`${what}: ${size} elements is over the limit`);
    if (t.dtype !== 'float32') throw fail(`${what}: dtype ${pyRepr(String(t.dtype))} is not supported (float32 only)`);
    if (!CODECS.includes(t.codec)) throw fail(`${what}: unknown codec ${pyRepr(String(t.codec))} (known: ${CODECS.join(', ')})`);
    if (typeof t.sha256 !== 'string' || !HEX64.test(t.sha256)) throw fail(`${what}: payload or checksum missing`);
    const payload = blob.get(t.payload, `${what} payload`);
    const palette = t.palette === null ? null : blob.get(t.palette, `${what} palette`);
    const scales = t.scales === null ? null : blob.get(t.scales, `${what} scales`);
    const record = { name: t.name, dims: dims.map(Number), size: Number(size), codec: t.codec, bits: t.bits, payload, palette,
      scales, scaleAxis: t.scale_axis, sha256: t.sha256 };
    if (record.codec in RAW_ITEMSIZE) {
      if (t.bits !== 0n || palette !== null || scales !== null || t.scale_axis !== null) throw fail(`${what}: raw tensors carry no bits, palette or scales`);
      const expected = record.size * RAW_ITEMSIZE[record.codec];
      if (payload.length !== expected) throw fail(`${what}: payload is ${payload.length} bytes, expected ${expected}`);
      return record;
    }
    if (!isInt(t.bits) || t.bits < 1n || t.bits > 8n) throw fail(`${what}: bits must be 1..8, got ${show(t.bits)}`);
    record.bits = Number(t.bits);
    if (!dims.length || record.size === 0) throw fail(`${what}: a palettized tensor needs a non-empty shape`);
    if (palette === null || palette.length % 2 || palette.length < 2 || palette.length > 2 << record.bits) {
      throw fail(`${what}: palette must hold 1..2^bits fp16 values`);
    }
    if (!allFinite(halves(palette))) throw fail(`${what}: palette holds NaN or infinite values`);
    if (scales === null) {
      if (t.scale_axis !== null) throw fail(`${what}: scale_axis given without scales`);
      return record;
    }
    if (!isInt(t.scale_axis) || t.scale_axis < 0n || t.scale_axis >= BigInt(dims.length)) {
      throw fail(`${what}: scale_axis ${show(t.scale_axis)} is not an axis of shape [${dims.join(', ')}]`);
    }
    record.scaleAxis = Number(t.scale_axis);
    if (scales.length !== 2 * record.dims[record.scaleAxis]) throw fail(`${what}: scales must hold one fp16 value per slice of axis ${record.scaleAxis}`);
    if (!allFinite(halves(scales))) throw fail(`${what}: scales hold NaN or infinite values`);
    return record;
  });
}

/** Verify every tensor's sha256 (payload ‖ palette ‖ scales), as the .klaus reader does when it reads the row. */
export async function checkTensorDigests(model) {
  for (const t of model.tensors) {
    const parts = [t.payload, t.palette, t.scales].filter((p) => p !== null);
    if ((await sha256Hex(...parts)) !== t.sha256) throw new ModelError(`${model.where}: tensor ${pyRepr(t.name)}: checksum mismatch (file is corrupt)`);
  }
}

/** The float32 values of one tensor, bit-identical to klaus.format.TensorRecord.decode. */
export async function decodeTensor(t) {
  if (t.codec === 'raw-f32') {
    const out = new Float32Array(t.size);
    new Uint8Array(out.buffer).set(t.payload);
    if (!allFinite(out)) throw new Error('raw-f32 payload holds NaN or infinite values');
    return out;
  }
  if (t.codec === 'raw-f16') {
    const out = halves(t.payload);
    if (!allFinite(out)) throw new Error('raw-f16 payload holds NaN or infinite values');
    return out;
  }
  const rows = t.dims[0];
  const cols = t.size / rows;
  const { indices, max } = await pngIndices(t.payload, rows, cols, t.bits);
  const palette = halves(t.palette);
  if (max >= palette.length) throw new Error(`index map refers past its ${palette.length}-entry palette`);
  const out = new Float32Array(t.size);
  if (t.scales === null) {
    for (let i = 0; i < out.length; i++) out[i] = palette[indices[i]];
    return out;
  }
  // numpy: float32(palette)[indices] * float32(scales) along scale_axis. The product of two float32 values is exact
  // in a double, so storing it in a Float32Array (one rounding) is IEEE float32 multiplication. Each slice of the
  // scale axis gets its own table of palette x scale products, so the loop below is a lookup per element.
  const scales = halves(t.scales);
  const inner = t.dims.slice(t.scaleAxis + 1).reduce((a, b) => a * b, 1);
  const axis = t.dims[t.scaleAxis];
  const entries = palette.length;
  const table = new Float32Array(axis * entries);
  for (let c = 0; c < axis; c++) for (let k = 0; k < entries; k++) table[c * entries + k] = palette[k] * scales[c];
  expand(indices, table, entries, axis, inner, out);
  return out;
}

/** out[i] = table[slice * entries + indices[i]], the slice of the scale axis that element i lies in. */
function expand(indices, table, entries, axis, inner, out) {
  for (let i = 0; i < out.length; ) {
    for (let c = 0; c < axis; c++) {
      const base = c * entries;
      const end = i + inner;
      for (; i < end; i++) out[i] = table[base + indices[i]];
    }
  }
}

/** Every tensor decoded: Map name -> {dims, values}. Errors name the file and the tensor. */
export async function decodeWeights(model) {
  const decoded = await Promise.all(
    model.tensors.map(async (t) => {
      try {
        return [t.name, { dims: t.dims, values: await decodeTensor(t) }];
      } catch (err) {
        throw new ModelError(`${model.where}: tensor ${pyRepr(t.name)}: ${err.message}`);
      }
    }),
  );
  return new Map(decoded);
}
