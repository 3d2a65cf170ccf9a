// klaus.preprocess in the browser: resize, crop, normalize a decoded photo into the model's input tensor.
// The resampling is a port of Pillow's (libImaging/Resample.c and the nearest-neighbour scale of Geometry.c) in
// its 8-bit fixed-point form, and the window logic follows klaus.preprocess.to_pixels, so that given the same
// decoded RGB pixels the tensor is bit-identical to Python's. What differs is the decoding itself (the browser's
// JPEG/PNG decoders, and how a large photo is scaled while decoding): see decodeImage.

export const MAX_INPUT_SIZE = 4096;
export const DEFAULT_MAX_PIXELS = 178956970; // klaus.images.DEFAULT_MAX_PIXELS (Pillow's bomb limit)
const MAX_RESIZED_PIXELS = 4096 * 4096;

// ------------------------------------------------------------------------------------------------ filters

const bicubic = (x) => {
  const a = -0.5;
  if (x < 0) x = -x;
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
};
const sinc = (x) => {
  if (x === 0) return 1;
  x *= Math.PI;
  return Math.sin(x) / x;
};
const F054 = Math.fround(0.54);
const F046 = Math.fround(0.46);
/** Pillow's filters and supports. Lanczos and Hamming call sin/cos, whose last bit may differ between the C
 * library and the JS engine; the others are exact arithmetic. */
export const FILTERS = {
  box: { support: 0.5, f: (x) => (x > -0.5 && x <= 0.5 ? 1 : 0) },
  bilinear: { support: 1, f: (x) => { x = Math.abs(x); return x < 1 ? 1 - x : 0; } },
  hamming: {
    support: 1,
    f: (x) => {
      x = Math.abs(x);
      if (x === 0) return 1;
      if (x >= 1) return 0;
      x *= Math.PI;
      return (Math.sin(x) / x) * (F054 + F046 * Math.cos(x));
    },
  },
  bicubic: { support: 2, f: bicubic },
  lanczos: { support: 3, f: (x) => (x >= -3 && x < 3 ? sinc(x) * sinc(x / 3) : 0) },
};
const SUPPORT = { bilinear: 1, hamming: 1, bicubic: 2, lanczos: 3 }; // filters that _window may use

const PRECISION_BITS = 22;
const ONE = 2 ** PRECISION_BITS;

/** Pillow's precompute_coeffs + normalize_coeffs_8bpc: per output pixel, the first input index, the count and the
 * fixed-point weights. ``in0``/``in1`` are the box edges as C floats. */
function coefficients(inSize, in0, in1, outSize, filter) {
  const scale = Math.fround(in1 - in0) / outSize; // (double)(in1 - in0): a float subtraction, then widened
  const filterscale = scale < 1 ? 1 : scale;
  const support = filter.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const w = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = in0 + (xx + 0.5) * scale;
    const ss = 1 / filterscale;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      const v = filter.f((x + xmin - center + 0.5) * ss);
      w[x] = v;
      ww += v;
    }
    for (let x = 0; x < xmax; x++) {
      const v = ww !== 0 ? w[x] / ww : w[x];
      kk[xx * ksize + x] = v < 0 ? Math.trunc(-0.5 + v * ONE) : Math.trunc(0.5 + v * ONE);
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, kk };
}

const clip8 = (ss) => {
  const v = Math.floor(ss / ONE);
  return v < 0 ? 0 : v > 255 ? 255 : v;
};

/** Horizontal pass over rows ``offset .. offset + outHeight`` of ``img``. */
function horizontal(img, outWidth, outHeight, offset, c) {
  const out = new Uint8Array(outWidth * outHeight * 3);
  const { ksize, bounds, kk } = c;
  const inStride = img.width * 3;
  for (let yy = 0; yy < outHeight; yy++) {
    const row = (yy + offset) * inStride;
    for (let xx = 0; xx < outWidth; xx++) {
      const xmin = bounds[xx * 2];
      const xmax = bounds[xx * 2 + 1];
      const k = xx * ksize;
      let s0 = ONE / 2;
      let s1 = ONE / 2;
      let s2 = ONE / 2;
      for (let x = 0; x < xmax; x++) {
        const p = row + (x + xmin) * 3;
        const kv = kk[k + x];
        s0 += img.data[p] * kv;
        s1 += img.data[p + 1] * kv;
        s2 += img.data[p + 2] * kv;
      }
      const o = (yy * outWidth + xx) * 3;
      out[o] = clip8(s0);
      out[o + 1] = clip8(s1);
      out[o + 2] = clip8(s2);
    }
  }
  return { width: outWidth, height: outHeight, data: out };
}

/** Vertical pass over columns ``offset .. offset + outWidth`` of ``img``. */
function vertical(img, outWidth, outHeight, offset, c) {
  const out = new Uint8Array(outWidth * outHeight * 3);
  const { ksize, bounds, kk } = c;
  const inStride = img.width * 3;
  for (let yy = 0; yy < outHeight; yy++) {
    const ymin = bounds[yy * 2];
    const ymax = bounds[yy * 2 + 1];
    const k = yy * ksize;
    for (let xx = 0; xx < outWidth; xx++) {
      let s0 = ONE / 2;
      let s1 = ONE / 2;
      let s2 = ONE / 2;
      const col = (xx + offset) * 3;
      for (let y = 0; y < ymax; y++) {
        const p = (y + ymin) * inStride + col;
        const kv = kk[k + y];
        s0 += img.data[p] * kv;
        s1 += img.data[p + 1] * kv;
        s2 += img.data[p + 2] * kv;
      }
      const o = (yy * outWidth + xx) * 3;
      out[o] = clip8(s0);
      out[o + 1] = clip8(s1);
      out[o + 2] = clip8(s2);
    }
  }
  return { width: outWidth, height: outHeight, data: out };
}

/** Which pass Pillow runs first for a two-pass resize of (w, h) to (rw, rh): Pillow 13 resamples columns first
 * when the height shrinks by more than twice as many pixels as the width (klaus.preprocess._pillow_vertical_first). */
export function verticalFirst(w, h, rw, rh) {
  return h - rh > 0 && h - rh > 2 * (w - rw);
}

/** Pillow's ImagingResample for an 8-bit RGB image (box as C floats). */
function resampleInner(img, xsize, ysize, filter, box) {
  const needH = xsize !== img.width || box[0] !== 0 || box[2] !== xsize;
  const needV = ysize !== img.height || box[1] !== 0 || box[3] !== ysize;
  const cv = coefficients(img.height, box[1], box[3], ysize, filter);
  const ch = coefficients(img.width, box[0], box[2], xsize, filter);
  if (needH && needV && verticalFirst(img.width, img.height, xsize, ysize)) {
    const first = ch.bounds[0];
    const last = ch.bounds[xsize * 2 - 2] + ch.bounds[xsize * 2 - 1];
    for (let i = 0; i < xsize; i++) ch.bounds[i * 2] -= first;
    const temp = vertical(img, last - first, ysize, first, cv);
    return horizontal(temp, xsize, ysize, 0, ch);
  }
  let current = img;
  if (needH) {
    const first = cv.bounds[0];
    const last = cv.bounds[ysize * 2 - 2] + cv.bounds[ysize * 2 - 1];
    for (let i = 0; i < ysize; i++) cv.bounds[i * 2] -= first;
    current = horizontal(img, xsize, last - first, first, ch);
  }
  if (needV) current = vertical(current, xsize, ysize, 0, cv);
  return current === img ? { width: img.width, height: img.height, data: img.data.slice() } : current;
}

const coord = (v) => (v < 0 ? -1 : Math.trunc(v));

/** Pillow's nearest-neighbour resize: ImagingTransform's affine scale (Geometry.c ImagingScaleAffine). */
function nearestScale(img, xsize, ysize, box) {
  const a0 = Math.fround(box[2] - box[0]) / xsize;
  const a4 = Math.fround(box[3] - box[1]) / ysize;
  const out = new Uint8Array(xsize * ysize * 3);
  const xintab = new Int32Array(xsize);
  let xo = box[0] + a0 * 0.5;
  let yo = box[1] + a4 * 0.5;
  let xmin = xsize;
  let xmax = 0;
  for (let x = 0; x < xsize; x++) {
    const xin = coord(xo);
    if (xin >= 0 && xin < img.width) {
      xmax = x + 1;
      if (x < xmin) xmin = x;
      xintab[x] = xin;
    }
    xo += a0;
  }
  for (let y = 0; y < ysize; y++) {
    const yi = coord(yo);
    if (yi >= 0 && yi < img.height) {
      for (let x = xmin; x < xmax; x++) {
        const p = (yi * img.width + xintab[x]) * 3;
        const o = (y * xsize + x) * 3;
        out[o] = img.data[p];
        out[o + 1] = img.data[p + 1];
        out[o + 2] = img.data[p + 2];
      }
    }
    yo += a4;
  }
  return { width: xsize, height: ysize, data: out };
}

/** ``img.crop((left, top, right, bottom))`` for a box inside the image. */
export function crop(img, left, top, right, bottom) {
  const w = right - left;
  const out = new Uint8Array(w * (bottom - top) * 3);
  for (let y = top; y < bottom; y++) out.set(img.data.subarray((y * img.width + left) * 3, (y * img.width + right) * 3), (y - top) * w * 3);
  return { width: w, height: bottom - top, data: out };
}

/** ``Image.resize((xsize, ysize), filter, box)`` of an RGB image, as Pillow computes it (box edges given as
 * Python floats; Pillow passes them to C as floats). */
export function resize(img, xsize, ysize, interpolation, box = null) {
  const b = (box || [0, 0, img.width, img.height]).map(Math.fround);
  if (box === null || (b[0] === 0 && b[1] === 0 && b[2] === img.width && b[3] === img.height)) {
    if (xsize === img.width && ysize === img.height) return { width: xsize, height: ysize, data: img.data.slice() };
  }
  if (Number.isInteger(b[0]) && Number.isInteger(b[1]) && b[2] - b[0] === xsize && b[3] - b[1] === ysize) {
    return crop(img, b[0], b[1], b[2], b[3]);
  }
  if (interpolation === 'nearest') return nearestScale(img, xsize, ysize, b);
  const filter = FILTERS[interpolation];
  if (!filter) throw new Error(`unsupported resampling filter ${interpolation}`);
  return resampleInner(img, xsize, ysize, filter, b);
}

// ------------------------------------------------------------------------------------------------ klaus.preprocess

/** Python's round(): halves to even. */
export function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 ? 2 * Math.round(x / 2) : r;
}

export const resizeSide = (spec) => roundHalfEven(spec.input_size / spec.crop_ratio);

function checkCrops(crops) {
  if (crops !== 1 && crops !== 10) throw new Error(`crops must be 1 or 10, got ${crops}`);
}

/** klaus.preprocess.resized_size: the image size after the resize rule, before cropping. */
export function resizedSize(width, height, spec, crops = 1) {
  checkCrops(crops);
  if (spec.resize === 'stretch') {
    const side = crops === 1 ? spec.input_size : resizeSide(spec);
    return [side, side];
  }
  const side = resizeSide(spec);
  if (width <= height) return [side, Math.max(side, roundHalfEven((height * side) / width))];
  return [Math.max(side, roundHalfEven((width * side) / height)), side];
}

/** klaus.preprocess.crop_boxes: [left, top, right, bottom] per crop, in tensor order (ten crops: four corners and
 * the center, then the same five again, mirrored by toPixels). */
export function cropBoxes(width, height, spec, crops = 1) {
  const [rw, rh] = resizedSize(width, height, spec, crops);
  const s = spec.input_size;
  const left = Math.floor((rw - s) / 2);
  const top = Math.floor((rh - s) / 2);
  const center = [left, top, left + s, top + s];
  if (crops === 1) return [center];
  const windows = [[0, 0, s, s], [rw - s, 0, rw, s], [0, rh - s, s, rh], [rw - s, rh - s, rw, rh], center];
  return [...windows, ...windows];
}

/** The smallest side the decoded image needs so that the resize never upsamples (klaus.preprocess._decode_target). */
export function decodeTarget(spec, crops = 1) {
  checkCrops(crops);
  return spec.resize === 'stretch' && crops === 1 ? spec.input_size : resizeSide(spec);
}

function sourceSpan(start, stop, scale, size, interpolation) {
  const reach = SUPPORT[interpolation] * Math.max(scale, 1) + 1;
  return [Math.max(0, Math.floor((start + 0.5) * scale - reach)), Math.min(size, Math.ceil((stop - 0.5) * scale + reach))];
}

/** klaus.preprocess._window: one window resampled from only the source rows (or columns) it needs. */
function window(img, box, rw, rh, interpolation) {
  const [left, top, right, bottom] = box;
  const { width, height } = img;
  if (verticalFirst(width, height, rw, rh)) {
    const sx = width / rw;
    const [x0, x1] = sourceSpan(left, right, sx, width, interpolation);
    if ((x1 - x0) * rh > MAX_RESIZED_PIXELS) return null;
    let cols = x0 === 0 && x1 === width ? img : crop(img, x0, 0, x1, height);
    if (rh !== height) cols = resize(cols, x1 - x0, rh, interpolation);
    if (top !== 0 || bottom !== rh) cols = crop(cols, 0, top, x1 - x0, bottom);
    const last = Math.min(x1 - x0, right * sx - x0);
    return resize(cols, right - left, bottom - top, interpolation, [left * sx - x0, 0, last, bottom - top]);
  }
  const sy = height / rh;
  const [y0, y1] = sourceSpan(top, bottom, sy, height, interpolation);
  if (rw * (y1 - y0) > MAX_RESIZED_PIXELS) return null;
  let rows = y0 === 0 && y1 === height ? img : crop(img, 0, y0, width, y1);
  if (rw !== width) rows = resize(rows, rw, y1 - y0, interpolation);
  if (left !== 0 || right !== rw) rows = crop(rows, left, 0, right, y1 - y0);
  const last = Math.min(y1 - y0, bottom * sy - y0);
  return resize(rows, right - left, bottom - top, interpolation, [0, top * sy - y0, right - left, last]);
}

function mirror(img) {
  const out = new Uint8Array(img.data.length);
  const { width, height } = img;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const p = (y * width + x) * 3;
      const o = (y * width + (width - 1 - x)) * 3;
      out[o] = img.data[p];
      out[o + 1] = img.data[p + 1];
      out[o + 2] = img.data[p + 2];
    }
  }
  return { width, height, data: out };
}

/** klaus.preprocess.to_pixels: the ``crops`` resized and cropped RGB windows of an RGB image {width, height,
 * data (Uint8Array, 3 bytes a pixel)}, as a list of images of input_size squared. */
export function toPixels(img, spec, crops = 1) {
  checkCrops(crops);
  const boxes = cropBoxes(img.width, img.height, spec, crops);
  const windows = crops === 10 ? boxes.slice(0, 5) : boxes;
  const [rw, rh] = resizedSize(img.width, img.height, spec, crops);
  let patches = null;
  if (windows.length === 1 && spec.interpolation in SUPPORT) {
    const one = window(img, windows[0], rw, rh, spec.interpolation);
    if (one) patches = [one];
  }
  if (patches === null && rw * rh <= MAX_RESIZED_PIXELS) {
    const full = resize(img, rw, rh, spec.interpolation);
    patches = windows.map(([l, t, r, b]) => crop(full, l, t, r, b));
  }
  if (patches === null) {
    const sx = img.width / rw;
    const sy = img.height / rh;
    patches = windows.map(([l, t, r, b]) => resize(img, r - l, b - t, spec.interpolation,
      [l * sx, t * sy, Math.min(img.width, r * sx), Math.min(img.height, b * sy)]));
  }
  return crops === 10 ? [...patches, ...patches.map(mirror)] : patches;
}

/** klaus.preprocess.normalize: float32 (pixel - mean) / std in the spec's channel order and layout, one tensor of
 * shape (n, 3, S, S) or (n, S, S, 3). Each step rounds to float32 as numpy's float32 arithmetic does. */
export function normalize(patches, spec) {
  const s = spec.input_size;
  const plane = s * s;
  const out = new Float32Array(patches.length * plane * 3);
  const order = spec.channel_order === 'BGR' ? [2, 1, 0] : [0, 1, 2];
  const mean = spec.mean.map(Math.fround);
  const std = spec.std.map(Math.fround);
  // The 256 possible values per channel, computed once: float32(float32(p - mean) / std).
  const table = [0, 1, 2].map((c) => Float32Array.from({ length: 256 }, (_, p) => Math.fround(p - mean[c]) / std[c]));
  patches.forEach((img, n) => {
    const base = n * plane * 3;
    for (let i = 0; i < plane; i++) {
      for (let c = 0; c < 3; c++) {
        const v = table[c][img.data[i * 3 + order[c]]];
        if (spec.layout === 'NCHW') out[base + c * plane + i] = v;
        else out[base + i * 3 + c] = v;
      }
    }
  });
  return out;
}

/** The model input for an RGB image: klaus.preprocess.to_tensor. Returns {data, dims}. */
export function toTensor(img, spec, crops = 1) {
  const s = spec.input_size;
  const data = normalize(toPixels(img, spec, crops), spec);
  return { data, dims: spec.layout === 'NCHW' ? [crops, 3, s, s] : [crops, s, s, 3] };
}

// ------------------------------------------------------------------------------------------------ decoding photos

/** Pillow's JPEG draft scale for a decode target: the largest of 8, 4, 2, 1 that keeps both sides >= target. */
export function draftScale(width, height, target) {
  const most = Math.min(Math.floor(width / target), Math.floor(height / target));
  return [8, 4, 2, 1].find((s) => most >= s) || 1;
}

/** Format, stored size and EXIF orientation from the first bytes of a photo (JPEG, PNG, GIF, WebP, BMP); null
 * where the format is not one of these or the header is cut short. */
export function imageInfo(bytes) {
  const b = bytes;
  const u16be = (i) => (b[i] << 8) | b[i + 1];
  const u32be = (i) => ((b[i] << 24) | (b[i + 1] << 16) | (b[i + 2] << 8) | b[i + 3]) >>> 0;
  const u16le = (i) => b[i] | (b[i + 1] << 8);
  const u32le = (i) => (b[i] | (b[i + 1] << 8) | (b[i + 2] << 16) | (b[i + 3] << 24)) >>> 0;
  if (b.length >= 24 && b[0] === 0x89 && b[1] === 0x50 && b[2] === 0x4e && b[3] === 0x47) {
    return { format: 'PNG', width: u32be(16), height: u32be(20), orientation: 1 };
  }
  if (b.length >= 10 && b[0] === 0x47 && b[1] === 0x49 && b[2] === 0x46) return { format: 'GIF', width: u16le(6), height: u16le(8), orientation: 1 };
  if (b.length >= 26 && b[0] === 0x42 && b[1] === 0x4d) return { format: 'BMP', width: u32le(18), height: Math.abs(u32le(22) | 0), orientation: 1 };
  if (b.length >= 30 && String.fromCharCode(...b.subarray(0, 4)) === 'RIFF' && String.fromCharCode(...b.subarray(8, 12)) === 'WEBP') {
    const kind = String.fromCharCode(...b.subarray(12, 16));
    if (kind === 'VP8 ') return { format: 'WEBP', width: u16le(26) & 0x3fff, height: u16le(28) & 0x3fff, orientation: 1 };
    if (kind === 'VP8L') {
      const bits = u32le(21);
      return { format: 'WEBP', width: (bits & 0x3fff) + 1, height: ((bits >> 14) & 0x3fff) + 1, orientation: 1 };
    }
    if (kind === 'VP8X') return { format: 'WEBP', width: (b[24] | (b[25] << 8) | (b[26] << 16)) + 1, height: (b[27] | (b[28] << 8) | (b[29] << 16)) + 1, orientation: 1 };
    return null;
  }
  if (b.length < 4 || b[0] !== 0xff || b[1] !== 0xd8) return null;
  let pos = 2;
  let orientation = 1;
  while (pos + 4 <= b.length) {
    if (b[pos] !== 0xff) return null;
    const marker = b[pos + 1];
    if (marker === 0xff) {
      pos += 1;
      continue;
    }
    if (marker === 0xd8 || (marker >= 0xd0 && marker <= 0xd7) || marker === 0x01) {
      pos += 2;
      continue;
    }
    const length = u16be(pos + 2);
    if (marker === 0xe1 && pos + 4 + length <= b.length) orientation = exifOrientation(b, pos + 4, pos + 2 + length) || orientation;
    const sof = marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker);
    if (sof) {
      if (pos + 9 > b.length) return null;
      return { format: 'JPEG', width: u16be(pos + 7), height: u16be(pos + 5), orientation };
    }
    if (marker === 0xda || marker === 0xd9) return null;
    pos += 2 + length;
  }
  return null;
}

/** The EXIF Orientation tag (1..8) of an APP1 segment, or 0. */
function exifOrientation(b, start, end) {
  if (end - start < 14 || String.fromCharCode(...b.subarray(start, start + 4)) !== 'Exif') return 0;
  const t = start + 6;
  const little = b[t] === 0x49;
  const u16 = (i) => (little ? b[i] | (b[i + 1] << 8) : (b[i] << 8) | b[i + 1]);
  const u32 = (i) => (little ? (b[i] | (b[i + 1] << 8) | (b[i + 2] << 16) | (b[i + 3] << 24)) >>> 0 : ((b[i] << 24) | (b[i + 1] << 16) | (b[i + 2] << 8) | b[i + 3]) >>> 0);
  const ifd = t + u32(t + 4);
  if (ifd + 2 > end) return 0;
  const count = u16(ifd);
  for (let i = 0; i < count; i++) {
    const e = ifd + 2 + i * 12;
    if (e + 12 > end) return 0;
    if (u16(e) === 0x0112) {
      const v = u16(e + 8);
      return v >= 1 && v <= 8 ? v : 0;
    }
  }
  return 0;
}

function megapixels(count, limit, up) {
  if (limit < 1000000) return `${count} px`;
  const tenths = up ? Math.ceil(count / 1e5) : Math.floor(count / 1e5);
  return `${(tenths / 10).toFixed(1)} Mpx`;
}

/** Decode a photo (Blob) into RGB for ``spec`` in a browser (window or worker): upright (EXIF orientation), no
 * colour management (as Pillow, which ignores ICC profiles), transparency over white.
 *
 * Large photos are scaled while decoding, as Python's draft decode does (klaus.images.load_image with a target
 * side): a JPEG whose sides are both at least 2, 4 or 8 times the decode target is decoded at 1/2, 1/4 or 1/8 scale.
 * Where the browser has WebCodecs' ImageDecoder (Chromium), that is libjpeg's DCT scaling at the size Pillow picks,
 * which gives Pillow's pixels and never holds the full-size image (a 12000 x 12000 JPEG: about 30 MB, not 600).
 * Elsewhere createImageBitmap's resize options do it: the browser's own filter, so such photos' pixels differ
 * slightly from Python's, and the browser may decode the full size first. Other formats above 16 Mpx get the same
 * scale rule through createImageBitmap (Python decodes them at full size). Photos over ``maxPixels`` are refused
 * from their header, as Python refuses them. */
export async function decodeImage(blob, spec, crops = 1, { label = 'photo', maxPixels = DEFAULT_MAX_PIXELS } = {}) {
  const head = new Uint8Array(await blob.slice(0, 1 << 18).arrayBuffer());
  if (!head.length) throw new Error(`${label}: empty file`);
  const info = imageInfo(head);
  const options = { imageOrientation: 'from-image', colorSpaceConversion: 'none', premultiplyAlpha: 'none' };
  if (info) {
    const pixels = info.width * info.height;
    if (pixels > maxPixels) {
      throw new Error(`${label}: image too large (${info.width}x${info.height} = ${megapixels(pixels, maxPixels, true)} > ${megapixels(maxPixels, maxPixels, false)} limit)`);
    }
    const scale = info.format === 'JPEG' || pixels > MAX_RESIZED_PIXELS ? draftScale(info.width, info.height, decodeTarget(spec, crops)) : 1;
    if (scale > 1) {
      const w = Math.ceil(info.width / scale);
      const h = Math.ceil(info.height / scale);
      if (info.format === 'JPEG') {
        const scaled = await scaledJpeg(blob, w, h);
        if (scaled) return scaled;
      }
      const swap = info.orientation >= 5;
      Object.assign(options, { resizeWidth: swap ? h : w, resizeHeight: swap ? w : h, resizeQuality: 'high' });
    }
  }
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, options);
  } catch {
    const kind = blob.type || (info ? info.format : '');
    throw new Error(`${label}: not an image this browser can decode${kind ? ` (${kind})` : ''}`);
  }
  try {
    return rgbOf(bitmap, bitmap.width, bitmap.height);
  } finally {
    bitmap.close();
  }
}

/** A JPEG decoded by WebCodecs' ImageDecoder at (width, height) in stored orientation (libjpeg's DCT scaling),
 * drawn upright; null where the browser has no ImageDecoder for JPEG or it fails (the caller falls back). */
async function scaledJpeg(blob, width, height) {
  if (typeof ImageDecoder === 'undefined') return null;
  let decoder = null;
  let frame = null;
  try {
    if (!(await ImageDecoder.isTypeSupported('image/jpeg'))) return null;
    decoder = new ImageDecoder({ data: blob.stream(), type: 'image/jpeg', desiredWidth: width, desiredHeight: height,
      colorSpaceConversion: 'none', preferAnimation: false });
    frame = (await decoder.decode()).image;
    if (frame.codedWidth !== width || frame.codedHeight !== height) return null; // not scaled as asked
    return rgbOf(frame, frame.displayWidth, frame.displayHeight); // drawImage applies the EXIF rotation
  } catch {
    return null;
  } finally {
    if (frame) frame.close();
    if (decoder) decoder.close();
  }
}

/** The RGB pixels of a drawable (ImageBitmap or VideoFrame) of the given display size. */
function rgbOf(source, width, height) {
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext('2d', { willReadFrequently: true, alpha: true });
  ctx.drawImage(source, 0, 0);
  return { width, height, data: overWhite(ctx.getImageData(0, 0, width, height).data) };
}

/** RGBA to RGB, transparent pixels composited over white with Pillow's alpha_composite arithmetic. */
export function overWhite(rgba) {
  const n = rgba.length >> 2;
  const out = new Uint8Array(n * 3);
  for (let i = 0; i < n; i++) {
    const a = rgba[i * 4 + 3];
    for (let c = 0; c < 3; c++) {
      let v = rgba[i * 4 + c];
      if (a === 0) v = 255;
      else if (a !== 255) {
        const tmp = v * a * 128 + 255 * (255 - a) * 128 + (0x80 << 7);
        v = Math.floor((Math.floor(tmp / 256) + tmp) / 256) >> 7;
      }
      out[i * 3 + c] = v;
    }
  }
  return out;
}
