"""Training throughput of CARL: model-only step vs carlzoo's device pipeline vs DataLoader.

Measures, in one run on one machine and at one batch size:
  (1) model   the training step alone on pre-augmented tensors already on the device;
  (2) carlzoo the full device pipeline: uint8 data on the device, per-sample augmentation
              on the device, the same step;
  (3) loader  torch DataLoader + torchvision PIL transforms in N workers, the same step.
and prints images/s, seconds per CIFAR-10 epoch (50,000 images), memory and the ratios
(2)/(1) and (2)/(3).

Memory (``peak_memory_mb`` in the JSON, with ``peak_memory_kind``): on a GPU the peak of
``torch.cuda.max_memory_allocated`` during that measurement (reset before it); on the CPU the
process's maximum resident set size so far (``ru_maxrss``, which cannot be reset), so it
includes every earlier measurement and only grows from one to the next.

    python benchmarks/train_throughput.py --data cifar10.npz              # GPU, batch 512
    python benchmarks/train_throughput.py --cpu-smoke                     # tiny CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torchvision

import carlzoo
from carlzoo.model import ModelConfig, build_model
from carlzoo.outputs import atomic_write_text
from carlzoo.training.augment import AUGMENT_PRESETS
from carlzoo.training.config import TrainConfig
from carlzoo.training.data import DataLoaderPipeline, DevicePipeline
from carlzoo.training.datasets import DatasetError, load_split
from carlzoo.training.loss import CARLLoss
from carlzoo.training.train import build_optimizer, training_step

CIFAR10_TRAIN = 50_000


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--data",
        default=None,
        help=".npz with x_train (or the WebP-encoded variant); random uint8 images when omitted",
    )
    p.add_argument("--batch-size", type=int, default=None, help="default 512; 32 with --cpu-smoke")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per measurement (default 60; 4 with --cpu-smoke)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps first (default 15; 1 with --cpu-smoke)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers for (3) (default 16; 2 with --cpu-smoke)",
    )
    p.add_argument("--width", type=int, default=None, help="default 64; 8 with --cpu-smoke")
    p.add_argument("--prototypes", type=int, default=100)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--compile-augment",
        action="store_true",
        help="also measure (2) with its augmentation through torch.compile (compile_augment)",
    )
    p.add_argument("--skip-loader", action="store_true", help="skip measurement (3)")
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny CPU run: width 8, batch 32, 4 steps, 2 workers unless given",
    )
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    smoke = args.cpu_smoke
    defaults = {
        "width": 8 if smoke else 64,
        "batch_size": 32 if smoke else 512,
        "workers": 2 if smoke else 16,
        "steps": 4 if smoke else 60,
        "warmup": 1 if smoke else 15,
    }
    for key, value in defaults.items():  # explicit values win over --cpu-smoke's
        if getattr(args, key) is None:
            setattr(args, key, value)
    minimum = {"width": 1, "batch_size": 1, "workers": 0, "steps": 1, "warmup": 0}
    for key, low in minimum.items():
        if getattr(args, key) < low:
            p.error(f"--{key.replace('_', '-')} {getattr(args, key)}: expected at least {low}")
    return args


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the peak allocated since :func:`reset_peak`. CPU: the process's max RSS so far
    (it cannot be reset: it covers the earlier measurements too)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda max_memory_allocated during this measurement"
    return "process max RSS so far (ru_maxrss: never reset, includes earlier measurements)"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    name: str,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    step,
    args,
    device: torch.device,
) -> dict[str, float]:
    for _ in range(args.warmup):
        step(*next(batches))
    sync(device)
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(*next(batches))
    sync(device)
    dt = time.perf_counter() - t0
    ips = args.steps * args.batch_size / dt
    res = {
        "images_per_s": ips,
        "s_per_cifar10_epoch": CIFAR10_TRAIN / ips,
        "peak_memory_mb": peak_memory_mb(device),
        "peak_memory_kind": memory_kind(device),
    }
    label = "peak" if device.type == "cuda" else "max RSS so far"
    print(
        f"  {name:8s} {ips:10.0f} img/s   {res['s_per_cifar10_epoch']:7.2f} s/epoch   "
        f"{label} {res['peak_memory_mb']:8.0f} MiB",
        flush=True,
    )
    return res


def check_no_host_sync(batches, step, device: torch.device, steps: int = 3) -> str:
    """Run a few batches + steps with CUDA's sync debug mode set to raise on any host sync."""
    if device.type != "cuda":
        return "not checked (CUDA only)"
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            step(*next(batches))
    except RuntimeError as e:
        return f"FOUND: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return f"none in {steps} steps (torch.cuda.set_sync_debug_mode('error'))"


def forever(pipeline) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        yield from pipeline.epoch(epoch)
        epoch += 1


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp = device.type == "cuda"
    channels_last = device.type == "cuda"

    if args.data:
        try:
            images = load_split("npz", args.data, "train").images
        except DatasetError as e:  # a refusal of an argument: argparse's exit status 2
            print(f"train_throughput.py: error: --data: {e}", file=sys.stderr)
            sys.exit(2)
    else:
        n = max(4 * args.batch_size, 2048 if args.cpu_smoke else CIFAR10_TRAIN)
        images = np.random.default_rng(0).integers(
            0, 256, (n, args.size, args.size, 3), dtype=np.uint8
        )
    aug = AUGMENT_PRESETS[32 if args.size <= 32 else 64 if args.size <= 64 else 96]

    torch.manual_seed(0)
    cfg = TrainConfig(model=ModelConfig(width=args.width, num_prototypes=args.prototypes))
    model = build_model(cfg.model).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = build_optimizer(model, cfg, device)
    criterion = CARLLoss()
    train_model = torch.compile(model) if args.compile else model

    def step(xa: torch.Tensor, xb: torch.Tensor) -> None:
        training_step(train_model, optimizer, criterion, xa, xb, 2.0, amp)

    print("carlzoo train throughput")
    print(
        f"  device   {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
        f" ({os.cpu_count()} CPU cores, {platform.processor() or platform.machine()})"
    )
    print(
        f"  versions python {sys.version.split()[0]}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, carlzoo {carlzoo.__version__}"
    )
    precision = "bf16 autocast, channels_last" if amp else "fp32"
    print(
        f"  setup    ResNet-18 width {args.width}, CIFAR stem, K={args.prototypes}, two views, "
        f"batch {args.batch_size}, {args.size} px, {precision}"
        f"{', compiled' if args.compile else ''}; {len(images)} training images"
        f"{' from ' + Path(args.data).name if args.data else ' (random)'}"
    )
    results: dict[str, dict[str, float]] = {}

    # (1) model-only: pre-augmented views already on the device.
    pre = DevicePipeline(
        images[: 4 * args.batch_size],
        aug,
        args.size,
        device,
        args.batch_size,
        seed=0,
        channels_last=channels_last,
    )
    fixed = list(pre.epoch(0))
    results["model"] = measure(
        "model", (fixed[i % len(fixed)] for i in range(10**9)), step, args, device
    )

    # (2) carlzoo: device-resident uint8 + per-sample device augmentation.
    pipe = DevicePipeline(
        images, aug, args.size, device, args.batch_size, seed=0, channels_last=channels_last
    )
    batches = forever(pipe)
    results["carlzoo"] = measure("carlzoo", batches, step, args, device)
    sync_check = check_no_host_sync(batches, step, device)
    print(f"  host syncs in the carlzoo batch + augmentation + step: {sync_check}")
    if args.compile_augment:
        compiled = DevicePipeline(
            images, aug, args.size, device, args.batch_size, seed=0,
            channels_last=channels_last, compile_augment=True,
        )  # fmt: skip
        batches = forever(compiled)
        step(*next(batches))  # compiles, outside the timing whatever --warmup says
        results["carlzoo_compiled_augment"] = measure(
            "carlzoo, compiled augmentation", batches, step, args, device
        )

    # (3) DataLoader + torchvision transforms.
    if not args.skip_loader:
        loader = DataLoaderPipeline(
            images,
            aug,
            args.size,
            device,
            args.batch_size,
            seed=0,
            workers=args.workers,
            channels_last=channels_last,
        )
        results["loader"] = measure(f"loader/{args.workers}w", forever(loader), step, args, device)

    r21 = results["carlzoo"]["images_per_s"] / results["model"]["images_per_s"]
    print(f"  ratio    carlzoo / model-only = {r21:.2f}")
    if "carlzoo_compiled_augment" in results:
        rc = results["carlzoo_compiled_augment"]["images_per_s"] / results["model"]["images_per_s"]
        print(f"  ratio    carlzoo with compiled augmentation / model-only = {rc:.2f}")
    if "loader" in results:
        r23 = results["carlzoo"]["images_per_s"] / results["loader"]["images_per_s"]
        print(f"  ratio    carlzoo / DataLoader({args.workers} workers) = {r23:.2f}")
    if args.json:
        atomic_write_text(
            args.json,
            json.dumps(
                {
                    "args": vars(args),
                    "device": str(device),
                    "torch": torch.__version__,
                    "results": results,
                    "host_sync_check": sync_check,
                },
                indent=2,
            ),
        )


if __name__ == "__main__":
    main()
