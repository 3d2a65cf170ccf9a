"""Fuzzing `klaus` with hostile model files and images, each run in a child process with limits.

* :mod:`.corpus` — the seed inputs: small classifiers built with `klaus compress`, the
  embedded model, images in many formats and modes, and bomb payloads (zlib and xz).
* :mod:`.models` — mutations of `.klaus` files: raw bytes; SQLite rows edited on a copy
  (meta values, the preprocessing JSON, the label set, tensor dims/codec/bits/palette/
  scales/payload); PNG chunks inside index maps (including zlib bombs that declare huge
  maps); the ONNX graph (bytes, structure, and graphs of unbounded work built with the
  ``onnx`` package: a Loop with a huge trip count, ConstantOfShape 30000 x 30000, Range,
  Resize, Conv with huge pads, ...). Checksums are recomputed for most mutations, so that
  they reach the checks behind the checksums.
* :mod:`.images` — mutations of images: truncations, flipped bytes, huge declared sizes
  in PNG/GIF/JPEG/BMP/TIFF/WebP headers, odd modes and EXIF, junk, pipes and devices.
* :mod:`.runner` — runs `klaus inspect`, `klaus classify -m` and `klaus export` on each
  case in a child process under an address-space limit and a time limit, from a small
  process pool, and classifies each outcome: ``success``, ``clean-error`` (exit status 1
  and exactly one stderr line ``klaus: error: ...``), ``traceback``, ``hang`` (over the
  time limit, 30 s), ``crash`` (killed by a signal), ``over-memory`` (peak RSS over
  1 GiB), ``stray-stderr`` (anything else on stderr) and ``bad-exit`` (another status, or
  status 1 with nothing said).

Every case is a (kind, mutator, seed, command) tuple: the same tuple builds the same bytes,
so a run is reproducible and a failing case can be rebuilt alone. The short run is
tests/test_fuzz.py; the long run, and the figures in BENCHMARKS.md, is bench/fuzz.py.
"""
