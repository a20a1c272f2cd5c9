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
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edge import atomic
from edge.bundle import is_bundle, sha256_path
from edge.errors import BundleError, OutputError
from edge.outputs import check_writable_folder, display, existing_ancestor


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
    """Yield a temporary folder beside `dest`; on success it replaces `dest` by rename (`edge.atomic.atomic_folder`).

    `dest` is checked again just before the rename (`check_destination`), so a folder of the user's
    that appeared there during the work is not replaced either."""
    dest = Path(dest).absolute()
    kind = check_destination(dest)
    if kind != "new" and not overwrite:
        raise BundleError(f"{dest} exists (pass --force to replace it)")
    with atomic.atomic_folder(dest, lambda d: check_destination(d) != "new") as tmp:
        yield tmp


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


