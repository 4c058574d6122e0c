"""``carlzoo list``, ``carlzoo info``, ``carlzoo embed`` and ``carlzoo assign``.

torch is imported only inside the commands that run a model, so ``carlzoo --help`` stays
fast. Register with ``main.add_command(list_cmd)`` (and ``info``, ``embed``, ``assign``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

__all__ = ["list_cmd", "info", "embed", "assign"]

_INPUTS = click.argument(
    "inputs", nargs=-1, required=True, metavar="INPUT...", type=click.Path(path_type=str)
)


def _common_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--model",
            "-m",
            "model_spec",
            required=True,
            metavar="SPEC",
            help="Zoo name (carlzoo list), model folder, or hf-hub:org/repo[@rev].",
        ),
        click.option(
            "--out",
            "-o",
            "out",
            required=True,
            type=click.Path(path_type=str),
            help="Output file: .npz, .npy (+ FILE.paths.txt), .csv or .parquet.",
        ),
        click.option(
            "--backend",
            type=click.Choice(["torch", "onnx"]),
            default="torch",
            show_default=True,
            help="Run the model in PyTorch or onnxruntime.",
        ),
        click.option(
            "--batch-size", "-b", type=click.IntRange(min=1), default=256, show_default=True
        ),
        click.option(
            "--device",
            default=None,
            help="cpu, cuda, cuda:1... (default: cuda when available, else cpu).",
        ),
        click.option(
            "--workers",
            "-j",
            type=click.IntRange(min=0),
            default=None,
            help="Image-decoding worker processes (0: decode in this process; "
            "default: min(4, CPUs)).",
        ),
        click.option(
            "--strict",
            is_flag=True,
            help="Fail (exit 1, no output) on the first undecodable image instead of skipping it.",
        ),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def _resolve_device(device: str | None, backend: str) -> str:
    if device is not None:
        return device
    if backend == "onnx":
        import onnxruntime as ort

        return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _run(
    inputs: tuple[str, ...],
    model_spec: str,
    out: str,
    backend: str,
    batch_size: int,
    device: str | None,
    workers: int | None,
    strict: bool,
    no_progress: bool,
    fn: Callable[[Any, Any], Any],
) -> tuple[list[str], list[Any], list[tuple[str, str]]]:
    """Decode ``inputs`` in parallel, run ``fn(model, batch)`` on each batch.

    Returns (ids of the decoded images, per-batch results, skipped (id, reason) pairs).
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from carlzoo.images import ImageFiles, ImageInputError, collate_images
    from carlzoo.pretrained import load
    from carlzoo.registry import ZooError

    try:
        found = find_inputs(inputs)
        dev = _resolve_device(device, backend)
        model = load(model_spec, device=dev, backend=backend)
    except (ZooError, ImageInputError) as e:
        raise click.ClickException(str(e)) from None
    paths = [p for p, _ in found]
    ids = [i for _, i in found]
    n_workers = _default_workers() if workers is None else workers
    n_batches = -(-len(paths) // batch_size)
    if workers is None and n_batches <= 1:
        n_workers = 0  # one batch: nothing to overlap with, a worker would only add start-up
    n_workers = min(n_workers, n_batches)
    dataset = ImageFiles(paths, model.transform, min_side=model.config.preprocessing.resize_size)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=n_workers,
        collate_fn=collate_images,
        pin_memory=backend == "torch" and dev.startswith("cuda"),  # onnx reads numpy on the CPU
        prefetch_factor=4 if n_workers else None,
    )
    good: list[str] = []
    results: list[Any] = []
    skipped: list[tuple[str, str]] = []
    bar = tqdm(
        total=len(paths),
        unit="img",
        file=sys.stderr,
        disable=no_progress,
        dynamic_ncols=True,
        desc=Path(out).name,
    )
    try:
        with torch.inference_mode():
            for indices, batch, failures in loader:
                for i, reason in failures:
                    if strict:
                        raise click.ClickException(
                            f"cannot read image {paths[i]}: {reason} (--strict: nothing written)"
                        )
                    skipped.append((ids[i], reason))
                    bar.write(f"skipped {paths[i]}: {reason}", file=sys.stderr)
                if batch is not None:
                    results.append(fn(model, batch))
                    good.extend(ids[i] for i in indices)
                bar.update(len(indices) + len(failures))
    finally:
        bar.close()
    if not good:
        raise click.ClickException(
            f"none of the {len(paths)} images could be read; nothing written to {out}"
        )
    return good, results, skipped


def find_inputs(inputs: tuple[str, ...] | list[str]) -> list[tuple[Path, str]]:
    """``carlzoo.images.find_images`` with an error when nothing is found."""
    from carlzoo.images import IMAGE_EXTENSIONS, ImageInputError, find_images

    found = find_images(list(inputs))
    if not found:
        raise ImageInputError(
            f"no images found in {', '.join(inputs)} (extensions: {' '.join(IMAGE_EXTENSIONS)})"
        )
    return found


def _check_out(out: str) -> None:
    """Usage error (exit 2) before any work when ``out`` cannot be written."""
    from carlzoo.outputs import OutputError, check_writable, output_format

    try:
        output_format(out)
        check_writable(out)
    except OutputError as e:
        raise click.BadParameter(str(e), param_hint="'--out'") from None


def _write_out(out: str, write: Callable[[], list[Path]]) -> list[Path]:
    """Run ``write()``; an OSError (read-only folder, full disk) becomes a one-line error.

    The writers remove their temp files on any error, so nothing half-written is left.
    """
    from carlzoo.outputs import OutputError

    try:
        return write()
    except OutputError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(
            f"cannot write {out}: {e.strerror or e}; choose a writable folder"
        ) from None


def _report(
    kind: str, good: list[str], skipped: list[tuple[str, str]], written: list[Path], seconds: float
) -> None:
    rate = len(good) / seconds if seconds > 0 else float("nan")
    rate_text = f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}"  # 0.38, not 0, for slow runs
    msg = (
        f"{kind} {len(good)} images in {seconds:.1f}s ({rate_text} img/s) -> "
        f"{', '.join(str(p) for p in written)}"
    )
    if skipped:
        msg += f"; skipped {len(skipped)} unreadable: {', '.join(s for s, _ in skipped[:5])}"
        msg += " ..." if len(skipped) > 5 else ""
    click.echo(msg, err=True)


@click.command("embed")
@_INPUTS
@_common_options
@click.option(
    "--layer",
    type=click.Choice(["backbone", "projection"]),
    default="backbone",
    show_default=True,
    help="backbone: features for probes and kNN; projection: z.",
)
@click.option(
    "--normalize/--no-normalize",
    default=True,
    show_default=True,
    help="L2-normalise each embedding.",
)
def embed(
    inputs: tuple[str, ...],
    model_spec: str,
    out: str,
    backend: str,
    batch_size: int,
    device: str | None,
    workers: int | None,
    strict: bool,
    no_progress: bool,
    layer: str,
    normalize: bool,
) -> None:
    """Embed images (files or folders, searched recursively) with a CARL encoder.

    Undecodable images are skipped, listed on stderr and in the output (exit status 0
    unless --strict or nothing could be read).

    \b
    carlzoo embed photos/ --model carl-cifar10 --out emb.npz
    carlzoo embed a.jpg b.png --model models/x --out emb.csv --layer projection
    """
    import numpy as np

    from carlzoo.outputs import write_embeddings

    _check_out(out)
    t0 = time.perf_counter()
    good, results, skipped = _run(
        inputs,
        model_spec,
        out,
        backend,
        batch_size,
        device,
        workers,
        strict,
        no_progress,
        lambda model, x: model.embed(x, layer=layer, normalize=normalize).numpy(),
    )
    emb = np.concatenate(results).astype(np.float32, copy=False)
    written = _write_out(out, lambda: write_embeddings(out, good, emb, skipped))
    _report("embedded", good, skipped, written, time.perf_counter() - t0)


@click.command("assign")
@_INPUTS
@_common_options
@click.option(
    "--top-k",
    "-k",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Prototypes to keep per image, most probable first.",
)
def assign(
    inputs: tuple[str, ...],
    model_spec: str,
    out: str,
    backend: str,
    batch_size: int,
    device: str | None,
    workers: int | None,
    strict: bool,
    no_progress: bool,
    top_k: int,
) -> None:
    """Assign images to the model's prototypes: top-k prototype ids and probabilities.

    \b
    carlzoo assign photos/ --model carl-cifar10 --out groups.csv --top-k 3
    """
    import numpy as np

    from carlzoo.outputs import write_assignments

    _check_out(out)
    t0 = time.perf_counter()

    def run(model: Any, x: Any) -> tuple[Any, Any]:
        k = model.config.architecture.num_prototypes
        if top_k > k:
            raise click.BadParameter(
                f"{top_k} is more than the model's {k} prototypes", param_hint="'--top-k'"
            )
        a = model.assign(x, top_k=top_k)
        return a.ids.numpy(), a.probs.numpy()

    good, results, skipped = _run(
        inputs, model_spec, out, backend, batch_size, device, workers, strict, no_progress, run
    )
    ids = np.concatenate([r[0] for r in results])
    probs = np.concatenate([r[1] for r in results])
    written = _write_out(out, lambda: write_assignments(out, good, ids, probs, skipped))
    _report("assigned", good, skipped, written, time.perf_counter() - t0)


def _table(rows: list[dict[str, str]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines.append("  ".join("-" * widths[c] for c in columns))
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def list_cmd(as_json: bool) -> None:
    """List the models of the zoo registry."""
    from carlzoo.registry import registry_table

    rows = registry_table()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    columns = [
        "name",
        "dataset",
        "input",
        "backbone",
        "status",
        "bundled",
        "knn_top1",
        "linear_top1",
        "repo",
        "revision",
    ]
    click.echo(_table(rows, columns))
    click.echo(
        "\nLoad one with carlzoo.load(NAME); `carlzoo info NAME` shows how to train an "
        "unpublished one locally."
    )


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and len(json.dumps(v)) > 80:
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


@click.command("info")
@click.argument("spec", metavar="NAME_OR_DIR")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def info(spec: str, as_json: bool) -> None:
    """Show a model's registry entry, config and metrics (zoo name, folder or hf-hub:...)."""
    from carlzoo.registry import REGISTRY, ZooError, bundled_path, unpublished_message

    report: dict[str, Any] = {}
    folder: Path | None = None
    try:
        if spec in REGISTRY:
            e = REGISTRY[spec]
            report["registry"] = {
                "name": e.name,
                "description": e.description,
                "dataset": e.dataset,
                "input_size": e.input_size,
                "status": e.status,
                "repo_id": e.repo_id,
                "revision": e.revision,
                "files": dict(e.files),
                "metrics": dict(e.metrics),
            }
            folder = bundled_path(spec)
            if folder is not None:
                report["bundled"] = str(folder)
            elif e.status != "published":
                report["note"] = unpublished_message(spec)
        elif spec.startswith("hf-hub:"):
            from carlzoo.pretrained import CONFIG_NAME, _hub_download, _parse_hub_spec

            repo_id, rev = _parse_hub_spec(spec, None)
            folder = _hub_download(
                repo_id, [CONFIG_NAME], rev, cache_dir=None, token=None, label=spec
            )
        else:
            folder = Path(spec).expanduser()
            if not folder.exists():
                from carlzoo.pretrained import load

                load(spec)  # no such folder: raises load's own error, with its did-you-mean
        if folder is not None:
            from carlzoo.pretrained import read_config

            report["config"] = read_config(folder).to_dict()
            files = sorted(p.name for p in folder.iterdir() if p.is_file())
            # A Hub snapshot folder holds only what this machine downloaded so far.
            report["cached_files" if spec.startswith("hf-hub:") else "files"] = files
    except ZooError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    for section, value in report.items():
        if isinstance(value, dict):
            click.echo(f"{section}:")
            for k, v in _flatten(value):
                click.echo(f"  {k}: {json.dumps(v, default=str) if not isinstance(v, str) else v}")
        else:
            click.echo(f"{section.replace('_', ' ')}: {value}")
