"""Write examples/*.jpg from scikit-image's bundled public-domain / CC0 photos.

Usage: python scripts/make_examples.py [OUT_DIR]   (default: examples/)
Needs scikit-image (not a Klaus dependency).  Output is deterministic for a
given Pillow/libjpeg: quality 92, no metadata, 4:2:0 subsampling.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image
from skimage import data

# output name -> skimage.data function
PHOTOS = {
    "cat.jpg": "chelsea",
    "coffee.jpg": "coffee",
    "rocket.jpg": "rocket",
    "astronaut.jpg": "astronaut",
}


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, func in PHOTOS.items():
        pixels = getattr(data, func)()
        path = out_dir / name
        Image.fromarray(pixels, "RGB").save(path, "JPEG", quality=92, subsampling="4:2:0")
        print(f"{path}  {pixels.shape[1]}x{pixels.shape[0]}  skimage.data.{func}()")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "examples")
