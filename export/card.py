"""Model cards: the ``README.md`` of an exported model folder.

The card is ``templates/model_card.md`` filled in from a :class:`CardContext`: YAML front
matter the Hub understands (``library_name``, ``license``, ``tags``, ``datasets``,
``pipeline_tag``, and a ``model-index`` holding only measured results), then what the model
is, how it was trained, its results with the commands that produced them, export checks,
intended uses, limitations, licence and citation. A result that was not measured is listed
as "not measured" and never enters the front matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from string import Template
from typing import Any

import yaml

__all__ = [
    "DATASET_TITLES",
    "dataset_title",
    "HUB_DATASETS",
    "Result",
    "CardContext",
    "front_matter",
    "model_index",
    "render_model_card",
    "parse_front_matter",
    "format_duration",
]

DATASET_TITLES: dict[str, str] = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "stl10": "STL-10",
    "tinyimagenet": "Tiny ImageNet",
    "imagenet64": "ImageNet 64x64 (downsampled ImageNet-1k)",
    "npz": "a custom .npz dataset",
    "imagefolder": "a custom labelled image folder",
    "folder": "a custom unlabelled image folder",
}
# Hub dataset ids, only where the id is certain; other datasets are named in the tags.
HUB_DATASETS: dict[str, str] = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100"}

_PROTOCOLS: dict[str, str] = {
    "knn": "kNN",
    "linear": "Linear probe",
    "semi1": "Semi-supervised, 1% labels",
    "semi10": "Semi-supervised, 10% labels",
    "finetune": "Fine-tuning",
    "cluster": "Clustering (prototype assignments)",
}
_METRICS: dict[str, tuple[str, str]] = {  # metric -> (model-index type, display name)
    "top1": ("accuracy", "top-1 accuracy"),
    "top5": ("top_5_accuracy", "top-5 accuracy"),
    "acc": ("accuracy", "cluster accuracy (Hungarian)"),
    "purity": ("purity", "purity"),
    "nmi": ("nmi", "NMI"),
    "ari": ("ari", "ARI"),
}
_PERCENT = ("top1", "top5", "acc", "purity")


@dataclass(frozen=True)
class Result:
    """One evaluation result of the exported checkpoint; ``value`` None means not measured."""

    protocol: str  # knn, linear, semi1, semi10, finetune, cluster
    metric: str  # top1, top5, acc, purity, nmi, ari
    dataset: str
    value: float | None
    split: str = "test"
    source: str = ""  # how it was measured, in words
    command: str | None = None  # the command that produced it
    # the settings that change the number and differ from `carlzoo probe`'s defaults
    # ({"layer": "projection"}, {"k": 5}); empty for the defaults
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        return self.value is not None and math.isfinite(self.value)

    @property
    def variant(self) -> str:
        """``" (layer=projection, k=5)"`` for non-default settings, else ``""``."""
        if not self.settings:
            return ""
        return " (" + ", ".join(f"{k}={_fmt(v)}" for k, v in self.settings.items()) + ")"

    @property
    def label(self) -> str:
        name = f"{_PROTOCOLS.get(self.protocol, self.protocol)} {_METRICS[self.metric][1]}"
        return name + self.variant

    def display(self) -> str:
        if not self.measured:
            return "not measured"
        assert self.value is not None
        return f"{self.value:.2f}%" if self.metric in _PERCENT else f"{self.value:.4f}"


@dataclass(frozen=True)
class CardContext:
    """Everything the card says about one exported model."""

    name: str
    dataset: str
    architecture: dict[str, Any]  # ModelConfig.to_dict()
    num_features: int
    preprocessing: dict[str, Any]  # input_size, resize_size, interpolation, mean, std
    training: dict[str, Any]  # the resolved training config (config_to_dict)
    epochs_completed: int
    steps: int
    results: list[Result] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # file name -> what it holds
    weights_dtype: str = "float32"
    train_time_s: float | None = None
    hardware: str | None = None
    recipe: str | None = None  # e.g. "training/configs/cifar10.yaml"
    recipe_changes: dict[str, Any] = field(default_factory=dict)  # dotted key -> value
    parity: dict[str, Any] | None = None  # see carlzoo.export.repo.check_parity
    onnx_opset: int | None = None
    carlzoo_version: str = ""
    license: str = "apache-2.0"
    probe_model: str = "RUN_DIR"  # how `carlzoo probe --model` names the exported checkpoint

    @property
    def dataset_title(self) -> str:
        return DATASET_TITLES.get(self.dataset, self.dataset)


def _copy_of(name: str) -> str | None:
    """The known dataset that ``name`` is a copy of (``cifar10_webp90`` -> ``cifar10``)."""
    known = [k for k in DATASET_TITLES if name.startswith(k + "_")]
    return max(known, key=len) if known else None


def dataset_title(name: str) -> str:
    """Display title: ``CIFAR-10``, or ``CIFAR-10 (copy cifar10_webp90)`` for a named copy."""
    if name in DATASET_TITLES:
        return DATASET_TITLES[name]
    base = _copy_of(name)
    return f"{DATASET_TITLES[base]} (copy {name})" if base else name


def _hub_dataset(name: str) -> str:
    return HUB_DATASETS.get(name) or HUB_DATASETS.get(_copy_of(name) or "", name)


def model_index(ctx: CardContext) -> list[dict[str, Any]]:
    """The ``model-index`` entry: measured results only (empty list when there are none)."""
    groups: dict[tuple[str, str, str, str], list[Result]] = {}
    for r in ctx.results:
        if r.measured:
            groups.setdefault((r.protocol, r.variant, r.dataset, r.split), []).append(r)
    if not groups:
        return []
    results = []
    for (protocol, variant, dataset, split), rows in groups.items():
        results.append(
            {
                "task": {
                    "type": "image-classification",
                    "name": (
                        f"{_PROTOCOLS.get(protocol, protocol)} on frozen CARL features"
                        if protocol in ("knn", "linear")
                        else _PROTOCOLS.get(protocol, protocol)
                    )
                    + variant,
                },
                "dataset": {
                    "name": dataset_title(dataset),
                    "type": _hub_dataset(dataset),
                    "split": split,
                },
                "metrics": [
                    {
                        "type": _METRICS[r.metric][0],
                        "value": round(float(r.value or 0.0), 4),
                        "name": r.label,
                    }
                    for r in rows
                ],
            }
        )
    return [{"name": ctx.name, "results": results}]


def front_matter(ctx: CardContext) -> dict[str, Any]:
    """The card's YAML metadata as a dict (Hub keys)."""
    arch = ctx.architecture
    tags = [
        "carl",
        "self-supervised",
        "image-feature-extraction",
        "clustering",
        str(arch.get("backbone", "resnet")),
        "safetensors",
    ]
    if "model.onnx" in ctx.files:
        tags.append("onnx")
    tags.append(ctx.dataset)
    meta: dict[str, Any] = {
        "library_name": "carlzoo",
        "license": ctx.license,
        "pipeline_tag": "image-feature-extraction",
        "tags": list(dict.fromkeys(tags)),
    }
    if ctx.dataset in HUB_DATASETS:
        meta["datasets"] = [HUB_DATASETS[ctx.dataset]]
    index = model_index(ctx)
    if index:
        meta["metrics"] = sorted({m["type"] for res in index[0]["results"] for m in res["metrics"]})
        meta["model-index"] = index
    return meta


def parse_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a card as a dict ({} when there is none)."""
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    data = yaml.safe_load(text[3:end])
    return data if isinstance(data, dict) else {}


def format_duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{minutes:.1f} min"
    hours, rest = divmod(int(round(minutes)), 60)
    return f"{hours} h {rest:02d} min"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _architecture_table(ctx: CardContext) -> str:
    a = ctx.architecture
    stem = {
        "cifar": "CIFAR (3x3 conv, stride 1, no max-pool)",
        "imagenet": "ImageNet (7x7 conv, stride 2, max-pool)",
    }.get(a.get("stem"), a.get("stem"))
    logits = a.get("logits")
    scores = (
        f"cosine similarity / temperature {a.get('temperature')}"
        if logits == "cosine"
        else "dot product (eq. 2 of the paper)"
    )
    rows = [
        ("Backbone", f"{a.get('backbone')} (width {a.get('width')}), {stem} stem"),
        ("Features (`embed`)", f"{ctx.num_features}-d, global average pool of the last stage"),
        (
            "Projection head",
            f"MLP {ctx.num_features} -> {a.get('proj_hidden_dim')} -> "
            f"{a.get('proj_hidden_dim')} -> {a.get('proj_dim')}",
        ),
        ("Prototypes", f"{a.get('num_prototypes')}, scored by {scores}"),
        ("Weights", f"`model.safetensors`, {ctx.weights_dtype}"),
    ]
    return _table(("Part", "Value"), rows)


def _preprocessing_table(ctx: CardContext) -> str:
    p = ctx.preprocessing
    rows = [
        ("Resize", f"shorter side to {p.get('resize_size')} px ({p.get('interpolation')})"),
        ("Crop", f"centre {p.get('input_size')} x {p.get('input_size')} px"),
        ("Normalise", f"mean {_fmt(list(p.get('mean', [])))}, std {_fmt(list(p.get('std', [])))}"),
    ]
    return _table(("Step", "Value"), rows)


def _training_section(ctx: CardContext) -> str:
    t = ctx.training
    data, optim, loss, aug = (t.get(k, {}) for k in ("data", "optim", "loss", "augment"))
    planned = t.get("epochs")
    epochs = f"{ctx.epochs_completed}"
    if planned and planned != ctx.epochs_completed:
        epochs += f" of the {planned} planned (the schedules follow {planned})"
    if ctx.recipe:
        recipe = f"`{ctx.recipe}`"
        if ctx.recipe_changes:
            changes = ", ".join(f"`{k}={_fmt(v)}`" for k, v in ctx.recipe_changes.items())
            recipe += f", changed: {changes}"
        else:
            recipe += ", unchanged"
    else:
        recipe = "a custom configuration"
    opt = optim.get("optimizer", "sgd").upper()
    warm = optim.get("warmup_epochs") or 0
    lines = [
        f"- **Data:** {ctx.dataset_title} (`{ctx.dataset}`)"
        + (f" read from `{data['root']}`" if str(data.get("root", "")).endswith(".npz") else "")
        + f", training images at {data.get('image_size')} px, no labels used.",
        f"- **Recipe:** {recipe}. The full resolved configuration is `training_config.json`.",
        f"- **Epochs:** {epochs}; {ctx.steps} optimiser steps of batch {optim.get('batch_size')}.",
        f"- **Optimiser:** {opt}, lr {_fmt(optim.get('lr'))} at batch {optim.get('batch_size')}, "
        f"cosine to {_fmt(optim.get('min_lr'))}"
        + (f" after {_fmt(warm)} warm-up epochs" if warm else "")
        + f", momentum {_fmt(optim.get('momentum'))}, weight decay "
        f"{_fmt(optim.get('weight_decay'))}.",
        f"- **Loss:** CARL's consistency term plus the uniform-prior KL term, its weight "
        f"decaying from {_fmt(loss.get('kl_start'))} to {_fmt(loss.get('kl_end'))} over "
        f"{_fmt(loss.get('kl_decay_epochs'))} epochs.",
        f"- **Augmentation:** SimCLR-style views: random resized crop (scale "
        f"{_fmt(aug.get('crop_scale'))}), flip, colour jitter (p {_fmt(aug.get('jitter_p'))}), "
        f"grayscale (p {_fmt(aug.get('grayscale_p'))}), blur (p {_fmt(aug.get('blur_p'))}).",
        f"- **Precision / seed:** {t.get('precision')} / {t.get('seed')}.",
        f"- **Hardware:** {ctx.hardware or 'not recorded'}.",
        "- **Training time:** "
        + (
            f"{format_duration(ctx.train_time_s)} (sum of the epoch times in `metrics.jsonl`)."
            if ctx.train_time_s is not None
            else "not recorded."
        ),
    ]
    if ctx.carlzoo_version:
        lines.append(f"- **Code:** carlzoo {ctx.carlzoo_version}.")
    return "\n".join(lines)


def _results_section(ctx: CardContext) -> str:
    if not ctx.results:
        return "Nothing was measured on this checkpoint yet: every result is not measured."
    rows = [
        (
            r.label,
            f"{dataset_title(r.dataset)} ({r.split})",
            r.display(),
            r.source or "-",
        )
        for r in ctx.results
    ]
    text = _table(("Result", "Dataset (split)", "Value", "How"), rows)
    if any(r.protocol == "cluster" and r.metric == "acc" and r.measured for r in ctx.results):
        k = ctx.architecture.get("num_prototypes")
        text += (
            "\n\nCluster accuracy matches prototypes to classes one-to-one (Hungarian): with "
            f"more prototypes ({k}) than classes, the unmatched prototypes' images count as "
            "errors, so it is low by construction. Purity maps each prototype to its majority "
            "class; NMI and ARI compare the two partitions without a matching."
        )
    commands = list(dict.fromkeys(r.command for r in ctx.results if r.measured and r.command))
    if commands:
        text += "\n\nThe commands that produced the measured values:\n\n```bash\n"
        text += "\n".join(commands) + "\n```"
    missing = [r for r in ctx.results if not r.measured]
    if missing:
        text += (
            f"\n\nTo measure a missing result, run `carlzoo probe --model {ctx.probe_model} "
            f"--dataset {ctx.dataset} --data-root DATA --protocol PROTOCOL --out "
            f"RUN_DIR/eval-PROTOCOL-{ctx.dataset}.json` and export again: the export reads "
            "every `RUN_DIR/eval*.json` and keeps the results measured on this checkpoint."
        )
    return text


def _export_section(ctx: CardContext) -> str:
    lines = [f"- Weights stored as {ctx.weights_dtype} safetensors."]
    if ctx.onnx_opset is None:
        lines.append("- No ONNX export.")
        return "\n".join(lines)
    lines.append(f"- `model.onnx`: opset {ctx.onnx_opset}, dynamic batch, float32.")
    par = ctx.parity or {}
    for key in ("random", "real"):
        check = par.get(key)
        if not check:
            continue
        scale = check.get("output_scale")
        at = f" (largest output magnitude {float(scale):.3g})" if scale is not None else ""
        lines.append(
            f"- ONNX vs PyTorch on {check.get('source', key)}: max abs difference "
            f"{float(check['max_abs_diff']):.2e}{at}, min cosine "
            f"{float(check['min_cosine']):.6f}."
        )
    if par.get("real") is None and par:
        lines.append("- No real images were available for the parity check.")
    return "\n".join(lines)


def _files_section(ctx: CardContext) -> str:
    return "\n".join(f"- `{name}`: {what}" for name, what in ctx.files.items())


def _template() -> str:
    return (
        resources.files("carlzoo.export")
        .joinpath("templates/model_card.md")
        .read_text(encoding="utf-8")
    )


def render_model_card(ctx: CardContext) -> str:
    """The card's Markdown text (front matter included)."""
    meta = yaml.safe_dump(front_matter(ctx), sort_keys=False, allow_unicode=True).rstrip("\n")
    summary = (
        f"A CARL self-supervised image encoder ({ctx.architecture.get('backbone')}) trained "
        f"on {ctx.dataset_title} for {ctx.epochs_completed} epochs, for "
        f"{ctx.preprocessing.get('input_size')} px images; exported with carlzoo."
    )
    mapping = {
        "front_matter": meta,
        "name": ctx.name,
        "summary": summary,
        "architecture_table": _architecture_table(ctx),
        "preprocessing_table": _preprocessing_table(ctx),
        "num_features": str(ctx.num_features),
        "training_section": _training_section(ctx),
        "results_section": _results_section(ctx),
        "export_section": _export_section(ctx),
        "dataset_title": ctx.dataset_title,
        "input_size": str(ctx.preprocessing.get("input_size")),
        "num_prototypes": str(ctx.architecture.get("num_prototypes")),
        "files_section": _files_section(ctx),
    }
    return Template(_template()).substitute(mapping)
