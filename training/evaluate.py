"""Evaluation protocols of the CARL paper (Silva & Ramirez Rivera, SAC 2022, sec. 4).

Every protocol probes a frozen (or, for fine-tuning, a copied) encoder on a labelled dataset:

* ``knn``: weighted cosine kNN on frozen features (k=200, T=0.1), wrapping
  :mod:`carlzoo.training.knn`.
* ``linear``: multinomial logistic regression on frozen, standardised features, full-batch
  L-BFGS (preconditioned by whitening) with L2 weight decay (defaults: ``weight_decay=1e-4``
  on the mean loss, ``max_iter=300``); about 5 s on 2 CPU cores for 50k x 512 features.
  ``weight_decay="auto"`` chooses it from :data:`WEIGHT_DECAY_GRID` on 10% of each class of the
  train split held out (:func:`select_weight_decay`), then fits on the whole train split.
* ``semi1`` / ``semi10``: a class-balanced 1% / 10% labelled subset of the train split, drawn
  deterministically from ``seed`` (indices saved with the result), then fine-tuning of encoder +
  linear head (SGD, Nesterov momentum 0.9, lr 0.05 with a cosine decay, weight decay 5e-4,
  batch 256, crop (scale 0.2-1) + flip augmentation, 60 / 30 epochs).
* ``finetune``: the same on 100% of the labels (30 epochs).
* ``cluster``: prototype assignments (argmax of the prototype logits) on the test split against
  its labels: NMI, ARI, cluster accuracy (Hungarian one-to-one matching), purity and the number
  of prototypes used.

Cross-domain transfer is a probe of an encoder on a dataset other than the one it was trained
on; :func:`run_probe` records both.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carlzoo.model import CARLModel
from carlzoo.outputs import atomic_write_safetensors, atomic_write_text
from carlzoo.training.augment import AugmentConfig, BatchAugment
from carlzoo.training.datasets import FOLDER_DATASETS
from carlzoo.training.dist import resolve_device
from carlzoo.training.features import extract_features, normalize_uint8
from carlzoo.training.knn import knn_accuracy, topk_accuracy
from carlzoo.training.loss import mean_entropy
from carlzoo.training.train import (
    assignment_information,
    cosine_schedule,
    decay_groups,
    effective_prototypes,
)

__all__ = [
    "PROTOCOLS",
    "LAYERS",
    "DEFAULT_EPOCHS",
    "FINETUNE_DEFAULTS",
    "ProbeError",
    "ProbeModel",
    "load_probe_model",
    "resolve_device",
    "model_fingerprint",
    "compute_features",
    "knn_eval",
    "linear_eval",
    "WEIGHT_DECAY_GRID",
    "select_weight_decay",
    "held_out_rows",
    "balanced_subset",
    "finetune_classifier",
    "finetune_steps",
    "semi_supervised_eval",
    "finetune_eval",
    "cluster_metrics",
    "assignment_stats",
    "cluster_eval",
    "run_probe",
    "write_json",
]

PROTOCOLS: tuple[str, ...] = ("knn", "linear", "semi1", "semi10", "finetune", "cluster")
LAYERS: tuple[str, ...] = ("backbone", "projection")
SEMI_FRACTIONS: dict[str, float] = {"semi1": 0.01, "semi10": 0.1, "finetune": 1.0}
DEFAULT_EPOCHS: dict[str, int] = {"semi1": 60, "semi10": 30, "finetune": 30}


class ProbeError(ValueError):
    """A probe that cannot run as asked (size mismatch, no labels, unknown protocol...)."""


# --------------------------------------------------------------------------------------------
# Models and devices
# --------------------------------------------------------------------------------------------


@dataclass
class ProbeModel:
    """An encoder with the preprocessing it expects and where it came from."""

    model: CARLModel
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    source: str  # "run" (training run / checkpoint) or "pretrained" (carlzoo.load)
    train_dataset: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    train_data_root: str | None = None  # where a run's data.root pointed
    resize_size: int | None = None  # the model's own preprocessing; None: input_size
    interpolation: str = "bicubic"


def _is_run(path: Path) -> bool:
    """A training checkpoint file or run folder (not a model folder with config.json)."""
    if path.is_file():
        return path.suffix == ".safetensors" and path.name != "model.safetensors"
    return path.is_dir() and not (path / "config.json").is_file() and (
        (path / "checkpoints").is_dir() or (path / "config.yaml").is_file())


def _attr(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def _pretrained_train_dataset(config: Any) -> str | None:
    """``config.provenance["dataset"]`` of a zoo model, when recorded."""
    value = _attr(_attr(config, "provenance") or {}, "dataset")
    return value if isinstance(value, str) and value else None


def load_probe_model(spec: str | Path | ProbeModel) -> ProbeModel:
    """A run folder / checkpoint (training/run.py) or anything :func:`carlzoo.load` accepts."""
    if isinstance(spec, ProbeModel):
        return spec
    path = Path(spec).expanduser()
    if _is_run(path):
        from carlzoo.training.run import load_run

        model, cfg, ckpt = load_run(path)
        return ProbeModel(model=model, input_size=int(cfg.data.image_size),
                          mean=tuple(cfg.augment.mean), std=tuple(cfg.augment.std),
                          name=str(spec), source="run", train_dataset=cfg.data.dataset,
                          info={"epoch": ckpt.epoch, "step": ckpt.step,
                                "architecture": cfg.model.to_dict()},
                          train_data_root=str(cfg.data.root))
    import carlzoo

    model = carlzoo.load(str(spec))
    pre = model.config.preprocessing
    arch = _attr(model.config, "architecture")
    return ProbeModel(model=model, input_size=int(_attr(pre, "input_size")),
                      mean=tuple(float(v) for v in _attr(pre, "mean")),
                      std=tuple(float(v) for v in _attr(pre, "std")), name=str(spec),
                      source="pretrained",
                      train_dataset=_pretrained_train_dataset(model.config),
                      info={"architecture": _jsonable(arch)},
                      resize_size=int(_attr(pre, "resize_size")),
                      interpolation=str(_attr(pre, "interpolation")))


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the submodules' structure and settings (their ``repr``, e.g. the
    prototype logits and temperature, which are not tensors) and the parameter and buffer
    names and bytes (the feature cache key)."""
    h = hashlib.sha256()
    for name, child in model.named_children():
        h.update(f"{name}={child!r};".encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Features (with an optional on-disk cache, safetensors only)
# --------------------------------------------------------------------------------------------


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[-60:] or "model"


def compute_features(model: CARLModel, images: np.ndarray, *, mean: Sequence[float],
                     std: Sequence[float], size: int | None = None, layer: str = "backbone",
                     batch_size: int = 256, device: str | torch.device | None = None,
                     cache_dir: str | Path | None = None, cache_tag: dict[str, Any] | None = None
                     ) -> Tensor:
    """Frozen-encoder features (N, F) float32 on the CPU, cached in ``cache_dir`` when given.

    The cache file is a .safetensors keyed by the model's weights, ``cache_tag`` (dataset,
    split...), the layer, the preprocessing and the images' bytes; a stale file is never reused.
    """
    dev = resolve_device(device)
    path = None
    if cache_dir is not None:
        tag = dict(cache_tag or {})
        key = {"model": model_fingerprint(model), "layer": layer, "size": size,
               "mean": [float(m) for m in mean], "std": [float(s) for s in std],
               "images": hashlib.sha256(np.ascontiguousarray(images)).hexdigest(),
               "shape": list(images.shape), "tag": {k: str(v) for k, v in tag.items()}}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        stem = "-".join(_safe_name(str(tag[k])) for k in ("model", "dataset", "split") if k in tag)
        path = Path(cache_dir) / f"{stem or 'features'}-{layer}-{digest}.safetensors"
        if path.is_file():
            cached = _read_cached_features(path, len(images))
            if cached is not None:
                return cached
    feats = extract_features(model, images, mean=mean, std=std, size=size,
                             batch_size=batch_size, layer=layer, device=dev)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_safetensors(path, {"features": feats.contiguous()},
                                 {"carlzoo_features": json.dumps(key)})
    return feats


def _read_cached_features(path: Path, rows: int) -> Tensor | None:
    """The features cached in ``path``, or None (with a warning) when the file is damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        feats = load_file(str(path))["features"]
        if feats.ndim != 2 or feats.shape[0] != rows:
            raise ValueError(f"features {tuple(feats.shape)} for {rows} images")
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        warnings.warn(f"feature cache {path} is unreadable ({exc}); computing it again",
                      stacklevel=3)
        return None
    return feats


def _tensor(x: np.ndarray | Tensor, dtype: torch.dtype | None = None) -> Tensor:
    t = torch.from_numpy(np.asarray(x)) if not isinstance(x, Tensor) else x
    return t.to(dtype) if dtype is not None else t


def _finite(x: Tensor, name: str) -> Tensor:
    """``x``, or ValueError (one line) when it holds NaN or inf."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(
            f"{name} hold {bad} non-finite value(s) (NaN or inf); a probe needs finite features "
            "(an encoder whose activations overflowed, e.g. in float16, gives such)"
        )
    return x


def _split(features: np.ndarray | Tensor, labels: np.ndarray | Tensor,
           name: str) -> tuple[Tensor, Tensor]:
    """One split's (N, D) features and (N,) int64 labels as tensors; ValueError (one line)
    when the features are not finite or the two do not pair up row for row."""
    x = _finite(_tensor(features), f"{name}_features")
    y = _tensor(labels, torch.long)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name}_features {tuple(x.shape)} and {name}_labels {tuple(y.shape)} do not pair "
            "up: expected (N, D) features and (N,) labels"
        )
    return x, y


def _num_classes(*labels: Tensor, num_classes: int | None = None) -> int:
    found = max(int(y.max()) + 1 for y in labels if y.numel())
    return max(found, num_classes or 0)


# --------------------------------------------------------------------------------------------
# kNN and linear evaluation on frozen features
# --------------------------------------------------------------------------------------------


def knn_eval(train_features: np.ndarray | Tensor, train_labels: np.ndarray | Tensor,
             test_features: np.ndarray | Tensor, test_labels: np.ndarray | Tensor, *,
             k: int = 200, t: float = 0.1, num_classes: int | None = None,
             device: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Weighted cosine kNN (votes exp(s/T)) on ``device``; k is clipped to the train set size."""
    dev = resolve_device(device)
    xtr, ytr = _split(train_features, train_labels, "train")
    xte, yte = _split(test_features, test_labels, "test")
    c = _num_classes(ytr, yte, num_classes=num_classes)
    acc = knn_accuracy(xtr, ytr, xte, yte, k=k, t=t, num_classes=c, device=dev)
    return {**acc, "k": int(k), "k_used": int(min(k, ytr.numel())), "t": float(t)}


def _whitening(x: Tensor, eps: float = 1e-3) -> Tensor:
    """Symmetric (D, D) matrix ``(C + eps * mean(eig C))^-1/2`` of the feature covariance C."""
    xc = x - x.mean(0, keepdim=True)
    cov = (xc.T @ xc).div_(x.shape[0]).double()
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp_min(0.0) + eps * float(evals.clamp_min(0.0).mean().clamp_min(1e-12))
    return ((evecs * evals.rsqrt()) @ evecs.T).to(x.dtype)


def linear_eval(train_features: np.ndarray | Tensor, train_labels: np.ndarray | Tensor,
                test_features: np.ndarray | Tensor, test_labels: np.ndarray | Tensor, *,
                num_classes: int | None = None, weight_decay: float = 1e-4,
                max_iter: int = 300, standardize: bool = True, precondition: bool = True,
                device: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Linear probe: softmax regression on frozen features, full-batch L-BFGS.

    Features are standardised with the train statistics; the objective is the mean
    cross-entropy plus ``weight_decay / 2 * ||W||^2`` (bias not decayed). ``precondition``
    runs L-BFGS in whitened coordinates (W = V P, P the inverse square root of the feature
    covariance): the same objective and optimum, reached in far fewer iterations.
    """
    dev = resolve_device(device)
    xtr, ytr = _split(train_features, train_labels, "train")
    xte, yte = _split(test_features, test_labels, "test")
    if xtr.shape[0] < 2:
        raise ValueError(
            f"the linear probe needs at least 2 training rows, got {xtr.shape[0]}; give it a "
            "larger train split"
        )
    xtr, xte, ytr, yte = xtr.float().to(dev), xte.float().to(dev), ytr.to(dev), yte.to(dev)
    c = _num_classes(ytr, yte, num_classes=num_classes)
    t0 = time.perf_counter()
    if standardize:
        mu, sd = xtr.mean(0, keepdim=True), xtr.std(0, keepdim=True).clamp_min(1e-6)
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    n, d = xtr.shape
    pen = None  # P @ P: the penalty ||V P||^2 has gradient 2 V P P
    if precondition:
        p_mat = _whitening(xtr)
        xtr, xte, pen = xtr @ p_mat, xte @ p_mat, p_mat @ p_mat
    xtr = torch.cat([xtr, torch.ones(n, 1, device=dev)], dim=1)  # bias as a last feature
    xte = torch.cat([xte, torch.ones(xte.shape[0], 1, device=dev)], dim=1)
    theta = torch.zeros(c, d + 1, device=dev)  # (C, D + 1): weights V, then the bias
    rows = torch.arange(n, device=dev)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9,
                            line_search_fn="strong_wolfe")

    def objective() -> tuple[Tensor, Tensor]:
        logp = F.linear(xtr, theta).log_softmax(dim=1)  # (N, C)
        v = theta[:, :d]
        decay_grad = weight_decay * (v if pen is None else v @ pen)
        loss = -logp[rows, ytr].mean() + 0.5 * (v * decay_grad).sum()
        # Analytic gradient X^T (softmax - onehot) / N: twice as fast as autograd on a CPU.
        p = logp.exp_()
        p[rows, ytr] -= 1.0
        grad = p.T.matmul(xtr).div_(n)
        grad[:, :d] += decay_grad
        return loss, grad

    def closure() -> Tensor:
        loss, theta.grad = objective()
        return loss

    with torch.no_grad():
        opt.step(closure)
        n_iter = int(opt.state[theta].get("n_iter", 0))
        loss = float(objective()[0])
        train_acc = topk_accuracy(F.linear(xtr, theta), ytr, (1,))["top1"]
        acc = topk_accuracy(F.linear(xte, theta), yte)
    return {**acc, "train_top1": train_acc, "train_loss": loss, "weight_decay": weight_decay,
            "max_iter": max_iter, "iterations": n_iter, "standardize": standardize,
            "precondition": precondition, "fit_time_s": time.perf_counter() - t0}


WEIGHT_DECAY_GRID: tuple[float, ...] = (
    1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1
)
"""The weight decays ``weight_decay="auto"`` tries: half-decade steps from 1e-6 to 0.1."""


def select_weight_decay(train_features: np.ndarray | Tensor, train_labels: np.ndarray | Tensor,
                        *, grid: Sequence[float] = WEIGHT_DECAY_GRID, val_fraction: float = 0.1,
                        seed: int = 0, num_classes: int | None = None, max_iter: int = 300,
                        device: str | torch.device | None = "cpu") -> dict[str, Any]:
    """The linear probe's weight decay, chosen on training features alone.

    ``val_fraction`` of each class's rows is held out (:func:`held_out_rows` with ``seed``);
    :func:`linear_eval` is fit on the other rows with each value of ``grid`` and scored on the
    held-out ones. The best top-1 wins, ties going to the larger decay. Returns
    ``weight_decay`` (the choice), ``grid``, ``val_top1`` (one score per value, in grid order),
    ``val_fraction``, ``seed`` and ``n_val``. No test data is involved.
    """
    values = [float(v) for v in grid]
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"grid must hold weight decays >= 0, got {list(grid)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    x, y = _split(train_features, train_labels, "train")
    c = _num_classes(y, num_classes=num_classes)
    val = torch.from_numpy(held_out_rows(y.numpy(), val_fraction, seed))
    if not val.numel():
        raise ValueError(
            f"no training row can be held out to choose the weight decay: each of the "
            f"{y.numel()} rows is its class's only one; give at least 2 rows of a class"
        )
    fit = torch.ones(y.numel(), dtype=torch.bool)
    fit[val] = False
    scores = [
        linear_eval(x[fit], y[fit], x[val], y[val], num_classes=c, weight_decay=wd,
                    max_iter=max_iter, device=device)["top1"]
        for wd in values
    ]
    best = max(range(len(values)), key=lambda i: (scores[i], values[i]))
    return {"weight_decay": values[best], "grid": values, "val_top1": scores,
            "val_fraction": float(val_fraction), "seed": int(seed), "n_val": int(val.numel())}


def held_out_rows(labels: np.ndarray | Sequence[int], fraction: float,
                  seed: int = 0) -> np.ndarray:
    """Sorted indices of a stratified ``fraction`` of the rows: ``round(fraction * n_c)`` of
    each class of ``n_c`` rows, at least 1 and at most ``n_c - 1`` (a class of one row keeps
    it), drawn like :func:`balanced_subset` (``numpy.random.default_rng(seed)``, classes in
    sorted order), so that on balanced labels the two draw the same rows."""
    y = np.asarray(labels)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    return _draw_per_class(
        y, np.unique(y), lambda n: min(max(int(round(fraction * n)), 1), n - 1), seed
    )


def _draw_per_class(y: np.ndarray, classes: np.ndarray, count: Callable[[int], int], seed: int,
                    allowed: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of ``count(n)`` rows of each class in ``classes`` (``n``: its rows in
    ``allowed``, all by default), drawn without replacement by
    ``numpy.random.default_rng(seed)``, classes in sorted order."""
    rng = np.random.default_rng(seed)
    picked = [np.zeros(0, dtype=np.int64)]
    for c in classes:
        idx = np.flatnonzero(y == c if allowed is None else (y == c) & allowed)
        picked.append(rng.permutation(idx)[:count(idx.size)])
    return np.sort(np.concatenate(picked)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Labelled subsets and fine-tuning
# --------------------------------------------------------------------------------------------


def balanced_subset(labels: np.ndarray | Sequence[int], fraction: float, seed: int = 0, *,
                    exclude: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
    """Sorted indices of a class-balanced subset of ``fraction`` of the labels.

    Every class gets ``max(1, round(fraction * N / C))`` samples (fewer when it has fewer),
    drawn without replacement by ``numpy.random.default_rng(seed)``, classes in sorted order:
    the same seed always gives the same subset. Indices in ``exclude`` are never drawn.
    """
    y = np.asarray(labels)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if y.ndim != 1 or y.size == 0:
        raise ValueError("labels must be a non-empty 1-D array")
    if fraction == 1.0 and exclude is None:
        return np.arange(y.size)
    classes = np.unique(y)
    per_class = max(1, int(round(fraction * y.size / classes.size)))
    allowed = np.ones(y.size, dtype=bool)
    if exclude is not None:
        allowed[np.asarray(exclude, dtype=np.int64)] = False
    return _draw_per_class(y, classes, lambda n: per_class, seed, allowed)


class _Classifier(nn.Module):
    def __init__(self, encoder: CARLModel, num_classes: int, layer: str) -> None:
        super().__init__()
        self.encoder, self.layer = encoder, layer
        dim = encoder.num_features if layer == "backbone" else encoder.model_config.proj_dim
        self.fc = nn.Linear(dim, num_classes)

    def trainable(self) -> list[nn.Parameter]:
        mods: list[nn.Module] = [self.encoder.backbone, self.fc]
        if self.layer == "projection":
            mods.append(self.encoder.head)
        return [p for m in mods for p in m.parameters()]

    def forward(self, x: Tensor) -> Tensor:
        f = self.encoder.forward_features(x)
        if self.layer == "projection":
            f = self.encoder.forward_head(f)
        return self.fc(f)


def _flip(x: Tensor, generator: torch.Generator) -> Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def finetune_steps(n: int, batch_size: int) -> int:
    """Batches per fine-tuning epoch over ``n`` images: ceil(n / batch_size) near-equal ones,
    so every image is used and none exceeds ``batch_size`` (the memory it was chosen for),
    nor falls below half of it; but never a batch of one image (BatchNorm needs two)."""
    return max(1, min(-(-n // batch_size), n // 2))


def finetune_classifier(model: CARLModel, images: np.ndarray, labels: np.ndarray, *,
                        num_classes: int, mean: Sequence[float], std: Sequence[float],
                        size: int, layer: str = "backbone", epochs: int = 30,
                        batch_size: int = 256, lr: float = 0.05, momentum: float = 0.9,
                        weight_decay: float = 5e-4, augment: str = "crop_flip",
                        crop_scale: tuple[float, float] = (0.2, 1.0), seed: int = 0,
                        device: str | torch.device | None = None) -> nn.Module:
    """Fine-tune a copy of ``model`` plus a linear head; returns the classifier (eval mode).

    SGD with Nesterov momentum, cosine lr decay per step, no decay on norms and biases.
    ``augment``: ``"crop_flip"`` (BatchAugment random resized crop + flip, colour ops off),
    ``"flip"`` or ``"none"``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 2:
        raise ProbeError(f"fine-tuning needs batches of at least 2 images (BatchNorm), got "
                         f"batch_size={batch_size}")
    if augment not in ("crop_flip", "flip", "none"):
        raise ValueError(f"augment={augment!r}: expected crop_flip, flip or none")
    if layer not in LAYERS:
        raise ValueError(f"layer={layer!r}: expected one of {list(LAYERS)}")
    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[]):  # seeds the head's init, not the caller's RNG
        torch.default_generator.manual_seed(seed)
        clf = _Classifier(copy.deepcopy(model).float(), num_classes, layer).to(dev)
    opt = torch.optim.SGD(decay_groups(clf.trainable(), weight_decay), lr=lr, momentum=momentum,
                          nesterov=momentum > 0)
    aug = BatchAugment(AugmentConfig(crop_scale=crop_scale, jitter_p=0.0, grayscale_p=0.0,
                                     blur_p=0.0, mean=tuple(mean), std=tuple(std)), size)
    x_all = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, 3, H, W)
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    n = x_all.shape[0]
    if n < 2:
        raise ProbeError(f"fine-tuning needs at least 2 labelled images, got {n}")
    steps_per_epoch = finetune_steps(n, batch_size)
    lrs = cosine_schedule(lr, 0.0, steps_per_epoch * epochs)  # per step, down to 0
    g_cpu = torch.Generator().manual_seed(seed)
    g_dev = torch.Generator(device=dev).manual_seed(seed + 1)
    step = 0
    clf.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g_cpu)
        for idx in torch.tensor_split(perm, steps_per_epoch):
            x = x_all[idx].to(dev, non_blocking=True)
            y = y_all[idx].to(dev, non_blocking=True)
            if augment == "crop_flip":
                x = aug(x, generator=g_dev)
            else:
                x = normalize_uint8(x, mean, std, size)
                if augment == "flip":
                    x = _flip(x, g_dev)
            for group in opt.param_groups:
                group["lr"] = float(lrs[step])
            loss = F.cross_entropy(clf(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"fine-tuning diverged (loss {float(loss.detach())}); "
                                     "lower lr")
    return clf.eval()


# What a fine-tuning result records as its settings: finetune_classifier's own defaults.
FINETUNE_DEFAULTS: dict[str, Any] = {
    "optimizer": "sgd_nesterov",
    **{
        key: inspect.signature(finetune_classifier).parameters[key].default
        for key in ("lr", "momentum", "weight_decay", "augment", "crop_scale")
    },
}


@torch.no_grad()
def _classify(clf: nn.Module, images: np.ndarray, *, mean: Sequence[float],
              std: Sequence[float], size: int, batch_size: int, device: torch.device) -> Tensor:
    clf.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = torch.from_numpy(images[start:start + batch_size]).to(device).permute(0, 3, 1, 2)
        out.append(clf(normalize_uint8(x, mean, std, size)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 1)


def semi_supervised_eval(model: CARLModel, train_images: np.ndarray, train_labels: np.ndarray,
                         test_images: np.ndarray, test_labels: np.ndarray, *, fraction: float,
                         mean: Sequence[float], std: Sequence[float], size: int,
                         num_classes: int | None = None, seed: int = 0,
                         epochs: int | None = None, batch_size: int = 256,
                         device: str | torch.device | None = None,
                         **finetune_kwargs: Any) -> dict[str, Any]:
    """Fine-tune on a class-balanced ``fraction`` of the train labels, test on the test split.

    The result holds top-1/top-5, the settings and the ``subset_indices`` used.
    """
    dev = resolve_device(device)
    ytr, yte = np.asarray(train_labels, np.int64), np.asarray(test_labels, np.int64)
    c = _num_classes(torch.from_numpy(ytr), torch.from_numpy(yte), num_classes=num_classes)
    idx = balanced_subset(ytr, fraction, seed)
    if epochs is None:
        semi1 = fraction <= SEMI_FRACTIONS["semi1"]
        epochs = DEFAULT_EPOCHS["semi1"] if semi1 else DEFAULT_EPOCHS["semi10"]
    t0 = time.perf_counter()
    clf = finetune_classifier(model, train_images[idx], ytr[idx], num_classes=c, mean=mean,
                              std=std, size=size, epochs=epochs, batch_size=batch_size,
                              seed=seed, device=dev, **finetune_kwargs)
    fit = time.perf_counter() - t0
    scores = _classify(clf, test_images, mean=mean, std=std, size=size, batch_size=batch_size,
                       device=dev)
    acc = topk_accuracy(scores, torch.from_numpy(yte))
    settings = {**FINETUNE_DEFAULTS, "fraction": fraction, "epochs": epochs,
                "batch_size": batch_size, "seed": seed,
                **{k: _jsonable(v) for k, v in finetune_kwargs.items()}}
    return {**acc, "n_labelled": int(len(idx)), "fit_time_s": fit, "settings": settings,
            "subset_indices": idx.tolist()}


def finetune_eval(model: CARLModel, train_images: np.ndarray, train_labels: np.ndarray,
                  test_images: np.ndarray, test_labels: np.ndarray, **kwargs: Any
                  ) -> dict[str, Any]:
    """Full fine-tuning: :func:`semi_supervised_eval` on 100% of the labels (30 epochs)."""
    kwargs.setdefault("epochs", DEFAULT_EPOCHS["finetune"])
    res = semi_supervised_eval(model, train_images, train_labels, test_images, test_labels,
                               fraction=1.0, **kwargs)
    res.pop("subset_indices")
    return res


# --------------------------------------------------------------------------------------------
# Clustering of prototype assignments
# --------------------------------------------------------------------------------------------


def cluster_metrics(assignments: np.ndarray | Sequence[int], labels: np.ndarray | Sequence[int],
                    *, num_prototypes: int | None = None) -> dict[str, Any]:
    """NMI, ARI, Hungarian cluster accuracy and purity of ``assignments`` against ``labels``.

    ``acc`` matches clusters to classes one-to-one (scipy ``linear_sum_assignment``), so with
    more prototypes than classes the unmatched clusters count as errors; ``purity`` maps each
    cluster to its majority class. Accuracies are in percent.
    """
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    a, y = np.asarray(assignments, np.int64), np.asarray(labels, np.int64)
    if a.shape != y.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"assignments {a.shape} and labels {y.shape} must be equal 1-D shapes")
    _, a_idx = np.unique(a, return_inverse=True)
    _, y_idx = np.unique(y, return_inverse=True)
    table = np.zeros((a_idx.max() + 1, y_idx.max() + 1), dtype=np.int64)
    np.add.at(table, (a_idx, y_idx), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    res = {
        "nmi": float(normalized_mutual_info_score(y, a)),
        "ari": float(adjusted_rand_score(y, a)),
        "acc": 100.0 * float(table[rows, cols].sum()) / a.size,
        "purity": 100.0 * float(table.max(axis=1).sum()) / a.size,
        "prototypes_used": int(table.shape[0]),
    }
    if num_prototypes is not None:
        res["num_prototypes"] = int(num_prototypes)
    return res


def cluster_eval(model: CARLModel, images: np.ndarray, labels: np.ndarray, *,
                 mean: Sequence[float], std: Sequence[float], size: int | None = None,
                 batch_size: int = 256, device: str | torch.device | None = None,
                 cache_dir: str | Path | None = None, cache_tag: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """:func:`cluster_metrics` of the argmax of the prototype logits over ``images``, and
    the :func:`assignment_stats` of their softmax."""
    logits = compute_features(model, images, mean=mean, std=std, size=size, layer="logits",
                              batch_size=batch_size, device=device, cache_dir=cache_dir,
                              cache_tag=cache_tag)
    metrics = cluster_metrics(logits.argmax(dim=1).numpy(), labels,
                              num_prototypes=logits.shape[1])
    return {**metrics, **assignment_stats(logits)}


def assignment_stats(logits: Tensor) -> dict[str, float]:
    """How confidently and how informatively (N, K) prototype logits assign N images, in the
    terms training logs: ``assignment_entropy`` mean H(p_i) in nats (0: every image on one
    prototype with certainty), ``effective_prototypes`` exp(H(pbar)) of the mean assignment,
    ``argmax_effective_prototypes`` exp(H) of the argmax histogram, and
    ``assignment_information`` H(pbar) - mean H(p_i), the information the assignment carries
    about the image (0 when every image gets the same assignment)."""
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"expected (N, K) logits with N >= 1, got shape {tuple(logits.shape)}")
    log_p = torch.log_softmax(logits.double(), dim=1)
    entropy = float(mean_entropy(log_p))
    eff = effective_prototypes(log_p.exp().mean(dim=0))
    counts = torch.bincount(logits.argmax(dim=1), minlength=logits.shape[1])
    return {  # as train() computes them for each epoch
        "assignment_entropy": entropy,
        "effective_prototypes": eff,
        "argmax_effective_prototypes": effective_prototypes(counts),
        "assignment_information": assignment_information(eff, entropy),
    }


# --------------------------------------------------------------------------------------------
# One probe end to end (what `carlzoo probe` runs)
# --------------------------------------------------------------------------------------------


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "to_dict"):
        return _jsonable(v.to_dict())
    if hasattr(v, "__dataclass_fields__"):
        import dataclasses

        return _jsonable(dataclasses.asdict(v))
    return str(v)


def _load_labelled(dataset: str, root: str | Path, split: str, *, download: bool,
                   image_size: int | None) -> Any:
    from carlzoo.training.datasets import load_split

    data = load_split(dataset, root, split, download=download, image_size=image_size)
    if len(data.images) == 0:
        raise ProbeError(f"{dataset}: the {split} split of {root} holds no images")
    if data.labels is None:
        raise ProbeError(f"{dataset}: the {split} split has no labels; the probe protocols "
                         "need a labelled dataset")
    return data


def _check_size(pm: ProbeModel, dataset: str, data: Any) -> np.ndarray:
    h, w = data.images.shape[1:3]
    if (h, w) == (pm.input_size, pm.input_size):
        return data.images
    raise ProbeError(f"model {pm.name} expects {pm.input_size} px inputs but {dataset} "
                     f"images are {h}x{w} px; pass --resize (resize=True) to resize them "
                     f"to {pm.input_size} px")


def _cross_domain(pm: ProbeModel, dataset: str, data_root: str | Path) -> bool | None:
    """Whether the probe data differ from the training data; None when that is unknown.

    Generic loaders (npz, imagefolder, folder) are the same dataset only at the same path,
    or in a file of the same bytes;
    a run's relative ``data.root`` (recorded before runs recorded absolute ones) names a path
    from a folder that is not known, so it answers None. A generic loader on one side only
    answers None too: an .npz may hold CIFAR-10 itself.
    """
    generic = ("npz", *FOLDER_DATASETS)
    if pm.train_dataset is None:
        return None
    if pm.train_dataset != dataset:
        return None if pm.train_dataset in generic or dataset in generic else True
    if dataset in generic:
        if pm.train_data_root is None:
            return None
        if not Path(pm.train_data_root).expanduser().is_absolute():
            return None
        trained, probed = Path(pm.train_data_root).resolve(), Path(data_root).resolve()
        if trained == probed:
            return False
        if trained.is_file() and probed.is_file():  # a copy of the .npz is the same data
            return not _same_bytes(trained, probed)
        return True
    return False


def _same_bytes(a: Path, b: Path) -> bool:
    from carlzoo.registry import sha256_file

    return a.stat().st_size == b.stat().st_size and sha256_file(a) == sha256_file(b)


def run_probe(model: str | Path | ProbeModel, dataset: str, data_root: str | Path,
              protocol: str, *, layer: str = "backbone", k: int = 200, t: float = 0.1,
              epochs: int | None = None, seed: int = 0, batch_size: int = 256,
              device: str | torch.device | None = None, cache_dir: str | Path | None = None,
              resize: bool = False, download: bool = False,
              weight_decay: float | str = 1e-4) -> dict[str, Any]:
    """Run one protocol of one model on one dataset; returns the JSON-able result.

    ``weight_decay`` is the linear probe's (a number, or ``"auto"``: chosen by
    :func:`select_weight_decay` with ``seed``, its scores kept in the result's settings).
    """
    if protocol not in PROTOCOLS:
        raise ProbeError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    if weight_decay != "auto" and (
        isinstance(weight_decay, (str, bool)) or not math.isfinite(weight_decay)
        or weight_decay < 0
    ):
        raise ProbeError(f"weight_decay={weight_decay!r}: expected a number >= 0 or 'auto'")
    if layer not in LAYERS:
        raise ProbeError(f"unknown layer {layer!r}; valid: {', '.join(LAYERS)}")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    pm = load_probe_model(model)
    # The dataset readers resize (shorter side, then a centre crop) when given a size; folders
    # of images always need one.
    size_arg = pm.input_size if resize or dataset in FOLDER_DATASETS else None
    if size_arg is not None and ((pm.resize_size or pm.input_size) != pm.input_size
                                 or pm.interpolation != "bicubic"):
        raise ProbeError(
            f"model {pm.name} preprocesses with resize_size {pm.resize_size} and "
            f"{pm.interpolation} interpolation; the probe resizes only as carlzoo's models do "
            f"(shorter side to {pm.input_size} px, bicubic, centre crop): give it the images "
            f"at {pm.input_size}x{pm.input_size} px"
        )
    test = _load_labelled(dataset, data_root, "test", download=download, image_size=size_arg)
    test_x = _check_size(pm, dataset, test)
    train = None
    if protocol != "cluster":
        train = _load_labelled(dataset, data_root, "train", download=download,
                               image_size=size_arg)
    train_x = _check_size(pm, dataset, train) if train is not None else None
    n_classes = max(int(test.labels.max()) + 1,
                    int(train.labels.max()) + 1 if train is not None else 0,
                    len(test.classes) if test.classes else 0)
    pre = {"mean": pm.mean, "std": pm.std, "size": pm.input_size}
    tag = {"model": pm.name, "dataset": dataset}
    feat_kw = dict(pre, batch_size=batch_size, device=dev, cache_dir=cache_dir)
    settings: dict[str, Any] = {"layer": layer, "seed": seed, "batch_size": batch_size,
                                "device": str(dev), "resize": resize}
    result: dict[str, Any]
    if protocol == "cluster":
        result = cluster_eval(pm.model, test_x, test.labels, cache_tag={**tag, "split": "test"},
                              **feat_kw)
        settings.pop("layer")
    elif protocol in ("knn", "linear"):
        ftr = compute_features(pm.model, train_x, layer=layer,
                               cache_tag={**tag, "split": "train"}, **feat_kw)
        fte = compute_features(pm.model, test_x, layer=layer,
                               cache_tag={**tag, "split": "test"}, **feat_kw)
        if protocol == "knn":
            result = knn_eval(ftr, train.labels, fte, test.labels, k=k, t=t,
                              num_classes=n_classes, device=dev)
            settings.update(k=result.pop("k"), k_used=result.pop("k_used"), t=result.pop("t"))
        else:
            selection = None
            if weight_decay == "auto":
                selection = select_weight_decay(ftr, train.labels, seed=seed,
                                                num_classes=n_classes, device=dev)
            wd = selection.pop("weight_decay") if selection else float(weight_decay)
            result = linear_eval(ftr, train.labels, fte, test.labels, num_classes=n_classes,
                                 weight_decay=wd, device=dev)
            settings.update({key: result.pop(key) for key in
                             ("weight_decay", "max_iter", "standardize", "precondition")})
            if selection:
                settings["weight_decay_selection"] = selection
            settings["classifier"] = "softmax regression, full-batch L-BFGS"
    else:
        kw = dict(pre, num_classes=n_classes, seed=seed, batch_size=batch_size, device=dev,
                  layer=layer, epochs=epochs if epochs is not None else DEFAULT_EPOCHS[protocol])
        if protocol == "finetune":
            result = finetune_eval(pm.model, train_x, train.labels, test_x, test.labels, **kw)
        else:
            result = semi_supervised_eval(pm.model, train_x, train.labels, test_x, test.labels,
                                          fraction=SEMI_FRACTIONS[protocol], **kw)
        settings.update(result.pop("settings"))
    from carlzoo import __version__

    out: dict[str, Any] = {
        "protocol": protocol,
        "dataset": dataset,
        "model": pm.name,
        "model_source": pm.source,
        "model_train_dataset": pm.train_dataset,
        # The checkpoint measured (runs only): an export attaches the result to it alone.
        "model_epoch": pm.info.get("epoch"),
        "model_step": pm.info.get("step"),
        "probe_dataset": dataset,
        "cross_domain": _cross_domain(pm, dataset, data_root),
        **result,
        "n_train": 0 if train is None else int(len(train.labels)),
        "n_test": int(len(test.labels)),
        "num_classes": n_classes,
        "input_size": pm.input_size,
        "image_size": int(test.images.shape[1]),
        "settings": settings,
        "time_s": time.perf_counter() - t0,
        "carlzoo_version": __version__,
    }
    if "subset_indices" in out:  # keep the long list last in the JSON
        out["subset_indices"] = out.pop("subset_indices")
    return _jsonable(out)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    """Write ``result`` as indented JSON through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2) + "\n"
    atomic_write_text(path, text)
