"""Train carl-cifar10 on one GPU in one run, evaluate it, and write small files to carry off.

    python benchmarks/gpu_cifar10.py --data cifar10_webp90.npz --out OUT \
        [--config training/configs/cifar10_fast.yaml] [--epochs 200] [--set key=value ...] \
        [--time-limit 540]

Reads a CIFAR-10 ``.npz`` (plain ``x_train``/``x_test`` arrays or the WebP-encoded variant
with ``train_bytes``/``train_off``), trains with the recipe, then measures kNN (k=200, T=0.1)
and a linear probe (L-BFGS on frozen backbone features) on the test split, plus clustering
metrics of the prototype assignments. Everything it writes to OUT is under 16 MiB a file:

    OUT/metrics.json           final metrics, timings, hardware, versions, the settings
    OUT/metrics.jsonl          the per-epoch training log (loss terms, prototypes, kNN curve)
    OUT/config.yaml            the resolved training config
    OUT/weights-0000K-of-0000N.safetensors   float16 model weights in shards (BN stats fp32)

At ``--probe-at`` epochs (default: half the run, e.g. epoch 100 of 200) kNN and the linear
probe are measured too, mid-schedule: a conservative stand-in for a run of that length,
whose learning rate would have annealed by then.

The run is built for GPU machines held for a fixed time. metrics.jsonl is updated after every
epoch and the weight shards every ``--save-every`` epochs, so a run killed from outside
still leaves its latest state behind. With ``--time-limit`` the script ends training early
when the next epoch and the evaluation would not fit in the time left, evaluates what it
has, and says so in metrics.json (``epochs`` against ``epochs_planned``, ``stopped_early``).

Back on any machine, ``--join OUT`` rebuilds OUT/run/ (config.yaml, metrics.jsonl,
checkpoints/last.safetensors with float32 weights, eval.json), which ``carlzoo export``
takes. ``--join OUT --lossless cifar10.npz`` also measures kNN, linear and clustering again
on the lossless test split there, which then become the model's CIFAR-10 results:

    python benchmarks/gpu_cifar10.py --out OUT --join --lossless cifar10.npz
    carlzoo export OUT/run --out carlzoo/models/carl-cifar10 --dtype float16
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import carlzoo
from carlzoo.outputs import atomic_write, atomic_write_text
from carlzoo.training.checkpoint import Checkpoint, save_checkpoint
from carlzoo.training.config import ConfigError, config_to_dict, load_config
from carlzoo.training.datasets import DatasetError, load_split
from carlzoo.training.evaluate import cluster_metrics, knn_eval, linear_eval
from carlzoo.training.features import extract_features
from carlzoo.training.run import load_run, read_metrics
from carlzoo.training.train import train

ROOT = Path(__file__).resolve().parents[1]
SHARD_BYTES = 15 * 2**20


def shard_state(state: dict[str, torch.Tensor], out: Path) -> list[Path]:
    """float16 weights (integer counters and BatchNorm statistics kept as they are) in <15 MiB
    shards."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        keep = not t.is_floating_point() or name.endswith(("running_mean", "running_var"))
        t = (t if keep else t.half()).detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    paths = []
    for i, shard in enumerate(shards):
        path = out / f"weights-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # a run killed mid-write keeps the previous shard
        atomic_write(path, lambda tmp, shard=shard: save_file(shard, str(tmp)))
        paths.append(path)
    return paths


def portable_command(argv: list[str]) -> str:
    """The command line as recorded in results: file names instead of this machine's paths."""

    def config(p: Path) -> str:
        p = p.resolve()
        return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name

    shown = {"--data": lambda p: p.name, "--lossless": lambda p: p.name,
             "--out": lambda p: "OUT", "--config": config}  # fmt: skip
    words = ["python", f"benchmarks/{Path(argv[0]).name}"]
    i = 1
    while i < len(argv):
        flag, eq, inline = argv[i].partition("=")
        value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else None)
        if flag in shown and value is not None:
            words.append(f"{flag} {shown[flag](Path(value))}")
            i += 1 if eq else 2
        else:
            words.append(argv[i])
            i += 1
    return " ".join(words)


class TimeGuard:
    """Says when a run must end after an epoch to stay within ``limit`` seconds from ``t0``.

    :meth:`tick` is called at the end of each epoch; it returns why to stop when
    ``used + next epoch + reserve > limit``, the next epoch estimated as the slowest of the
    last five (epochs with a kNN evaluation included), so the estimate errs long.
    """

    def __init__(
        self, limit: float, reserve: float = 0.0, t0: float | None = None, label: str = "limit"
    ) -> None:
        self.t_prev = time.perf_counter()
        self.t0 = self.t_prev if t0 is None else t0
        self.limit, self.reserve, self.label = limit, reserve, label
        self.walls: list[float] = []
        self.stopped_early: str | None = None

    def exclude(self, seconds: float) -> None:
        """Time spent since the last tick outside training (a probe): used, not an epoch's."""
        self.t_prev += seconds

    def tick(self, epoch: int) -> str | None:
        now = time.perf_counter()
        self.walls.append(now - self.t_prev)
        self.t_prev = now
        used, nxt = now - self.t0, max(self.walls[-5:])
        if used + nxt + self.reserve > self.limit:
            kept = f" + {self.reserve:.0f} s for evaluation" if self.reserve else ""
            self.stopped_early = (
                f"time {self.label}: {used:.0f} s used after epoch {epoch}, next epoch "
                f"~{nxt:.1f} s{kept} > {self.limit:.0f} s"
            )
        return self.stopped_early


def evaluate(
    model: torch.nn.Module, cfg: object, train_set: object, test_set: object, device: torch.device
) -> dict:
    """kNN (k=200, T=0.1), linear probe and prototype clustering on the test split."""
    kw = dict(
        mean=cfg.augment.mean,
        std=cfg.augment.std,
        size=cfg.data.image_size,
        device=device,
        amp=False,
    )
    f_train = extract_features(model, train_set.images, **kw)
    f_test = extract_features(model, test_set.images, **kw)
    logits = extract_features(model, test_set.images, layer="logits", **kw)
    return {
        "knn": knn_eval(
            f_train, train_set.labels, f_test, test_set.labels, k=200, t=0.1, device=device
        ),
        "linear": linear_eval(f_train, train_set.labels, f_test, test_set.labels, device=device),
        "clustering": cluster_metrics(logits.argmax(1).numpy(), test_set.labels),
    }


class EpochWatch:
    """``train(on_epoch_end=...)``: copies the log out, saves shards, ends the run in time."""

    def __init__(
        self,
        out: Path,
        run: Path,
        guard: TimeGuard,
        save_every: int,
        epochs: int,
        probe_at: set[int] | None = None,
        probe: Callable[[torch.nn.Module], dict] | None = None,
    ) -> None:
        self.out, self.run, self.guard = out, run, guard
        self.save_every, self.epochs = save_every, epochs
        self.probe_at, self.probe = probe_at or set(), probe
        self.probes: list[dict] = []

    def __call__(self, record: dict, model: torch.nn.Module) -> bool:
        shutil.copy(self.run / "metrics.jsonl", self.out / "metrics.jsonl")
        if not (self.out / "config.yaml").exists():
            shutil.copy(self.run / "config.yaml", self.out / "config.yaml")
        epoch = record["epoch"]
        if self.save_every and epoch % self.save_every == 0:
            shard_state(model.state_dict(), self.out)
        if self.probe is not None and epoch in self.probe_at:
            t0 = time.perf_counter()
            res = {"epoch": epoch, **self.probe(model)}
            res["seconds"] = time.perf_counter() - t0
            self.probes.append(res)
            self.guard.exclude(res["seconds"])
            print(
                f"probe at epoch {epoch}: kNN {res['knn']['top1']:.2f}%, linear "
                f"{res['linear']['top1']:.2f}% ({res['seconds']:.0f} s)",
                flush=True,
            )
        stop = self.guard.tick(epoch)
        g = self.guard
        if epoch == 5:
            per_epoch = sum(g.walls[1:]) / 4  # epoch 1 pays for loading and warm-up
            total = g.t_prev - g.t0 + per_epoch * (self.epochs - epoch)
            print(
                f"epochs 2-5: {per_epoch:.2f} s each; {self.epochs} epochs end at ~{total:.0f} s "
                f"(limit {g.limit:.0f} s, {g.reserve:.0f} s of it kept for evaluation)",
                flush=True,
            )
        if stop:
            print(f"stopping early ({stop})", flush=True)
        return stop is not None


def join(out: Path, lossless: Path | None = None) -> Path:
    """Rebuild a run folder that ``carlzoo export`` accepts from OUT's small files.

    With ``lossless`` (the lossless CIFAR-10 ``.npz``), kNN, linear and clustering are
    measured again on its test split on this machine; those become the ``cifar10`` results
    and the run's own results are kept under the name of the copy it used (e.g.
    ``cifar10_webp90``).
    """
    shards = sorted(out.glob("weights-*-of-*.safetensors"))
    if not shards:
        sys.exit(f"{out} holds no weights-*-of-*.safetensors shards")
    if not (out / "metrics.json").is_file():
        sys.exit(f"{out} holds no metrics.json: the run did not reach its evaluation")
    state: dict[str, torch.Tensor] = {}
    for s in shards:
        state.update(
            {
                k: (v.float() if v.dtype == torch.float16 else v)
                for k, v in load_file(str(s)).items()
            }
        )
    cfg = load_config(out / "config.yaml")
    final = json.loads((out / "metrics.json").read_text())
    # The run's log up to the epoch the shards hold (a stopped run's log ends there too).
    rows = read_metrics(out / "metrics.jsonl", final["epochs"])
    if not rows or rows[-1]["epoch"] != final["epochs"]:
        sys.exit(f"{out}/metrics.jsonl has no line for epoch {final['epochs']} of metrics.json")
    last = rows[-1]
    run = out / "run"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "config.yaml", run / "config.yaml")
    atomic_write_text(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    save_checkpoint(
        run / "checkpoints" / "last.safetensors",
        Checkpoint(
            model=state,
            epoch=last["epoch"],
            step=last["step"],
            config=config_to_dict(cfg),
            metrics=last,
        ),
    )
    load_run(run)  # the weights match the config
    # The evaluations in `carlzoo probe --out` form, so `carlzoo export` puts them on the card.
    run_dataset = "cifar10"
    if lossless is not None:
        run_dataset = Path(final.get("data_file") or "cifar10_lossy.npz").stem
    evaluations = [
        {
            "protocol": protocol,
            "dataset": run_dataset,
            "split": "test",
            **final[key],
            "command": final["command"],
        }
        for protocol, key in (("knn", "knn"), ("linear", "linear"), ("cluster", "clustering"))
        if key in final
    ]
    if lossless is not None:
        from carlzoo.training.evaluate import run_probe

        command = portable_command(sys.argv)
        measured: list[dict] = []
        with tempfile.TemporaryDirectory() as cache:
            for protocol in ("knn", "linear", "cluster"):
                t0 = time.perf_counter()
                res = run_probe(run, "cifar10", lossless, protocol, cache_dir=cache)
                res["command"] = command
                measured.append(res)
                top1 = res.get("top1", res.get("acc"))
                print(
                    f"{protocol} on {lossless.name}: {top1:.2f}% ({time.perf_counter() - t0:.0f} s)"
                )
        evaluations = measured + evaluations
    atomic_write_text(run / "eval.json", json.dumps(evaluations, indent=2))
    print(f"rebuilt {run} from {len(shards)} shard(s)")
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", help="CIFAR-10 .npz (plain or WebP-encoded)")
    p.add_argument("--out", required=True, help="output folder (files < 16 MiB each)")
    p.add_argument("--config", default=str(ROOT / "training/configs/cifar10_fast.yaml"))
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument(
        "--time-limit",
        type=float,
        default=0.0,
        help="seconds for the whole script (0: none); training ends early to fit",
    )
    p.add_argument(
        "--eval-reserve", type=float, default=45.0, help="seconds kept for evaluation and files"
    )
    p.add_argument("--save-every", type=int, default=25, help="epochs between weight shards")
    p.add_argument(
        "--probe-at",
        type=int,
        action="append",
        default=None,
        help="also run kNN + linear at this epoch (repeatable; default: half the epochs; 0: none)",
    )
    p.add_argument("--join", action="store_true", help="rebuild OUT/run from OUT's shards")
    p.add_argument(
        "--lossless", help="with --join: evaluate again on this lossless CIFAR-10 .npz (CPU)"
    )
    args = p.parse_args()
    out = Path(args.out)
    if args.lossless and not Path(args.lossless).is_file():
        p.error(f"--lossless {args.lossless}: no such file")
    if args.lossless:
        try:  # readable before the run folder is rebuilt
            load_split("cifar10", args.lossless, "test")
        except DatasetError as e:
            p.error(f"--lossless: {e}")
    if args.join:
        join(out, Path(args.lossless) if args.lossless else None)
        return
    if not args.data:
        p.error("--data is required unless --join")
    if not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file")
    t_start = time.perf_counter()
    overrides = [f"data.root={Path(args.data).resolve()}", "data.dataset=cifar10", *args.overrides]
    if args.epochs is not None:
        overrides.append(f"epochs={args.epochs}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        p.error(str(e))
    try:  # decoded once, before OUT exists: a bad file leaves nothing behind
        train_set = load_split("cifar10", args.data, "train")
        test_set = load_split("cifar10", args.data, "test")
    except DatasetError as e:
        p.error(f"--data: {e}")
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch "
        f"{torch.__version__}, carlzoo {carlzoo.__version__}, python {sys.version.split()[0]}",
        flush=True,
    )

    probe_at = {cfg.epochs // 2} if args.probe_at is None else set(args.probe_at) - {0}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        limit = args.time_limit or float("inf")
        guard = TimeGuard(limit, args.eval_reserve, t0=t_start)
        watch = EpochWatch(
            out,
            run,
            guard,
            args.save_every,
            cfg.epochs,
            probe_at={e for e in probe_at if 0 < e < cfg.epochs},
            probe=lambda m: evaluate(m, cfg, train_set, test_set, device),
        )
        t0 = time.perf_counter()
        splits = {"pretrain": train_set, "test": test_set}  # decoded once, above
        train(cfg, run, progress=False, on_epoch_end=watch, splits=splits)  # log copied to out
        train_time = time.perf_counter() - t0
        model, cfg, _ = load_run(run)

    model = model.to(device)
    t0 = time.perf_counter()
    final = evaluate(model, cfg, train_set, test_set, device)
    knn, linear, clusters = final["knn"], final["linear"], final["clustering"]
    eval_time = time.perf_counter() - t0

    rows = read_metrics(out / "metrics.jsonl")
    metrics = {
        "dataset": f"cifar10 ({Path(args.data).name})",
        "data_file": Path(args.data).name,
        "split": "test",
        "epochs": rows[-1]["epoch"],
        "epochs_planned": cfg.epochs,
        "stopped_early": guard.stopped_early,
        "knn": knn,
        "linear": linear,
        "clustering": clusters,
        "prototypes_used": rows[-1]["prototypes_used"],
        "knn_curve": [(r["epoch"], r["knn_top1"]) for r in rows if "knn_top1" in r],
        "probes": watch.probes,  # kNN + linear at earlier epochs of this run (same schedule)
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "total_time_s": time.perf_counter() - t_start,
        "hardware": (
            torch.cuda.get_device_name()
            if device.type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "torch": torch.__version__,
        "carlzoo": carlzoo.__version__,
        "command": portable_command(sys.argv),
        "time_limit_s": args.time_limit or None,
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=float))
    shards = shard_state(model.state_dict(), out)
    print(
        f"kNN top-1 {knn['top1']:.2f}%  linear top-1 {linear['top1']:.2f}%  "
        f"NMI {clusters.get('nmi', float('nan')):.3f}  train {train_time:.0f} s  "
        f"eval {eval_time:.0f} s  -> {out} ({len(shards)} weight shards)"
    )
    assert all(s.stat().st_size < 16 * 2**20 for s in shards)


if __name__ == "__main__":
    main()
