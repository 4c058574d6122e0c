"""The benchmark scripts run in their small CPU mode (the figures themselves are not asserted)."""

import ast
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import random_npz

ROOT = Path(__file__).resolve().parents[1]
GPU = str(ROOT / "benchmarks" / "gpu_cifar10.py")
# gpu_cifar10.py's settings for a tiny CPU run
TINY_GPU_SETS = ["--set", "model.width=4", "--set", "optim.batch_size=64", "--set", "device=cpu",
                 "--set", "optim.warmup_epochs=0"]  # fmt: skip


def _run_script(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


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


def test_augment_cost_counts_the_augmentation_next_to_the_training_step(tmp_path):
    out = tmp_path / "cost.json"
    result = _run_script(
        str(ROOT / "benchmarks" / "augment_cost.py"), "--batch-size", "8", "--min-time", "0.1",
        "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ResNet-18 width 4," in result.stdout and "share of the host's dispatch" in result.stdout
    figures = json.loads(out.read_text())
    augment, step = figures["rows"]["augment (both views)"], figures["rows"]["training step"]
    assert 0 < augment["kernels"] < augment["ops"] and 0 < step["kernels"] < step["ops"]
    assert augment["us_batch2"] > 0 and augment["us_batch8"] > 0 and step["us_batch2"] > 0
    assert "us_batch8" not in step  # the CPU times the step at batch 2 only
    bad = _run_script(str(ROOT / "benchmarks" / "augment_cost.py"), "--batch-size", "1")
    assert bad.returncode == 2 and "--batch-size >= 2" in _last_line(bad)


def test_train_throughput_keeps_explicit_values_labels_cpu_memory_and_refuses_bad_counts(
    tmp_path,
):
    out = tmp_path / "figures.json"
    script = str(ROOT / "benchmarks" / "train_throughput.py")
    # --cpu-smoke sets what is not given; what is given wins.
    result = _run_script(
        script, "--cpu-smoke", "--width", "4", "--batch-size", "16", "--steps", "1",
        "--warmup", "0", "--skip-loader", "--compile-augment", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "width 4," in result.stdout and "batch 16," in result.stdout
    assert "carlzoo with compiled augmentation / model-only = " in result.stdout
    figures = json.loads(out.read_text())
    assert set(figures["results"]) == {"model", "carlzoo", "carlzoo_compiled_augment"}
    assert figures["args"]["width"] == 4 and figures["args"]["batch_size"] == 16
    assert figures["args"]["workers"] == 2  # not given: --cpu-smoke's
    # The CPU figure is the process's max RSS so far, and says so.
    assert "max RSS so far" in result.stdout and " peak " not in result.stdout
    for res in figures["results"].values():
        assert res["peak_memory_kind"].startswith("process max RSS so far")
    for flag, value, message in [
        ("--steps", "0", "--steps 0: expected at least 1"),
        ("--warmup", "-1", "--warmup -1: expected at least 0"),
    ]:
        result = _run_script(script, "--cpu-smoke", flag, value)
        assert result.returncode == 2 and message in _last_line(result), result.stderr[-2000:]


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
    assert 0 <= metrics["clustering"]["assignment_information"] <= math.log(100)
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
    from safetensors import safe_open

    with safe_open(str(out / "weights-00001-of-00001.safetensors"), "pt") as f:
        assert f.metadata()["epoch"] == "1"  # the epoch its weights are of

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
    assert {(e["model_epoch"], e["model_step"]) for e in evals} == {(1, ckpt.step)}
    assert "--lossless" in evals[0]["command"] and evals[0]["settings"]["k"] == 200
    assert exported["provenance"]["epochs"] == 1 and exported["provenance"]["epochs_planned"] == 4


def _fake_gpu_out(out: Path, data: Path, *, data_file: str = "c10.npz", width: int = 4) -> dict:
    """An OUT as gpu_cifar10.py leaves it after 2 epochs, without training: its config, log,
    metrics.json and one float16 shard of a width-``width`` model; returns the float32 state."""
    import torch
    from safetensors.torch import save_file

    from carlzoo.model import build_model
    from carlzoo.training.config import load_config, save_config

    out.mkdir()
    cfg = load_config(
        ROOT / "training/configs/cifar10_fast.yaml",
        [f"model.width={width}", "optim.batch_size=64", "device=cpu", "optim.warmup_epochs=0",
         "epochs=2", f"data.root={data}", "data.dataset=cifar10"],
    )  # fmt: skip
    save_config(cfg, out / "config.yaml")
    rows = [{"epoch": e, "step": 3 * e, "loss": 1.0, "prototypes_used": 9} for e in (1, 2)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = {
        "epochs": 2, "epochs_planned": 2, "data_file": data_file, "split": "test",
        "knn": {"top1": 12.5, "top5": 50.0}, "linear": {"top1": 25.0},
        "clustering": {"nmi": 0.5, "ari": 0.1, "purity": 30.0},
        "command": f"python benchmarks/gpu_cifar10.py --data {data_file} --out OUT",
    }  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(metrics))
    torch.manual_seed(0)
    state = build_model(cfg.model).state_dict()
    half = {
        k: v.half() if v.is_floating_point() and "running" not in k else v for k, v in state.items()
    }
    save_file(half, str(out / "weights-00001-of-00001.safetensors"), metadata={"epoch": "2"})
    return state


def test_gpu_cifar10_join_takes_one_complete_shard_set_and_says_what_is_wrong(tmp_path):
    import torch
    from safetensors.torch import save_file

    data = random_npz(tmp_path / "c10.npz", 96, size=32, classes=10, n_test=32)
    out = tmp_path / "out"
    state = _fake_gpu_out(out, data)
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    keys = list(zeros)
    good = out / "weights-00001-of-00001.safetensors"
    good_bytes = good.read_bytes()

    def join_fails(message: str) -> None:
        result = _run_script(GPU, "--out", str(out), "--join")
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in _last_line(result), result.stderr[-2000:]
        assert not (out / "run").exists()

    # An earlier run's shards of another count next to this run's: not mixed in.
    stale = [out / f"weights-0000{k}-of-00002.safetensors" for k in (1, 2)]
    save_file({k: zeros[k] for k in keys[:10]}, str(stale[0]))
    save_file({k: zeros[k] for k in keys[10:]}, str(stale[1]))
    join_fails("holds shards of 2 sets (weights-*-of-00001: 1, weights-*-of-00002: 2)")
    # An incomplete set.
    good.unlink()
    stale[0].unlink()
    join_fails("holds 1 of 2 shards; missing weights-00001-of-00002.safetensors")
    stale[1].unlink()
    # A shard cut short in the copy.
    good.write_bytes(good_bytes[: len(good_bytes) // 2])
    join_fails("weights-00001-of-00001.safetensors is not a readable safetensors file")
    # Shards of epoch 1 next to the metrics of epoch 2.
    save_file({k: v.half() for k, v in zeros.items()}, str(good), metadata={"epoch": "1"})
    join_fails("the shards are not all the weights of epoch 2")
    # Shards of another architecture than config.yaml's.
    other = tmp_path / "other"
    _fake_gpu_out(other, data, width=8)
    (out / "config.yaml").write_bytes((other / "config.yaml").read_bytes())
    good.write_bytes(good_bytes)
    join_fails("do not fit its config.yaml (backbone.conv1.weight is (4, 3, 3, 3) in them")


def test_gpu_cifar10_shard_writer_leaves_one_set_that_records_its_epoch(tmp_path):
    import torch
    from safetensors import safe_open

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_cifar10
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for k in (1, 2, 3):  # an earlier run's set of 3
        (tmp_path / f"weights-0000{k}-of-00003.safetensors").write_bytes(b"old")
    state = {"a.weight": torch.ones(4), "a.running_mean": torch.zeros(4)}
    gpu_cifar10.shard_state(state, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights-00001-of-00001.safetensors"]
    gpu_cifar10.shard_state(state, tmp_path, epoch=3, step=12)
    with safe_open(str(tmp_path / "weights-00001-of-00001.safetensors"), "pt") as f:
        assert f.metadata() == {"epoch": "3", "step": "12"}
        assert f.get_tensor("a.weight").dtype == torch.float16


def test_gpu_cifar10_join_lossless_results_are_the_published_cifar10_ones(tmp_path):
    """A run trained on a file named cifar10.npz: its own results must not take the name of
    the lossless ones, which `carlzoo export` publishes as the model's CIFAR-10 results."""
    from carlzoo.export.repo import export_model

    data = random_npz(tmp_path / "cifar10.npz", 96, size=32, classes=10, n_test=32)
    out = tmp_path / "out"
    _fake_gpu_out(out, data, data_file="cifar10.npz")
    result = _run_script(GPU, "--out", str(out), "--join", "--lossless", str(data))
    assert result.returncode == 0, result.stderr[-2000:]
    evals = json.loads((out / "run" / "eval.json").read_text())
    assert [(e["protocol"], e["dataset"]) for e in evals] == [
        ("knn", "cifar10"), ("linear", "cifar10"), ("cluster", "cifar10"),
        ("knn", "cifar10_run"), ("linear", "cifar10_run"), ("cluster", "cifar10_run"),
    ]  # fmt: skip
    assert {(e["model_epoch"], e["model_step"]) for e in evals} == {(2, 6)}
    assert evals[0]["model"] == str(out / "run")  # where the joined run is
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no leftovers

    export_model(out / "run", tmp_path / "model", onnx=False)
    exported = json.loads((tmp_path / "model" / "config.json").read_text())["metrics"]
    assert exported["knn_top1"] == round(evals[0]["top1"], 6)
    assert exported["linear_top1"] == round(evals[1]["top1"], 6)
    assert exported["cifar10_run_knn_top1"] == 12.5
    assert exported["cifar10_run_linear_top1"] == 25.0


def test_gpu_cifar10_join_stopped_by_sigterm_leaves_no_half_built_copy(tmp_path):
    data = random_npz(tmp_path / "cifar10.npz", 96, size=32, classes=10, n_test=32)
    out = tmp_path / "out"
    _fake_gpu_out(out, data)
    proc = subprocess.Popen(
        [sys.executable, GPU, "--out", str(out), "--join", "--lossless", str(data)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(out.glob(".join-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(out.glob(".join-*")), "the join never started building"
    proc.send_signal(signal.SIGTERM)  # while it measures on the lossless copy
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not (out / "run").exists()


def test_gpu_cifar10_refuses_an_out_holding_an_earlier_run(tmp_path):
    data = random_npz(tmp_path / "c10.npz", 96, size=32, classes=10, n_test=32)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("earlier: run\n")
    (out / "weights-00001-of-00002.safetensors").write_bytes(b"earlier")
    result = _run_script(
        GPU, "--data", str(data), "--out", str(out), "--epochs", "1", *TINY_GPU_SETS
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert _last_line(result).endswith(
        f"--out {out} holds an earlier run's config.yaml, weights-00001-of-00002.safetensors; "
        "choose another --out or empty it"
    )
    assert (out / "config.yaml").read_text() == "earlier: run\n"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml", "weights-00001-of-00002.safetensors"
    ]  # fmt: skip



def _gpu_job(
    step: str, data: Path, out: Path, *, python_dir: Path | None = None, timeout: float = 60,
    **env: str,
) -> subprocess.CompletedProcess:
    """benchmarks/gpu_run.sh's STEP on DATA into OUT (a sweep: one variant for one epoch), with
    ``python_dir`` first on PATH (the python3 the job runs) and ``env`` added."""
    full = {**os.environ, "DATA": str(data), "OUT": str(out), "STEP": step, "EPOCHS": "1",
            "VARIANTS": "base", **env}
    if python_dir is not None:
        full["PATH"] = f"{python_dir}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_run.sh")],
        capture_output=True, text=True, timeout=timeout, env=full,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("step", "earlier"),
    [("train", "train.log"),  # checked before tee replaces it
     ("sweep", "sweep.json"), ("sweep", "sweep.log"), ("throughput", "throughput.json"),
     ("throughput", "train.log")],  # another step's files: two steps' can exceed 8 files
)
def test_gpu_run_refuses_an_out_that_is_not_empty(tmp_path, step, earlier):
    out = tmp_path / "out"
    out.mkdir()
    (out / earlier).write_text("earlier result\n")
    result = _gpu_job(step, tmp_path / "unused.npz", out)
    assert result.returncode == 2, result.stderr[-2000:]
    assert _last_line(result) == (
        f"gpu_run.sh: OUT={out} is not empty (it holds: {earlier}); each step writes into an "
        "empty OUT: choose another OUT or empty it"
    )
    assert [p.name for p in out.iterdir()] == [earlier]
    assert (out / earlier).read_text() == "earlier result\n"


@pytest.mark.parametrize("step", ["train", "sweep"])
def test_gpu_run_trains_the_recipe_config_names(tmp_path, step):
    """CONFIG reaches the training script: an unknown recipe is refused by name."""
    data = random_npz(tmp_path / "c10.npz", 64, size=32, classes=10, n_test=16)
    out = tmp_path / "out"
    result = _gpu_job(
        step, data, out, python_dir=Path(sys.executable).parent, timeout=120,
        CONFIG="no_such_recipe", SETS="model.width=4 device=cpu",
    )  # fmt: skip
    assert result.returncode == 2, result.stdout[-2000:]
    assert "no preset named 'no_such_recipe'; presets: cifar10, cifar100, cifar10_adamw" in (
        result.stdout.strip().splitlines()[-1]
    )
    assert list(out.iterdir()) == []  # the refusal leaves OUT free for the corrected call


@pytest.mark.parametrize(
    ("step", "log"),
    [("train", "train.log"), ("sweep", "sweep.log"), ("throughput", "throughput.txt")],
)
@pytest.mark.parametrize("code", [1, 2])
def test_gpu_run_keeps_a_failed_steps_log_unless_its_script_refused_the_arguments(
    tmp_path, step, log, code
):
    """Exit status 2 (a refusal before any work) leaves OUT empty; any other failure keeps
    the log, and the script's status is the job's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(f"#!/bin/sh\necho 'the script says no'\nexit {code}\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    result = _gpu_job(step, tmp_path / "c10.npz", out, python_dir=bin_dir)
    assert result.returncode == code, result.stderr[-2000:]
    assert result.stdout.count("the script says no") == 1  # the step's next script not run
    if code == 2:
        assert list(out.iterdir()) == []
    else:
        assert [p.name for p in out.iterdir()] == [log]
        assert "the script says no" in (out / log).read_text()


def test_gpu_sweep_refuses_an_out_holding_an_earlier_sweep(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.json").write_text("{}")
    result = _run_script(
        str(ROOT / "benchmarks" / "gpu_sweep.py"), "--data", str(tmp_path / "unused.npz"),
        "--out", str(out), "--epochs", "1", "--variant", "base",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert _last_line(result).endswith(
        f"--out {out} holds an earlier sweep.json; choose another --out or move it"
    )
    assert (out / "sweep.json").read_text() == "{}"


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
    info = k30["assignment_information"]
    assert 0 <= info <= math.log(30)
    assert "| k30 | `model.num_prototypes=30` | 3/3 |" in result.stdout
    assert f"| {k30['prototypes_used']} | {info:.2f} |" in result.stdout
    assert nokl["error"] == "collapsed" and "collapse_floor" in nokl["message"]
    assert "| nokl |" in result.stdout and "failed: collapsed" in result.stdout

    # A preset by name, from another folder: recorded by the name given. Stopped by its time
    # share before the schedule's kNN (every 3 epochs), it measures kNN where it stopped.
    result = _run_script(
        *common, "--out", str(tmp_path / "b"), "--variant", "base", "--time-limit", "0.001",
        "--config", "cifar10_fast", "--knn-every", "3", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    sweep = json.loads((tmp_path / "b" / "sweep.json").read_text())
    assert sweep["config"] == "cifar10_fast" and "--config cifar10_fast" in sweep["command"]
    assert sweep["variants"][0]["epochs_planned"] == 3
    (row,) = sweep["variants"]
    assert row["epochs"] == 1 and row["epochs_planned"] == 3
    assert row["stopped_early"].startswith("time share") and row["knn_epoch"] == 1
    assert 0 <= row["knn_top1"] <= 100 and row["knn_curve"] == [[1, row["knn_top1"]]]
    assert "stopped early at epoch 1: kNN" in result.stdout


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


def test_gpu_sweep_checks_each_variant_with_the_settings_it_runs_with(tmp_path):
    """--epochs, --knn-every and checkpoint_every are part of every variant's config: a
    config they make invalid is refused before the data is read or OUT exists."""
    data = random_npz(tmp_path / "c10.npz", 96, size=32, classes=10, n_test=32)
    script = str(ROOT / "benchmarks" / "gpu_sweep.py")
    out = tmp_path / "out"
    args = [script, "--data", str(data), "--out", str(out), "--set", "model.width=4",
            "--set", "device=cpu", "--variant", "base"]  # fmt: skip
    # The recipe warms up for 10 epochs: 5 epochs per variant cannot work without a shorter one.
    result = _run_script(*args, "--epochs", "5")
    assert result.returncode == 2, result.stderr[-2000:]
    line = _last_line(result)
    assert "--variant base: optim.warmup_epochs=10 must be shorter than epochs=5" in line
    assert "--set optim.warmup_epochs=" in line and 'SETS="optim.warmup_epochs=N"' in line
    result = _run_script(*args, "--epochs", "5", "--knn-every", "-1")
    assert result.returncode == 2
    assert "--knn-every -1: expected 0 (no kNN) or more" in _last_line(result)
    assert not out.exists()


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
        ([sweep, "--data", "nope.npz", "--out", str(out), "--epochs", "1", "--variant", "a",
          "--set", "optim.warmup_epochs=0"], "nope.npz: no such file"),
        ([gpu, "--data", str(npy), "--out", str(out)], f"--data: cifar10: {npy} is a file; point"),
        ([sweep, "--data", str(npy), "--out", str(out), "--epochs", "1", "--variant", "a",
          "--set", "optim.warmup_epochs=0"], f"--data: cifar10: {npy} is a file; point"),
        ([gpu, "--out", str(out), "--join", "--lossless", str(npy)],
         f"--lossless: cifar10: {npy} is a file; point"),
        ([gpu, "--out", str(out), "--lossless", str(data)], "--lossless is for --join"),
        ([gpu, "--out", str(out), "--join"], f"--join: {out} is not a folder"),
    ]  # fmt: skip
    for args, message in cases:
        result = _run_script(*args)
        assert result.returncode == 2 and message in result.stderr.splitlines()[-1], args
        assert not out.exists()
    # --join is a flag: the docstring (--help) shows it so.
    doc = ast.get_docstring(ast.parse(Path(gpu).read_text()))
    assert "--join OUT" not in doc and "--out OUT --join" in doc
    throughput = str(ROOT / "benchmarks" / "train_throughput.py")
    result = _run_script(throughput, "--data", str(npy), "--cpu-smoke")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"train_throughput.py: error: --data: npz: {npy} is not an .npz file (a zip of named "
        "arrays, as np.savez writes)"
    )


def _bench_module(name: str):
    """A script of benchmarks/ imported as a module (they import the scripts beside them)."""
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_variant_changes_keep_the_commas_of_a_bracketed_value():
    parse_variant = _bench_module("gpu_sweep").parse_variant
    assert parse_variant("crop:augment.crop_scale=[0.14,1.0],optim.lr=0.3") == (
        "crop", ["augment.crop_scale=[0.14,1.0]", "optim.lr=0.3"]
    )  # fmt: skip
    assert parse_variant("a:optim.lr=0.3, model.num_prototypes=512") == (
        "a", ["optim.lr=0.3", "model.num_prototypes=512"]
    )  # fmt: skip
    assert parse_variant("base") == ("base", [])


def test_gpu_runs_keeps_the_weights_of_the_best_runs_that_fit_in_eight_files():
    weights_kept = _bench_module("gpu_runs").weights_kept

    def rows(*linear):
        return [{"name": f"r{i}", "linear_top1": v, "knn_top1": 1.0} for i, v in enumerate(linear)]

    two = {"r0": 2, "r1": 2, "r2": 2, "r3": 2}  # ResNet-18 in float16: 2 shards of < 16 MiB
    # Two runs: 2 tars + 2 x 2 shards + runs.json + the log = 8 files.
    assert weights_kept(rows(50.0, 60.0), two) == {"r0", "r1"}
    # Three or four: room for one run's shards, the best linear one's; a failed run has none.
    assert weights_kept(rows(50.0, 70.0, 60.0), two) == {"r1"}
    assert weights_kept(rows(None, 40.0, 30.0, 20.0), two) == {"r1"}
    assert weights_kept([{"name": "r0"}, {"name": "r1"}], two) == set()
    # Larger models have more shards (a ResNet-34: 3): the best that fit, in order.
    assert weights_kept(rows(50.0, 60.0), {"r0": 2, "r1": 3}) == {"r1"}
    assert weights_kept(rows(60.0, 50.0), {"r0": 3, "r1": 4}) == {"r0"}
    assert weights_kept(rows(60.0, 50.0), {"r0": 5, "r1": 2}) == {"r1"}


def test_gpu_runs_trains_variants_at_once_and_packs_them_into_eight_files(tmp_path):
    data = random_npz(tmp_path / "c10.npz", 128, size=32, classes=10, n_test=32)
    out = tmp_path / "out"
    result = _run_script(
        str(ROOT / "benchmarks" / "gpu_runs.py"), "--data", str(data), "--out", str(out),
        "--epochs", "1", "--pack", "--eval-reserve", "0", *TINY_GPU_SETS, "--set", "knn_every=1",
        "--variant", "base", "--variant", "crop:augment.crop_scale=[0.14,1.0]",
        "--variant", "k20:model.num_prototypes=20",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    runs = json.loads((out / "runs.json").read_text())
    assert [r["name"] for r in runs["runs"]] == ["base", "crop", "k20"]
    assert all(r["returncode"] == 0 and r["epochs"] == 1 for r in runs["runs"])
    assert "--data c10.npz --out OUT" in runs["command"] and str(tmp_path) not in runs["command"]
    # These tiny models have one shard each: 3 tars + 3 shards + runs.json (+ the log) fit.
    assert all(r["weights_kept"] for r in runs["runs"])
    best = max(runs["runs"], key=lambda r: r["linear_top1"])
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted(
        ["runs.json", *(f"{n}/{f}" for n in ("base", "crop", "k20")
                        for f in ("run.tar", "weights-00001-of-00001.safetensors"))]
    )  # fmt: skip
    assert "| crop | `augment.crop_scale=[0.14,1.0]` | 1/1 |" in result.stdout
    assert result.stdout.count("--time-limit") == 0  # none given, none passed on
    assert result.stdout.count("--eval-reserve 0.0 --set model.width=4") == 3

    # A run's folder is its tar and its shards: the run each variant trained, which --join
    # rebuilds for `carlzoo export`.
    import tarfile

    from carlzoo.training.config import load_config

    run = tmp_path / "run"
    run.mkdir()
    with tarfile.open(out / best["name"] / "run.tar") as tar:
        assert sorted(tar.getnames()) == [
            "config.yaml", "metrics.json", "metrics.jsonl", "train.log"
        ]  # fmt: skip
        tar.extractall(run, filter="data")
    for shard in (out / best["name"]).glob("weights-*"):
        (run / shard.name).write_bytes(shard.read_bytes())
    with tarfile.open(out / "crop" / "run.tar") as tar:
        tar.extract("config.yaml", tmp_path / "crop", filter="data")
    assert load_config(tmp_path / "crop" / "config.yaml").augment.crop_scale == (0.14, 1.0)
    result = _run_script(GPU, "--out", str(run), "--join")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run / "run" / "checkpoints" / "last.safetensors").is_file()


def test_gpu_runs_refuses_bad_variants_and_earlier_results_before_starting(tmp_path):
    script = str(ROOT / "benchmarks" / "gpu_runs.py")
    data = random_npz(tmp_path / "c10.npz", 16, size=32, classes=10, n_test=16)
    out = tmp_path / "out"
    args = [script, "--data", str(data), "--out", str(out), "--epochs", "1", *TINY_GPU_SETS]
    cases = [
        (["--variant", "a:model.nope=1"], "--variant a: "),
        (["--variant", "a", "--variant", "a:optim.lr=1"], "--variant names must differ"),
        ([f"--variant=v{i}" for i in range(5)], "--variant: 5 given, at most 4 share one GPU"),
        (["--variant", "a", "--data", str(tmp_path / "nope.npz")], "nope.npz: no such file"),
        (["--variant", "a", "--variant", ".."], "--variant ..: that name is OUT's own"),
        (["--variant", "runs.json"], "--variant runs.json: that name is OUT's own"),
        (["--variant", "a", "--finish"], "--finish stops runs that would not finish in --time"),
    ]
    for extra, message in cases:
        result = _run_script(*args, *extra)
        assert result.returncode == 2 and message in _last_line(result), (extra, result.stderr)
        assert not out.exists()
    (out / "b").mkdir(parents=True)  # an earlier run of a variant of that name
    result = _run_script(*args, "--variant", "a", "--variant", "b")
    assert result.returncode == 2
    assert _last_line(result).endswith(
        f"--out {out} holds an earlier b; choose another --out or empty it"
    )
    assert [p.name for p in out.iterdir()] == ["b"]

    # A data file every run refuses (exit status 2, before any work): nothing is left behind.
    bad = tmp_path / "bad.npz"
    bad.write_text("not an npz\n")
    fresh = tmp_path / "fresh"
    result = _run_script(
        script, "--data", str(bad), "--out", str(fresh), "--epochs", "1", *TINY_GPU_SETS,
        "--variant", "a", "--variant", "b",
    )  # fmt: skip
    assert result.returncode == 2, result.stdout[-2000:]
    assert "every run refused to start; a's says: " in _last_line(result)
    assert "bad.npz" in _last_line(result) and not fresh.exists()


def test_gpu_runs_row_of_a_killed_run_names_the_signal(tmp_path):
    result_row = _bench_module("gpu_runs").result_row
    (tmp_path / "train.log").write_text("device cpu\n06:47:13 epoch 35/200 loss 2.5\n")
    row = result_row("a", ["optim.lr=1"], tmp_path, -9, 12.0)
    assert row["error"] == "killed by SIGKILL; its log ends: 06:47:13 epoch 35/200 loss 2.5"
    assert row["returncode"] == -9 and row["wall_s"] == 12.0


def test_gpu_runs_stopped_by_timeout_stops_every_run_and_records_them(tmp_path):
    """`timeout` signals gpu_runs.py and then its whole process group: every run stops, and
    runs.json says so."""
    data = random_npz(tmp_path / "c10.npz", 128, size=32, classes=10, n_test=32)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_runs.py"), "--data", str(data),
         "--out", str(out), "--epochs", "500", "--pack", *TINY_GPU_SETS,
         "--set", "knn_every=0", "--variant", "a", "--variant", "b"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(
            (out / n / "metrics.jsonl").is_file() for n in ("a", "b")
        ):
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)  # as `timeout` does: the driver, then the group
        stdout, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, stdout[-2000:]
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no run left behind
    runs = json.loads((out / "runs.json").read_text())["runs"]
    assert [r["name"] for r in runs] == ["a", "b"]
    assert all(r["error"] == "stopped by SIGTERM to gpu_runs.py" for r in runs)
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "runs.json"]
    assert [p.name for p in (out / "a").iterdir()] == ["run.tar"]


def test_gpu_run_passes_bracketed_values_as_written_not_as_globs(tmp_path):
    """SETS and VARIANTS words reach the scripts as written, also where a file in the
    repository root matches them as a shell pattern."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    for name in ("carlzoo", "training", "export", "cli"):
        (repo / name).mkdir()
    (repo / "benchmarks" / "gpu_run.sh").write_text(
        (ROOT / "benchmarks" / "gpu_run.sh").read_text()
    )
    (repo / "augment.crop_scale=0").write_text("")  # matches augment.crop_scale=[0.14,1.0]
    (repo / "c:augment.crop_scale=1").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "arg: $a"; done\n')
    fake.chmod(0o755)
    for step in ("train", "sweep", "runs"):
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               "DATA": "c10.npz", "OUT": str(tmp_path / step), "STEP": step, "EPOCHS": "1",
               "SETS": "augment.crop_scale=[0.14,1.0]", "EVAL_RESERVE": "20",
               "VARIANTS": "c:augment.crop_scale=[0.2,1.0]\n  d:optim.lr=0.1"}  # fmt: skip
        result = subprocess.run(
            ["bash", str(repo / "benchmarks" / "gpu_run.sh")],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        args = [line for line in result.stdout.splitlines() if line.startswith("arg: ")]
        assert "arg: augment.crop_scale=[0.14,1.0]" in args, (step, result.stdout, result.stderr)
        assert "arg: augment.crop_scale=0" not in args
        if step != "sweep":  # the time the run keeps for its evaluation and files
            assert args[args.index("arg: --eval-reserve") + 1] == "arg: 20", step
        if step != "train":
            assert "arg: c:augment.crop_scale=[0.2,1.0]" in args, step
            assert "arg: c:augment.crop_scale=1" not in args
            assert "arg: d:optim.lr=0.1" in args  # a word on the next line counts too


def test_gpu_runs_stops_the_last_run_when_sharing_would_cut_every_schedule_short():
    gpu_runs = _bench_module("gpu_runs")

    def records(*times):  # epoch 1 loads and warms up: never counted
        return [{"epoch": e, "epoch_time_s": t} for e, t in enumerate(times, 1)]

    shared = records(9.0, 2.0, 2.0, 2.0, 2.0)  # 195 epochs left at 2.1 s (5% added): 410 s
    assert gpu_runs.forecast(shared, 200, 0) == pytest.approx(1.05 * 2.0 * 195)
    assert gpu_runs.forecast(shared[:3], 200, 0) is None  # two paced epochs only
    assert gpu_runs.forecast(shared, 200, 3) is None  # two since the last stop

    def stop(a, b, elapsed=20.0, limit=560.0):
        return gpu_runs.to_stop({"a": (a, 200), "b": (b, 200)}, elapsed, limit, 20.0, {})

    assert stop(shared, shared) is None  # 20 + 410 + 20 s fit in 560
    assert stop(shared, shared, limit=440.0) == "b"  # both late: the last one goes
    slow = records(9.0, 3.0, 3.0, 3.0)  # 197 epochs left at 3.15 s: 621 s
    assert stop(slow, slow) == "b"
    # A run that would finish is never stopped, also where another would not: it ends soon
    # and leaves the GPU to the other anyway.
    assert stop(slow, shared) is None and stop(shared, slow) is None
    assert stop(records(9.0, 3.0, 3.0), records(9.0, 3.0, 3.0)) is None  # too early to tell
    three = {"a": (slow, 200), "b": (shared, 200), "c": (slow, 200)}
    assert gpu_runs.to_stop(three, 20.0, 560.0, 20.0, {}) == "c"
    alone = {"a": (records(9.0, 3.0, 3.0, 3.0), 200)}
    assert gpu_runs.to_stop(alone, 20.0, 100.0, 20.0, {}) is None  # nothing to share with


def test_gpu_runs_finish_stops_the_last_run_so_the_first_can_go_on(tmp_path):
    data = random_npz(tmp_path / "c10.npz", 128, size=32, classes=10, n_test=32)
    out = tmp_path / "out"
    # 500 epochs cannot fit in 20 s: the second run is stopped once three epochs say so, and
    # the first goes on until its own time limit ends it early.
    result = _run_script(
        str(ROOT / "benchmarks" / "gpu_runs.py"), "--data", str(data), "--out", str(out),
        "--epochs", "500", "--time-limit", "20", "--eval-reserve", "0", "--finish", "--pack",
        *TINY_GPU_SETS, "--set", "knn_every=0", "--variant", "first", "--variant", "second",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    first, second = json.loads((out / "runs.json").read_text())["runs"]
    assert second["stopped"].startswith("stopped after epoch")
    assert "not every run would finish its schedule in 20 s" in second["stopped"]
    assert "error" not in second and not second["weights_kept"]
    assert first["epochs"] < 500 and first["stopped_early"].startswith("time limit")
    assert first["weights_kept"] and "stopped" not in first
    assert "| second | (recipe) | stopped after epoch" in result.stdout
