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

OUT must not hold an earlier run's files (config.yaml, metrics.json, metrics.jsonl, weight
shards, run/): a training run refuses such an OUT rather than mix two runs' files.

At ``--probe-at`` epochs (default: half the run, e.g. epoch 100 of 200) kNN and the linear
probe are measured too, mid-schedule: a conservative stand-in for a run of that length,
whose learning rate would have annealed by then.

The run is built for GPU machines held for a fixed time. metrics.jsonl is updated after every
epoch and the weight shards every ``--save-every`` epochs, so a run killed from outside
still leaves its latest state behind. With ``--time-limit`` the script ends training early
when the next epoch and the evaluation would not fit in the time left, evaluates what it
has, and says so in metrics.json (``epochs`` against ``epochs_planned``, ``stopped_early``).

Back on any machine, ``--out OUT --join`` rebuilds OUT/run/ (config.yaml, metrics.jsonl,
checkpoints/last.safetensors with float32 weights, eval.json), which ``carlzoo export``
takes, from OUT's one complete set of shards 1..N of N. ``--out OUT --join --lossless
cifar10.npz`` also measures kNN, linear and clustering again on the lossless test split
there, which then become the model's CIFAR-10 results (the run's own results stay in
eval.json under another name):

    python benchmarks/gpu_cifar10.py --out OUT --join --lossless cifar10.npz
    carlzoo export OUT/run --out carlzoo/models/carl-cifar10 --dtype float16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import carlzoo
from carlzoo.model import build_model
from carlzoo.outputs import atomic_write, atomic_write_safetensors, atomic_write_text
from carlzoo.training.checkpoint import Checkpoint, CheckpointError, save_checkpoint
from carlzoo.training.config import ConfigError, config_to_dict, load_config
from carlzoo.training.datasets import DatasetError, load_split
from carlzoo.training.evaluate import assignment_stats, cluster_metrics, knn_eval, linear_eval
from carlzoo.training.features import extract_features
from carlzoo.training.run import load_run, read_metrics
from carlzoo.training.train import train

ROOT = Path(__file__).resolve().parents[1]
SHARD_BYTES = 15 * 2**20
SHARD_NAME = re.compile(r"weights-(\d{5})-of-(\d{5})\.safetensors")
# What a training run leaves in OUT (gpu_run.sh adds train.log), and what --join adds.
RUN_FILES = ("config.yaml", "metrics.json", "metrics.jsonl", "run")


class JoinError(ValueError):
    """OUT cannot be joined; the message is one line and names the file."""


def shard_name(k: int, n: int) -> str:
    return f"weights-{k:05d}-of-{n:05d}.safetensors"


def earlier_run_files(out: Path) -> list[str]:
    """The names in ``out`` that a training run writes (an earlier run's, when present)."""
    if not out.is_dir():
        return []
    names = [name for name in RUN_FILES if (out / name).exists()]
    return names + sorted(p.name for p in out.glob("weights-*-of-*.safetensors"))


def copy_atomic(src: Path, dst: Path) -> None:
    """A copy that a kill leaves either old or new, never cut short."""
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def shard_state(
    state: dict[str, torch.Tensor],
    out: Path,
    epoch: int | None = None,
    step: int | None = None,
) -> list[Path]:
    """float16 weights (integer counters and BatchNorm statistics kept as they are) in <15 MiB
    shards, each recording the ``epoch`` and ``step`` they were saved at. Shards of another
    count (another run's) are removed: OUT holds one set."""
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
    meta = {k: str(v) for k, v in (("epoch", epoch), ("step", step)) if v is not None}
    paths = []
    n = len(shards)
    for i, shard in enumerate(shards):
        path = out / shard_name(i + 1, n)
        # a run killed mid-write keeps the previous shard
        atomic_write_safetensors(path, shard, meta)
        paths.append(path)
    for p in out.glob("weights-*-of-*.safetensors"):
        m = SHARD_NAME.fullmatch(p.name)
        if m and int(m[2]) != n:
            p.unlink(missing_ok=True)
    return paths


EVAL_RESERVE = 45.0  # seconds a time-limited run keeps for its evaluation and files


def portable_command(argv: list[str]) -> str:
    """The command line as recorded in results: file names instead of this machine's paths."""

    shown = {"--data": lambda p: p.name, "--lossless": lambda p: p.name,
             "--out": lambda p: "OUT", "--config": config_label}  # fmt: skip
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


def run_overrides(data: str | Path, sets: list[str], epochs: int | None) -> list[str]:
    """The recipe changes a run of this script trains with: the data, ``--set``, ``--epochs``."""
    own = [f"data.root={Path(data).resolve()}", "data.dataset=cifar10", *sets]
    return [*own, f"epochs={epochs}"] if epochs is not None else own


def config_label(config: str | Path) -> str:
    """``--config`` as recorded: a preset name as given, a file relative to the repository
    (else its name). A name without a suffix that is no file is a preset, as load_config
    reads it."""
    p = Path(config)
    if not p.suffix and not p.exists():
        return str(config)
    p = p.resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name


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
        "clustering": {
            **cluster_metrics(logits.argmax(1).numpy(), test_set.labels),
            **assignment_stats(logits),
        },
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
        self.config_copied = False

    def __call__(self, record: dict, model: torch.nn.Module) -> bool:
        copy_atomic(self.run / "metrics.jsonl", self.out / "metrics.jsonl")
        if not self.config_copied:  # this run's, once (main refuses an OUT holding one)
            copy_atomic(self.run / "config.yaml", self.out / "config.yaml")
            self.config_copied = True
        epoch = record["epoch"]
        if self.save_every and epoch % self.save_every == 0:
            shard_state(model.state_dict(), self.out, epoch, record.get("step"))
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


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def shard_set(out: Path) -> list[Path]:
    """OUT's one complete set of shards 1..N of N, in order; anything else is a JoinError."""
    found = sorted(out.glob("weights-*-of-*.safetensors"))
    if not found:
        raise JoinError(f"{out} holds no weights-*-of-*.safetensors shards; copy the run's OUT")
    sets: dict[int, dict[int, Path]] = {}
    for p in found:
        m = SHARD_NAME.fullmatch(p.name)
        if m is None or not 1 <= int(m[1]) <= int(m[2]):
            raise JoinError(
                f"{p} is not a shard this script writes (weights-KKKKK-of-NNNNN.safetensors, "
                "K in 1..N); remove it"
            )
        sets.setdefault(int(m[2]), {})[int(m[1])] = p
    if len(sets) > 1:
        held = ", ".join(f"weights-*-of-{n:05d}: {len(s)}" for n, s in sorted(sets.items()))
        raise JoinError(
            f"{out} holds shards of {len(sets)} sets ({held}): only one is this run's; remove "
            "the others (or copy the run's OUT again into an empty folder)"
        )
    ((n, parts),) = sets.items()
    missing = [shard_name(k, n) for k in range(1, n + 1) if k not in parts]
    if missing:
        raise JoinError(
            f"{out} holds {len(parts)} of {n} shards; missing {', '.join(missing)}: copy "
            f"{'them' if len(missing) > 1 else 'it'} from the run's OUT"
        )
    return [parts[k] for k in range(1, n + 1)]


def read_shards(shards: list[Path], epoch: int) -> dict[str, torch.Tensor]:
    """The float32 state of ``shards``, which must all have been saved at ``epoch`` when they
    say (shards of older versions of this script do not)."""
    state: dict[str, torch.Tensor] = {}
    saved_at: dict[str, str | None] = {}
    for s in shards:
        try:
            with safe_open(str(s), framework="pt") as f:
                saved_at[s.name] = (f.metadata() or {}).get("epoch")
                part = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise JoinError(
                f"{s} is not a readable safetensors file ({_one_line(e)}); copy it again from "
                "the run's OUT"
            ) from None
        state.update({k: (v.float() if v.dtype == torch.float16 else v) for k, v in part.items()})
    if set(saved_at.values()) not in ({None}, {str(epoch)}):
        held = ", ".join(f"{name}: epoch {e or '?'}" for name, e in saved_at.items())
        raise JoinError(
            f"the shards are not all the weights of epoch {epoch}, the epoch metrics.json "
            f"reports ({held}); copy the run's final OUT again"
        )
    return state


def check_fits(state: dict[str, torch.Tensor], cfg: object, out: Path) -> None:
    """The shards' tensors are those of the model config.yaml describes, shape for shape."""
    expected = build_model(cfg.model).state_dict()
    missing = sorted(expected.keys() - state.keys())
    extra = sorted(state.keys() - expected.keys())
    wrong = [k for k in expected if k in state and expected[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        why = f"{k} is {tuple(state[k].shape)} in them, {tuple(expected[k].shape)} in the model"
    elif missing or extra:
        why = f"{len(missing)} tensor(s) missing (e.g. {missing[0]})" if missing else ""
        why += ("; " if missing and extra else "") + (
            f"{len(extra)} unknown (e.g. {extra[0]})" if extra else ""
        )
    else:
        return
    raise JoinError(
        f"the shards in {out} do not fit its config.yaml ({why}): both must come from the same "
        "run; copy the run's OUT again"
    )


def join(out: Path, lossless: Path | None = None) -> Path:
    """Rebuild a run folder that ``carlzoo export`` accepts from OUT's small files.

    With ``lossless`` (the lossless CIFAR-10 ``.npz``), kNN, linear and clustering are
    measured again on its test split on this machine; those become the ``cifar10`` results
    and the run's own results are kept under the name of the copy it used (e.g.
    ``cifar10_webp90``; ``cifar10_run`` when that copy is itself named ``cifar10``), so that
    the two never share a name. Every result names the checkpoint it measured
    (``model_epoch``, ``model_step``), as ``carlzoo export`` requires.

    Raises JoinError (one line) on files that do not make one run; OUT/run is then left as
    it was: it is built beside and moved into place at the end.
    """
    if not out.is_dir():
        raise JoinError(f"{out} is not a folder; --out names the folder the GPU job wrote")
    shards = shard_set(out)
    metrics_path = out / "metrics.json"
    if not metrics_path.is_file():
        raise JoinError(f"{out} holds no metrics.json: the run did not reach its evaluation")
    try:
        final = json.loads(metrics_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise JoinError(f"{metrics_path} is not valid JSON ({_one_line(e)})") from None
    if not isinstance(final, dict) or not isinstance(final.get("epochs"), int):
        raise JoinError(f"{metrics_path} records no epochs: it is not this script's metrics.json")
    if not (out / "config.yaml").is_file():
        raise JoinError(f"{out} holds no config.yaml; copy it from the run's OUT")
    try:
        cfg = load_config(out / "config.yaml")
    except ValueError as e:
        raise JoinError(f"{out / 'config.yaml'}: {_one_line(e)}") from None
    # The run's log up to the epoch the shards hold (a stopped run's log ends there too).
    rows = read_metrics(out / "metrics.jsonl", final["epochs"])
    if (
        not rows
        or rows[-1]["epoch"] != final["epochs"]
        or not isinstance(rows[-1].get("step"), int)
    ):
        raise JoinError(
            f"{out}/metrics.jsonl has no line for epoch {final['epochs']} of metrics.json"
        )
    last = rows[-1]
    state = read_shards(shards, final["epochs"])
    check_fits(state, cfg, out)
    dest = out / "run"
    if dest.exists() and not dest.is_dir():
        raise JoinError(f"{dest} is not a folder; remove it")
    try:
        build = Path(tempfile.mkdtemp(prefix=".join-", dir=out))
    except OSError as e:
        raise JoinError(
            f"cannot write in {out} ({_one_line(e)}); copy it to a writable folder first"
        ) from None
    try:
        run = build / "run"
        (run / "checkpoints").mkdir(parents=True)
        copy_atomic(out / "config.yaml", run / "config.yaml")
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
        try:
            load_run(run)  # the weights match the config
        except CheckpointError as e:
            raise JoinError(f"{out}: {_one_line(e)}") from None
        # The evaluations in `carlzoo probe --out` form, so `carlzoo export` puts them on
        # the card, measured on the checkpoint built here.
        measured_on = {"model_epoch": last["epoch"], "model_step": last["step"]}
        run_dataset = "cifar10"
        if lossless is not None:  # the lossless results are "cifar10": never the same name
            stem = Path(final.get("data_file") or "cifar10_lossy.npz").stem
            run_dataset = stem if stem.casefold() != "cifar10" else f"{stem}_run"
        evaluations = [
            {
                "protocol": protocol,
                "dataset": run_dataset,
                "split": "test",
                **final[key],
                **measured_on,
                "command": final.get("command"),
            }
            for protocol, key in (("knn", "knn"), ("linear", "linear"), ("cluster", "clustering"))
            if isinstance(final.get(key), dict)
        ]
        if lossless is not None:
            evaluations = measure_lossless(run, dest, lossless) + evaluations
        atomic_write_text(run / "eval.json", json.dumps(evaluations, indent=2))
        (dest / "checkpoints").mkdir(parents=True, exist_ok=True)
        for name in ("config.yaml", "metrics.jsonl", "checkpoints/last.safetensors", "eval.json"):
            os.replace(run / name, dest / name)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    print(f"rebuilt {dest} from {len(shards)} shard(s)")
    return dest


def measure_lossless(run: Path, dest: Path, lossless: Path) -> list[dict]:
    """kNN, linear and clustering of the run in ``run`` (to be moved to ``dest``) on the
    test split of ``lossless``."""
    from carlzoo.training.evaluate import ProbeError, run_probe

    command = portable_command(sys.argv)
    measured: list[dict] = []
    with tempfile.TemporaryDirectory() as cache:
        for protocol in ("knn", "linear", "cluster"):
            t0 = time.perf_counter()
            try:
                res = run_probe(run, "cifar10", lossless, protocol, cache_dir=cache)
            except (ProbeError, DatasetError) as e:
                raise JoinError(f"--lossless {lossless}: {_one_line(e)}") from None
            res["model"] = str(dest)  # where it is once joined, not where it was measured
            res["command"] = command
            measured.append(res)
            top1 = res.get("top1", res.get("acc"))
            print(f"{protocol} on {lossless.name}: {top1:.2f}% ({time.perf_counter() - t0:.0f} s)")
    return measured


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


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
        "--eval-reserve",
        type=float,
        default=EVAL_RESERVE,
        help="seconds kept for evaluation and files",
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
    if args.lossless and not args.join:
        p.error(
            "--lossless is for --join (it measures the joined run again): add --join, or drop "
            "--lossless to train"
        )
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is not a folder")
    if args.lossless and not Path(args.lossless).is_file():
        p.error(f"--lossless {args.lossless}: no such file")
    if args.lossless:
        try:  # readable before the run folder is rebuilt
            load_split("cifar10", args.lossless, "test")
        except DatasetError as e:
            p.error(f"--lossless: {e}")
    if args.join:
        # SIGTERM (`timeout`, `kill`) as an exception, so the half-built copy beside OUT/run
        # is removed as it is after an error or Ctrl-C.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            join(out, Path(args.lossless) if args.lossless else None)
        except JoinError as e:
            p.error(f"--join: {e}")
        return
    if not args.data:
        p.error("--data is required unless --join")
    if not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file")
    held = earlier_run_files(out)
    if held:  # --join would mix this run's files with those of the earlier one
        p.error(
            f"--out {out} holds an earlier run's {', '.join(held)}; choose another --out or "
            "empty it"
        )
    t_start = time.perf_counter()
    try:
        cfg = load_config(args.config, run_overrides(args.data, args.overrides, args.epochs))
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
        model, cfg, ckpt = load_run(run)

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
    # The shards first: metrics.json marks a finished run, whose shards are all in place.
    shards = shard_state(model.state_dict(), out, ckpt.epoch, ckpt.step)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=float))
    print(
        f"kNN top-1 {knn['top1']:.2f}%  linear top-1 {linear['top1']:.2f}%  "
        f"NMI {clusters.get('nmi', float('nan')):.3f}  train {train_time:.0f} s  "
        f"eval {eval_time:.0f} s  -> {out} ({len(shards)} weight shards)"
    )
    assert all(s.stat().st_size < 16 * 2**20 for s in shards)


if __name__ == "__main__":
    main()
