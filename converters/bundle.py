"""Bundles: a folder with the model file(s), metadata.json and golden.npz, written atomically.

Writing: everything goes into `.<name>.partial-<pid>` beside the destination, then one rename
puts it in place; a run killed at any point leaves the destination absent or complete (SIGINT and
SIGTERM remove the partial folder on the way out). The destination is checked before any work:
only a bundle this project wrote (`is_bundle`) or an empty folder is ever replaced; a file, a
user's folder, or a place that cannot be written is refused. Loading checks the format version,
the target, the file names and the SHA-256 of every file.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edge.atomic import pid_alive
from edge.contract import MAX_INPUT_SIZE, ModelSpec
from edge.errors import BundleError, EdgeError, OutputError
from edge.outputs import check_writable_folder, default_mode, display, existing_ancestor

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


def is_bundle(folder: Path) -> bool:
    """Whether `folder` holds a bundle this project wrote: a metadata.json object with our format
    version, a target, a model file and the file hash list. Nothing else is ever replaced."""
    try:
        meta = json.loads((Path(folder) / "metadata.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(meta, dict) and isinstance(meta.get("format_version"), int) and isinstance(meta.get("target"), str)
            and isinstance(meta.get("model_file"), str) and isinstance(meta.get("files"), dict))


def check_destination(dest: str | Path) -> str:
    """Check a bundle destination before any work. -> "new", "empty folder" or "bundle" (an existing
    bundle of ours, to be replaced). Raises OutputError for a file, a link, a folder that is not one of
    our bundles (nothing of the user's is deleted), or a place where nothing can be written.
    Missing parent folders are fine: they are created."""
    dest = Path(dest)
    if str(dest) == "" or dest.name in ("", ".", ".."):
        raise OutputError(f"--out {display(dest)}: not a folder name")
    if dest.is_symlink():
        raise OutputError(f"--out {display(dest)}: is a symbolic link; refusing to replace it (give a new folder)")
    if dest.exists():
        if not dest.is_dir():
            raise OutputError(f"--out {display(dest)}: exists and is not a folder; refusing to replace it (give a new folder)")
        if is_bundle(dest):
            kind = "bundle"
        elif not any(dest.iterdir()):
            kind = "empty folder"
        else:
            raise OutputError(f"--out {display(dest)}: an existing folder that is not a retinaface-edge bundle; "
                              "refusing to replace it (give a new or empty folder)")
        check_writable_folder(Path(os.path.abspath(dest)).parent, "--out")
        return kind
    ancestor = existing_ancestor(dest)
    if not ancestor.is_dir():
        raise OutputError(f"--out {display(dest)}: {display(ancestor)} is not a folder")
    check_writable_folder(ancestor, "--out")
    return "new"


@contextmanager
def atomic_folder(dest: Path, overwrite: bool = True):
    """Yield a temporary folder beside `dest`; on success it replaces `dest` by rename.

    `dest` is checked again just before the rename (`check_destination`), so a folder of the user's
    that appeared there during the work is not replaced either. The new folder gets the user's
    normal mode (umask), not the private mode of a temporary folder."""
    dest = Path(dest).absolute()
    kind = check_destination(dest)
    if kind != "new" and not overwrite:
        raise BundleError(f"{dest} exists (pass --force to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(dest)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}.{secrets.token_hex(4)}"
    tmp.mkdir(mode=0o777)  # umask applies, as for any folder the user makes
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        os.chmod(tmp, default_mode(folder=True))
        old = None
        if check_destination(dest) != "new":
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
        if not (isinstance(spec.input_size, int) and 0 < spec.input_size <= MAX_INPUT_SIZE and spec.input_size % 32 == 0):
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
    try:
        runner = mod.load_runner(folder, meta, threads)
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
