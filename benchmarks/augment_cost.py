"""What carlzoo's batched augmentation costs per step, next to the training step it feeds.

    python benchmarks/augment_cost.py                   # CPU, batch 512 and batch 2
    python benchmarks/augment_cost.py --device cuda     # on a GPU: kernels and time
    python benchmarks/augment_cost.py --compile         # and the torch.compile'd augmentation

For the augmentation of one step as the device pipeline runs it (one ``BatchAugment`` call on
the batch doubled, both views at once; the 32 px CIFAR preset) and, as the baseline measured
in the same run, one CARL training step (ResNet-18, CIFAR stem, two views, SGD), it prints:

* ``ops``: top-level ATen operators dispatched per call (each a Python -> C++ round trip);
* ``kernels``: on a GPU, the CUDA kernels (and copies) the profiler records; on a CPU, the
  ATen operators that compute (view and metadata operators such as ``view``, ``select`` or
  ``unbind`` left out). Code compiled by torch.compile runs outside ATen, so on a CPU the
  compiled row counts only what stays eager (the parameter draws): its fused kernels are
  not in it;
* the time per call at batch 2 (dispatch cost alone: what a GPU's host thread pays per
  step) and at the batch given (the work itself).

On a GPU the step is asynchronous: the host thread must dispatch the augmentation's operators
and the step's while the GPU runs them, so the augmentation's ``ops`` are a cost even where
its kernels are cheap, and each of its ``kernels`` reads and writes both views.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from carlzoo.model import ModelConfig, build_model
from carlzoo.outputs import atomic_write_text
from carlzoo.training.augment import AUGMENT_PRESETS, BatchAugment
from carlzoo.training.loss import CARLLoss
from carlzoo.training.train import training_step

# Operators that only make views or read metadata: no kernel runs for them.
_VIEWS = {
    "aten::view", "aten::select", "aten::slice", "aten::unbind", "aten::unsqueeze",
    "aten::squeeze", "aten::expand", "aten::as_strided", "aten::permute", "aten::t",
    "aten::transpose", "aten::reshape", "aten::alias", "aten::detach", "aten::lift_fresh",
    "aten::resolve_conj", "aten::resolve_neg", "aten::empty", "aten::empty_like",
    "aten::empty_strided", "aten::result_type", "aten::is_nonzero", "aten::size",
    "aten::_unsafe_view", "aten::expand_as", "aten::contiguous", "aten::numpy_T",
}  # fmt: skip


def count_ops(fn: Callable[[], object], device: torch.device) -> tuple[int, int]:
    """(top-level ATen operators, kernels) for one call of ``fn``: the CUDA kernels on a GPU,
    the ATen operators that compute on a CPU."""
    fn()
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.events()
    names = [
        e.name
        for e in events
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    ]
    if cuda:
        kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    else:
        kernels = sum(1 for n in names if n not in _VIEWS)
    return len(names), kernels


def seconds_per_call(fn: Callable[[], object], device: torch.device, min_time: float) -> float:
    """Median over 5 rounds of the mean time per call, each round at least ``min_time`` / 5."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        fn()
    sync()
    rounds = []
    for _ in range(5):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            if n >= 3 and time.perf_counter() - t0 >= min_time / 5:
                break
        sync()
        rounds.append((time.perf_counter() - t0) / n)
    return sorted(rounds)[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--width", type=int, default=None,
                   help="ResNet-18 width of the baseline step (default 64 on a GPU, 4 on the "
                        "CPU, where batch 2 must stay dispatch-bound)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per timing (>= 0.1)")
    p.add_argument("--compile", action="store_true",
                   help="also time the augmentation through torch.compile (compile_augment=true)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    device = torch.device(args.device)
    width = args.width or (64 if device.type == "cuda" else 4)
    if args.batch_size < 2 or width < 1 or args.min_time < 0.1:
        p.error("--batch-size >= 2, --width >= 1 and --min-time >= 0.1 are required")
    torch.manual_seed(0)
    augment = BatchAugment(AUGMENT_PRESETS[32], 32)
    augments = {"augment (both views)": augment}
    if args.compile:
        augments["compiled (both views)"] = BatchAugment(AUGMENT_PRESETS[32], 32, compile=True)
    model = build_model(ModelConfig(width=width)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = CARLLoss()
    amp = device.type == "cuda"  # bf16 autocast, as training runs there
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)

    rows: dict[str, dict[str, float]] = {}
    for batch in (2, args.batch_size):
        x = images(batch)
        x2 = torch.cat([x, x])  # as DevicePipeline augments a batch: both views in one call
        xa, xb = augment(x2).chunk(2)

        def step(xa: torch.Tensor = xa, xb: torch.Tensor = xb) -> None:
            training_step(model, opt, criterion, xa, xb, 1.0, amp)

        fns = [(name, lambda x2=x2, a=a: a(x2)) for name, a in augments.items()]
        for name, fn in [*fns, ("training step", step)]:
            row = rows.setdefault(name, {})
            if batch == 2:
                row["ops"], row["kernels"] = count_ops(fn, device)
            elif name == "training step" and device.type == "cpu":
                continue  # minutes per step on a CPU, and not the figure this script is for
            row[f"us_batch{batch}"] = 1e6 * seconds_per_call(fn, device, args.min_time)
    aug, step_row = rows["augment (both views)"], rows["training step"]
    print(f"device {device}, batch {args.batch_size}, ResNet-18 width {width}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'':<22}{'ops':>6}{'kernels':>9}{'us at batch 2':>15}"
          f"{f'us at batch {args.batch_size}':>18}")
    for name, row in rows.items():
        big = row.get(f"us_batch{args.batch_size}")
        print(f"{name:<22}{row['ops']:>6.0f}{row['kernels']:>9.0f}{row['us_batch2']:>15.0f}"
              f"{'-' if big is None else f'{big:.0f}':>18}")
    if "compiled (both views)" in rows and device.type == "cpu":
        print("(compiled: the counts cover the eager parameter draws only; on a CPU the "
              "profiler does not see the compiled kernels)")
    share = aug["us_batch2"] / (aug["us_batch2"] + step_row["us_batch2"])
    print(f"the augmentation's share of the host's dispatch time per step (batch 2): "
          f"{100 * share:.0f}%")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(
            {"device": str(device), "batch_size": args.batch_size, "torch": torch.__version__,
             "width": width, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
