"""Bundles: a folder with the model file(s), metadata.json and golden.npz, written atomically.

Writing: everything goes into `.<name>.partial-<pid>` beside the destination, then one rename
puts it in place; a run killed at any point leaves the destination absent or complete. Loading
checks the format version, the target, the file names and the SHA-256 of every file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edge.atomic import pid_alive
from edge.contract import ModelSpec
from edge.errors import BundleError

FORMAT_VERSION = 1
MESH_DECODER_FILE = "mesh_decoder.npz"  # low-rank mesh heads: mean (3V,) and basis (K, 3V), float32
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def git_revision() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def clean_stale_partials(dest: Path) -> list[Path]:
    """Remove `.<name>.partial-<pid>` folders left by killed runs (their pid is gone)."""
    removed = []
    for p in dest.parent.glob(f".{dest.name}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1].split(".")[0])
        except ValueError:
            continue
        if not pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def atomic_folder(dest: Path, overwrite: bool = True):
    """Yield a temporary folder beside `dest`; on success it replaces `dest` by rename."""
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(dest)
    if dest.exists() and not overwrite:
        raise BundleError(f"{dest} exists (pass --force to replace it)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-{os.getpid()}.", dir=dest.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            os.rename(dest, old)
        os.rename(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_path(p: Path) -> str:
    """SHA-256 of a file; of a folder (an .mlpackage): over its sorted relative paths and file hashes."""
    import hashlib

    from edge.weights import sha256_file

    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f"{f.relative_to(p).as_posix()}\0{sha256_file(f)}\n".encode())
        return h.hexdigest()
    return sha256_file(p)


def write_metadata(folder: Path, meta: dict) -> None:
    meta = dict(meta)
    meta["files"] = {f.name: sha256_path(f) for f in sorted(folder.iterdir()) if f.name != "metadata.json"}
    (folder / "metadata.json").write_text(json.dumps(meta, indent=1, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_metadata(bundle: str | Path, verify: bool = True) -> tuple[Path, dict]:
    """-> (folder, metadata), after checking format version, target, file names and hashes."""
    from converters.registry import TARGET_MODULES

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
    if not isinstance(target, str) or target not in TARGET_MODULES:
        raise BundleError(f"bundle {folder.name}: unknown target {target!r}"[:200])
    from converters.base import PRECISIONS

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
        if not (isinstance(spec.input_size, int) and spec.input_size > 0 and spec.input_size % 32 == 0):
            raise ValueError(f"input_size {spec.input_size!r}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BundleError(f"bundle {folder.name}: metadata spec is invalid ({type(e).__name__}: {str(e)[:120]})") from None
    return folder, meta


def load_bundle_runner(bundle: str | Path, threads: int | None = None):
    """-> (runner, spec, description) for any bundle, after verification."""
    from converters.registry import target_module

    folder, meta = read_metadata(bundle)
    mod = target_module(meta["target"])
    reason = mod.CAPABILITIES.runs_here()
    if reason:
        raise BundleError(f"bundle {folder.name}: {reason}")
    runner = attach_mesh_decoder(mod.load_runner(folder, meta, threads), folder, meta)
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
