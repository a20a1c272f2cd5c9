"""One training loop for every trainer (detector, mesh head, compression): optimiser and
schedule, frozen or training batch norms, checkpoints written atomically and exact resume,
CSV and TensorBoard logs, a progress bar, AMP and TF32 control on CUDA, and
DistributedDataParallel when started by `torchrun` (gloo on CPU, NCCL on CUDA).

A run's folder holds `last.pth` (model, optimiser, step: what `--resume` reads), `final.pth`
(tensors plus our metadata: what `--weights` reads), `log.csv` and `tensorboard/`.
"""
from __future__ import annotations

import csv
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from edge.atomic import atomic_file
from edge.errors import ConfigError


@dataclass
class TrainConfig:
    out: str
    epochs: int = 10
    iters: int | None = None  # total optimiser steps; when set it overrides `epochs`
    batch: int = 8  # per process
    lr: float = 1e-3
    optimizer: str = "sgd"  # sgd (momentum 0.9, as the reference recipes) or adamw
    weight_decay: float = 5e-4
    warmup: int = 50  # linear warm-up steps, then cosine decay to 1 % of lr
    workers: int = 0
    seed: int = 0
    save_every: int = 100
    bn: str = "frozen"  # frozen: running statistics fixed (small batches); train: updated
    amp: bool = False  # CUDA only: float16 autocast with a gradient scaler
    tf32: bool = False  # CUDA only
    clip: float | None = 10.0  # gradient-norm clip
    progress: bool = True
    extra: dict = field(default_factory=dict)  # trainer-specific settings, recorded in checkpoints

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.bn not in ("frozen", "train"):
            raise ConfigError(f"--bn must be frozen or train, got {self.bn!r}")
        if self.batch < 1 or self.epochs < 1 or (self.iters is not None and self.iters < 1):
            raise ConfigError("batch, epochs and iters must be positive")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """Read torchrun's environment; initialise the process group when there is more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistEnv(dist.get_rank() if world > 1 else 0, world, local, device)


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of one epoch: a permutation drawn from (seed, epoch), padded to a multiple of
    the world size, every world-th index from the rank, minus the first `skip` (exact mid-epoch resume)."""

    def __init__(self, n: int, seed: int, epoch: int, rank: int, world: int, skip: int = 0, shuffle: bool = True):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))
        order += order[: (-len(order)) % world]
        self.indices = order[rank::world][skip:]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def set_bn(model: torch.nn.Module, mode: str) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train(mode == "train")


def _read_resume(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, not a deep traceback
        raise ConfigError(f"cannot resume from {path}: {str(e).splitlines()[0][:160]}") from None


StepFn = Callable[[torch.nn.Module, object, torch.device], tuple[torch.Tensor, dict]]


def train(model: torch.nn.Module, dataset, collate, step_fn: StepFn, cfg: TrainConfig, *, meta: dict,
          params: list[torch.nn.Parameter] | None = None, resume: str | Path | None = None,
          env: DistEnv | None = None, after_step=None) -> list[dict]:
    """Train `model` in place. step_fn(wrapped_model, batch, device) -> (loss, parts dict of floats).
    meta: our checkpoint metadata (arch, kind, ...), saved with every checkpoint.
    params: the parameters to train (default: all that require grad), or param groups (dicts) with an
    optional "lr_scale" multiplying the schedule's learning rate. after_step(step): called after every
    optimiser step, and once with the step resumed from (QAT freezes its observers by it).
    Returns the logged rows (this process)."""

    env = env or dist_env()
    out = Path(cfg.out)
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    elif cfg.amp:
        print("note: --amp applies to CUDA only; training in float32", file=sys.stderr)
    model.to(env.device)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    params = [p for g in groups for p in g["params"]]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = max(1, math.ceil(math.ceil(len(dataset) / env.world) / cfg.batch))
    total = cfg.iters if cfg.iters is not None else cfg.epochs * per_epoch
    step = 0
    if resume is not None:
        ck = _read_resume(Path(resume))
        if not isinstance(ck, dict) or "model" not in ck or "optimizer" not in ck or "step" not in ck:
            raise ConfigError(f"{resume} is not a training checkpoint (last.pth of a run folder)")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step = int(ck["step"])
        if env.main:
            print(f"resumed from {resume} at step {step} of {total}", file=sys.stderr)
        if after_step is not None:
            after_step(step)
    wrapped = model
    if env.world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and env.device.type == "cuda")
    log_rows: list[dict] = []
    csv_file = writer = tb = None
    if env.main:
        new = not (out / "log.csv").exists() or step == 0
        if not new:  # drop rows logged after the checkpoint we resume from
            with open(out / "log.csv", newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
            with atomic_file(out / "log.csv") as tmp, open(tmp, "w", newline="") as f:
                if kept:
                    w = csv.DictWriter(f, fieldnames=list(kept[0]))
                    w.writeheader()
                    w.writerows(kept)
            new = not kept
        csv_file = open(out / "log.csv", "w" if new else "a", newline="")

        tb = SummaryWriter(str(out / "tensorboard"), purge_step=step if step else None)

    def save(name: str, full: bool) -> None:
        if not full:
            save_final(out / name, model, meta, step)
            return
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        obj = {"model": state, "optimizer": opt.state_dict(), "step": step, "config": _plain(asdict(cfg)),
               "retinaface_edge": meta}
        with atomic_file(out / name) as tmp:
            torch.save(obj, tmp)

    bar = tqdm(total=total, initial=step, desc="training", disable=not (cfg.progress and env.main), mininterval=1.0)
    t_last = time.perf_counter()
    try:
        while step < total:
            epoch, within = divmod(step, per_epoch)
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            sampler = EpochSampler(len(dataset), cfg.seed, epoch, env.rank, env.world, skip=within * cfg.batch)
            loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch, sampler=sampler, collate_fn=collate,
                                                 num_workers=cfg.workers, drop_last=False)
            wrapped.train()
            set_bn(model, cfg.bn)
            for batch in loader:
                if step >= total:
                    break
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, total, cfg) * g["lr_scale"]
                with torch.autocast(env.device.type, dtype=torch.float16, enabled=scaler.is_enabled()):
                    loss, parts = step_fn(wrapped, batch, env.device)
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                scaler.step(opt)
                scaler.update()
                step += 1
                if after_step is not None:
                    after_step(step)
                now = time.perf_counter()
                row = {"step": step, "epoch": epoch, "lr": opt.param_groups[0]["lr"], "loss": loss.item(), **parts,
                       "seconds": round(now - t_last, 4)}
                t_last = now
                log_rows.append(row)
                if env.main:
                    if writer is None:
                        writer = csv.DictWriter(csv_file, fieldnames=list(row))
                        if new:
                            writer.writeheader()
                    writer.writerow(row)
                    for k, v in row.items():
                        if k not in ("step", "epoch"):
                            tb.add_scalar(f"train/{k}", v, step)
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
                    if step % cfg.save_every == 0 or step == total:
                        csv_file.flush()
                        save("last.pth", full=True)
        if env.main:
            save("final.pth", full=False)
    finally:
        bar.close()
        if csv_file:
            csv_file.close()
        if tb:
            tb.close()
    model.eval()
    return log_rows


def save_final(path: Path, model: torch.nn.Module, meta: dict, steps: int) -> None:
    """final.pth: the model's tensors plus our metadata (what `--weights` reads), written atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_file(path) as tmp:
        torch.save({"state_dict": state, "retinaface_edge": {**meta, "steps": steps}}, tmp)


def _plain(d):
    """Checkpoint configs hold only plain types (readable with weights_only=True)."""
    if isinstance(d, dict):
        return {str(k): _plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain(v) for v in d]
    return d if isinstance(d, (int, float, str, bool, type(None))) else str(d)
