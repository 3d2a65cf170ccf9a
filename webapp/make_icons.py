"""Draw the on-device app's icons with Pillow: webapp/src/icons/*.png.

A white "K" with a small leaf-like palette of dots (the k-means palette the model is made of)
on the app's teal, drawn from polygons at 4x and downsampled, so no font is needed. The
maskable icon keeps everything inside the central 80 % safe zone. Deterministic: PNGs are
written without metadata, so the same Pillow gives the same bytes. Run
``python webapp/make_icons.py``; ``node build.mjs`` copies the icons into the package.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent / "src" / "icons"
TEAL = (29, 78, 95, 255)
WHITE = (255, 255, 255, 255)
PALETTE = [(124, 195, 216, 255), (215, 232, 238, 255), (255, 200, 87, 255), (240, 128, 96, 255)]
SUPERSAMPLE = 4

# name: (size in pixels, maskable, rounded corners)
ICONS = {
    "icon-192.png": (192, False, True),
    "icon-512.png": (512, False, True),
    "icon-maskable-512.png": (512, True, False),
    "apple-touch-icon.png": (180, False, False),
}


def draw_icon(size: int, maskable: bool, rounded: bool) -> Image.Image:
    """The icon at ``size`` pixels (RGBA)."""
    big = size * SUPERSAMPLE
    image = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    if rounded:
        draw.rounded_rectangle((0, 0, big - 1, big - 1), radius=big // 5, fill=TEAL)
    else:
        draw.rectangle((0, 0, big - 1, big - 1), fill=TEAL)
    # The glyph lives in a centred box: 62 % of the icon (maskable: 50 %, inside the 80 % safe circle).
    box = 0.5 if maskable else 0.62
    left, top = big * (1 - box) / 2, big * (1 - box) / 2
    unit = big * box

    def pt(x: float, y: float) -> tuple[float, float]:
        return (left + x * unit, top + y * unit)

    stem = 0.2
    draw.polygon([pt(0.05, 0.0), pt(0.05 + stem, 0.0), pt(0.05 + stem, 1.0), pt(0.05, 1.0)], fill=WHITE)
    # The arm's lower edge runs (0.96, 0) -> (0.25, 0.73); the leg starts on that edge.
    draw.polygon([pt(0.25, 0.47), pt(0.70, 0.0), pt(0.96, 0.0), pt(0.25, 0.73)], fill=WHITE)
    draw.polygon([pt(0.42, 0.555), pt(0.57, 0.40), pt(0.98, 1.0), pt(0.72, 1.0)], fill=WHITE)
    # Four palette dots at the top right.
    radius = unit * 0.075
    for i, colour in enumerate(PALETTE):
        cx, cy = pt(0.62 + 0.13 * (i % 2), 0.70 + 0.17 * (i // 2))
        cx += unit * 0.42
        cy -= unit * 0.58
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def write_icons(out: Path = OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (size, maskable, rounded) in ICONS.items():
        icon = draw_icon(size, maskable, rounded)
        if not rounded:  # opaque everywhere: no alpha channel needed
            icon = icon.convert("RGB")
        path = out / name
        icon.save(path, "PNG", optimize=True)
        written.append(path)
    return written


def main() -> int:
    for path in write_icons():
        print(f"{path}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
