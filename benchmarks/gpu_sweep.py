"""Compare recipe variants on one GPU in one time-boxed run: the kNN each reaches in E epochs.

    python benchmarks/gpu_sweep.py --data cifar10_webp90.npz --out OUT --epochs 40 \
        --variant base --variant lr0.3:optim.lr=0.3 \
        --variant k300:model.num_prototypes=300,model.proj_hidden_dim=2048 \
        [--config training/configs/cifar10_fast.yaml] [--time-limit 540]

Each ``--variant NAME[:key=value,key=value]`` trains the recipe with those changes for
``--epochs`` epochs E, with the kNN monitor (k=200, T=0.1, the whole training split as the
bank) every ``--knn-every`` epochs and at the end. The cosine lr follows E; the warm-up
(``optim.warmup_epochs``) and the KL decay (``loss.kl_decay_epochs``) are counted in epochs
as the recipe sets them, so E must exceed the warm-up (10 epochs in cifar10_fast.yaml) or the
sweep needs ``--set optim.warmup_epochs=N``. Every variant's config is checked before any
data is read. The time left is shared out evenly over the variants still to run; a variant
that would overrun its share stops early and is marked so (its schedule is then unfinished:
compare it with care).

OUT/sweep.json is rewritten after every variant (one row each: changes, epochs done, final
and best kNN, the kNN curve, prototypes in use, images/s, seconds), and a Markdown table for
``benchmarks/RESULTS.md`` is printed at the end. No weights are kept: a sweep chooses a
recipe, ``gpu_cifar10.py`` then trains the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import carlzoo
from carlzoo.outputs import atomic_write_text
from carlzoo.training.config import TrainConfig, load_config
from carlzoo.training.datasets import DatasetError, ImageArrays, load_split
from carlzoo.training.run import read_metrics
from carlzoo.training.train import CollapseError, knn_bank, knn_monitor, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_cifar10 import TimeGuard, config_label, portable_command  # noqa: E402  (a script beside)

ROOT = Path(__file__).resolve().parents[1]


def _top_level_commas(text: str) -> list[str]:
    """``text`` split at the commas outside brackets: a YAML list value such as
    ``augment.crop_scale=[0.14,1.0]`` stays one change."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth = max(depth - 1, 0)
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``NAME[:key=value,key=value]`` -> (NAME, ["key=value", ...]); a value in brackets may
    hold commas (``crop:augment.crop_scale=[0.14,1.0]``)."""
    name, _, changes = spec.partition(":")
    if not name or not all(c.isalnum() or c in "._-" for c in name):
        raise argparse.ArgumentTypeError(
            f"--variant {spec!r}: expected NAME[:key=value,...] with a name of letters, "
            "digits, '.', '_' or '-'"
        )
    overrides = [c.strip() for c in _top_level_commas(changes) if c.strip()] if changes else []
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise argparse.ArgumentTypeError(f"--variant {spec!r}: {bad[0]!r} is not key=value")
    return name, overrides


def variant_config(args: argparse.Namespace, changes: list[str]) -> TrainConfig:
    """The config a variant trains with: the recipe, the sweep's settings, --set, its changes.
    Validated with exactly these before anything runs."""
    base = [
        f"data.root={Path(args.data).resolve()}",
        "data.dataset=cifar10",
        f"epochs={args.epochs}",
        f"knn_every={args.knn_every}",
        "checkpoint_every=0",
    ]
    return load_config(args.config, [*base, *args.overrides, *changes])


def run_variant(
    name: str,
    changes: list[str],
    args: argparse.Namespace,
    seconds: float,
    splits: dict[str, ImageArrays],
) -> dict[str, Any]:
    """Train one variant; ``splits`` are --data's splits, decoded once for every variant."""
    root = str(Path(args.data).resolve())
    cfg = variant_config(args, changes)
    guard = TimeGuard(seconds, label="share")
    own = (cfg.data.dataset, cfg.data.root) == ("cifar10", root)  # else it trains on other data
    at_stop: list[tuple[int, float]] = []

    def on_epoch_end(record: dict, model: torch.nn.Module) -> bool:
        if guard.tick(record["epoch"]) is None:
            return False
        # Stopped early: the schedule's last kNN will not run, so measure it here (the
        # monitor's k, T and bank), else an early-stopped variant would have no result.
        if cfg.knn_every and own and "knn_top1" not in record:
            bank = knn_bank(splits["pretrain"], cfg.knn_max_train)
            device = next(model.parameters()).device
            res = knn_monitor(model, cfg, bank, splits["test"], device)
            at_stop.append((record["epoch"], res["knn_top1"]))
            print(f"stopped early at epoch {record['epoch']}: kNN {res['knn_top1']:.2f}%")
        return True

    with tempfile.TemporaryDirectory() as tmp:
        train(
            cfg,
            Path(tmp) / "run",
            progress=False,
            on_epoch_end=on_epoch_end,
            splits=splits if own else None,
        )
        rows = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
    curve = [(r["epoch"], r["knn_top1"]) for r in rows if "knn_top1" in r] + at_stop
    last = rows[-1]
    return {
        "name": name,
        "changes": changes,
        "epochs": last["epoch"],
        "epochs_planned": cfg.epochs,
        "knn_top1": curve[-1][1] if curve else None,
        "knn_epoch": curve[-1][0] if curve else None,
        "best_knn_top1": max(v for _, v in curve) if curve else None,
        "knn_curve": curve,
        "prototypes_used": last["prototypes_used"],
        "effective_prototypes": last["effective_prototypes"],
        "assignment_information": last["assignment_information"],
        "final_loss": last["loss"],
        "images_per_s": sum(r["images_per_s"] for r in rows) / len(rows),
        "seconds": time.perf_counter() - guard.t0,
        "stopped_early": guard.stopped_early,
    }


def markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    lines = [
        f"Sweep: {header['epochs']} epochs per variant on top of `{header['config']}`"
        + (f" with {', '.join(header['overrides'])}" if header["overrides"] else "")
        + f"; {header['hardware']}; data {header['data']}.",
        "",
        "| variant | changes | epochs | kNN top-1 (final) | best kNN | prototypes used "
        "| information (nats) | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        knn = "-" if r.get("knn_top1") is None else f"{r['knn_top1']:.2f}"
        best = "-" if r.get("best_knn_top1") is None else f"{r['best_knn_top1']:.2f}"
        if r.get("error"):
            knn, best = f"failed: {r['error']}", "-"
        epochs = f"{r.get('epochs', 0)}/{r.get('epochs_planned', header['epochs'])}"
        changes = ", ".join(f"`{c}`" for c in r["changes"]) or "(recipe)"
        info = r.get("assignment_information")
        info = "-" if info is None else f"{info:.2f}"
        lines.append(
            f"| {r['name']} | {changes} | {epochs} | {knn} | {best} | "
            f"{r.get('prototypes_used', '-')} | {info} | {r.get('seconds', 0):.0f} |"
        )
    return "\n".join(lines)


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, default=float)
    atomic_write_text(path, text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, help="CIFAR-10 .npz (plain or WebP-encoded)")
    p.add_argument("--out", required=True, help="output folder (sweep.json)")
    p.add_argument("--config", default=str(ROOT / "training/configs/cifar10_fast.yaml"))
    p.add_argument("--epochs", type=int, required=True, help="epochs per variant (>= 1)")
    p.add_argument(
        "--knn-every", type=int, default=10, help="epochs between kNN measurements (0: none)"
    )
    p.add_argument("--variant", dest="variants", type=parse_variant, action="append", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="for every variant")
    p.add_argument("--time-limit", type=float, default=0.0, help="seconds in all (0: none)")
    args = p.parse_args()
    names = [n for n, _ in args.variants]
    if len(set(names)) != len(names):
        p.error(f"--variant names must differ, got {names}")
    if args.epochs < 1:
        p.error(f"--epochs {args.epochs}: expected at least 1")
    if args.knn_every < 0:
        p.error(f"--knn-every {args.knn_every}: expected 0 (no kNN) or more")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is not a folder")
    if (out / "sweep.json").exists():  # an earlier sweep's table would be overwritten
        p.error(f"--out {out} holds an earlier sweep.json; choose another --out or move it")
    # Every variant's config, as run_variant builds it, is valid before data is read or
    # anything runs.
    for name, changes in args.variants:
        try:
            variant_config(args, changes)
        except ValueError as e:
            hint = ""
            if "warmup_epochs" in str(e) and "must be shorter than epochs" in str(e):
                hint = (
                    f" (--epochs {args.epochs} does not exceed the warm-up; with gpu_run.sh: "
                    'SETS="optim.warmup_epochs=N" or a larger EPOCHS)'
                )
            p.error(f"--variant {name}: {e}{hint}")
    if not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file")
    t_start = time.perf_counter()
    try:  # decoded once, before OUT exists: a bad file leaves nothing behind
        splits = {split: load_split("cifar10", args.data, split) for split in ("pretrain", "test")}
    except DatasetError as e:
        p.error(f"--data: {e}")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout
    )
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    header = {
        "config": config_label(args.config),  # a preset's name as given, a file's path
        "overrides": args.overrides,
        "epochs": args.epochs,
        "data": Path(args.data).name,
        "hardware": torch.cuda.get_device_name() if cuda else "CPU",
        "torch": torch.__version__,
        "carlzoo": carlzoo.__version__,
        "command": portable_command(sys.argv),
    }
    rows: list[dict[str, Any]] = []
    for i, (name, changes) in enumerate(args.variants):
        left = (args.time_limit - (time.perf_counter() - t_start)) if args.time_limit else None
        share = left / (len(args.variants) - i) if left is not None else float("inf")
        print(
            f"== variant {name} ({', '.join(changes) or 'the recipe'}), {share:.0f} s", flush=True
        )
        try:
            row = run_variant(name, changes, args, share, splits)
        except (CollapseError, FloatingPointError) as e:  # a collapse or NaN is a result too
            kind = "collapsed" if isinstance(e, CollapseError) else "loss not finite"
            row = {"name": name, "changes": changes, "error": kind, "message": str(e)}
        rows.append(row)
        write_json(out / "sweep.json", {**header, "variants": rows})
        print(json.dumps({k: v for k, v in row.items() if k != "knn_curve"}), flush=True)
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
