"""Two gloo processes on 127.0.0.1, launched by torchrun and bounded in time."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hubserver import pick_free_port
from safetensors.torch import load_file
from tiny import TINY_TRAIN_SETS, random_npz, set_args

from carlzoo.model import ModelConfig, build_model
from carlzoo.training.loss import CARLLoss

HERE = Path(__file__).resolve().parent
TIMEOUT = 240


def torchrun(*args: str, nproc: int = 2, ok: bool = True) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={pick_free_port()}",
        *args,
    ]
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert (result.returncode == 0) == ok, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_process_loss_and_gradients_equal_the_full_batch(tmp_path):
    torchrun(str(HERE / "ddp_grad_worker.py"), str(tmp_path))
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]

    torch.manual_seed(0)
    model = build_model(ModelConfig(width=4, num_prototypes=10)).eval()
    g = torch.Generator().manual_seed(1)
    xa = torch.randn(8, 3, 16, 16, generator=g)
    xb = torch.randn(8, 3, 16, 16, generator=g)
    la, lb = model(torch.cat([xa, xb])).logits.chunk(2)
    terms = CARLLoss()(la, lb, 2.0)
    terms.total.backward()

    # World-size invariance: the uniform prior uses the global mean assignment.
    for r in ranks:
        assert r["uniform_prior"].item() == pytest.approx(terms.uniform_prior.item(), rel=1e-5)
    # L_c is a per-sample mean, so the ranks' mean is the full-batch value.
    mean_c = sum(r["consistency"].item() for r in ranks) / 2
    assert mean_c == pytest.approx(terms.consistency.item(), rel=1e-5)
    mean_total = sum(r["total"].item() for r in ranks) / 2
    assert mean_total == pytest.approx(terms.total.item(), rel=1e-5)
    # DDP-averaged gradients equal the single-process gradients of the global loss.
    for name, p in model.named_parameters():
        torch.testing.assert_close(ranks[0][f"grad.{name}"], p.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ranks[1][f"grad.{name}"], p.grad, rtol=1e-4, atol=1e-6)


def test_two_process_training_checkpoints_once_and_resumes(tmp_path):
    data = random_npz(tmp_path / "d.npz", 64, size=16, classes=2, n_test=16)
    run = tmp_path / "run"
    common = [
        "-m",
        "carlzoo.cli",
        "train",
        "--dataset",
        "npz",
        "--data-root",
        str(data),
        "--out",
        str(run),
        "--no-progress",
        *set_args(*TINY_TRAIN_SETS, "knn_every=1", "checkpoint_every=1"),
    ]
    torchrun(*common, "--epochs", "3", "--stop-after", "2")
    rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # rank 0 alone logs
    assert rows[1]["step"] == 2 * (64 // 16)  # global batch 16 split over 2 ranks
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["epoch_0001.safetensors", "epoch_0002.safetensors", "last.safetensors"]
    torchrun(*common, "--epochs", "3", "--resume")
    rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows) and "knn_top1" in rows[-1]


@pytest.mark.parametrize("rank1_has", ["a copy", "no checkpoint"])
def test_resume_needs_every_rank_to_see_the_same_checkpoint(tmp_path, rank1_has):
    sys.path.insert(0, str(HERE))
    from ddp_resume_worker import config

    from carlzoo.training.train import train

    data = random_npz(tmp_path / "d.npz", 64, size=16, classes=2, n_test=16)
    node0, node1 = tmp_path / "node0" / "run", tmp_path / "node1" / "run"
    train(config(str(data)), node0, progress=False, stop_after=1)
    if rank1_has == "a copy":
        shutil.copytree(node0, node1)
    torchrun(str(HERE / "ddp_resume_worker.py"), str(data), str(tmp_path), str(node0), str(node1))
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    if rank1_has == "a copy":
        assert outcomes == ["finished at epoch 2, process group closed"] * 2
    else:
        # Both ranks refuse (none trains on its own schedule, none is left waiting).
        for node, outcome in zip((node0, node1), outcomes, strict=True):
            assert outcome.startswith(
                f"--resume: the processes see different checkpoints in {node / 'checkpoints'} "
                "(from no checkpoint to epoch 1); every node must read the same run folder"
            )


def test_sync_bn_on_cpu_processes_is_refused_before_the_data_is_read(tmp_path):
    run = tmp_path / "run"
    result = torchrun(
        "-m", "carlzoo.cli", "train", "--dataset", "npz", "--data-root",
        str(tmp_path / "missing.npz"),  # read after the check: it would fail otherwise
        "--out", str(run), "--no-progress", *set_args(*TINY_TRAIN_SETS, "sync_bn=true"),
        ok=False,
    )
    assert (
        "Error: sync_bn=true needs CUDA devices (PyTorch's SyncBatchNorm has no CPU kernel); "
        "use --set sync_bn=false on CPU processes"
    ) in result.stderr
    assert "missing.npz" not in result.stderr and not run.exists()
