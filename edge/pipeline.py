"""One pipeline: numpy pre-processing -> any runner -> numpy post-processing."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.anchors import priors
from edge.contract import ModelSpec
from edge.image_io import check_image_array, load_image
from edge.postprocess import Detections, decode_at, decode_detections, image_outputs, rescale
from edge.preprocess import Prepared, prepare
from edge.runners import Outputs, Runner


@dataclass
class PostConfig:
    score_threshold: float = 0.5
    nms_threshold: float = 0.4
    top_k: int = 5000
    keep_top_k: int = 750


class Pipeline:
    """image (path or BGR array) -> Detections in original pixels.

    runner: callable (1, 3, H, W) float32 -> {"loc", "conf", "landmarks"[, "mesh"]} numpy arrays. A runner
    that also has `run_image((1, H, W, 3) BGR canvas)` normalises inside its model and is given the canvas.
    """

    def __init__(self, runner: Runner, spec: ModelSpec, post: PostConfig | None = None, mesh_decoder=None):
        self.runner = runner
        self.spec = spec
        self.post = post or PostConfig()
        # low-rank mesh heads: (mean, basis) from the weights; runners that know them expose `mesh_decoder`
        self.mesh_decoder = mesh_decoder if mesh_decoder is not None else getattr(runner, "mesh_decoder", None)
        if spec.mesh_rank and self.mesh_decoder is None:
            raise ValueError("a low-rank mesh head needs its decoder (mean, basis)")
        self._priors: dict[tuple[int, int], np.ndarray] = {}

    def priors_for(self, hw: tuple[int, int]) -> np.ndarray:
        if hw not in self._priors:
            self._priors[hw] = priors(hw[0], hw[1], self.spec.arch.min_sizes, self.spec.steps)
        return self._priors[hw]

    def preprocess(self, image) -> Prepared:
        """The input in the form this pipeline's runner takes (canvas or tensor), built here, not in `infer`."""
        img = load_image(image) if isinstance(image, (str, Path)) else check_image_array(image)
        prep = prepare(img, self.spec)
        if _takes_canvas(self.runner, prep):  # built now: timed as pre-processing
            _ = prep.canvas if prep.has_canvas else prep.pixel_canvas
        else:
            _ = prep.tensor
        return prep

    def postprocess(self, outputs: Outputs, prep: Prepared, batch_index: int = 0) -> Detections:
        one = image_outputs(outputs, batch_index)
        det = decode_detections(
            one,
            self.priors_for(prep.input_hw),
            prep.input_hw,
            variances=self.spec.variances,
            score_threshold=self.post.score_threshold,
            nms_threshold=self.post.nms_threshold,
            top_k=self.post.top_k,
            keep_top_k=self.post.keep_top_k,
            mesh_decoder=self.mesh_decoder,
        )
        return rescale(det, prep.scale, prep.pad, prep.image_hw)

    def faces_at(self, outputs: Outputs, prep: Prepared, anchors: np.ndarray, batch_index: int = 0) -> Detections:
        """The faces these outputs give at the given anchors (no threshold, no NMS), in original pixels."""
        one = image_outputs(outputs, batch_index)
        det = decode_at(one, self.priors_for(prep.input_hw), anchors, prep.input_hw, variances=self.spec.variances,
                        mesh_decoder=self.mesh_decoder)
        return rescale(det, prep.scale, prep.pad, prep.image_hw)

    def infer(self, prep: Prepared) -> Outputs:
        return run_prepared(self.runner, prep)

    def run_raw(self, image) -> tuple[Prepared, Outputs]:
        prep = self.preprocess(image)
        return prep, self.infer(prep)

    def __call__(self, image) -> Detections:
        prep, out = self.run_raw(image)
        return self.postprocess(out, prep)


def run_prepared(runner: Runner, prep: Prepared) -> Outputs:
    """The runner on one prepared input: the canvas where the runner normalises inside its model, else the tensor.
    A runner whose model takes integer pixels (`takes_pixels`) always gets a canvas, rounded where the image was
    resized (`Prepared.pixel_canvas`)."""
    if _takes_canvas(runner, prep):
        return runner.run_image((prep.canvas if prep.has_canvas else prep.pixel_canvas)[None])
    return runner(prep.tensor)


def _takes_canvas(runner: Runner, prep: Prepared) -> bool:
    if getattr(runner, "run_image", None) is None:
        return False
    return prep.has_canvas or (getattr(runner, "takes_pixels", False) and prep.has_image)
