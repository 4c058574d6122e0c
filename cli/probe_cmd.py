"""``carlzoo probe``: kNN, linear, semi-supervised, fine-tuning and clustering evaluation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

# For --help only (evaluate.PROTOCOLS, which run_probe checks, would import torch here).
_PROTOCOLS = ("knn", "linear", "semi1", "semi10", "finetune", "cluster")


# The protocols each protocol-specific option acts on; giving one to another protocol is refused
# rather than ignored.
_USED_BY = {
    "k": ("knn",),
    "t": ("knn",),
    "weight_decay": ("linear",),
    "epochs": ("semi1", "semi10", "finetune"),
    "seed": ("linear", "semi1", "semi10", "finetune"),
    "layer": ("knn", "linear", "semi1", "semi10", "finetune"),
}


def _refuse_unused(ctx: click.Context, protocol: str) -> None:
    """A UsageError for the first option given on the command line that ``protocol`` does not
    use (``--k 20 --protocol linear`` would otherwise run with the option silently dropped)."""
    from click.core import ParameterSource

    if protocol not in _PROTOCOLS:
        return  # run_probe names the valid ones
    for name, users in _USED_BY.items():
        if protocol in users or ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
            continue
        flag = "--" + name.replace("_", "-")
        which = " or ".join(users)
        raise click.UsageError(f"{flag} is for --protocol {which}, not {protocol}")


class _WeightDecay(click.ParamType):
    name = "FLOAT|auto"

    def convert(self, value: Any, param: Any, ctx: Any) -> float | str:
        if value == "auto":
            return value
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not number >= 0 or number == float("inf"):
            self.fail(f"{value!r} is not a number >= 0 or 'auto'", param, ctx)
        return number


def _table(result: dict[str, Any]) -> str:
    keys = ["protocol", "model", "model_train_dataset", "dataset", "n_train", "n_test",
            "top1", "top5", "nmi", "ari", "acc", "purity", "prototypes_used",
            "assignment_information", "n_labelled", "time_s"]
    rows = []
    width = max((len(key) for key in keys if key in result), default=0)
    for key in keys:
        if key not in result:
            continue
        v = result[key]
        text = f"{v:.4f}" if key in ("nmi", "ari") else f"{v:.2f}" if isinstance(v, float) else v
        rows.append(f"  {key:<{width}} {text}")
    return "\n".join(rows)


def _check_writable(folder: Path, name: str, option: str) -> None:
    """Refuse an ``option`` whose output ``name`` cannot be made in ``folder`` (or in the
    nearest of its parents that exists: the missing ones are made) before the probe runs,
    which may take hours."""
    from carlzoo.outputs import OutputError, check_writable, existing_ancestor

    folder = existing_ancestor(folder)
    if not folder.is_dir():
        raise click.BadParameter(f"{folder} is a file, not a folder", param_hint=f"'{option}'")
    try:
        check_writable(folder / name)
    except OutputError as e:
        raise click.BadParameter(str(e), param_hint=f"'{option}'") from None


@click.command()
@click.option("--model", "model_spec", required=True, metavar="NAME_OR_DIR_OR_RUN",
              help="Run folder or checkpoint from `carlzoo train`, or anything carlzoo.load "
                   "accepts (zoo name, model folder, hf-hub:org/repo).")
@click.option("--dataset", required=True, help="Dataset name (cifar10, cifar100, stl10, npz, ...).")
@click.option("--data-root", required=True, help="Folder (or .npz file) holding the dataset.")
@click.option("--protocol", required=True, metavar="|".join(_PROTOCOLS),
              help="knn, linear, semi1, semi10, finetune or cluster.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="Write the result as JSON here (atomically).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Feature extraction and fine-tuning batch size.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Fine-tuning epochs (semi1 60, semi10 30, finetune 30 by default).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 2), default=0, show_default=True,
              help="Seed of the labelled subset, of fine-tuning and of --weight-decay auto's "
                   "held-out split.")
@click.option("--layer", type=click.Choice(["backbone", "projection"]), default="backbone",
              show_default=True, help="Features to probe.")
@click.option("--k", "k", type=click.IntRange(min=1), default=200, show_default=True,
              help="kNN neighbours.")
@click.option("--t", "t", type=click.FloatRange(min=0, min_open=True), default=0.1,
              show_default=True, help="kNN temperature.")
@click.option("--weight-decay", "weight_decay", type=_WeightDecay(), default=None,
              help="Linear probe L2 weight decay (default 1e-4), or 'auto': the best of "
                   "1e-6..0.1 on 10% of each class of the train split held out (drawn with "
                   "--seed).")
@click.option("--cache", "cache_dir", default=None, type=click.Path(file_okay=False),
              help="Cache frozen features (.safetensors) in this folder.")
@click.option("--resize", is_flag=True,
              help="Resize images to the model's input size when they differ.")
@click.option("--download", is_flag=True, help="Download the dataset if it is missing.")
def probe(model_spec: str, dataset: str, data_root: str, protocol: str, out_path: str | None,
          device: str, batch_size: int, epochs: int | None, seed: int, layer: str, k: int,
          t: float, weight_decay: float | str | None, cache_dir: str | None, resize: bool,
          download: bool) -> None:
    """Evaluate an encoder on a labelled dataset.

    \b
    carlzoo probe --model runs/c10 --dataset cifar10 --data-root data/ --protocol knn
    carlzoo probe --model carl-cifar10 --dataset cifar100 --data-root data/ \\
        --protocol linear --weight-decay auto --cache feats/ --out c10_to_c100.json
    """
    _refuse_unused(click.get_current_context(), protocol)
    if not math.isfinite(t):
        raise click.BadParameter(f"{t} is not a finite number > 0", param_hint="'--t'")
    if out_path is not None:  # write_json makes the missing folders
        _check_writable(Path(out_path).parent, Path(out_path).name, "--out")
    if cache_dir is not None:  # the cache is written after the features are computed
        _check_writable(Path(cache_dir), Path(cache_dir).name, "--cache")
    from carlzoo.training import evaluate
    from carlzoo.training.checkpoint import CheckpointError
    from carlzoo.training.datasets import DatasetError

    try:
        result = evaluate.run_probe(model_spec, dataset, data_root, protocol, layer=layer, k=k,
                                    t=t, epochs=epochs, seed=seed, batch_size=batch_size,
                                    device=device, cache_dir=cache_dir, resize=resize,
                                    download=download,
                                    weight_decay=1e-4 if weight_decay is None else weight_decay)
    except (evaluate.ProbeError, DatasetError, CheckpointError, ValueError) as e:
        # ValueError includes ZooError (carlzoo.load) and config errors: one-line messages.
        raise click.ClickException(" ".join(str(e).split())) from None
    except (KeyError, OSError, ImportError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise click.ClickException(f"{type(e).__name__}: {msg}") from None
    click.echo(_table(result))
    if out_path is not None:
        try:
            evaluate.write_json(result, out_path)
        except OSError as e:
            raise click.ClickException(f"cannot write {out_path}: {e.strerror or e}; the "
                                       "result is printed above") from None
        click.echo(f"wrote {out_path}")
