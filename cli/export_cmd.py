"""``carlzoo export`` and ``carlzoo push``: a training run -> a model folder -> the Hub."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.argument("source", metavar="RUN_DIR_OR_CHECKPOINT", type=click.Path())
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Model folder to write (config.json, model.safetensors, model.onnx, "
    "README.md, training_config.json, metrics.json); not the run, a folder holding it, or the "
    "current folder.",
)
@click.option("--no-onnx", is_flag=True, help="Do not write model.onnx.")
@click.option(
    "--opset",
    type=int,
    default=None,
    help="ONNX opset: 18 (the default) up to the installed onnx's newest.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Weights dtype (float16 keeps BN statistics float32).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace --out if it exists (a model folder: nothing but the files an export writes).",
)
@click.option("--name", default=None, help="Model name (default: the --out folder's name).")
def export(
    source: str,
    out_dir: str,
    no_onnx: bool,
    opset: int | None,
    dtype: str,
    overwrite: bool,
    name: str | None,
) -> None:
    """Export a training run (or checkpoint) as a model folder for carlzoo.load and the Hub.

    The results in RUN_DIR/eval*.json (`carlzoo probe --out`) measured on the exported
    checkpoint are published with it; others are left out with a warning.

    \b
    carlzoo export runs/c10 --out models/carl-cifar10
    carlzoo export runs/c10/checkpoints/epoch_0100.safetensors --out m/ --dtype float16
    """
    from carlzoo.export.repo import ExportError, export_model

    try:
        res = export_model(
            source,
            out_dir,
            onnx=not no_onnx,
            opset=opset,
            dtype=dtype,
            overwrite=overwrite,
            name=name,
        )
    except (ExportError, OSError) as e:
        raise click.ClickException(" ".join(str(e).split())) from None
    click.echo(f"wrote {res.out_dir}: {', '.join(res.files)}")
    if res.parity is not None:
        for key in ("random", "real"):
            check = res.parity.get(key)
            if check:
                click.echo(
                    f"ONNX parity on {check['source']}: max abs diff "
                    f"{check['max_abs_diff']:.2e}, min cosine {check['min_cosine']:.6f}"
                )
        if res.parity.get("real") is None:
            click.echo("ONNX parity on real images: no images available (dataset not found)")
    if dtype == "float16":
        click.echo(f"float16 weights: max abs diff {res.roundtrip_max_abs_diff:.2e} vs float32")
    measured = ", ".join(f"{k} {v:g}" for k, v in res.metrics.items()) or "none"
    click.echo(f"measured metrics: {measured}")
    for line in res.warnings:  # results of other checkpoints left out, stale folders removed
        click.echo(f"warning: {line}", err=True)
    _echo_bundled_pins(Path(res.out_dir), res.files)


def _echo_bundled_pins(out_dir: Path, hashes: dict[str, str]) -> None:
    """When ``out_dir`` is a zoo model's bundled folder, print the hashes its entry must pin."""
    from carlzoo import registry

    out_dir = out_dir.resolve()
    if out_dir.parent != registry.BUNDLED_DIR.resolve() or out_dir.name not in registry.REGISTRY:
        return
    click.echo(
        f"{out_dir.name} is bundled in the package: carlzoo.load({out_dir.name!r}) loads it once "
        f"its entry in carlzoo/registry.py pins these files:"
    )
    click.echo("    files={")
    for fname, digest in sorted(hashes.items()):
        click.echo(f'        "{fname}": "{digest}",')
    click.echo("    },")


@click.command()
@click.argument("model_dir", metavar="MODEL_DIR", type=click.Path())
@click.option("--repo-id", required=True, metavar="ORG/NAME", help="Hub repository.")
@click.option(
    "--revision",
    default=None,
    metavar="BRANCH",
    help="Branch to push to (created if missing; default main).",
)
@click.option(
    "--private",
    is_flag=True,
    help="Create the repository as private; an existing public one is refused.",
)
@click.option(
    "--token",
    default=None,
    metavar="T",
    help="Hub token (default: HF_TOKEN, then the saved `hf auth login` token).",
)
@click.option("--name", default=None, help="Registry name (default: config.json's name).")
@click.option("--json", "as_json", is_flag=True, help="Print the registry entry as JSON.")
def push(
    model_dir: str,
    repo_id: str,
    revision: str | None,
    private: bool,
    token: str | None,
    name: str | None,
    as_json: bool,
) -> None:
    """Upload an exported model folder to the Hugging Face Hub as one commit.

    The commit makes the branch mirror the folder: files the branch holds that the folder
    lacks are removed (and listed; they stay in the branch's history). Prints the commit
    sha and the registry entry (revision and sha256 of every file) to paste into
    carlzoo/registry.py.

    \b
    carlzoo push models/carl-cifar10 --repo-id carlzoo/carl-cifar10
    """
    from carlzoo.export.push import PushError, push_model, registry_entry, registry_snippet

    try:
        res = push_model(model_dir, repo_id, revision=revision, private=private, token=token)
    except PushError as e:
        raise click.ClickException(str(e)) from None
    # With --json, stdout holds the entry alone.
    click.echo(
        f"pushed {model_dir} to {res.repo_id}@{res.revision}: commit {res.commit_sha}",
        err=as_json,
    )
    if res.deleted:
        click.echo(
            f"removed from {res.repo_id}@{res.revision} (not in {model_dir}; still in the "
            f"branch's history): {', '.join(res.deleted)}",
            err=True,
        )
    entry = registry_entry(res, model_dir, name)
    if as_json:
        click.echo(json.dumps(entry, indent=2))
    else:
        click.echo("registry entry for carlzoo/registry.py:")
        click.echo(registry_snippet(entry))
