"""The baseline for cold start and memory: the least code that classifies a photo with ONNX Runtime.

    python bench/minimal_fp32.py MODEL.onnx IMAGE... [--rss]

Imports only onnxruntime, numpy and Pillow; EfficientNet-Lite preprocessing
(shorter side to 256, bicubic, center 224 crop, (x - 127) / 128), one photo per
run. Prints each photo's top-1 class index; with ``--rss`` also a JSON line with
the peak (VmHWM) and current (VmRSS) resident set size of this process.
"""

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image


def main() -> None:
    model, images = sys.argv[1], [a for a in sys.argv[2:] if a != "--rss"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    for image in images:
        img = Image.open(image).convert("RGB")
        scale = 256 / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        left, top = (img.width - 224) // 2, (img.height - 224) // 2
        x = (np.asarray(img.crop((left, top, left + 224, top + 224)), np.float32) - 127.0) / 128.0
        logits = session.run(None, {session.get_inputs()[0].name: x.transpose(2, 0, 1)[None]})[0]
        print(int(np.argmax(logits)))
    if "--rss" in sys.argv:  # peak (VmHWM) and current (VmRSS) resident set, session still alive
        with open("/proc/self/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        peak, current = (int(status[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS"))
        print(json.dumps({"peak_bytes": peak, "current_bytes": current, "session": bool(session)}))


if __name__ == "__main__":
    main()
