"""The benchmark scripts run in their small CPU mode (the figures themselves are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

from tiny import random_npz

ROOT = Path(__file__).resolve().parents[1]


def _run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def test_train_throughput_cpu_smoke(tmp_path):
    out = tmp_path / "figures.json"
    script = str(ROOT / "benchmarks" / "train_throughput.py")
    result = _run_script(script, "--cpu-smoke", "--json", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "carlzoo / model-only" in result.stdout
    assert "carlzoo / DataLoader(2 workers)" in result.stdout
    figures = json.loads(out.read_text())["results"]
    assert set(figures) == {"model", "carlzoo", "loader"}
    assert all(v["images_per_s"] > 0 for v in figures.values())


def test_gpu_cifar10_stops_in_time_and_its_shards_rebuild_an_exportable_run(tmp_path):
    import numpy as np
    import torch

    from carlzoo.export.repo import export_model
    from carlzoo.training.run import load_run

    data = random_npz(tmp_path / "c10.npz", 192, size=32, classes=10, n_test=64)
    out = tmp_path / "out"
    script = str(ROOT / "benchmarks" / "gpu_cifar10.py")
    # A time limit that has passed by the end of epoch 1: the run must stop there, evaluate
    # what it has and say so, with the same files a full run leaves.
    result = _run_script(
        script, "--data", str(data), "--out", str(out), "--epochs", "4",
        "--set", "model.width=4", "--set", "optim.batch_size=64", "--set", "device=cpu",
        "--set", "optim.warmup_epochs=1", "--time-limit", "0.001", "--eval-reserve", "0",
        "--probe-at", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stopping early (time limit" in result.stdout
    assert "epoch 1/4 loss" in result.stdout  # the per-epoch log reaches stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["epochs_planned"] == 4
    assert metrics["stopped_early"].startswith("time limit")
    # Recorded commands name files, not this machine's folders.
    command = "python benchmarks/gpu_cifar10.py --data c10.npz --out OUT"
    assert metrics["command"].startswith(command)
    assert str(tmp_path) not in json.dumps(metrics)
    assert 0 <= metrics["knn"]["top1"] <= 100 and 0 <= metrics["linear"]["top1"] <= 100
    (probe,) = metrics["probes"]  # measured at epoch 1, before the time limit ended the run
    assert probe["epoch"] == 1 and "probe at epoch 1: kNN" in result.stdout
    # Epoch 1 is the last one trained, so the probe saw the final weights (up to one of the
    # 64 test images flipping with another memory layout's rounding).
    assert abs(probe["knn"]["top1"] - metrics["knn"]["top1"]) <= 100 / 64 + 1e-6
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "config.yaml", "metrics.json", "metrics.jsonl", "weights-00001-of-00001.safetensors"
    ]  # fmt: skip
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1

    result = _run_script(script, "--out", str(out), "--join")
    assert result.returncode == 0, result.stderr[-2000:]
    model, cfg, ckpt = load_run(out / "run")
    assert cfg.model.width == 4 and cfg.epochs == 4 and ckpt.epoch == 1
    # float16 shards, restored to float32: within half precision of each other.
    from safetensors.torch import load_file

    shard = load_file(str(out / "weights-00001-of-00001.safetensors"))
    w = model.state_dict()["backbone.conv1.weight"]
    assert shard["backbone.conv1.weight"].dtype == torch.float16 and w.dtype == torch.float32
    torch.testing.assert_close(w, shard["backbone.conv1.weight"].float())

    export_model(out / "run", tmp_path / "model", onnx=False)
    exported = json.loads((tmp_path / "model" / "config.json").read_text())
    assert exported["metrics"]["knn_top1"] == metrics["knn"]["top1"]
    assert exported["provenance"]["epochs"] == 1 and exported["provenance"]["epochs_planned"] == 4

    # --lossless measures again on another copy: those become the cifar10 results, and the
    # run's own stay under the name of the file it was trained and evaluated on.
    lossless = tmp_path / "lossless.npz"
    with np.load(data) as z:
        x, y = z["x_train"], z["y_train"]
    np.savez(lossless, x_train=x, y_train=y, x_test=x[64:128], y_test=y[64:128])
    result = _run_script(script, "--out", str(out), "--join", "--lossless", str(lossless))
    assert result.returncode == 0, result.stderr[-2000:]
    evals = json.loads((out / "run" / "eval.json").read_text())
    assert [(e["protocol"], e["dataset"]) for e in evals] == [
        ("knn", "cifar10"), ("linear", "cifar10"), ("cluster", "cifar10"),
        ("knn", "c10"), ("linear", "c10"), ("cluster", "c10"),
    ]  # fmt: skip
    assert evals[3]["top1"] == metrics["knn"]["top1"]
    assert "--lossless" in evals[0]["command"] and evals[0]["settings"]["k"] == 200
    assert exported["provenance"]["epochs"] == 1 and exported["provenance"]["epochs_planned"] == 4


def test_gpu_sweep_compares_variants_records_collapse_and_keeps_to_its_time(tmp_path):
    data = random_npz(tmp_path / "c10.npz", 256, size=32, classes=10, n_test=32)
    script = str(ROOT / "benchmarks" / "gpu_sweep.py")
    common = [
        script, "--data", str(data), "--epochs", "3", "--knn-every", "1",
        "--set", "model.width=4", "--set", "optim.batch_size=64", "--set", "device=cpu",
        "--set", "optim.warmup_epochs=0",
    ]  # fmt: skip
    # Without the uniform prior, at lr 5, every image lands on one prototype by epoch 3.
    collapse = "nokl:loss.kl_start=0,loss.kl_end=0,optim.lr=5,collapse_patience=1"
    result = _run_script(
        *common, "--out", str(tmp_path / "a"), "--variant", "base",
        "--variant", "k30:model.num_prototypes=30", "--variant", collapse,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    sweep = json.loads((tmp_path / "a" / "sweep.json").read_text())
    base, k30, nokl = sweep["variants"]
    assert [v["name"] for v in sweep["variants"]] == ["base", "k30", "nokl"]
    assert base["changes"] == [] and k30["changes"] == ["model.num_prototypes=30"]
    assert base["epochs"] == 3 and [e for e, _ in base["knn_curve"]] == [1, 2, 3]
    assert base["stopped_early"] is None and 1 <= k30["prototypes_used"] <= 30
    assert nokl["error"] == "collapsed" and "collapse_floor" in nokl["message"]
    assert "| k30 | `model.num_prototypes=30` | 3/3 |" in result.stdout
    assert "| nokl |" in result.stdout and "failed: collapsed" in result.stdout

    result = _run_script(
        *common, "--out", str(tmp_path / "b"), "--variant", "base", "--time-limit", "0.001"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = json.loads((tmp_path / "b" / "sweep.json").read_text())["variants"]
    assert row["epochs"] == 1 and row["epochs_planned"] == 3
    assert row["stopped_early"].startswith("time share") and row["knn_epoch"] == 1


def test_gpu_sweep_rejects_bad_variants_before_training(tmp_path):
    script = str(ROOT / "benchmarks" / "gpu_sweep.py")
    args = [script, "--data", "missing.npz", "--out", str(tmp_path), "--epochs", "1"]
    result = _run_script(*args, "--variant", "a:model.nope=1")
    assert result.returncode == 2 and "--variant a:" in result.stderr
    assert "model.nope" in result.stderr
    result = _run_script(*args, "--variant", "a b")
    assert result.returncode == 2 and "NAME[:key=value,...]" in result.stderr
    result = _run_script(*args, "--variant", "a", "--variant", "a:optim.lr=1")
    assert result.returncode == 2 and "must differ" in result.stderr
    assert not (tmp_path / "sweep.json").exists()


def test_gpu_scripts_refuse_bad_input_before_writing(tmp_path):
    import numpy as np

    data = tmp_path / "c10.npz"
    x = np.zeros((8, 32, 32, 3), np.uint8)
    np.savez(data, x_train=x, y_train=np.zeros(8), x_test=x, y_test=np.zeros(8))
    npy = tmp_path / "c10.npy"  # one array: np.save, not np.savez
    np.save(npy, x)
    gpu = str(ROOT / "benchmarks" / "gpu_cifar10.py")
    sweep = str(ROOT / "benchmarks" / "gpu_sweep.py")
    out = tmp_path / "out"
    cases = [
        ([gpu, "--data", str(tmp_path / "nope.npz"), "--out", str(out)], "nope.npz: no such file"),
        ([gpu, "--data", str(data), "--out", str(out), "--set", "optim.lr=fast"],
         "optim.lr: expected a number"),
        ([gpu, "--out", str(out), "--join", "--lossless", "gone.npz"], "gone.npz: no such file"),
        ([sweep, "--data", "nope.npz", "--out", str(out), "--epochs", "1", "--variant", "a"],
         "nope.npz: no such file"),
        ([gpu, "--data", str(npy), "--out", str(out)], f"--data: cifar10: {npy} is a file; point"),
        ([sweep, "--data", str(npy), "--out", str(out), "--epochs", "1", "--variant", "a"],
         f"--data: cifar10: {npy} is a file; point"),
        ([gpu, "--out", str(out), "--join", "--lossless", str(npy)],
         f"--lossless: cifar10: {npy} is a file; point"),
    ]  # fmt: skip
    for args, message in cases:
        result = _run_script(*args)
        assert result.returncode == 2 and message in result.stderr.splitlines()[-1], args
        assert not out.exists()
    throughput = str(ROOT / "benchmarks" / "train_throughput.py")
    result = _run_script(throughput, "--data", str(npy), "--cpu-smoke")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"train_throughput.py: error: --data: npz: {npy} is not an .npz file (a zip of named "
        "arrays, as np.savez writes)"
    )
