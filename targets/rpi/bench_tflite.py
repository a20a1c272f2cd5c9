"""Raspberry Pi benchmark: a TFLite bundle with XNNPACK at several thread counts.

    python targets/rpi/bench_tflite.py BUNDLE --threads 1,2,4 --json rpi.json
    # on the host: edge bench --merge rpi.json --report bench_rpi/
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
    ap.add_argument("--threads", default="1,2,4")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    _, meta, _ = edgecheck.load_bundle(a.bundle)
    rows = []
    for t in (int(x) for x in a.threads.split(",")):
        run, runtime = runtimes.tflite(Path(a.bundle) / meta["model_file"], meta["spec"]["output_names"], threads=t)
        r = devbench.bench_rows(Path(a.bundle), run, runtime, t, a.warmup, a.runs)
        rows.append(r)
        print(f"{r['name']} threads {t}: infer {r['ms']['infer']['median']:.1f} ms (p90 {r['ms']['infer']['p90']:.1f}), "
              f"end-to-end {r['ms']['e2e']['median']:.1f} ms")
        if runtime.endswith("XNNPACK partitions: 0"):
            print(f"  note: XNNPACK took no op of this graph: it ran in {runtime.split(';')[0]}'s builtin kernels; ai-edge-litert "
                  "runs a full-integer bundle as one XNNPACK partition (pip install ai-edge-litert; numpy 2)")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
