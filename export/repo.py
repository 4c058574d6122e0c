"""Export a training run as a model folder ready for the Hub (``carlzoo export``).

:func:`export_model` reads a run folder (or one checkpoint file) written by ``carlzoo train``
and writes a folder that :func:`carlzoo.pretrained.from_pretrained` loads::

    config.json            ZooConfig: architecture, preprocessing, provenance, metrics
    model.safetensors      the weights (float32, or float16 with BN statistics in float32)
    model.onnx             the same network for onnxruntime (unless onnx=False)
    README.md              the model card (carlzoo.export.card)
    training_config.json   the resolved training configuration
    metrics.json           the measured results and where they come from

Everything is written into a temporary folder next to ``out_dir`` and renamed into place at
the end, so a failed export (bad checkpoint, ONNX parity failure, ...) leaves nothing
behind, and an existing ``out_dir`` is replaced only with ``overwrite=True``.

Checks before the rename: the folder is loaded back with ``from_pretrained`` and must give
the checkpoint's outputs (float32: within 1e-6; float16: the rounding error is recorded),
and the ONNX graph must match PyTorch within ``parity_tol`` (default 1e-4 for float32 and
1e-2 for float16 weights, see ``carlzoo.export.onnx.PARITY_TOL``; scaled by the
output magnitude when it exceeds 1; see :func:`check_parity`) on random inputs and on real
images: a few test images of the run's dataset when it can be loaded, else images from
``examples/images`` when present.

The published training configuration keeps only the last component of ``data.root`` (a
local path). Only measured numbers enter ``config.json``, ``metrics.json`` and the card:
the last kNN monitor result in ``metrics.jsonl`` and the results in ``RUN_DIR/eval.json``
(written by ``carlzoo probe --out``, one result or a list of them).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from carlzoo.export.card import DATASET_TITLES, CardContext, Result, render_model_card
from carlzoo.export.onnx import (
    PARITY_TOL,
    check_opset,
    export_onnx,
    onnx_parity,
    parity_failure,
    parity_inputs,
)
from carlzoo.registry import sha256_file

__all__ = [
    "ExportError",
    "ExportResult",
    "RunRecords",
    "export_model",
    "read_run_records",
    "read_evaluations",
    "detect_recipe",
    "real_parity_images",
    "check_parity",
    "EXAMPLE_IMAGES",
]

EXAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "examples" / "images"
"""Fallback images for the parity check (present in a source checkout that has them)."""

_DTYPES = ("float32", "float16")
_EVAL_METRICS = ("top1", "top5", "acc", "purity", "nmi", "ari")
_HARDWARE_KEYS = ("hardware", "device_name", "gpu_name", "gpu")
_IGNORED_RECIPE_KEYS = {"data.root", "data.download"}
_FILES = {
    "config.json": "architecture, preprocessing, provenance and measured metrics (ZooConfig)",
    "model.safetensors": "the weights: backbone, projection head and prototypes",
    "model.onnx": "the same network for onnxruntime: input `images` (N, 3, S, S) float32, "
    "outputs `features`, `projection`, `logits`",
    "training_config.json": "the resolved training configuration of the run",
    "metrics.json": "the measured results, where each comes from, and the last epoch's record",
    "README.md": "this model card",
}


class ExportError(ValueError):
    """An export that cannot be done; the message is one line and names the input."""


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    files: dict[str, str]  # file name -> sha256
    metrics: dict[str, float]  # measured values (config.json "metrics")
    parity: dict[str, Any] | None  # {"random": {...}, "real": {...} | None}
    roundtrip_max_abs_diff: float  # reloaded folder vs the checkpoint's model


@dataclass(frozen=True)
class RunRecords:
    """What ``metrics.jsonl`` says about the epochs up to the exported checkpoint."""

    records: list[dict[str, Any]] = field(default_factory=list)  # one per epoch, in order
    train_time_s: float | None = None
    hardware: str | None = None
    knn: dict[str, Any] | None = None  # the last record with knn_top1


def _one_line(e: BaseException | str) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


# ---- reading the run ---------------------------------------------------------------------


def _run_dir(source: Path, ckpt_path: Path) -> Path:
    if source.is_dir():
        return source
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent


def read_run_records(
    run_dir: str | Path, last_epoch: int, fallback: dict[str, Any] | None = None
) -> RunRecords:
    """Per-epoch records of ``run_dir/metrics.jsonl`` up to ``last_epoch`` (the last record
    of each epoch wins, so a resumed run counts each epoch once). Unreadable lines (a run
    killed mid-write) are skipped. ``fallback`` (the checkpoint's own record) is used when
    the file is missing.
    """
    from carlzoo.training.run import read_metrics

    path = Path(run_dir) / "metrics.jsonl"
    records = read_metrics(path, last_epoch)
    if not path.is_file() and fallback and isinstance(fallback.get("epoch"), int):
        records = [fallback]
    times = [r["epoch_time_s"] for r in records if isinstance(r.get("epoch_time_s"), (int, float))]
    hardware = None
    for rec in reversed(records):
        for key in _HARDWARE_KEYS:
            if isinstance(rec.get(key), str) and rec[key]:
                hardware = rec[key]
                break
        if hardware:
            break
    knn = next((r for r in reversed(records) if _finite(r.get("knn_top1"))), None)
    return RunRecords(records, float(sum(times)) if times else None, hardware, knn)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_evaluations(run_dir: str | Path) -> list[dict[str, Any]]:
    """The results in ``run_dir/eval.json`` (one object or a list); [] when there is none."""
    path = Path(run_dir) / "eval.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ExportError(
            f"{path} is not valid JSON ({_one_line(e)}); fix or remove it "
            "(it is written by `carlzoo probe --out`)"
        ) from None
    items = data if isinstance(data, list) else [data]
    if not all(
        isinstance(d, dict)
        and isinstance(d.get("protocol"), str)
        and isinstance(d.get("dataset"), str)
        for d in items
    ):
        raise ExportError(
            f"{path}: expected a `carlzoo probe --out` result (an object with "
            "protocol, dataset, top1, ...) or a list of them"
        )
    return items


def _portable_evaluation(ev: dict[str, Any]) -> dict[str, Any]:
    """A probe result as published: the probed run or folder is this model, not a local path."""
    model = ev.get("model")
    if not isinstance(model, str):
        return ev
    if ev.get("model_source") == "run":  # eval.json of a run holds that run's results
        return {**ev, "model": "this model"}
    if Path(model).expanduser().exists():  # a local model folder: its name only
        return {**ev, "model": Path(model).name}
    return ev


def detect_recipe(cfg: Any) -> tuple[str | None, dict[str, Any]]:
    """(``training/configs/<recipe>.yaml``, changed keys): of the recipes for the run's dataset
    (``cifar10.yaml``, ``cifar10_fast.yaml``, ...), the one the run changes least."""
    from carlzoo.training.config import (
        PRESETS,
        config_to_dict,
        flat_config,
        load_config,
        preset_path,
    )

    dataset = cfg.data.dataset
    if dataset not in PRESETS:
        return None, {}
    ours = flat_config(config_to_dict(cfg))
    best: tuple[str, dict[str, Any]] | None = None
    for path in sorted(preset_path(dataset).parent.glob(f"{dataset}*.yaml")):
        recipe = load_config(path)
        if recipe.data.dataset != dataset:  # cifar100.yaml next to cifar10.yaml
            continue
        base = flat_config(config_to_dict(recipe))
        changes = {
            k: v for k, v in ours.items() if base.get(k) != v and k not in _IGNORED_RECIPE_KEYS
        }
        if best is None or len(changes) < len(best[1]):
            best = (f"training/configs/{path.name}", changes)
    return best if best is not None else (None, {})


def _train_command(recipe: str | None, changes: dict[str, Any]) -> str:
    if recipe is None:  # training_config.json is JSON, hence YAML: it is a complete recipe
        return "carlzoo train --config training_config.json --data-root DATA --out RUN_DIR"
    sets = " ".join(f"--set {k}={_cli_value(v)}" for k, v in changes.items())
    preset = Path(recipe).stem
    return f"carlzoo train --config {preset} --data-root DATA --out RUN_DIR {sets}".rstrip()


def _cli_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_cli_value(x) for x in v) + "]"
    return str(v)


def _results(
    cfg: Any, records: RunRecords, evaluations: list[dict[str, Any]], command: str
) -> list[Result]:
    """Measured results (probe results first) and "not measured" rows for the basic ones."""
    dataset = cfg.data.dataset
    out: list[Result] = []
    for ev in evaluations:
        protocol, ds = ev["protocol"], ev["dataset"]
        settings = ev.get("settings") if isinstance(ev.get("settings"), dict) else {}
        detail = ", ".join(f"{k}={settings[k]}" for k in ("k", "t", "layer") if k in settings)
        source = f"`carlzoo probe --protocol {protocol}`" + (f" ({detail})" if detail else "")
        cmd = (
            f"carlzoo probe --model RUN_DIR --dataset {ds} --data-root DATA "
            f"--protocol {protocol} --out RUN_DIR/eval.json"
        )
        if isinstance(ev.get("command"), str):  # measured by a script, not `carlzoo probe`
            words = ev["command"].split()
            script = next((w for w in words if w.endswith(".py")), words[0] if words else "")
            source, cmd = f"`{script}` ({protocol})", ev["command"]
        for metric in _EVAL_METRICS:
            if _finite(ev.get(metric)):
                out.append(Result(protocol, metric, ds, float(ev[metric]), "test", source, cmd))
    probed_knn = any(r.protocol == "knn" and r.dataset == dataset for r in out)
    if records.knn is not None and not probed_knn:
        rec = records.knn
        source = (
            f"kNN monitor of `carlzoo train` at epoch {rec['epoch']} (k={cfg.knn_k}, "
            f"t={cfg.knn_t}, at most {cfg.knn_max_train} training images)"
        )
        for metric in ("top1", "top5"):
            if _finite(rec.get(f"knn_{metric}")):
                out.append(
                    Result(
                        "knn", metric, dataset, float(rec[f"knn_{metric}"]), "test", source, command
                    )
                )
    for protocol in ("knn", "linear"):
        if not any(
            r.protocol == protocol and r.dataset == dataset and r.metric == "top1" for r in out
        ):
            out.append(Result(protocol, "top1", dataset, None))
    return out


def _metric_key(r: Result, dataset: str) -> str:
    key = f"{r.protocol}_{r.metric}"
    return key if r.dataset == dataset else f"{r.dataset}_{key}"


# ---- parity ------------------------------------------------------------------------------


def real_parity_images(cfg: Any, preprocessing: Any, n: int = 8) -> tuple[Tensor, str] | None:
    """(normalised images, where they come from): test images of the run's dataset, else
    ``examples/images``; None when neither is available."""
    from PIL import Image

    transform = preprocessing.make_transform()
    d = cfg.data
    try:
        from carlzoo.training.datasets import FOLDER_DATASETS, load_split

        size = d.image_size if d.dataset in FOLDER_DATASETS else None
        split = load_split(d.dataset, d.root, "test", image_size=size)
        if len(split):
            arrays = split.images[:n]
            x = torch.stack([transform(Image.fromarray(np.asarray(a))) for a in arrays])
            return x, f"{len(arrays)} images of the {d.dataset} test split"
    except Exception:  # the dataset is elsewhere now or unreadable: use the fallback
        pass
    if EXAMPLE_IMAGES.is_dir():
        from carlzoo.images import BadImage, find_images, read_image

        tensors = []
        for path, _ in find_images(EXAMPLE_IMAGES)[:n]:
            try:
                tensors.append(transform(read_image(path)))
            except BadImage:
                continue
        if tensors:
            return torch.stack(tensors), f"{len(tensors)} bundled example images"
    return None


def check_parity(
    model: Any,
    onnx_path: str | Path,
    random_inputs: Tensor,
    real: tuple[Tensor, str] | None,
    tol: float = 1e-4,
) -> dict[str, Any]:
    """ONNX vs PyTorch on random and real inputs; ExportError when they differ.

    The verdict is :func:`carlzoo.export.onnx.parity_failure` with limit ``tol``.
    """
    out: dict[str, Any] = {"tol": tol, "real": None}
    checks = [("random", random_inputs, f"{len(random_inputs)} random N(0, 1) inputs")]
    if real is not None:
        checks.append(("real", real[0], real[1]))
    for key, x, source in checks:
        res = onnx_parity(model, onnx_path, x)
        out[key] = {**res, "source": source, "n": int(len(x))}
        failure = parity_failure(res, tol)
        if failure:
            raise ExportError(
                f"ONNX parity check failed on {source}: {failure}; the ONNX graph does not "
                "reproduce the model, so nothing was written (retry with another --opset, "
                "or --no-onnx)"
            )
    return out


# ---- export ------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")


@torch.inference_mode()
def _outputs(model: Any, x: Tensor) -> tuple[Tensor, ...]:
    model.eval()
    return tuple(t.float() for t in model(x))


def export_model(
    source: str | Path,
    out_dir: str | Path,
    *,
    onnx: bool = True,
    opset: int | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    name: str | None = None,
    parity_tol: float | None = None,
    real_images: Sequence[str | Path] | None = None,
) -> ExportResult:
    """Export the run folder or checkpoint ``source`` to the model folder ``out_dir``.

    ``real_images``: image files for the parity check instead of the run's dataset.
    Raises :class:`ExportError` (one line) on bad input or a failed check; nothing is
    written then.
    """
    from carlzoo import __version__
    from carlzoo.pretrained import Preprocessing, ZooConfig, from_pretrained, save_pretrained
    from carlzoo.registry import ZooError
    from carlzoo.training.checkpoint import CheckpointError
    from carlzoo.training.config import config_to_dict
    from carlzoo.training.run import find_checkpoint, load_run

    if dtype not in _DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
    used_opset = None
    if onnx:
        try:
            used_opset = check_opset(opset)
        except ValueError as e:
            raise ExportError(f"--{e}") from None  # "--opset 0 cannot be exported: ..."
    source, out_dir = Path(source).expanduser(), Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} exists and is not a folder; choose another path")
    if out_dir.exists() and not overwrite:
        raise ExportError(
            f"--out {out_dir} already exists; pass --overwrite to replace it or "
            "choose another folder"
        )
    if not out_dir.parent.is_dir():
        raise ExportError(f"--out {out_dir}: the parent folder {out_dir.parent} does not exist")
    try:
        ckpt_path = find_checkpoint(source)
        model, cfg, ckpt = load_run(source)
    except CheckpointError as e:
        raise ExportError(_one_line(e)) from None
    run_dir = _run_dir(source, ckpt_path)
    records = read_run_records(run_dir, ckpt.epoch, ckpt.metrics)
    evaluations = [_portable_evaluation(ev) for ev in read_evaluations(run_dir)]
    recipe, changes = detect_recipe(cfg)
    command = _train_command(recipe, changes)
    results = _results(cfg, records, evaluations, command)
    dataset = cfg.data.dataset
    metrics = {
        _metric_key(r, dataset): round(float(r.value), 6)
        for r in results
        if r.measured and r.value is not None
    }
    size = int(cfg.data.image_size)
    try:
        pre = Preprocessing(
            input_size=size,
            resize_size=size,
            interpolation="bicubic",
            mean=tuple(cfg.augment.mean),
            std=tuple(cfg.augment.std),
        )
    except ValueError as e:
        raise ExportError(
            f"{ckpt_path}: unusable preprocessing in its config: {_one_line(e)}"
        ) from None
    train_cfg = config_to_dict(cfg)
    if train_cfg["data"].get("root"):  # a local path: publish only its last component
        train_cfg["data"]["root"] = Path(str(train_cfg["data"]["root"])).name
    provenance: dict[str, Any] = {
        "dataset": dataset,
        "dataset_title": DATASET_TITLES.get(dataset, dataset),
        "epochs": int(ckpt.epoch),
        "epochs_planned": int(cfg.epochs),
        "steps": int(ckpt.step),
        "checkpoint": ckpt_path.name,
        "recipe": recipe,
        "recipe_changes": changes,
        "train_time_s": records.train_time_s,
        "hardware": records.hardware,
        "code_version": __version__,
        "training_config": train_cfg,
        "onnx_opset": None,
    }
    model_name = name or out_dir.name
    zoo_cfg = ZooConfig(
        architecture=cfg.model,
        preprocessing=pre,
        name=model_name,
        provenance=provenance,
        metrics=metrics,
    )

    staging = out_dir.parent / f".{out_dir.name}.export-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder = staging / out_dir.name
    random_x = parity_inputs(size)
    try:
        staging.mkdir()
        save_pretrained(model, folder, zoo_cfg, dtype=dtype)
        try:
            reloaded = from_pretrained(folder, backend="torch")
        except ZooError as e:
            raise ExportError(f"the exported folder does not load back: {_one_line(e)}") from None
        ref, got = _outputs(model, random_x), _outputs(reloaded, random_x)
        roundtrip = max(float((a - b).abs().max()) for a, b in zip(ref, got, strict=True))
        if dtype == "float32" and roundtrip > 1e-6:
            raise ExportError(
                f"the exported weights do not reproduce {ckpt_path}: max abs diff {roundtrip:.3g}"
            )
        parity = None
        if onnx:
            if real_images is not None:
                from carlzoo.images import read_image

                tf = pre.make_transform()
                real = (
                    torch.stack([tf(read_image(p)) for p in real_images]),
                    f"{len(real_images)} given images",
                )
            else:
                real = real_parity_images(cfg, pre)
            try:
                export_onnx(
                    reloaded, folder / "model.onnx", input_size=size, opset=used_opset, dtype=dtype
                )
            except Exception as e:  # torch.onnx raises many types; name it in one line
                raise ExportError(
                    f"ONNX export (opset {used_opset}) failed: "
                    f"{type(e).__name__}: {_one_line(e)[:300]}"
                ) from None
            try:
                tol = PARITY_TOL[dtype] if parity_tol is None else parity_tol
                parity = check_parity(reloaded, folder / "model.onnx", random_x, real, tol)
            except ExportError:
                raise
            except Exception as e:  # onnxruntime cannot run the file
                raise ExportError(
                    f"ONNX parity check could not run: {type(e).__name__}: {_one_line(e)[:300]}"
                ) from None
            provenance["onnx_opset"] = used_opset
        # config.json also records the export checks (the weights are unchanged)
        extra: dict[str, Any] = {"onnx_opset": provenance["onnx_opset"]}
        if parity is not None:
            extra["onnx_parity"] = parity
        if dtype == "float16":
            extra["float16_max_abs_diff"] = roundtrip
        cfg_path = folder / "config.json"
        cfg_dict = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg_dict["provenance"].update(extra)
        _write_json(cfg_path, cfg_dict)
        _write_json(folder / "training_config.json", train_cfg)
        _write_json(
            folder / "metrics.json",
            {
                "measured": metrics,
                "results": [asdict(r) for r in results],
                "knn_monitor": records.knn,
                "evaluations": evaluations,
                "last_epoch": records.records[-1] if records.records else ckpt.metrics,
                "float16_max_abs_diff": roundtrip if dtype == "float16" else None,
            },
        )
        present = sorted(p.name for p in folder.iterdir() if p.is_file()) + ["README.md"]
        files = {
            f: _FILES.get(f, "written by carlzoo.pretrained.save_pretrained")
            for f in dict.fromkeys(present)
        }
        ctx = CardContext(
            name=model_name,
            dataset=dataset,
            architecture=cfg.model.to_dict(),
            num_features=int(model.num_features),
            preprocessing=pre.to_dict(),
            training=train_cfg,
            epochs_completed=int(ckpt.epoch),
            steps=int(ckpt.step),
            results=results,
            files=files,
            weights_dtype=dtype,
            train_time_s=records.train_time_s,
            hardware=records.hardware,
            recipe=recipe,
            recipe_changes=changes,
            parity=parity,
            onnx_opset=provenance["onnx_opset"],
            carlzoo_version=__version__,
        )
        (folder / "README.md").write_text(render_model_card(ctx), encoding="utf-8")
        hashes = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
        _replace_dir(folder, out_dir, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(out_dir, hashes, metrics, parity, roundtrip)


def _replace_dir(new: Path, target: Path, overwrite: bool) -> None:
    """Rename ``new`` onto ``target``; an existing ``target`` is moved aside first and
    removed only once the new folder is in place."""
    old = None
    if target.exists():
        if not overwrite:  # appeared while exporting
            raise ExportError(f"--out {target} appeared while exporting; pass --overwrite")
        old = new.parent / f"{target.name}.old"
        os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
