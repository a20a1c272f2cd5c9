"""`edge bench`: latency of bundles, the FP32 PyTorch model and peer detectors, measured the same
way in one run, with pre-processing, inference and post-processing timed separately.

Runs are taken in rounds: each round gives every candidate a block of runs (after a short pause and
two untimed runs), so drift on a shared machine hits all candidates alike. Not run by run: onnxruntime's
worker threads spin for a while after each inference and slowed whatever ran next (OpenVINO int8 at
2 threads measured 6.1 ms interleaved run by run against 3.6 ms alone). The compute floor is the
model's multiply-accumulates divided by the peak MAC rate of the same cores through the same runtime's
kernels: a 1024^3 matrix product at the same thread count in onnxruntime (MatMul / MatMulInteger),
TFLite (FULLY_CONNECTED, fp32 or int8), OpenVINO (MatMul, f32 or NNCF-quantised) or PyTorch (matmul).
The floor is an estimate, itself a timing: the peak rate is taken as the best of several repeats,
measured before and after the timed runs at each thread count, and a busy machine can still lower it
(a model measured 0.80x "its floor" once while other work ran), so the table marks it as one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import onnxruntime as ort
import torch
from matplotlib.lines import Line2D
from onnx import TensorProto, helper
from tqdm import tqdm

from edge.atomic import write_json
from edge.bundle import CALIBRATED, load_bundle_runner, path_bytes, read_metadata
from edge.commands.args import peer_pipeline
from edge.commands.soak import rss_bytes
from edge.contract import MAX_INPUT_SIZE
from edge.evaluate.parity import reference_model
from edge.outputs import check_args
from edge.pipeline import Pipeline
from edge.quiet import native_output_quiet
from edge.runners import TorchRunner
from edge.runners.tflite import TFLiteRunner
from edge.samples import scene
from edge.weights.fetch import cache_dir
from edge.weights.load import load_weights
from edge.weights.registry import REGISTRY

# Pause before each candidate's block of runs. Five OpenVINO, TFLite and onnxruntime bundles in one run, 2 threads,
# 640x640: without it every row came out 10-30 % slower than with it (OpenVINO FP32 9.8 against 7.1 ms, onnxruntime
# FP32 11.3 against 8.6 ms), the two untimed runs notwithstanding.
BLOCK_PAUSE_S = 0.1


@dataclass
class Candidate:
    name: str
    pipeline: object
    model_bytes: int
    macs: float | None  # multiply-accumulates per inference
    dtype: str  # "fp32" or "int8": which peak rate is the floor
    runtime: str = "onnxruntime"  # whose matrix-product kernels give the floor: onnxruntime, tflite, openvino, torch


def conv_macs(model, size: int) -> float:
    """MACs of one forward pass at size x size (convolutions; the rest is negligible here)."""

    total = 0.0

    def hook(m, inp, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1]
        total += out.numel() / out.shape[0] * (m.in_channels // m.groups) * k

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hs:
        h.remove()
    return total


def peak_macs_per_s(threads: int, dtype: str, n: int = 1024, reps: int = 5) -> float:
    """Best-of-reps MAC rate of an n x n x n matrix product in onnxruntime."""

    if dtype == "fp32":
        node = helper.make_node("MatMul", ["a", "b"], ["c"])
        ins = [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]), helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])]
        out = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
        feeds = {"a": np.random.rand(n, n).astype(np.float32), "b": np.random.rand(n, n).astype(np.float32)}
    else:
        node = helper.make_node("MatMulInteger", ["a", "b"], ["c"])
        ins = [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]), helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])]
        out = helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])
        feeds = {"a": np.random.randint(0, 255, (n, n), dtype=np.uint8), "b": np.random.randint(-127, 127, (n, n), dtype=np.int8)}
    m = helper.make_model(helper.make_graph([node], "peak", ins, [out]), opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    s = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    s.run(None, feeds)
    best = min(_timed(lambda: s.run(None, feeds)) for _ in range(reps))
    return n ** 3 / best


def _peak_tflite(threads: int, dtype: str, n: int = 1024, reps: int = 5) -> float:
    """A 1024^3 product through TFLite's own kernels (FULLY_CONNECTED), fp32 or PT2E int8; models cached."""

    path = cache_dir() / "bench" / f"matmul_{dtype}_{n}.tflite"
    if not path.is_file():
        import litert_torch  # optional: tflite extra

        path.parent.mkdir(parents=True, exist_ok=True)
        lin = torch.nn.Linear(n, n, bias=False).eval()
        x = torch.randn(n, n)
        if dtype == "fp32":
            with native_output_quiet():
                em = litert_torch.convert(lin, (x,))
        else:
            from litert_torch.quantize.pt2e_quantizer import (  # optional: tflite extra
                PT2EQuantizer,
                get_symmetric_quantization_config,
            )
            from litert_torch.quantize.quant_config import QuantConfig  # optional: tflite extra
            from torchao.quantization.pt2e.quantize_pt2e import (  # optional: tflite/train extra
                convert_pt2e,
                prepare_pt2e,
            )

            q = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            gm = prepare_pt2e(torch.export.export(lin, (x,)).module(), q)
            gm(x)
            gm = convert_pt2e(gm, fold_quantize=False)
            gm.training = False
            with native_output_quiet():
                em = litert_torch.convert(gm, (x,), quant_config=QuantConfig(pt2e_quantizer=q))
        tmp = path.with_suffix(".partial")
        with native_output_quiet():
            em.export(str(tmp))
        tmp.replace(path)
    r = TFLiteRunner(path, ["y"], threads)
    x = np.random.rand(n, n).astype(np.float32)
    r(x)
    return n ** 3 / min(_timed(lambda: r(x)) for _ in range(reps))


def _peak_openvino(threads: int, dtype: str, n: int = 1024, reps: int = 5) -> float:
    """A 1024^3 product through OpenVINO's CPU kernels: f32 MatMul, or NNCF-quantised (u8 x i8)."""
    import openvino as ov  # optional: openvino extra
    import openvino.opset13 as ops  # optional: openvino extra

    x = ops.parameter([n, n], ov.Type.f32, name="x")
    w = ops.constant(np.random.rand(n, n).astype(np.float32) - 0.5)
    m = ov.Model([ops.matmul(x, w, False, True)], [x], "matmul")
    data = np.random.rand(n, n).astype(np.float32)
    if dtype == "int8":
        import nncf  # optional: openvino extra

        with native_output_quiet(litert=False):  # nncf draws a progress bar (statistics collection)
            m = nncf.quantize(m, nncf.Dataset([data]), subset_size=1, preset=nncf.QuantizationPreset.MIXED)
    c = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
    req = c.create_infer_request()
    req.infer({0: data})
    return n ** 3 / min(_timed(lambda: req.infer({0: data})) for _ in range(reps))


def _peak_torch(threads: int, dtype: str, n: int = 1024, reps: int = 5) -> float:
    torch.set_num_threads(threads)
    a, b = torch.rand(n, n), torch.rand(n, n)
    a @ b
    return n ** 3 / min(_timed(lambda: a @ b) for _ in range(reps))


def peak(runtime: str, threads: int, dtype: str) -> float:
    """Peak MAC/s of `runtime`'s own matrix-product kernels at `threads` (torch: fp32 only)."""
    fn = {"onnxruntime": peak_macs_per_s, "tflite": _peak_tflite, "openvino": _peak_openvino, "torch": _peak_torch}[runtime]
    return fn(threads, dtype)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def rss_mb() -> float:
    return rss_bytes() / 2**20


def _distinct_tails(paths: list[Path]) -> list[str]:
    """The shortest trailing path parts that tell the paths apart (run1/b_int8, run2/b_int8); the position
    where even the full paths are the same (one bundle given twice). Rows are keyed by name: two candidates
    with one name would pool their timings."""
    for k in range(1, max(len(p.parts) for p in paths) + 1):
        tails = ["/".join(p.parts[-k:]) for p in paths]
        if len(set(tails)) == len(tails):
            return tails
    return [f"{'/'.join(p.parts[-2:])} #{i + 1}" for i, p in enumerate(paths)]


def build_candidates(bundles, peers, torch_ref: bool, threads: int, input_size: int) -> list[Candidate]:
    model, _ = load_weights("default")
    ours_macs = conv_macs(model, input_size)
    out = []
    for b in bundles:
        folder, meta = read_metadata(b)
        runner, spec, _ = load_bundle_runner(b, threads=threads)
        files = [meta["model_file"]] + (["model.bin"] if meta["target"] == "openvino" else [])
        dtype = "int8" if meta["precision"] in CALIBRATED else "fp32"
        rt = {"onnx": "onnxruntime", "tflite": "tflite", "openvino": "openvino"}.get(meta["target"])
        name, source = f"{meta['target']} {meta['precision']}", model
        w = meta.get("weights", {})
        if w.get("sha256") != REGISTRY["default"].sha256:  # another model (a pruned one): its own name and MACs

            name += f" [{w.get('name')}]"
            try:
                source = reference_model(meta)
            except Exception:  # noqa: BLE001 - the checkpoint moved: no compute floor for this row
                source = None
        out.append(Candidate(name, Pipeline(runner, spec), sum(path_bytes(folder / f) for f in files),
                             conv_macs(source, spec.input_size) if rt and source is not None else None, dtype, rt or "onnxruntime"))
    seen = {}
    for c, b in zip(out, bundles):  # two bundles of different checkpoints with one file name: the folder tells them apart
        seen.setdefault(c.name, []).append((c, b))
    for group in seen.values():
        if len(group) > 1:
            for c, tag in zip((c for c, _ in group), _distinct_tails([Path(b).resolve() for _, b in group])):
                c.name += f" <{tag}>"
    if torch_ref:
        torch.set_num_threads(threads)
        out.append(Candidate("pytorch fp32 (eager)", Pipeline(TorchRunner(model), model.spec.with_input_size(input_size)),
                             sum(p.numel() * 4 for p in model.parameters()), ours_macs, "fp32", "torch"))
    for p in peers:
        pipe, desc = peer_pipeline(p, input_size, threads=threads)
        path = getattr(pipe, "model_path", None) or (p.split(":", 1)[1] if p.startswith(("yunet:", "yunet-cv:")) else None)
        size = Path(path).stat().st_size if path else 0
        out.append(Candidate(desc, pipe, size, None, "fp32"))
    return out


def _timed_run(pipeline, image) -> dict[str, float]:
    t0 = time.perf_counter()
    prep = pipeline.preprocess(image)
    t1 = time.perf_counter()
    out = pipeline.infer(prep)
    t2 = time.perf_counter()
    pipeline.postprocess(out, prep)
    t3 = time.perf_counter()
    return {"pre": (t1 - t0) * 1e3, "infer": (t2 - t1) * 1e3, "post": (t3 - t2) * 1e3, "e2e": (t3 - t0) * 1e3}


def bench(candidates: list[Candidate], image: np.ndarray, warmup: int, runs: int, threads: int, progress: bool = True) -> list[dict]:
    try:  # pre-processing resizes with OpenCV where it is installed: same thread budget as the runtimes
        import cv2  # optional: bench extra

        cv2.setNumThreads(threads)
    except ImportError:
        pass
    added = {}
    for c in candidates:  # resident memory a candidate adds once loaded and warmed (first runs allocate arenas)
        before = rss_mb()
        for _ in range(warmup):
            c.pipeline(image)
        added[c.name] = rss_mb() - before
    times = {c.name: {"pre": [], "infer": [], "post": [], "e2e": []} for c in candidates}
    rounds = min(5, runs)
    blocks = [runs // rounds + (i < runs % rounds) for i in range(rounds)]
    # the peak MAC rates behind the floor, measured on either side of the timed runs: the best of both is kept,
    # so one measurement slowed by other work on the machine does not make the floor look low
    kinds = sorted({(c.runtime, c.dtype) for c in candidates if c.macs})
    peaks = {k: peak(k[0], threads, k[1]) for k in kinds}
    bar = tqdm(total=runs * len(candidates), desc=f"bench {threads} thread(s)", disable=not progress)
    for block in blocks:
        for c in candidates:
            if len(candidates) > 1:  # let the previous runtime's worker threads go idle first (see the module doc)
                time.sleep(BLOCK_PAUSE_S)
            for i in range(block + 2):  # the first two untimed: the previous candidate's runtime may still hold the cores
                t = _timed_run(c.pipeline, image)
                if i >= 2:
                    bar.update()
                    for k, v in t.items():
                        times[c.name][k].append(v)
    bar.close()
    peaks = {k: max(v, peak(k[0], threads, k[1])) for k, v in peaks.items()}
    rows = []
    for c in candidates:
        stats = {k: {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "min": float(np.min(v))} for k, v in times[c.name].items()}
        floor_ms = c.macs / peaks[c.runtime, c.dtype] * 1e3 if c.macs else None
        rows.append({"name": c.name, "threads": threads, "image_hw": list(image.shape[:2]), "runs": runs, "warmup": warmup, "ms": stats, "model_bytes": c.model_bytes,
                     "gmacs": c.macs / 1e9 if c.macs else None, "floor_ms": floor_ms, "floor_dtype": c.dtype,
                     "infer_over_floor": stats["infer"]["median"] / floor_ms if floor_ms else None, "floor_is_estimate": True,
                     "peak_gmacs_per_s": peaks[c.runtime, c.dtype] / 1e9 if c.macs else None, "floor_runtime": c.runtime if c.macs else None,
                     "rss_added_by_warmup_mb": round(added[c.name], 1),
                     "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def table(rows: list[dict], accuracy: dict[str, dict] | None = None) -> str:
    acc = accuracy or {}
    lines = ["| model | threads | image | pre ms | infer ms (median / p90 / min) | post ms | end-to-end ms (median / p90) | infer / floor (estimate) | size MB | RSS +MB | WIDER hard |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        m = r["ms"]
        ratio = f"{r['infer_over_floor']:.1f}x ({r['floor_ms']:.1f} ms {r['floor_dtype']})" if r.get("infer_over_floor") else "–"
        hard = acc.get(r["name"], {}).get("hard")
        img = "x".join(str(v) for v in r["image_hw"]) if r.get("image_hw") else "–"
        lines.append(f"| {r['name']} | {r['threads']} | {img} | {m['pre']['median']:.1f} | {m['infer']['median']:.1f} / {m['infer']['p90']:.1f} / {m['infer']['min']:.1f} | "
                     f"{m['post']['median']:.1f} | {m['e2e']['median']:.1f} / {m['e2e']['p90']:.1f} | {ratio} | {r['model_bytes'] / 1e6:.2f} | "
                     f"{r.get('rss_added_by_warmup_mb', '–')} | "
                     f"{'–' if hard is None else f'{100 * hard:.2f}'} |")
    return "\n".join(lines)


def plot(rows: list[dict], accuracy: dict[str, dict], out: Path) -> None:
    matplotlib.use("Agg")

    names = [n for n in dict.fromkeys(r["name"] for r in rows) if n in accuracy]
    # one legend entry per model (colour), one per thread count (marker): 20 models at 2 thread counts stay legible
    fig, ax = plt.subplots(figsize=(10, max(4.8, 0.2 * len(names) + 1.5)), dpi=120)
    colours = {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}
    markers = {}
    for r in rows:
        if r["name"] not in accuracy:
            continue
        m = markers.setdefault(r["threads"], "osD^v"[len(markers) % 5])
        ax.scatter(r["ms"]["e2e"]["median"], 100 * accuracy[r["name"]]["hard"], color=colours[r["name"]], marker=m, s=36)

    handles = [Line2D([], [], color=colours[n], marker="o", ls="", label=n) for n in names]
    handles += [Line2D([], [], color="grey", marker=m, ls="", label=f"{t} thread(s)") for t, m in markers.items()]
    ax.legend(handles=handles, fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xlabel("end-to-end latency, median (ms)")
    ax.set_ylabel("WIDER FACE val AP hard (%)")
    ax.grid(alpha=0.3)
    ax.set_title(machine(), fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def write_report(rows: list[dict], accuracy: dict[str, dict], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# Benchmark ({time.strftime('%Y-%m-%d')}, {machine()})", "", table(rows, accuracy), "",
          "infer / floor: median inference over the model's MACs at the peak MAC rate of the same runtime's matrix-product "
          "kernels (best of repeats before and after the timed runs). An estimate: the peak is itself a timing.", ""]
    if accuracy:
        plot(rows, accuracy, out / "latency_vs_ap.png")
        md += ["![latency vs AP](latency_vs_ap.png)", ""]
    (out / "bench.md").write_text("\n".join(md))
    return out / "bench.md"


def cmd_bench(args) -> int:
    check_args(args, files=("json",), folders=("report",))

    accuracy = {}
    for spec in args.accuracy or []:
        name, _, path = spec.partition("=")
        accuracy[name] = json.loads(Path(path).read_text())
    rows: list[dict] = []
    for f in args.merge or []:
        rows += json.loads(Path(f).read_text())
    if args.bundles or args.peers or args.torch:
        image = scene(7, args.image_size, 8)
        for t in args.threads:
            cands = build_candidates(args.bundles, args.peers, args.torch, t, args.input_size)
            rows += bench(cands, image, args.warmup, args.runs, t, progress=not args.quiet)
    print(table(rows, accuracy))
    if args.json:
        write_json(args.json, rows)
    if args.report:
        print(f"report: {write_report(rows, accuracy, args.report)}")
    return 0


def _hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 720x1280, got {text!r}") from None
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f"image size {text} is too small (at least 32x32)")

    if max(h, w) > MAX_INPUT_SIZE:
        raise argparse.ArgumentTypeError(f"image size {text} is larger than the limit of {MAX_INPUT_SIZE} a side")
    return h, w


def register(sub) -> None:
    p = sub.add_parser("bench", help="latency of bundles, the PyTorch model and peers, side by side")
    p.add_argument("bundles", nargs="*")
    p.add_argument("--peers", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help="comma-separated: yunet:PATH.onnx, blazeface:short_range, blazeface:full_range")
    p.add_argument("--torch", action="store_true", help="also the FP32 PyTorch model (eager)")
    p.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    p.add_argument("--input-size", type=int, default=640)
    p.add_argument("--image-size", type=_hw, default=(720, 1280), metavar="HxW",
                   help="the built-in test scene's size (default 720x1280: a resize in pre-processing; 640x640: none)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--accuracy", action="append", help="NAME=eval.json (edge eval widerface --json) to plot latency against AP hard")
    p.add_argument("--merge", action="append", help="rows JSON written by edge bench or a device script, added to the table")
    p.add_argument("--json", default=None)
    p.add_argument("--report", default=None, help="folder for bench.md and the plot")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)
