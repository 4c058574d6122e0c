"""The CARL training loop: data, model, loss, optimiser, schedules, resume, loop.

Runs unchanged on one CPU process, one GPU, or N processes under torchrun (DDP).
Everything a step needs is on the device; metrics are reduced to Python numbers only
once per logging interval and once per epoch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from carlzoo.model import CARLModel, build_model
from carlzoo.outputs import atomic_write_text, existing_ancestor
from carlzoo.training import dist
from carlzoo.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from carlzoo.training.config import TrainConfig, config_to_dict, flat_config, save_config
from carlzoo.training.data import DataLoaderPipeline, DevicePipeline
from carlzoo.training.datasets import FOLDER_DATASETS, ImageArrays, load_split
from carlzoo.training.dist import resolve_device
from carlzoo.training.features import extract_features
from carlzoo.training.knn import knn_accuracy
from carlzoo.training.loss import CARLLoss, LossTerms, kl_weight
from carlzoo.training.run import read_metrics

__all__ = [
    "train",
    "RESUME_MAY_CHANGE",
    "resume_mismatch",
    "CollapseError",
    "cosine_schedule",
    "build_optimizer",
    "load_optimizer_state",
    "resolve_device",
    "effective_prototypes",
    "unwrap",
    "knn_bank",
    "knn_monitor",
]

log = logging.getLogger("carlzoo.train")


class CollapseError(RuntimeError):
    """Training stopped because the prototype assignment collapsed."""


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0
) -> np.ndarray:
    """Per-step values: linear warm-up from 0 to ``base``, then cosine down to ``final``."""
    warmup = np.linspace(0.0, base, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    n = max(total_steps - warmup_steps, 0)
    t = np.arange(n) / max(n, 1)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t))
    return np.concatenate([warmup, cosine])


def decay_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Optimiser groups: ``weight_decay`` on weights, none on norms and biases (1-d tensors)."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """SGD with momentum, LARS or AdamW; no weight decay (and no LARS adaptation) on norms and
    biases. AdamW takes ``optim.momentum`` as beta1 (0.9 by default, Adam's own) and 0.999
    as beta2."""
    o = cfg.optim
    groups = decay_groups(model.parameters(), o.weight_decay)
    if o.optimizer == "lars":
        # timm's LARS adapts only groups with weight decay (always_adapt=False), which
        # excludes norms and biases as in SimCLR / BYOL.
        from timm.optim import Lars

        return Lars(groups, lr=o.lr, momentum=o.momentum, trust_coeff=o.lars_eta)
    fused = device.type == "cuda"
    flags = {"fused": fused, "foreach": None if fused else True}
    if o.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.momentum, 0.999), **flags)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, **flags)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a checkpoint's optimizer state into this run's optimizer, as this machine needs it.

    ``Optimizer.load_state_dict`` takes the implementation flags (``fused``, ``foreach``) of the
    machine that saved the state, and leaves its tensors contiguous as checkpoints store them.
    The state is loaded with this run's flags instead, so torch itself places AdamW's step
    counts where this run's kernels read them (float32 beside the parameter for fused ones),
    and each state tensor gets its parameter's memory layout (channels_last conv weights):
    CUDA's fused SGD refuses tensors of unequal strides, and the CPU's computes wrong updates
    with them.
    """
    flags = {k: optimizer.defaults[k] for k in ("fused", "foreach") if k in optimizer.defaults}
    groups = [{**group, **flags} for group in state["param_groups"]]
    optimizer.load_state_dict({**state, "param_groups": groups})
    for group in optimizer.param_groups:
        for p in group["params"]:
            slots = optimizer.state.get(p, {})
            for key, value in slots.items():
                if (
                    isinstance(value, Tensor)
                    and value.shape == p.shape
                    and value.stride() != p.stride()
                ):
                    slots[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def unwrap(model: nn.Module) -> CARLModel:
    """The CARLModel inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model  # type: ignore[return-value]


def describe_hardware(device: torch.device, world: int) -> str:
    """E.g. "1 x NVIDIA H100 80GB HBM3" or "1 x CPU (2 cores, x86_64)", for the model card."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    return f"{world} x {name}"


def effective_prototypes(mean_p: Tensor) -> float:
    """exp(H) of a distribution over the K prototypes (a mean assignment pbar, or counts,
    normalised here): 1 when every image sits on one prototype, K when use is uniform."""
    p = mean_p.double().clamp_min(1e-12)
    p = p / p.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def assignment_information(effective: float, entropy: float) -> float:
    """I = H(pbar) - mean H(p_i) in nats from ``effective`` = exp(H(pbar)) and ``entropy`` =
    mean H(p_i): what the assignments tell about the image (0 when all are the same)."""
    return max(math.log(effective) - entropy, 0.0)


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: CARLLoss,
    xa: Tensor,
    xb: Tensor,
    lam: float,
    amp: bool,
) -> tuple[LossTerms, Tensor]:
    """One CARL step on two views: forward both as one batch, eq. 7, backward, update.

    Returns the loss terms and the (2B, K) logits, all still on the device (no sync).
    """
    with torch.autocast(xa.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(torch.cat([xa, xb])).logits  # (2B, K)
    logits_a, logits_b = logits.float().chunk(2)
    terms = criterion(logits_a, logits_b, lam)
    optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    optimizer.step()
    return terms, logits


def _load_data(
    cfg: TrainConfig, splits: Mapping[str, ImageArrays] | None = None
) -> tuple[ImageArrays, ImageArrays | None, ImageArrays | None, bool]:
    """(pre-training images, the kNN monitor's bank and test split or None, whether the bank
    is a subset of the labelled train split: ``knn_max_train`` below its size)."""
    d = cfg.data
    size = d.image_size if d.dataset in FOLDER_DATASETS else None
    loaded = dict(splits or {})

    def split(name: str) -> ImageArrays:
        if name not in loaded:
            download = d.download and name == "pretrain"
            loaded[name] = load_split(d.dataset, d.root, name, download=download, image_size=size)
        return loaded[name]

    full = split("pretrain")
    pretrain = full
    if d.subset:
        pretrain = ImageArrays(
            full.images[: d.subset],
            None if full.labels is None else full.labels[: d.subset],
            full.classes,
        )
    train_l = test = None
    capped = False
    if cfg.knn_every and d.dataset != "folder":
        # A labelled pre-training pool is the train split itself (every dataset but STL-10,
        # whose pool adds the unlabeled images): reuse it rather than read it twice.
        if full.labels is not None:
            train_l = full
        else:
            train_l = split("train")
        test = split("test")
        if train_l.labels is None or test.labels is None:
            train_l = test = None
        else:
            pool = len(train_l)
            train_l = knn_bank(train_l, cfg.knn_max_train)
            capped = len(train_l) < pool
    return pretrain, train_l, test, capped


def knn_bank(train_l: ImageArrays, max_train: int) -> ImageArrays:
    """The kNN monitor's memory bank: ``train_l``, or a fixed random subset of ``max_train``
    of its images (seed 0, in their order) when it holds more."""
    if len(train_l) <= max_train:
        return train_l
    idx = np.sort(np.random.default_rng(0).permutation(len(train_l))[:max_train])
    return ImageArrays(train_l.images[idx], train_l.labels[idx], train_l.classes)


def knn_monitor(
    model: CARLModel,
    cfg: TrainConfig,
    train_l: ImageArrays,
    test: ImageArrays,
    device: torch.device,
) -> dict[str, float]:
    """The kNN top-1 / top-5 the training loop logs: ``test`` classified by its neighbours
    in ``train_l`` (the bank, see :func:`knn_bank`) with ``cfg.knn_k`` and ``cfg.knn_t``."""
    kw = dict(
        mean=cfg.augment.mean,
        std=cfg.augment.std,
        size=cfg.data.image_size,
        device=device,
        channels_last=cfg.channels_last,
        amp=cfg.precision == "bf16",
    )
    f_train = extract_features(model, train_l.images, **kw)
    f_test = extract_features(model, test.images, **kw)
    acc = knn_accuracy(
        f_train,
        torch.from_numpy(train_l.labels),
        f_test,
        torch.from_numpy(test.labels),
        k=cfg.knn_k,
        t=cfg.knn_t,
        device=device,
    )
    return {"knn_top1": acc["top1"], "knn_top5": acc["top5"]}


def _check_start(
    cfg: TrainConfig, out_dir: Path, last_path: Path, resume: bool, device: torch.device
) -> None:
    """Refuse a run that cannot start as asked: before its data is read or anything written
    (of a checkpoint to resume, only the header is read)."""
    world = dist.world_size()
    if cfg.optim.batch_size % world:
        raise ValueError(
            f"optim.batch_size={cfg.optim.batch_size} is not divisible by the {world} processes"
        )
    if cfg.sync_bn and world > 1 and device.type != "cuda":
        raise ValueError(
            "sync_bn=true needs CUDA devices (PyTorch's SyncBatchNorm has no "
            "CPU kernel); use --set sync_bn=false on CPU processes"
        )
    if dist.is_main_process():
        _check_out_dir(out_dir)
        if not resume and last_path.exists():
            raise FileExistsError(
                f"{out_dir} already holds a run (checkpoints/last.safetensors);"
                " pass --resume to continue it or choose another --out"
            )
    saved = read_checkpoint_meta(last_path) if resume and last_path.exists() else None
    if resume and world > 1:
        _check_ranks_resume_alike(saved, out_dir, device)
    if saved is not None:
        changed = resume_mismatch(saved.get("config", {}), cfg)
        if changed:
            more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            raise ValueError(
                f"--resume: the run in {out_dir} was trained with other settings: "
                f"{', '.join(changed[:4])}{more}; resume it with its own "
                f"(--config {out_dir / 'config.yaml'}) or choose another --out"
            )


def _check_out_dir(out_dir: Path) -> None:
    """ValueError (one line) unless ``out_dir`` is a folder, or one can be made there, that
    takes files: checked before the data is read, without creating anything."""
    hint = "choose another --out"
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder; {hint}")
    parent = existing_ancestor(out_dir)  # where the run's folders go
    if not parent.is_dir():
        raise ValueError(
            f"--out {out_dir} cannot be created: {parent} is a file, not a folder; {hint}"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out_dir} cannot be written: {parent} is not writable; {hint}")


def _check_ranks_resume_alike(
    saved: Mapping[str, Any] | None, out_dir: Path, device: torch.device
) -> None:
    """Every process must resume from the same checkpoint: nodes that read different copies
    of the run folder (or none) would train with different schedules until one of them
    stops and the others hang in a collective."""
    mine = (-1, -1) if saved is None else (int(saved.get("epoch", -1)), int(saved.get("step", -1)))
    lo, hi = dist.all_reduce_min_max(torch.tensor(mine, device=device, dtype=torch.int64))
    if not torch.equal(lo, hi):
        def seen(epoch: int) -> str:
            return "no checkpoint" if epoch < 0 else f"epoch {epoch}"

        raise ValueError(
            f"--resume: the processes see different checkpoints in {out_dir / 'checkpoints'} "
            f"(from {seen(int(lo[0]))} to {seen(int(hi[0]))}); every node must read the same "
            "run folder: put --out on a filesystem all nodes share, or copy it to each node"
        )


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Keep one line per epoch up to ``last_epoch`` (later ones were lost with the process)."""
    if not path.is_file():
        return
    text = "".join(json.dumps(r) + "\n" for r in read_metrics(path, last_epoch))
    if text != path.read_text():
        atomic_write_text(path, text)


def _collapse_streak(path: Path, last_epoch: int, cfg: TrainConfig, device: torch.device) -> int:
    """Epochs in a row up to ``last_epoch`` whose effective number of prototypes was below
    ``cfg.collapse_floor``, from rank 0's metrics.jsonl, the same on every process."""
    count = 0
    if last_epoch > 0 and dist.is_main_process():
        for rec in reversed(read_metrics(path, last_epoch)):
            eff = rec.get("effective_prototypes")
            if not isinstance(eff, (int, float)) or eff >= cfg.collapse_floor:
                break
            count += 1
    if dist.world_size() > 1:
        total = dist.all_reduce_sum(torch.tensor(float(count), device=device))
        count = int(total.item())
    return count


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _collapse_message(eff: float, cfg: TrainConfig, epochs: int) -> str:
    m = cfg.model
    logits = (
        ""
        if (m.logits, m.temperature) == ("cosine", 0.1)
        else " use model.logits=cosine with model.temperature 0.1,"
    )
    return (
        f"training stopped: the prototype assignment collapsed (effective number of "
        f"prototypes {eff:.2f} < collapse_floor {cfg.collapse_floor} for {epochs} epochs). "
        f"Fixes: raise loss.kl_start / loss.kl_end,{logits} or lower optim.lr "
        f"(now {cfg.optim.lr})."
    )


def _diffuse(record: Mapping[str, Any], cfg: TrainConfig) -> bool:
    """Whether the assignments tell the images apart by fewer than ``collapse_floor``
    prototypes, exp(I) with I = H(pbar) - mean H(p_i) the information they carry about the
    image, while the mean assignment pbar spreads over more: each image then gets nearly the
    same spread-out assignment. The collapse guard (on pbar) does not see it, yet the images
    are told apart no better than in a collapse (:func:`_diffuse_message` names the causes)."""
    floor = cfg.collapse_floor
    return (
        record["effective_prototypes"] >= floor
        and math.exp(record["assignment_information"]) < floor
    )


def _diffuse_message(record: Mapping[str, Any], cfg: TrainConfig, epochs: int) -> str:
    """The warning for :func:`_diffuse` epochs, with the fix its cause calls for. With the mean
    assignment spread over at least half the prototypes the uniform prior is met, and it is
    the prototypes a batch's views cannot fill (measured: K = 1,024 and 2,048 at 1,024 views);
    with the mean shrunk onto a few of them the prior has lost its hold (measured: K = 100 with
    its weight decayed to 0.5, the mean on 7 prototypes and every argmax on one)."""
    k = cfg.model.num_prototypes
    spread = record["effective_prototypes"]
    if spread >= k / 2:
        fix = (
            f"use fewer prototypes (model.num_prototypes={k}, against "
            f"{2 * cfg.optim.batch_size} views per batch)"
        )
    else:
        fix = (
            f"raise the uniform prior's weight (loss.kl_start {cfg.loss.kl_start:g}, "
            f"loss.kl_end {cfg.loss.kl_end:g}; lambda {record['kl_weight']:.2f} now): the mean "
            f"assignment has shrunk onto {spread:.0f} of {k} prototypes"
        )
    return (
        f"epoch {record['epoch']}: the assignments tell the images apart by "
        f"{math.exp(record['assignment_information']):.2f} effective prototypes "
        f"(< collapse_floor {cfg.collapse_floor} for {epochs} epochs; by argmax "
        f"{record['argmax_effective_prototypes']:.1f}) while their mean spreads over "
        f"{spread:.0f}: every image gets nearly the same spread-out assignment. Training goes "
        f"on; if it stays so, {fix}"
    )


# What a resumed run may change: where and how it runs, what it logs and monitors, how often
# it saves. Every other setting defines what is trained and must match the checkpoint's.
RESUME_MAY_CHANGE = frozenset(
    {
        "device",
        "precision",
        "channels_last",
        "compile",
        "compile_augment",
        "sync_bn",
        "checkpoint_every",
        "save_every",
        "log_every",
        "knn_every",
        "knn_k",
        "knn_t",
        "knn_max_train",
        "collapse_floor",
        "collapse_patience",
        "data.root",
        "data.download",
        "data.workers",
        "data.device_budget_gb",
        "data.pipeline",
    }
)


def resume_mismatch(saved: Mapping[str, Any], cfg: TrainConfig) -> list[str]:
    """``"key (saved -> now)"`` for each setting outside :data:`RESUME_MAY_CHANGE` where
    ``cfg`` differs from ``saved``, a checkpoint's config (keys only one side knows, from
    another carlzoo version, are not compared)."""
    old, new = flat_config(saved), flat_config(config_to_dict(cfg))
    return [
        f"{key} ({old[key]!r} -> {new[key]!r})"
        for key in sorted(old.keys() & new.keys())
        if key not in RESUME_MAY_CHANGE and old[key] != new[key]
    ]


def _cuda_math_flags() -> tuple[bool, bool, bool]:
    return (
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )


def _set_cuda_math_flags(benchmark: bool, matmul_tf32: bool, cudnn_tf32: bool) -> None:
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    torch.backends.cudnn.allow_tf32 = cudnn_tf32


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    on_epoch_end: Callable[[dict[str, Any], CARLModel], bool | None] | None = None,
    splits: Mapping[str, ImageArrays] | None = None,
) -> dict[str, Any]:
    """Train CARL as ``cfg`` says, writing config, metrics and checkpoints to ``out_dir``.

    ``stop_after`` ends the run after that many epochs in this call (a time-boxed job);
    the schedules still follow ``cfg.epochs``, so ``--resume`` continues it exactly.
    ``on_epoch_end(record, model)`` is called on every process after each epoch's metrics
    line is written, with that line (kNN fields on rank 0 only) and the unwrapped model; a
    true return value on any process ends the run there on every process, with the epoch's
    checkpoint written. ``splits`` holds splits of ``cfg.data`` the caller has already
    loaded, by :func:`load_split`'s split name (``"pretrain"``, ``"train"``, ``"test"``);
    they are used instead of reading the dataset again. Returns the last epoch's metrics.

    On CUDA the run enables cuDNN autotuning and TF32 matmuls and convolutions; the
    process's previous settings are restored when ``train`` returns or raises.
    """
    saved = _cuda_math_flags()
    try:
        return _train(cfg, out_dir, resume=resume, progress=progress, stop_after=stop_after,
                      on_epoch_end=on_epoch_end, splits=splits)
    finally:
        _set_cuda_math_flags(*saved)


def _train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool,
    progress: bool,
    stop_after: int | None,
    on_epoch_end: Callable[[dict[str, Any], CARLModel], bool | None] | None,
    splits: Mapping[str, ImageArrays] | None,
) -> dict[str, Any]:
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1 (epochs to run in this call), got {stop_after}")
    out_dir = Path(out_dir)
    if cfg.data.root:  # config.yaml records where the data were, wherever it is read from
        root = os.path.abspath(os.path.expanduser(cfg.data.root))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=root))
    # ---- distributed and device -------------------------------------------------------
    wants_cuda = cfg.device.startswith("cuda") or (
        cfg.device == "auto" and torch.cuda.is_available()
    )
    owns_process_group = not dist.is_distributed()
    dist.init_from_env("cuda" if wants_cuda else "cpu")
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        _set_cuda_math_flags(benchmark=True, matmul_tf32=True, cudnn_tf32=True)
    rank, world = dist.rank(), dist.world_size()
    main = dist.is_main_process()
    ckpt_dir = out_dir / "checkpoints"
    last_path = ckpt_dir / "last.safetensors"
    try:
        _check_start(cfg, out_dir, last_path, resume, device)
    except Exception:
        # All ranks refuse alike (but for rank 0's FileExistsError, after which torchrun
        # stops the others): close the group rather than leave it to abort at exit.
        if owns_process_group:
            dist.destroy()
        raise

    # ---- data (before the run folder is written, so bad data leaves nothing) -------------
    pretrain, train_l, test, knn_capped = _load_data(cfg, splits)
    common = dict(
        seed=cfg.seed,
        rank=rank,
        world=world,
        channels_last=cfg.channels_last,
    )
    if cfg.data.pipeline == "device":
        data = DevicePipeline(
            pretrain.images,
            cfg.augment,
            cfg.data.image_size,
            device,
            cfg.optim.batch_size,
            budget_bytes=cfg.data.device_budget_gb * 1e9,
            compile_augment=cfg.compile_augment,
            **common,
        )
    else:
        data = DataLoaderPipeline(
            pretrain.images,
            cfg.augment,
            cfg.data.image_size,
            device,
            cfg.optim.batch_size,
            workers=cfg.data.workers,
            **common,
        )
    # The pipeline holds what it needs (an accelerator's store holds its own copy): the
    # host array need not live on through the run (ImageNet 64x64: 15.7 GB per process).
    del pretrain
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    dist.barrier()
    steps_per_epoch = len(data)
    total_steps = steps_per_epoch * cfg.epochs

    # ---- model, loss, optimiser, schedules -------------------------------------------
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and world > 1:  # on CUDA devices (checked at the start)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, cfg, device)
    # Linear scaling of the peak lr with the global batch is left to the recipe: lr is
    # the value at optim.batch_size.
    lr_schedule = cosine_schedule(
        cfg.optim.lr,
        cfg.optim.min_lr,
        total_steps,
        # Rounded to steps, at least one step short of the run, so the lr reaches optim.lr.
        min(round(cfg.optim.warmup_epochs * steps_per_epoch), total_steps - 1),
    )
    criterion = CARLLoss()

    # ---- resume -----------------------------------------------------------------------
    start_epoch, step = 0, 0
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        try:
            unwrap(model).load_state_dict(ckpt.model)
            if ckpt.optimizer is not None:
                load_optimizer_state(optimizer, ckpt.optimizer)
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{last_path} does not fit this run's model or optimiser ({first}); "
                "resume it with the config it was trained with, or choose another --out"
            ) from None
        start_epoch, step = ckpt.epoch, ckpt.step
        if "torch" in ckpt.rng:
            torch.set_rng_state(ckpt.rng["torch"])
        if "cuda" in ckpt.rng and device.type == "cuda":
            torch.cuda.set_rng_state(ckpt.rng["cuda"], device)
        if main:
            _truncate_metrics(out_dir / "metrics.jsonl", start_epoch)
            log.info("resumed from %s at epoch %d, step %d", last_path, start_epoch, step)
    elif resume and main:
        log.info("--resume: no checkpoint in %s, starting from scratch", ckpt_dir)
    if start_epoch == 0 and main:
        # Lines of an earlier start that died before its first checkpoint would be read as
        # this run's epochs.
        _truncate_metrics(out_dir / "metrics.jsonl", 0)
    # Collapsed epochs in a row, up to the checkpoint: resuming must not reset the count.
    collapsed_epochs = _collapse_streak(out_dir / "metrics.jsonl", start_epoch, cfg, device)
    diffuse_epochs = 0  # epochs in a row of _diffuse assignments (warned of, not stopped)

    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        train_model = torch.compile(train_model)

    amp = cfg.precision == "bf16" and device.type == "cuda"
    hardware = describe_hardware(device, world)
    k = cfg.model.num_prototypes
    metrics_path = out_dir / "metrics.jsonl"
    last: dict[str, Any] = {}
    end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, start_epoch + stop_after)
    if start_epoch >= cfg.epochs and main:
        log.info("nothing to train: the run in %s has finished its %d epochs", out_dir, cfg.epochs)

    # ---- loop -------------------------------------------------------------------------
    for epoch in range(start_epoch, end_epoch):
        train_model.train()
        lam = kl_weight(epoch, cfg.loss.kl_start, cfg.loss.kl_end, cfg.loss.kl_decay_epochs)
        sums = torch.zeros(4, device=device, dtype=torch.float64)  # total, L_c, L_KL, H(p)
        mean_p = torch.zeros(k, device=device, dtype=torch.float64)
        usage = torch.zeros(k, device=device, dtype=torch.float64)
        n_steps = 0
        bar = None
        if progress and main:
            from tqdm import tqdm

            bar = tqdm(
                total=steps_per_epoch,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                leave=False,
                file=sys.stderr,
                dynamic_ncols=True,
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for xa, xb in data.epoch(epoch):
            for group in optimizer.param_groups:
                group["lr"] = float(lr_schedule[min(step, total_steps - 1)])
            terms, logits = training_step(train_model, optimizer, criterion, xa, xb, lam, amp)
            step += 1
            n_steps += 1
            with torch.no_grad():
                sums += torch.stack(
                    [terms.total.detach(), terms.consistency, terms.uniform_prior, terms.entropy]
                ).double()
                mean_p += terms.mean_assignment.double()
                usage.index_add_(
                    0,
                    logits.detach().argmax(dim=1),
                    torch.ones(logits.shape[0], device=device, dtype=torch.float64),
                )
            if bar is not None:
                bar.update(1)
                if n_steps % cfg.log_every == 0 or n_steps == steps_per_epoch:
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix(
                        loss=f"{float(sums[0]) / n_steps:.4f}",
                        img_s=f"{n_steps * cfg.optim.batch_size / elapsed:.0f}",
                    )
        if bar is not None:
            bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_time = time.perf_counter() - t0

        # ---- epoch metrics (reduced over ranks) ---------------------------------------
        sums = dist.all_reduce_sum(sums) / world
        usage = dist.all_reduce_sum(usage)
        mean_p = mean_p / max(n_steps, 1)  # already the global mean per step
        eff = effective_prototypes(mean_p)
        entropy = float(sums[3]) / max(n_steps, 1)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "loss": float(sums[0]) / max(n_steps, 1),
            "consistency": float(sums[1]) / max(n_steps, 1),
            "uniform_prior": float(sums[2]) / max(n_steps, 1),
            "kl_weight": lam,
            "lr": float(lr_schedule[min(step, total_steps) - 1]),
            "prototypes_used": int((usage > 0).sum()),
            "effective_prototypes": eff,
            "argmax_effective_prototypes": effective_prototypes(usage),
            "assignment_entropy": entropy,
            "assignment_information": assignment_information(eff, entropy),
            "images_per_s": n_steps * cfg.optim.batch_size / epoch_time,
            "epoch_time_s": epoch_time,
            "hardware": hardware,
        }
        final_epoch = epoch + 1 == cfg.epochs
        if (
            train_l is not None
            and test is not None
            and main
            and ((epoch + 1) % cfg.knn_every == 0 or final_epoch)
        ):
            record.update(knn_monitor(model, cfg, train_l, test, device))
            if knn_capped:  # a bank of knn_max_train images, not the whole train split
                record["knn_bank"] = len(train_l)
        if not math.isfinite(record["loss"]):
            fp32 = " or use precision=fp32" if amp else ""
            raise FloatingPointError(
                f"epoch {epoch + 1}: loss is {record['loss']}; lower "
                f"optim.lr (now {cfg.optim.lr}){fp32}"
            )
        collapsed_epochs = collapsed_epochs + 1 if eff < cfg.collapse_floor else 0
        record["collapsed_epochs"] = collapsed_epochs
        diffuse_epochs = diffuse_epochs + 1 if _diffuse(record, cfg) else 0

        # ---- log, callback, checkpoint (rank 0 writes) ----------------------------------
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            knn = f", kNN {record['knn_top1']:.2f}%" if "knn_top1" in record else ""
            log.info(
                "epoch %d/%d loss %.4f (L_c %.4f, L_KL %.4f, lambda %.2f) prototypes %d/%d "
                "(effective %.1f, by argmax %.1f; information %.2f nats) %.0f img/s%s",
                epoch + 1,
                cfg.epochs,
                record["loss"],
                record["consistency"],
                record["uniform_prior"],
                lam,
                record["prototypes_used"],
                k,
                eff,
                record["argmax_effective_prototypes"],
                record["assignment_information"],
                record["images_per_s"],
                knn,
            )
            if diffuse_epochs == cfg.collapse_patience:
                log.warning(_diffuse_message(record, cfg, diffuse_epochs))
        stop = False
        if on_epoch_end is not None:
            flag = torch.tensor(float(bool(on_epoch_end(record, unwrap(model)))), device=device)
            stop = float(dist.all_reduce_sum(flag)) > 0
        save_last = stop or epoch + 1 == end_epoch or (epoch + 1) % cfg.save_every == 0
        keep = cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0
        if main and (save_last or keep):
            ckpt = Checkpoint(
                model=unwrap(model).state_dict(),
                optimizer=optimizer.state_dict(),
                epoch=epoch + 1,
                step=step,
                config=config_to_dict(cfg),
                metrics=record,
                rng=_rng_state(device),
            )
            if save_last:
                save_checkpoint(last_path, ckpt)
            if keep:
                save_checkpoint(ckpt_dir / f"epoch_{epoch + 1:04d}.safetensors", ckpt)
        dist.barrier()
        last = record
        if collapsed_epochs >= cfg.collapse_patience:
            raise CollapseError(_collapse_message(eff, cfg, collapsed_epochs))
        if stop:
            if main:
                log.info("stopped after epoch %d by on_epoch_end", epoch + 1)
            break
    if owns_process_group:
        dist.destroy()  # the group train() created (torchrun); a caller's group stays theirs
    return last
