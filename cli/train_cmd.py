"""``carlzoo train``."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.option(
    "--config",
    "config_path",
    default=None,
    metavar="YAML_OR_PRESET",
    help="YAML recipe or preset name (cifar10, cifar10_fast, cifar10_adamw, cifar100, stl10, "
    "tinyimagenet, imagenet64).",
)
@click.option("--dataset", default=None, help="Dataset name (overrides data.dataset).")
@click.option("--data-root", default=None, help="Folder (or .npz file) holding the dataset.")
@click.option("--download", is_flag=True, help="Download the dataset if it is missing.")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Run folder: config.yaml, metrics.jsonl, checkpoints/.",
)
@click.option("--epochs", type=int, default=None, help="Overrides epochs.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override any config key, e.g. --set optim.lr=0.3 (repeatable).",
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option(
    "--stop-after",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many epochs in this call (schedules keep --epochs).",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train(
    config_path: str | None,
    dataset: str | None,
    data_root: str | None,
    download: bool,
    out_dir: str,
    epochs: int | None,
    overrides: tuple[str, ...],
    resume: bool,
    stop_after: int | None,
    no_progress: bool,
) -> None:
    """Train a CARL encoder.

    \b
    carlzoo train --config cifar10 --data-root data/ --out runs/c10
    torchrun --nproc-per-node 4 -m carlzoo.cli train --config stl10 --data-root d/ --out r/
    """
    from carlzoo.training.checkpoint import CheckpointError
    from carlzoo.training.config import ConfigError, load_config
    from carlzoo.training.datasets import DatasetError
    from carlzoo.training.train import CollapseError
    from carlzoo.training.train import train as run_training

    data: dict = {}
    if dataset is not None:
        data["dataset"] = dataset
    if data_root is not None:
        data["root"] = data_root
    if download:
        data["download"] = True
    extra: dict = {"data": data} if data else {}
    if epochs is not None:
        extra["epochs"] = epochs
    try:
        cfg = load_config(config_path, overrides, **extra)
        if not cfg.data.root:
            raise click.UsageError("no dataset root: pass --data-root PATH")
        last = run_training(
            cfg, Path(out_dir), resume=resume, progress=not no_progress, stop_after=stop_after
        )
    except KeyboardInterrupt:
        saved = Path(out_dir) / "checkpoints" / "last.safetensors"
        click.echo(
            f"\ninterrupted: {saved} holds the last saved epoch; continue with the same command "
            "and --resume"
            if saved.is_file()
            else "\ninterrupted before the first checkpoint: nothing to resume",
            err=True,
        )
        sys.exit(130)
    except (
        ConfigError,
        DatasetError,
        CheckpointError,
        CollapseError,
        FileExistsError,
        FloatingPointError,
        ValueError,
    ) as e:
        raise click.ClickException(str(e)) from None
    if last:
        knn = f", kNN top-1 {last['knn_top1']:.2f}%" if "knn_top1" in last else ""
        click.echo(
            f"epoch {last['epoch']}: loss {last['loss']:.4f}, prototypes used "
            f"{last['prototypes_used']}{knn}; run folder {out_dir}"
        )
