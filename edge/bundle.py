"""Reading a bundle: metadata, file hashes verified, the runner for its target, the low-rank mesh decoder."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from edge.contract import MAX_INPUT_SIZE, ModelSpec
from edge.errors import BundleError, EdgeError
from edge.outputs import display
from edge.runners import coreml, onnx, openvino, tflite
from edge.weights.fetch import sha256_file

FORMAT_VERSION = 1
PRECISIONS = ("fp32", "fp16", "int8", "int8-mixed", "int8w")
CALIBRATED = ("int8", "int8-mixed")  # the precisions with integer activations: calibrated, or from a QAT program
# target -> the module whose load_runner(folder, meta, threads) runs its bundles (converters.registry: the converters)
RUNNERS = {"onnx": onnx, "tflite": tflite, "openvino": openvino, "coreml": coreml}
MESH_DECODER_FILE = "mesh_decoder.npz"  # low-rank mesh heads: mean (3V,) and basis (K, 3V), float32


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_bundle(folder: Path) -> bool:
    """Whether `folder` holds a bundle this project wrote: a metadata.json object with our format
    version, a target, a model file and the file hash list. Nothing else is ever replaced."""
    try:
        meta = json.loads((Path(folder) / "metadata.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(meta, dict) and isinstance(meta.get("format_version"), int) and isinstance(meta.get("target"), str)
            and isinstance(meta.get("model_file"), str) and isinstance(meta.get("files"), dict))


def sha256_path(p: Path) -> str:
    """SHA-256 of a file; of a folder (an .mlpackage): over its sorted relative paths and file hashes."""

    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f"{f.relative_to(p).as_posix()}\0{sha256_file(f)}\n".encode())
        return h.hexdigest()
    return sha256_file(p)


def read_metadata(bundle: str | Path, verify: bool = True) -> tuple[Path, dict]:
    """-> (folder, metadata), after checking format version, target, file names and hashes."""

    folder = Path(bundle)
    if not folder.is_dir():
        raise BundleError(f"bundle {bundle}: not a folder")
    mpath = folder / "metadata.json"
    if not mpath.is_file():
        raise BundleError(f"bundle {folder.name}: metadata.json is missing")
    try:
        meta = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"bundle {folder.name}: metadata.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise BundleError(f"bundle {folder.name}: metadata.json is not an object")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"bundle {folder.name}: metadata has no integer format_version")
    if version > FORMAT_VERSION:
        raise BundleError(f"bundle {folder.name}: format version {version} is newer than this toolkit's ({FORMAT_VERSION}); upgrade retinaface-edge")
    target = meta.get("target")
    if not isinstance(target, str) or target not in RUNNERS:
        raise BundleError(f"bundle {folder.name}: unknown target {target!r}"[:200])

    if meta.get("precision") not in PRECISIONS:
        raise BundleError(f"bundle {folder.name}: unknown precision {meta.get('precision')!r}"[:200])
    files = meta.get("files")
    if not isinstance(files, dict) or not isinstance(meta.get("model_file"), str):
        raise BundleError(f"bundle {folder.name}: metadata lacks the file list or model_file")
    if not all(isinstance(v, str) for v in files.values()):
        raise BundleError(f"bundle {folder.name}: file hashes in metadata must be strings")
    for name in list(files) + [meta["model_file"]]:
        if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
            raise BundleError(f"bundle {folder.name}: unsafe file name {name!r} in metadata")
    if meta["model_file"] not in files:
        raise BundleError(f"bundle {folder.name}: model_file {meta['model_file']!r} is not in the file list")
    for name, digest in files.items():
        p = folder / name
        if not p.exists() or p.is_symlink():
            raise BundleError(f"bundle {folder.name}: {name} is missing")
        if verify and sha256_path(p) != digest:
            raise BundleError(f"bundle {folder.name}: {name} does not match its SHA-256 in metadata.json (tampered or corrupt)")
    try:
        spec = ModelSpec.from_dict(meta["spec"])
        spec.output_names, spec.arch.anchors_per_cell  # noqa: B018 - derived fields must compute
        if not (isinstance(spec.input_size, int) and 0 < spec.input_size <= MAX_INPUT_SIZE and spec.input_size % 32 == 0):
            raise ValueError(f"input_size {spec.input_size!r}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BundleError(f"bundle {folder.name}: metadata spec is invalid ({type(e).__name__}: {str(e)[:120]})") from None
    return folder, meta


def load_bundle_runner(bundle: str | Path, threads: int | None = None):
    """-> (runner, spec, description) for any bundle, after verification."""

    folder, meta = read_metadata(bundle)
    try:
        runner = RUNNERS[meta["target"]].load_runner(folder, meta, threads)
    except (ImportError, EdgeError):
        raise
    except Exception as e:  # noqa: BLE001 - each runtime has its own error for a model it cannot parse
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BundleError(f"bundle {display(folder.name)}: {meta['model_file']} is not a model {meta['target']} can load "
                          f"({type(e).__name__}: {msg[:160]}); its hash matches, so it was corrupt when the bundle was made "
                          "or the metadata was re-hashed") from None
    runner = attach_mesh_decoder(runner, folder, meta)
    spec = ModelSpec.from_dict(meta["spec"])
    desc = f"bundle {folder.name} [{meta['target']} {meta['precision']}, {runner.name}]"
    return runner, spec, desc


def read_mesh_decoder(folder: Path, meta: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean (3V,), basis (K, 3V)) of a bundle whose model has a low-rank mesh head, else None."""
    spec = meta["spec"]
    rank, vertices = spec.get("mesh_rank", 0), spec.get("mesh_vertices", 0)
    if not rank:
        return None
    name = meta.get("mesh_decoder")
    listed = name in meta["files"] if "files" in meta else True  # edge-convert reads it before metadata is final
    if name != MESH_DECODER_FILE or not listed or not (folder / name).is_file():
        raise BundleError(f"bundle {folder.name}: its model has a low-rank mesh head but no {MESH_DECODER_FILE}")
    try:
        with np.load(folder / name, allow_pickle=False) as z:
            mean, basis = z["mean"].astype(np.float32), z["basis"].astype(np.float32)
    except (OSError, ValueError, KeyError) as e:
        raise BundleError(f"bundle {folder.name}: {name} is unreadable ({type(e).__name__})") from None
    if mean.shape != (3 * vertices,) or basis.shape != (rank, 3 * vertices):
        raise BundleError(f"bundle {folder.name}: {name} has shapes {mean.shape}, {basis.shape}; "
                          f"the spec says rank {rank}, {vertices} vertices")
    return mean, basis


def attach_mesh_decoder(runner, folder: Path, meta: dict):
    """Give a bundle's runner the mesh decoder the pipeline looks for (`runner.mesh_decoder`)."""
    dec = read_mesh_decoder(Path(folder), meta)
    if dec is not None:
        runner.mesh_decoder = dec
    return runner


def path_bytes(p: Path) -> int:
    """Size of a file, or of all files under a folder (an .mlpackage)."""
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.is_file() else 0
