"""`edge soak BUNDLE...`: many inferences through the pipeline in one process, watching resident
memory. A leak in a runtime binding or in our pre/post-processing shows as growth after warm-up."""
from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

from tqdm import tqdm

from edge.atomic import write_json
from edge.bundle import load_bundle_runner
from edge.outputs import check_args
from edge.pipeline import Pipeline
from edge.samples import scene


def rss_bytes() -> int:
    """Current resident set size (Linux /proc), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def soak(bundle: str, n: int, warmup: int, every: int = 500, progress: bool = True) -> dict:
    runner, spec, desc = load_bundle_runner(bundle)
    pipe = Pipeline(runner, spec)
    image = scene(5)
    for _ in range(warmup):
        pipe(image)
    base = rss_bytes()
    samples = [(0, base)]
    faces = set()
    t = time.perf_counter()
    for i in tqdm(range(1, n + 1), desc=Path(bundle).name, unit="inf", disable=not progress, mininterval=5):
        faces.add(len(pipe(image)))
        if i % every == 0:
            samples.append((i, rss_bytes()))
    secs = time.perf_counter() - t
    final = samples[-1][1]
    return {"bundle": str(bundle), "runner": runner.name, "inferences": n, "warmup": warmup, "seconds": round(secs, 1),
            "rss_after_warmup_mb": round(base / 2**20, 1), "rss_final_mb": round(final / 2**20, 1),
            "rss_max_mb": round(max(s for _, s in samples) / 2**20, 1), "growth_pct": round(100 * (final - base) / base, 2),
            "face_counts_seen": sorted(faces), "samples_mb": [(i, round(s / 2**20, 1)) for i, s in samples]}


def cmd_soak(args) -> int:
    check_args(args, files=("json",))
    results = []
    ok = True
    for b in args.bundles:
        r = soak(b, args.n, args.warmup, progress=not args.quiet)
        passed = r["growth_pct"] < args.max_growth and len(r["face_counts_seen"]) == 1
        ok &= passed
        r["passed"] = passed
        results.append(r)
        print(f"{b}: {r['inferences']} inferences in {r['seconds']} s [{r['runner']}]; RSS {r['rss_after_warmup_mb']} MB after "
              f"{r['warmup']} warm-up -> {r['rss_final_mb']} MB (max {r['rss_max_mb']}), growth {r['growth_pct']} % "
              f"(limit {args.max_growth} %); face counts seen {r['face_counts_seen']} -> {'ok' if passed else 'FAILED'}")
    if args.json:
        write_json(args.json, results)
    return 0 if ok else 1


def register(sub) -> None:
    p = sub.add_parser("soak", help="many inferences in one process; resident-memory growth after warm-up")
    p.add_argument("bundles", nargs="+")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--max-growth", type=float, default=5.0, help="percent")
    p.add_argument("--json", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_soak)
