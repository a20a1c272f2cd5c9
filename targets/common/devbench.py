"""Device benchmark loop shared by targets/*/bench_*.py: numpy + one runtime, the same JSON rows
as `edge bench` (load them with `edge bench --merge rows.json --report DIR`)."""
from __future__ import annotations

import os
import platform
import time

import edgecheck
import numpy as np


def bench_rows(bundle, run, name: str, threads: int, warmup: int = 5, runs: int = 30) -> dict:
    folder, meta, g = edgecheck.load_bundle(bundle)
    spec = meta["spec"]
    canvas = g["canvases"][min(1, len(g["canvases"]) - 1)]
    size = canvas.shape[0]
    pri = edgecheck.priors(size, size, spec["arch"]["min_sizes"], spec["steps"])
    decoder = edgecheck.mesh_decoder_of(folder, meta)
    times = {"pre": [], "infer": [], "post": [], "e2e": []}
    canvas_input = edgecheck.takes_canvas(meta)
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        x = edgecheck.network_input(canvas, spec, canvas_input)
        t1 = time.perf_counter()
        out = run(x)
        t2 = time.perf_counter()
        edgecheck.detect(edgecheck.first_image(out), pri, (size, size), spec["variances"], mesh_decoder=decoder)
        t3 = time.perf_counter()
        if i >= warmup:
            for k, v in (("pre", t1 - t0), ("infer", t2 - t1), ("post", t3 - t2), ("e2e", t3 - t0)):
                times[k].append(v * 1e3)
    size_bytes = sum((folder / f).stat().st_size for f in meta["files"] if f != "golden.npz" and (folder / f).is_file())
    return {"name": f"{meta['target']} {meta['precision']} [{name}, {platform.machine()}]", "threads": threads, "runs": runs, "warmup": warmup,
            "ms": {k: {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "min": float(np.min(v))} for k, v in times.items()},
            "model_bytes": size_bytes, "gmacs": None, "floor_ms": None, "floor_dtype": meta["precision"], "infer_over_floor": None,
            "device": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores", "pre_note": "letterboxed canvas from golden.npz: normalisation only"}
