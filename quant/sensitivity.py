"""Mixed-precision sensitivity of the full-integer int8 graph: for each block of the model, the simulated
int8 program (PT2E quantise/dequantise pairs of `CanvasInput(integer_graph_form(model))`, the graph that
`edge-convert --target tflite --precision int8` converts) with that block's activations in int16 (weights stay
int8 per channel: TFLite's 16x8 kernels), measured against the FP32 model on real pictures with the parity
harness's matching. The row of a block is what int16 there would buy; the all-int8 row is the baseline.

The simulation tracks the converted TFLite model closely (recall 0.947 against 0.941 on the fidelity study's
pictures, docs/full-integer.md). Of the int16 rows, what `edge-convert --precision int8-mixed` builds is
converted (stage 1 with the normalisation before it: recall 0.978 measured on the TFLite bundle); with stage 1 in
int16, its first convolution (the normalisation folded in) reads the pixels requantised to int16 (see
quant.ptq.full_integer_quantizer).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edge.evaluate.parity import detection_agreement
from edge.pipeline import Pipeline, PostConfig
from edge.runners import TorchRunner
from quant.equalize import equalize
from quant.ptq import pt2e_calibrated, quantized_program


@dataclass(frozen=True)
class Block:
    """A row of the table: a name and the model modules whose activations go to int16 together."""

    name: str
    modules: tuple[str, ...]


def blocks_of(model, level: str = "unit") -> list[Block]:
    """The model's blocks, input to output. level "unit": every backbone block (body.stage1.0, ...), the FPN, each
    SSH and the heads together; "stage": the three backbone stages, the FPN, the SSHs and the heads."""
    if level not in ("unit", "stage"):
        raise ValueError(f"level must be 'unit' or 'stage', got {level!r}")
    names = [n for n, _ in model.named_children()]
    heads = tuple(n for n in names if n.endswith("Head"))
    sshs = tuple(n for n in names if n.startswith("ssh"))
    out = []
    for stage_name, stage in model.body.named_children():
        full = f"body.{stage_name}"
        if level == "stage":
            out.append(Block(full, (full,)))
        else:
            out += [Block(f"{full}.{i}", (f"{full}.{i}",)) for i in range(len(stage))]
    out.append(Block("fpn", ("fpn",)))
    out += [Block(s, (s,)) for s in sshs] if level == "unit" else [Block("ssh", sshs)]
    out.append(Block("heads", heads))
    return out


class SimulatedRunner:
    """A converted PT2E program of the full-integer graph as a pipeline runner: it takes the BGR pixel canvas.
    A low-rank mesh head's decoder goes to the pipeline (the FP32 model's, as bundles carry it)."""

    takes_pixels = True

    def __init__(self, program, names: tuple[str, ...], name: str = "pt2e-simulation"):
        self.program, self.names, self.name = program, names, name

    def run_image(self, canvas: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            outs = self.program(torch.from_numpy(np.ascontiguousarray(canvas, dtype=np.float32)))
        return {k: v.numpy() for k, v in zip(self.names, outs)}


def simulated_program(model, spec, calib, int16_modules=(), equalized=None):
    """The int8 program edge-convert builds for TFLite `--precision int8` (cross-layer equalisation by weight and
    activation range, histogram calibration on `calib`), with int16 activations under `int16_modules` (on the same
    equalised model, so each row compares with the shipped int8 graph; `int8-mixed` itself is converted from weight
    equalisation alone), converted to quantise/dequantise pairs. `equalized`: the equalised model, to skip
    recomputing it."""
    if equalized is None:
        equalized, _ = equalize(model, activations=calib.tensors(spec))
        equalized.spec = spec
    gm, _ = pt2e_calibrated(equalized, spec, calib, progress=False, full_integer=True, int16_modules=int16_modules)
    return quantized_program(gm, fold_quantize=False)


def reference_detections(model, spec, images) -> list:
    """The FP32 model's faces (score >= 0.5) on each of `images` ((name, BGR array) pairs)."""
    pipe = Pipeline(TorchRunner(model), spec, PostConfig())
    return [pipe(im) for _, im in images]


def program_agreement(reference: list, model, images, program) -> dict:
    """Pooled parity figures of a simulated program of `model` against the reference detections (one per image,
    same order)."""
    spec = model.spec
    pipe = Pipeline(SimulatedRunner(program, spec.output_names), spec, PostConfig(),
                    mesh_decoder=getattr(TorchRunner(model), "mesh_decoder", None))
    ref_faces = cand_faces = matched = 0
    ious, lmk, mesh = [], [], []
    for ref, (_, im) in zip(reference, images):
        d = detection_agreement(ref, pipe(im))
        ref_faces, cand_faces, matched = ref_faces + d["ref_faces"], cand_faces + d["cand_faces"], matched + d["matched"]
        ious += d["iou"]
        lmk += d.get("landmark_nme", [])
        mesh += d.get("mesh_nme", [])

    def mean(v):
        return float(np.mean(v)) if v else None

    return {"ref_faces": ref_faces, "cand_faces": cand_faces, "recall": matched / ref_faces if ref_faces else 1.0,
            "precision": matched / cand_faces if cand_faces else 1.0, "mean_iou": mean(ious), "landmark_nme": mean(lmk),
            "mesh_nme": mean(mesh)}


def block_macs(model, size: int, blocks: list[Block]) -> dict[str, float]:
    """Share of the model's convolution multiply-accumulates in each block, at a square `size` input."""
    macs: dict[str, float] = {}

    def hook(name):
        def f(mod, inp, out):
            k = mod.weight[0].numel()  # (in / groups) x kh x kw per output value
            macs[name] = macs.get(name, 0.0) + float(out.numel() * k)
        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    total = sum(macs.values())
    return {b.name: sum(v for n, v in macs.items() if any(n == m or n.startswith(m + ".") for m in b.modules)) / total
            for b in blocks}


def sensitivity(model, spec, calib, images, blocks: list[Block], progress=None) -> dict:
    """-> {"baseline": figures of the all-int8 program, "blocks": [{"block", "modules", "macs_share", figures,
    "d_recall", ...}]}. images: (name, BGR array) pairs; progress(i, n, name) is called before each program."""
    reference = reference_detections(model, spec, images)
    equalized, _ = equalize(model, activations=calib.tensors(spec))
    equalized.spec = spec
    shares = block_macs(model, spec.input_size, blocks)
    rows, baseline = [], None
    for i, block in enumerate([None, *blocks]):
        if progress is not None:
            progress(i, len(blocks) + 1, "all int8" if block is None else block.name)
        program = simulated_program(model, spec, calib, () if block is None else block.modules, equalized)
        figs = program_agreement(reference, model, images, program)
        if block is None:
            baseline = figs
            continue
        rows.append({"block": block.name, "modules": list(block.modules), "macs_share": shares[block.name], **figs,
                     "d_recall": figs["recall"] - baseline["recall"],
                     "d_mean_iou": None if figs["mean_iou"] is None or baseline["mean_iou"] is None
                     else figs["mean_iou"] - baseline["mean_iou"]})
    return {"baseline": baseline, "blocks": rows, "images": len(images), "reference_faces": baseline["ref_faces"]}
