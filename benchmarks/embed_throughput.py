"""Throughput of ``carlzoo embed`` end to end vs the model alone, for both backends.

Writes N real CIFAR-10 test images as PNG files to a temp folder, then measures in one run,
on one machine, at one batch size:

  model-only   ``model.embed(x)`` on tensors decoded and preprocessed beforehand;
  end to end   ``carlzoo embed FOLDER --out emb.npz``, in this process: file discovery,
               loading the model, parallel decoding, preprocessing, the model, writing.

for the torch and the onnx backend, and prints images/s and the ratio end to end /
model-only (target: >= 0.85, i.e. decoding is hidden behind the model).

    python benchmarks/embed_throughput.py --data cifar10.npz [--n 512] [--size 32]

``--size`` is the model input: the PNG files are written at that size (bicubic from 32 px),
so no resizing happens in the pipeline. The model is a bundled zoo model when the package
ships one, else a randomly initialised CARL ResNet-18 (throughput does not depend on the
weights), exported to ONNX in a temp folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import PIL
import torch
import torchvision
from PIL import Image

import carlzoo
from carlzoo import registry
from carlzoo.cli.zoo_cmd import embed
from carlzoo.export.onnx import export_onnx
from carlzoo.images import read_image
from carlzoo.model import ModelConfig, build_model
from carlzoo.outputs import atomic_write_text
from carlzoo.pretrained import Preprocessing, ZooConfig, load, save_pretrained
from carlzoo.training.datasets import DatasetError, load_split

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--data", required=True, help="CIFAR-10 .npz, plain or WebP-encoded (its test split)"
    )
    p.add_argument("--n", type=int, default=512, help="images (default 512)")
    p.add_argument("--size", type=int, default=32, help="model input and PNG size (default 32)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=None, help="carlzoo embed --workers")
    p.add_argument("--repeats", type=int, default=3, help="timed runs each; the best counts")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--backends", default="torch,onnx")
    p.add_argument("--model", default=None, help="model spec (default: see above)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    if not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file")
    return args


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def header(args: argparse.Namespace, device: str, model_desc: str) -> dict:
    info = {
        "machine": f"{platform.node()} {platform.machine()}, {cpu_name()}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "versions": {
            "python": platform.python_version(),
            "carlzoo": carlzoo.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "onnxruntime": onnxruntime.__version__,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
        },
        "settings": {
            "n": args.n,
            "size": args.size,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "device": device,
            "repeats": args.repeats,
        },
        "model": model_desc,
    }
    print("embed throughput: carlzoo embed end to end vs model-only")
    print(f"  machine   {info['machine']}" + (f", GPU {info['gpu']}" if info["gpu"] else ""))
    if info["load_avg"]:
        print(f"  load avg  {', '.join(f'{v:.2f}' for v in info['load_avg'])} (before the run)")
    print("  versions  " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print("  settings  " + ", ".join(f"{k}={v}" for k, v in info["settings"].items()))
    print(f"  model     {model_desc}")
    return info


def write_pngs(data: str, n: int, size: int, folder: Path) -> list[Path]:
    try:
        x = load_split("npz", data, "test").images[:n]  # plain or WebP-encoded arrays
    except DatasetError as e:
        raise SystemExit(str(e)) from None
    if len(x) < n:
        raise SystemExit(f"{data} has only {len(x)} test images, asked for --n {n}")
    folder.mkdir(parents=True)
    paths = []
    for i, a in enumerate(x):
        img = Image.fromarray(a)
        if size != img.width:
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        p = folder / f"{i:05d}.png"
        img.save(p)
        paths.append(p)
    return paths


def make_model(args: argparse.Namespace, tmp: Path) -> tuple[str, str]:
    """(model spec, description)."""
    if args.model:
        return args.model, args.model
    for name in registry.list_models():
        if registry.bundled_path(name) is not None:
            return name, f"bundled zoo model {name}"
    torch.manual_seed(0)
    model = build_model(ModelConfig()).eval()
    pre = Preprocessing(
        input_size=args.size, resize_size=args.size, mean=CIFAR10_MEAN, std=CIFAR10_STD
    )
    folder = save_pretrained(
        model, tmp / "model", ZooConfig(model.model_config, pre, name="random-resnet18")
    )
    export_onnx(model, folder / "model.onnx", input_size=args.size)
    return str(folder), "random CARL ResNet-18 (CIFAR stem, K=100; no trained weights bundled)"


def model_only_seconds(model: object, x: torch.Tensor, batch: int, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        model.embed(x[i : i + batch])  # CPU tensors in, CPU tensors out, as the CLI does
    return time.perf_counter() - t0


def end_to_end_seconds(argv: list[str]) -> float:
    t0 = time.perf_counter()
    embed.main(argv, standalone_mode=False)
    return time.perf_counter() - t0


def measure(
    spec: str,
    backend: str,
    device: str,
    x: torch.Tensor,
    folder: Path,
    out: Path,
    args: argparse.Namespace,
    warm_folder: Path,
) -> tuple[float, float]:
    """(model-only, end-to-end) images/s: the two alternate, best of ``repeats`` each, so a
    burst of load from elsewhere on the machine does not land on one side only."""
    argv = [
        "--model",
        spec,
        "--backend",
        backend,
        "--device",
        device,
        "-b",
        str(args.batch_size),
        "--no-progress",
        "--out",
        str(out),
    ]
    if args.workers is not None:
        argv += ["--workers", str(args.workers)]
    model = load(spec, device=device, backend=backend)
    model.embed(x[: args.batch_size])  # warm-up
    end_to_end_seconds([str(warm_folder), *argv])  # warm-up
    model_s, e2e_s = [], []
    for _ in range(args.repeats):
        model_s.append(model_only_seconds(model, x, args.batch_size, device))
        e2e_s.append(end_to_end_seconds([str(folder), *argv]))
    with np.load(out) as z:
        assert len(z["paths"]) == args.n and len(z["skipped"]) == 0
    return len(x) / min(model_s), args.n / min(e2e_s)


def main() -> int:
    args = parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="carlzoo-embed-bench-") as tmp_name:
        tmp = Path(tmp_name)
        spec, desc = make_model(args, tmp)
        info = header(args, device, desc)
        paths = write_pngs(args.data, args.n, args.size, tmp / "images")
        warm = tmp / "warm"
        warm.mkdir()
        for p in paths[: args.batch_size]:
            (warm / p.name).symlink_to(p)
        tf = load(spec, backend="torch").transform
        x = torch.stack([tf(read_image(p)) for p in paths])  # pre-decoded, not timed
        results = {}
        print(
            f"\n  {'backend':8} {'model-only':>14} {'end to end':>14} {'ratio':>7}  target >= 0.85"
        )
        for backend in args.backends.split(","):
            model_only, e2e = measure(
                spec, backend, device, x, tmp / "images", tmp / "emb.npz", args, warm
            )
            ratio = e2e / model_only
            results[backend] = {
                "model_only_images_per_s": model_only,
                "end_to_end_images_per_s": e2e,
                "ratio": ratio,
            }
            verdict = "ok" if ratio >= 0.85 else "BELOW"
            print(
                f"  {backend:8} {model_only:10.1f} im/s {e2e:10.1f} im/s {ratio:7.3f}  {verdict}",
                flush=True,
            )
        print(
            "\n  model-only: model.embed on pre-decoded tensors; end to end: carlzoo embed "
            "(discovery, model load, decode, preprocess, model, .npz write);\n  the two "
            f"alternate, best of {args.repeats} each."
        )
    if args.json:
        atomic_write_text(args.json, json.dumps({**info, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
