"""Pruning, pruned checkpoints, and `edge compress` writing atomically (SIGKILL never leaves half a file)."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from edge.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("torch_pruning")


def test_prune_keeps_contract_and_rounds_channels(default_model):
    from quant.prune import PruneConfig, compress

    model, _ = default_model
    pruned, rep = compress(model, PruneConfig(ratio=0.3), size=320)
    assert rep["gmacs_after"] < 0.5 * rep["gmacs_before"] and rep["params_after"] < rep["params_before"]
    x = torch.zeros(1, 3, 320, 320)
    with torch.no_grad():
        a, b = model(x), pruned(x)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}  # heads untouched
    for m in pruned.modules():
        if isinstance(m, torch.nn.Conv2d) and m.out_channels not in (4, 8, 20):  # heads: 2 anchors x 2/4/10
            assert m.out_channels % 8 == 0, m


def test_pruned_checkpoint_round_trip(default_model, tmp_path):
    from quant.prune import PruneConfig, compress

    model, info = default_model
    pruned, rep = compress(model, PruneConfig(ratio=0.5), size=320)
    p = tmp_path / "p.pth"
    torch.save({"state_dict": pruned.state_dict(), "retinaface_edge": {"format": 1, "kind": "pruned", "arch": info.arch.name, "prune": rep}}, p)
    loaded, li = load_weights(p)
    assert li.from_checkpoint and "configuration from the checkpoint" in li.describe()
    x = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        a, b = pruned.eval()(x), loaded(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compress_cli_and_kill(shared, tmp_path):
    """Tiny settings (2 steps, 320 px): the command runs end to end, and SIGKILL at any point leaves --out absent or whole."""
    out = tmp_path / "small.pth"
    cmd = [sys.executable, "-m", "edge.cli", "compress", "--images", str(shared / "images"), "--prune", "0.3", "--steps", "2",
           "--batch", "1", "--size", "320", "--val", "1", "--out", str(out), "--quiet"]
    seen_partial = False
    for delay in (1.0, 2.5, 4.0, 5.5):
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t = time.time()
        while time.time() - t < delay and p.poll() is None:
            seen_partial |= any(tmp_path.glob(".small.pth.partial-*"))
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if out.exists():
            load_weights(out)  # complete, or this raises
            out.unlink()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    model, info = load_weights(out)
    assert info.from_checkpoint and sum(p.numel() for p in model.parameters()) < 300_000
    assert "teacher-face recall" in r.stdout
    assert not list(tmp_path.glob(".small.pth.partial-*"))
