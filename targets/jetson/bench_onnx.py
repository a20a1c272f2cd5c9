"""Jetson benchmark: an ONNX bundle on onnxruntime with TensorRT, then CUDA, then CPU providers.

    python targets/jetson/bench_onnx.py BUNDLE --json jetson.json
    # (trtexec --onnx=BUNDLE/model.onnx --fp16 gives TensorRT's own figure for comparison)
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
import devbench  # noqa: E402
import edgecheck  # noqa: E402
import runtimes  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--providers", default=None, help="comma-separated onnxruntime providers (default: best available)")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    _, meta, _ = edgecheck.load_bundle(a.bundle)
    providers = a.providers.split(",") if a.providers else None
    run, runtime = runtimes.onnxruntime(Path(a.bundle) / meta["model_file"], meta["spec"]["output_names"], providers)
    r = devbench.bench_rows(Path(a.bundle), run, runtime, 0, a.warmup, a.runs)
    print(f"{r['name']}: infer {r['ms']['infer']['median']:.1f} ms (p90 {r['ms']['infer']['p90']:.1f}), end-to-end {r['ms']['e2e']['median']:.1f} ms")
    if a.json:
        Path(a.json).write_text(json.dumps([r], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
