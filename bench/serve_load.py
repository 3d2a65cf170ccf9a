"""Load on `klaus serve`: clients ask for thumbnails of 12 MP photos and upload photos, all at once.

    .venv/bin/python bench/serve_load.py                 # 32 clients, 640 requests: a markdown table
    .venv/bin/python bench/serve_load.py --json
    .venv/bin/python bench/serve_load.py --bombs         # also 6 uploads + 6 thumbnails of 100-169 Mpx images at once
    .venv/bin/python bench/serve_load.py --section       # the "Serving under load" part of BENCHMARKS.md (with --bombs)
    .venv/bin/python bench/serve_load.py --write         # ... and write it there

Loopback only (127.0.0.1, a free port), a bounded number of requests and a time limit. The
photos are generated into a temporary folder (smooth colour fields with grain, upscaled to
4000 x 3000, JPEG quality 90, so they compress like camera photos) and indexed with
`klaus index`; then `klaus serve --port 0` runs as its own process and the clients (threads,
one keep-alive connection each) send their requests: half thumbnail requests (a random photo,
small or large; the first request for each builds it, later ones are served from the cache)
and half uploads of one of the photos to /api/classify (raw bodies and multipart forms).

Measured on the server process: its resident memory idle before the load (after one warm-up
request of each kind), its peak during the load (``VmHWM`` from /proc, reset after the
warm-up; and the largest of ``VmRSS`` samples every 10 ms), and its resident memory after the
load once it has been idle for 3 s. Targets: peak under 1 GiB, back within 100 MiB of idle, and
no answer other than 200 or 503 with Retry-After.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

KLAUS = [str(Path(sys.executable).with_name("klaus"))]
if not Path(KLAUS[0]).exists():
    KLAUS = [sys.executable, "-m", "klaus.cli"]
MIB = 2**20
PEAK_TARGET = 1024 * MIB
RETURN_TARGET = 100 * MIB
COMMAND = "python bench/serve_load.py"


def make_photos(folder: Path, count: int, size: tuple[int, int] = (4000, 3000), seed: int = 0) -> list[Path]:
    """``count`` camera-like JPEGs of ``size``: smooth colour fields with grain, quality 90."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    small_w, small_h = max(8, width // 8), max(8, height // 8)
    yy, xx = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    paths = []
    for i in range(count):
        phase = rng.uniform(0, 6.28, 3)
        freq = rng.uniform(0.01, 0.05, 3)
        base = np.stack([127 + 100 * np.sin(freq[c] * (xx + 1.7 * yy) + phase[c]) for c in range(3)], axis=-1)
        base += rng.normal(0, 18, base.shape)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
        grain = rng.integers(-6, 7, (height, width, 1), dtype=np.int16)
        pixels = np.clip(np.asarray(image, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
        path = folder / f"photo{i:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def index(folder: Path, db: Path) -> None:
    subprocess.run([*KLAUS, "index", str(folder), "--db", str(db)], check=True, capture_output=True, timeout=1800)


@dataclass
class Server:
    """A `klaus serve` process on a free loopback port."""

    proc: subprocess.Popen
    host: str
    port: int

    @classmethod
    def start(cls, db: Path, *args: str, env: dict[str, str] | None = None) -> Server:
        proc = subprocess.Popen(
            [*KLAUS, "serve", "--db", str(db), "--host", "127.0.0.1", "--port", "0", "--json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            proc.kill()
            raise RuntimeError(f"klaus serve did not start: {proc.communicate()[1].strip()}")
        url = json.loads(line)["url"]
        host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
        return cls(proc, host, int(port))

    def connection(self, timeout: float = 120.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def get(self, path: str) -> tuple[int, bytes]:
        conn = self.connection()
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def stop(self) -> str:
        """Stop the server (SIGTERM, then SIGKILL after 30 s); its stderr."""
        self.proc.terminate()
        try:
            _out, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, err = self.proc.communicate()
        return err or ""


def status_field(pid: int, name: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/PID/status in bytes (0 if unavailable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux: ``5`` to /proc/PID/clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    """Samples a process's VmRSS every ``interval`` seconds; keeps the largest."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, status_field(self.pid, "VmRSS"))
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


@dataclass
class Outcomes:
    """What the clients got back."""

    statuses: Counter = field(default_factory=Counter)  # "thumb 200", "upload 503", ...
    errors: list[str] = field(default_factory=list)  # anything but 200, or 503 with Retry-After
    requests: int = 0
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(n for key, n in self.statuses.items() if key.endswith(f" {status}"))


def multipart(data: bytes, boundary: str = "klaus-load-boundary") -> tuple[bytes, str]:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="photo"; filename="photo.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def run_clients(
    server: Server,
    photo_ids: list[int],
    uploads: list[bytes],
    *,
    clients: int,
    requests: int,
    seconds: float,
    seed: int = 0,
) -> Outcomes:
    """``clients`` threads share ``requests`` requests (half thumbnails, half uploads), stopping at ``seconds``."""
    out = Outcomes()
    lock = threading.Lock()
    budget = iter(range(requests))
    deadline = time.monotonic() + seconds
    start = time.monotonic()

    def record(kind: str, status: int, retry_after: str | None, body: bytes) -> None:
        problem = None
        if status == 503:
            if not (retry_after and retry_after.isdigit()):
                problem = f"{kind}: 503 without Retry-After"
        elif status != 200:
            problem = f"{kind}: {status} {body[:120]!r}"
        elif kind == "thumb" and not body.startswith(b"\xff\xd8"):
            problem = "thumb: 200 but not a JPEG"
        elif kind == "upload" and "predictions" not in json.loads(body):
            problem = f"upload: 200 without predictions {body[:120]!r}"
        with lock:
            out.statuses[f"{kind} {status}"] += 1
            out.requests += 1
            if problem:
                out.errors.append(problem)

    def client(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        conn = server.connection()
        try:
            while time.monotonic() < deadline:
                with lock:
                    turn = next(budget, None)
                if turn is None:
                    return
                try:
                    if rng.random() < 0.5:
                        kind = "thumb"
                        size = rng.choice(("small", "large"))
                        conn.request("GET", f"/thumb/{rng.choice(photo_ids)}?size={size}")
                    else:
                        kind = "upload"
                        data = rng.choice(uploads)
                        if rng.random() < 0.5:
                            conn.request("POST", "/api/classify", body=data, headers={"Content-Type": "image/jpeg"})
                        else:
                            body, content_type = multipart(data)
                            conn.request("POST", "/api/classify", body=body, headers={"Content-Type": content_type})
                    response = conn.getresponse()
                    body = response.read()
                    record(kind, response.status, response.getheader("Retry-After"), body)
                    if response.getheader("Connection", "").lower() == "close":
                        conn.close()
                        conn = server.connection()
                except (OSError, http.client.HTTPException) as exc:
                    with lock:
                        out.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                        out.requests += 1
                    conn.close()
                    conn = server.connection()
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.seconds = time.monotonic() - start
    return out


@dataclass
class Figures:
    photos: int
    photo_size: str
    upload_mib: float
    clients: int
    requests: int
    seconds: float
    statuses: dict[str, int]
    errors: list[str]
    idle_rss: int
    peak_rss: int
    after_rss: int
    stderr_lines: list[str]

    @property
    def peak_met(self) -> bool:
        return self.peak_rss < PEAK_TARGET

    @property
    def return_met(self) -> bool:
        return self.after_rss - self.idle_rss <= RETURN_TARGET


def measure(
    *,
    photos: int = 48,
    clients: int = 32,
    requests: int = 640,
    seconds: float = 600.0,
    size: tuple[int, int] = (4000, 3000),
    serve_args: tuple[str, ...] = (),
    seed: int = 0,
) -> Figures:
    """Generate and index the photos, start the server, warm it up, load it, and measure (see the module docstring)."""
    work = Path(tempfile.mkdtemp(prefix="klaus-serve-load-"))
    try:
        paths = make_photos(work / "photos", photos, size, seed)
        db = work / "library.db"
        index(work / "photos", db)
        uploads = [p.read_bytes() for p in paths[: min(8, len(paths))]]
        server = Server.start(db, *serve_args)
        try:
            status, _ = server.get("/thumb/1?size=small")  # warm-up: one of each kind
            assert status == 200, status
            conn = server.connection()
            conn.request("POST", "/api/classify", body=uploads[0], headers={"Content-Type": "image/jpeg"})
            response = conn.getresponse()
            response.read()
            conn.close()
            assert response.status == 200, response.status
            shutil.rmtree(work / ".library.db.thumbs", ignore_errors=True)  # the load builds every thumbnail
            time.sleep(1.0)
            pid = server.proc.pid
            idle = status_field(pid, "VmRSS")
            reset = reset_peak(pid)
            sampler = Sampler(pid)
            sampler.start()
            outcomes = run_clients(
                server,
                list(range(1, photos + 1)),
                uploads,
                clients=clients,
                requests=requests,
                seconds=seconds,
                seed=seed,
            )
            sampled = sampler.stop()
            peak = max(sampled, status_field(pid, "VmHWM") if reset else 0)
            time.sleep(3.0)
            after = status_field(pid, "VmRSS")
            status, _ = server.get("/")
            if status != 200:
                outcomes.errors.append(f"after the load, / answered {status}")
        finally:
            err = server.stop()
        return Figures(
            photos=photos,
            photo_size=f"{size[0]}x{size[1]}",
            upload_mib=round(sum(len(u) for u in uploads) / len(uploads) / MIB, 2),
            clients=clients,
            requests=outcomes.requests,
            seconds=round(outcomes.seconds, 1),
            statuses=dict(sorted(outcomes.statuses.items())),
            errors=outcomes.errors[:20],
            idle_rss=idle,
            peak_rss=peak,
            after_rss=after,
            stderr_lines=[line for line in err.splitlines() if line.strip()],
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class BombFigures:
    """Large images within the pixel limit, all at once: what the server's memory does."""

    images: list[str]
    requests: int
    statuses: dict[str, int]
    errors: list[str]
    seconds: float
    idle_rss: int
    peak_rss: int
    after_rss: int
    stderr_lines: list[str]


def make_bombs(folder: Path) -> list[Path]:
    """Small files that decode to huge images: a 13000 x 13000 RGBA PNG and a 10000 x 10000 GIF."""
    folder.mkdir(parents=True, exist_ok=True)
    png, gif = folder / "rgba-13000.png", folder / "palette-10000.gif"
    Image.new("RGBA", (13_000, 13_000), (40, 90, 160, 200)).save(png)
    Image.new("P", (10_000, 10_000), 7).save(gif)
    return [png, gif]


def measure_bombs(*, uploads: int = 6, thumbs: int = 6, serve_args: tuple[str, ...] = ()) -> BombFigures:
    """``uploads`` uploads and ``thumbs`` thumbnail requests of the images of :func:`make_bombs`, all at once."""
    work = Path(tempfile.mkdtemp(prefix="klaus-serve-bombs-"))
    try:
        paths = make_bombs(work / "photos")
        db = work / "library.db"
        index(work / "photos", db)
        server = Server.start(db, *serve_args)
        try:
            time.sleep(1.0)
            pid = server.proc.pid
            idle = status_field(pid, "VmRSS")
            reset = reset_peak(pid)
            sampler = Sampler(pid)
            sampler.start()
            out = Outcomes()
            lock = threading.Lock()
            data = paths[0].read_bytes()

            def request(kind: str, number: int) -> None:
                conn = server.connection(timeout=300)
                try:
                    if kind == "upload":
                        conn.request("POST", "/api/classify", body=data, headers={"Content-Type": "image/png"})
                    else:
                        conn.request("GET", f"/thumb/{1 + number % len(paths)}?size={('small', 'large')[number % 2]}")
                    response = conn.getresponse()
                    body = response.read()
                    with lock:
                        out.statuses[f"{kind} {response.status}"] += 1
                        out.requests += 1
                        if response.status not in (200, 503) or (
                            response.status == 503 and not response.getheader("Retry-After")
                        ):
                            out.errors.append(f"{kind}: {response.status} {body[:120]!r}")
                except (OSError, http.client.HTTPException) as exc:
                    with lock:
                        out.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                finally:
                    conn.close()

            start = time.monotonic()
            threads = [threading.Thread(target=request, args=("upload", n)) for n in range(uploads)]
            threads += [threading.Thread(target=request, args=("thumb", n)) for n in range(thumbs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.monotonic() - start
            sampled = sampler.stop()
            peak = max(sampled, status_field(pid, "VmHWM") if reset else 0)
            time.sleep(3.0)
            after = status_field(pid, "VmRSS")
        finally:
            err = server.stop()
        return BombFigures(
            images=[f"{p.name} ({p.stat().st_size // 1024} KiB)" for p in paths],
            requests=out.requests,
            statuses=dict(sorted(out.statuses.items())),
            errors=out.errors[:20],
            seconds=round(seconds, 1),
            idle_rss=idle,
            peak_rss=peak,
            after_rss=after,
            stderr_lines=[line for line in err.splitlines() if line.strip()],
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def section(f: Figures, bombs: BombFigures | None = None, command: str = COMMAND) -> str:
    """The "Serving under load" part of BENCHMARKS.md's Reliability section."""
    ok = f.statuses
    thumbs = f"{ok.get('thumb 200', 0)} / {ok.get('thumb 503', 0)}"
    uploads = f"{ok.get('upload 200', 0)} / {ok.get('upload 503', 0)}"
    lines = [
        "### Serving under load",
        "",
        f"`{command}`: {f.photos} generated {f.photo_size} JPEGs (mean upload {f.upload_mib} MiB) indexed, then "
        f"`klaus serve` with its defaults on loopback and {f.clients} clients at once, each on its own keep-alive "
        "connection, sharing the requests: half thumbnails (a random photo, small or large, each built on its first "
        "request), half uploads to `/api/classify` (raw bodies and multipart forms). RSS of the server process: idle "
        "after one warm-up request of each kind, peak during the load (VmHWM reset after the warm-up, and 10 ms "
        "samples), and 3 s after the last answer. A 503 is the server refusing work beyond its limits (a queue of 64 "
        "waiting for the decoding pool, the upload-body budget) with `Retry-After`; these clients do not wait, they "
        "send their next request at once.",
        "",
        "| clients | requests | thumbnails 200 / 503 | uploads 200 / 503 | other answers | seconds | idle RSS "
        "| peak RSS | RSS 3 s after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {f.clients} | {f.requests} | {thumbs} | {uploads} | {len(f.errors)} | {f.seconds} | {f.idle_rss / MIB:.0f} MiB "
        f"| **{f.peak_rss / MIB:.0f} MiB** | **{f.after_rss / MIB:.0f} MiB** |",
        "",
        f"Targets: peak RSS under 1 GiB — {'met' if f.peak_met else '**not met**'}; back within 100 MiB of idle "
        f"({(f.after_rss - f.idle_rss) / MIB:+.0f} MiB) — {'met' if f.return_met else '**not met**'}; "
        f"no answer but 200 or 503 with Retry-After — {'met' if not f.errors else '**not met**'}"
        f"{'' if not f.errors else ' (' + '; '.join(f.errors[:3]) + ')'}; server stderr: "
        f"{'nothing' if not f.stderr_lines else f'{len(f.stderr_lines)} lines'}.",
    ]
    if bombs is not None:
        b = bombs
        n_uploads = b.statuses.get("upload 200", 0) + b.statuses.get("upload 503", 0)
        n_thumbs = b.statuses.get("thumb 200", 0) + b.statuses.get("thumb 503", 0)
        lines += [
            "",
            f"Large images within the pixel limit, all at once (`{command} --bombs`): {' and '.join(b.images)} "
            f"indexed, then {n_uploads} uploads of the PNG and {n_thumbs} thumbnail requests of both sent together. "
            "Each PNG decode (676 MB as RGBA) is larger than the 384 MiB decoding budget, so it runs alone; a request "
            "that would wait longer than 30 s is answered 503.",
            "",
            "| requests | answers | other answers | seconds | idle RSS | peak RSS | RSS 3 s after |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| {b.requests} | {', '.join(f'{k}: {n}' for k, n in b.statuses.items())} | {len(b.errors)} | {b.seconds} "
            f"| {b.idle_rss / MIB:.0f} MiB | **{b.peak_rss / MIB:.0f} MiB** | **{b.after_rss / MIB:.0f} MiB** |",
            "",
            f"Peak under 1 GiB — {'met' if b.peak_rss < PEAK_TARGET else '**not met**'}; back within 100 MiB of idle "
            f"({(b.after_rss - b.idle_rss) / MIB:+.0f} MiB) — "
            f"{'met' if b.after_rss - b.idle_rss <= RETURN_TARGET else '**not met**'}; server stderr: "
            f"{'nothing' if not b.stderr_lines else f'{len(b.stderr_lines)} lines'}.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=48)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=640)
    parser.add_argument("--seconds", type=float, default=600.0, help="stop sending after this long")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--bombs", action="store_true", help="also the large-image burst (always with --section)")
    parser.add_argument("--section", action="store_true", help="the BENCHMARKS.md part (markdown), with the burst")
    parser.add_argument("--write", action="store_true", help="write that part into BENCHMARKS.md (implies --section)")
    args = parser.parse_args()
    figures = measure(photos=args.photos, clients=args.clients, requests=args.requests, seconds=args.seconds)
    bombs = measure_bombs() if args.section or args.bombs or args.write else None
    if args.json:
        report = {**asdict(figures), "peak_met": figures.peak_met, "return_met": figures.return_met}
        print(json.dumps({**report, "bombs": asdict(bombs) if bombs else None}, indent=2))
    else:
        print(section(figures, bombs))
    if args.write:
        from reliability import write_part

        write_part("### Serving under load", section(figures, bombs))
        print("wrote the Serving under load part of BENCHMARKS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
