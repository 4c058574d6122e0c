"""Train several carl-cifar10 candidates at once on one GPU, each a whole gpu_cifar10.py run.

    python benchmarks/gpu_runs.py --data cifar10_webp90.npz --out OUT \
        --variant k512:model.num_prototypes=512 \
        --variant crop0.14:augment.crop_scale=[0.14,1.0] \
        [--config training/configs/cifar10_fast.yaml] [--epochs 200] [--set key=value ...] \
        [--time-limit 560] [--eval-reserve 20] [--finish] [--pack]

Why at once: the CARL ResNet-18 step at 32 px is bound by the host thread that dispatches
its kernels, not by the GPU. On an H200 one training step takes 14.1 ms at batch 2 and
16.7 ms at batch 512 (``augment_cost.py``), so one run leaves the GPU idle most of the time,
and two processes, each with its own host thread, share it with little loss each.

Each ``--variant NAME[:key=value,...]`` (the syntax of ``gpu_sweep.py``; a value in brackets
may hold commas) becomes one process of ``gpu_cifar10.py --out OUT/NAME`` with the recipe,
the ``--set`` changes for every variant, then its own; its output goes to
``OUT/NAME/train.log``. All start together with the same ``--time-limit``, so each stops
early, evaluates and says so if sharing the GPU makes the schedule too long. With
``--finish`` the runs that can finish come first instead: once the pace of three epochs
says that two or more would not finish their schedules in the time limit, the last-listed of
those is stopped (its row says so) and the others go on faster; a run that would finish is
never stopped. So list the variants best bet first. Every variant's config is checked
before any process starts.

OUT/runs.json holds one row per variant (its changes, epochs done, kNN, linear, NMI,
images/s, time, exit status) and a Markdown table for ``benchmarks/RESULTS.md`` is printed.
The exit status is 0 when every run not stopped by ``--finish`` ended well, else 1 (the
other runs are kept).

``--pack`` is for machines that hand back at most 8 files: each run's small files
(config.yaml, metrics.json, metrics.jsonl, train.log) go into ``OUT/NAME/run.tar``, and the
weight shards are kept for as many runs as 8 files allow, best linear top-1 first (both
runs of two; one of three or four). A run's folder for ``gpu_cifar10.py --join`` is then
``tar -xf OUT/NAME/run.tar -C DIR`` plus its shards.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_cifar10 import (  # noqa: E402  (scripts beside this one)
    EVAL_RESERVE,
    config_label,
    portable_command,
    run_overrides,
)
from gpu_sweep import parse_variant  # noqa: E402

from carlzoo.outputs import atomic_write_text  # noqa: E402
from carlzoo.training.config import load_config  # noqa: E402
from carlzoo.training.run import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPU_SCRIPT = Path(__file__).resolve().parent / "gpu_cifar10.py"
SMALL_FILES = ("config.yaml", "metrics.json", "metrics.jsonl", "train.log")
MAX_FILES = 8  # what a machine that limits them hands back
OWN_FILES = 2  # runs.json and the job's log beside it (gpu_run.sh's runs.log)
MAX_VARIANTS = 4
RESERVED = ("runs.json", "runs.log")  # OUT's own files: no variant's folder
STARTUP = 10.0  # seconds a run's start-up (imports) takes that its own clock does not count
KILL_AFTER = 30.0  # seconds a run has to end after SIGTERM before SIGKILL


def child_command(args: argparse.Namespace, changes: list[str], out: Path, limit: float) -> list:
    """The gpu_cifar10.py command line of one variant."""
    cmd = [sys.executable, str(GPU_SCRIPT), "--data", args.data, "--out", str(out)]
    cmd += ["--config", args.config]
    if args.epochs is not None:
        cmd += ["--epochs", str(args.epochs)]
    if limit:
        cmd += ["--time-limit", f"{limit:.1f}"]
    if args.eval_reserve is not None:
        cmd += ["--eval-reserve", str(args.eval_reserve)]
    for kv in [*args.overrides, *changes]:
        cmd += ["--set", kv]
    return cmd


def weights_kept(rows: list[dict[str, Any]], shards: dict[str, int]) -> set[str]:
    """Names of the runs whose shards (``shards``: name -> count) fit in MAX_FILES next to
    one tar per run and OWN_FILES, best linear top-1 first; a run without results keeps none."""
    room = MAX_FILES - OWN_FILES - len(rows)
    done = [r for r in rows if r.get("linear_top1") is not None]
    done.sort(key=lambda r: (r["linear_top1"], r.get("knn_top1") or 0.0), reverse=True)
    kept = set()
    for r in done:
        if 0 < shards[r["name"]] <= room:
            kept.add(r["name"])
            room -= shards[r["name"]]
    return kept


def shard_count(run: Path) -> int:
    return len(list(run.glob("weights-*.safetensors")))


def last_line(log: Path) -> str:
    text = log.read_text(errors="replace").strip() if log.is_file() else ""
    return text.splitlines()[-1] if text else ""


def forecast(records: list[dict[str, Any]], epochs: int, since: int) -> float | None:
    """Seconds the run's remaining epochs will take at the pace of its last three epochs
    after epoch ``since`` (epoch 1, which loads and warms up, never counts), 5% added for the
    kNN monitor and probes; None until three such epochs have ended."""
    recent = [r["epoch_time_s"] for r in records if r["epoch"] > max(since, 1)][-3:]
    if len(recent) < 3:
        return None
    return 1.05 * sum(recent) / 3 * (epochs - records[-1]["epoch"])


def to_stop(
    progress: dict[str, tuple[list[dict[str, Any]], int]],
    elapsed: float,
    limit: float,
    reserve: float,
    since: dict[str, int],
) -> str | None:
    """The run to stop so that another can finish its schedule in ``limit`` seconds
    (``progress``: name -> (its per-epoch records, its epochs), in variant order): the last of
    those that would not finish in time at the pace they share, when at least two would not
    (stopping it speeds up the earlier one). A run that would finish is never stopped."""
    late = []
    for name, (records, epochs) in progress.items():
        left = forecast(records, epochs, since.get(name, 0))
        if left is not None and elapsed + left + reserve > limit:
            late.append(name)
    return late[-1] if len(late) >= 2 else None


def pack(run: Path) -> None:
    """run's small files into run/run.tar (written beside, then renamed), then removed."""
    present = [run / n for n in SMALL_FILES if (run / n).is_file()]
    tmp = run / ".run.tar.tmp"
    with tarfile.open(tmp, "w") as tar:
        for f in present:
            tar.add(f, arcname=f.name)
    tmp.replace(run / "run.tar")
    for f in present:
        f.unlink()


def result_row(name: str, changes: list[str], run: Path, code: int, wall: float) -> dict[str, Any]:
    """One variant's row of runs.json from its folder; ``wall``: seconds its process ran."""
    row: dict[str, Any] = {"name": name, "changes": changes, "returncode": code, "wall_s": wall}
    metrics_file = run / "metrics.json"
    if not metrics_file.is_file():
        last = last_line(run / "train.log") or "no output"
        if code < 0:  # the OOM killer, say
            last = f"killed by {signal.Signals(-code).name}; its log ends: {last}"
        row["error"] = last
        return row
    m = json.loads(metrics_file.read_text())
    records = read_metrics(run / "metrics.jsonl")
    paced = [r for r in records if r["epoch"] > 1] or records  # epoch 1 loads and warms up
    rates = [r["images_per_s"] for r in paced if "images_per_s" in r]
    row.update(
        epochs=m["epochs"],
        epochs_planned=m["epochs_planned"],
        stopped_early=m["stopped_early"],
        knn_top1=m["knn"]["top1"],
        linear_top1=m["linear"]["top1"],
        nmi=m["clustering"].get("nmi"),
        knn_curve=m["knn_curve"],
        images_per_s=sum(rates) / len(rates) if rates else None,
        train_time_s=m["train_time_s"],
        total_time_s=m["total_time_s"],
        hardware=m["hardware"],
    )
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | changes | epochs | kNN top-1 | linear top-1 | NMI | images/s | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        changes = ", ".join(f"`{c}`" for c in r["changes"]) or "(recipe)"
        if "stopped" in r or "error" in r:
            why = r.get("stopped") or f"failed: {r['error']}"
            lines.append(f"| {r['name']} | {changes} | {why} | | | | | |")
            continue
        rate = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.0f}"
        nmi = "-" if r["nmi"] is None else f"{r['nmi']:.3f}"
        lines.append(
            f"| {r['name']} | {changes} | {r['epochs']}/{r['epochs_planned']} | "
            f"{r['knn_top1']:.2f} | {r['linear_top1']:.2f} | {nmi} | {rate} | "
            f"{r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="CIFAR-10 .npz (plain or WebP-encoded)")
    p.add_argument("--out", required=True, help="output folder: OUT/NAME per variant, runs.json")
    p.add_argument("--config", default=str(ROOT / "training/configs/cifar10_fast.yaml"))
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--variant", dest="variants", type=parse_variant, action="append", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="for every variant")
    p.add_argument("--time-limit", type=float, default=0.0, help="seconds for each run (0: none)")
    p.add_argument(
        "--eval-reserve", type=float, default=None, help="gpu_cifar10.py's (default: its own)"
    )
    p.add_argument(
        "--finish",
        action="store_true",
        help="with --time-limit: stop the last runs when sharing would cut all schedules short",
    )
    p.add_argument(
        "--pack", action="store_true", help=f"leave at most {MAX_FILES} files in OUT (see above)"
    )
    args = p.parse_args()
    names = [n for n, _ in args.variants]
    if len(set(names)) != len(names):
        p.error(f"--variant names must differ, got {names}")
    for name in names:
        if name in RESERVED or set(name) == {"."}:
            p.error(f"--variant {name}: that name is OUT's own ({', '.join(RESERVED)}, '.', '..')")
    if args.finish and not args.time_limit:
        p.error("--finish stops runs that would not finish in --time-limit: give one")
    if len(names) > MAX_VARIANTS:
        p.error(
            f"--variant: {len(names)} given, at most {MAX_VARIANTS} share one GPU here; "
            "run the rest in another call"
        )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is not a folder")
    held = [n for n in ["runs.json", *names] if (out / n).exists()]
    if held:  # an earlier result would be overwritten or mixed with this one
        p.error(f"--out {out} holds an earlier {', '.join(held)}; choose another --out or empty it")
    planned: dict[str, int] = {}
    for name, changes in args.variants:  # every config valid before any process starts
        try:
            sets = [*args.overrides, *changes]
            planned[name] = load_config(
                args.config, run_overrides(args.data, sets, args.epochs)
            ).epochs
        except ValueError as e:
            p.error(f"--variant {name}: {e}")
    if not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file")

    t_start = time.perf_counter()
    made_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // len(names))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    procs: dict[str, subprocess.Popen] = {}
    logs = {}
    signals: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        # `timeout` signals this process and then its whole group: only note it here (a
        # handler that waited could run again inside its own wait and never return).
        signals.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for name, changes in args.variants:
        if signals:
            break
        run = out / name
        run.mkdir()
        logs[name] = open(run / "train.log", "w")  # noqa: SIM115  (closed below)
        limit = max(args.time_limit - (time.perf_counter() - t_start) - STARTUP, 1.0)
        cmd = child_command(args, changes, run, limit if args.time_limit else 0.0)
        print(f"== {name}: {portable_command(cmd[1:])}", flush=True)
        procs[name] = subprocess.Popen(cmd, stdout=logs[name], stderr=subprocess.STDOUT, env=env)

    codes: dict[str, int] = {}
    walls: dict[str, float] = {}
    stopped: dict[str, str] = {}  # runs stopped so that the others finish, and why
    since: dict[str, int] = {}  # epoch of each run when the last one was stopped
    reserve = EVAL_RESERVE if args.eval_reserve is None else args.eval_reserve
    t_signal = None
    while len(codes) < len(procs):
        if signals and t_signal is None:  # stop every run, then record what there is
            t_signal = time.perf_counter()
            print(f"== signal {signal.Signals(signals[0]).name}: stopping every run", flush=True)
            for proc in procs.values():
                if proc.poll() is None:
                    proc.terminate()
        if t_signal is not None and time.perf_counter() - t_signal > KILL_AFTER:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
        running = [n for n in procs if n not in codes and n not in stopped]
        if args.finish and not signals and len(running) > 1:
            progress = {n: (read_metrics(out / n / "metrics.jsonl"), planned[n]) for n in running}
            elapsed = time.perf_counter() - t_start
            victim = to_stop(progress, elapsed, args.time_limit, reserve, since)
            if victim is not None and procs[victim].poll() is None:
                epoch = progress[victim][0][-1]["epoch"] if progress[victim][0] else 0
                stopped[victim] = (
                    f"stopped after epoch {epoch} at {elapsed:.0f} s: sharing the GPU, not every "
                    f"run would finish its schedule in {args.time_limit:.0f} s"
                )
                print(f"== {victim} {stopped[victim]}", flush=True)
                procs[victim].terminate()
                for n in running:  # their pace so far was shared with the stopped run
                    records = progress[n][0]
                    since[n] = records[-1]["epoch"] if records else 0
        for name, proc in procs.items():
            if name not in codes and proc.poll() is not None:
                codes[name] = proc.returncode
                logs[name].close()
                walls[name] = time.perf_counter() - t_start
                print(
                    f"== {name} ended ({codes[name]}) after {walls[name]:.0f} s: "
                    f"{last_line(out / name / 'train.log')}",
                    flush=True,
                )
        time.sleep(0.2)

    if not signals and codes and all(c == 2 for c in codes.values()):
        # Every run refused its arguments (exit status 2, e.g. a --data that is no CIFAR-10
        # .npz) before any work: nothing is left behind, so the corrected call can use OUT.
        why = last_line(out / names[0] / "train.log")
        for name in procs:
            (out / name / "train.log").unlink()
            (out / name).rmdir()
        if made_out:
            out.rmdir()
        p.error(f"every run refused to start; {names[0]}'s says: {why}")

    rows = [result_row(n, c, out / n, codes[n], walls[n]) for n, c in args.variants if n in procs]
    for row in rows:
        if row["name"] in stopped:
            row.pop("error", None)  # the log's last line: the signal, not the reason
            row["stopped"] = stopped[row["name"]]
        elif signals and "linear_top1" not in row:
            row["error"] = f"stopped by {signal.Signals(signals[0]).name} to gpu_runs.py"
    if args.pack:
        keep = weights_kept(rows, {r["name"]: shard_count(out / r["name"]) for r in rows})
        for row in rows:
            run = out / row["name"]
            row["weights_kept"] = row["name"] in keep
            if not row["weights_kept"]:
                for shard in run.glob("weights-*.safetensors"):
                    shard.unlink()
            pack(run)
    header = {
        "config": config_label(args.config),
        "overrides": args.overrides,
        "data": Path(args.data).name,
        "command": portable_command(sys.argv),
        "seconds": time.perf_counter() - t_start,
    }
    atomic_write_text(
        out / "runs.json", json.dumps({**header, "runs": rows}, indent=2, default=float)
    )
    print(markdown(rows))
    if signals:
        return 128 + signals[0]
    return 0 if all(code == 0 for n, code in codes.items() if n not in stopped) else 1


if __name__ == "__main__":
    sys.exit(main())
