"""kNN and linear probe on real CIFAR-10: a random-init narrow CARL encoder versus the same
encoder (same seed, same initial weights) after a short CPU training run.

    python benchmarks/eval_real_cifar10.py --data /path/to/cifar10.npz

The .npz holds x_train, y_train, x_test, y_test (uint8 NHWC, int labels). Training uses the
real ``carlzoo.training.train.train`` with the cifar10 preset, a narrow ResNet-18 and the first
``--subset`` training images; both encoders are probed on the full train / test splits.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from carlzoo.model import CARLModel, build_model
from carlzoo.training import evaluate
from carlzoo.training.config import load_config
from carlzoo.training.datasets import load_split
from carlzoo.training.run import load_run
from carlzoo.training.train import train


def probe(
    model: CARLModel, train_set: Any, test_set: Any, mean: Any, std: Any, batch_size: int
) -> dict[str, Any]:
    t0 = time.perf_counter()
    kw = dict(mean=mean, std=std, size=32, batch_size=batch_size, device="cpu")
    f_train = evaluate.compute_features(model, train_set.images, **kw)
    f_test = evaluate.compute_features(model, test_set.images, **kw)
    t_feat = time.perf_counter() - t0
    t0 = time.perf_counter()
    knn = evaluate.knn_eval(f_train, train_set.labels, f_test, test_set.labels, k=200, t=0.1)
    t_knn = time.perf_counter() - t0
    lin = evaluate.linear_eval(f_train, train_set.labels, f_test, test_set.labels)
    return {
        "knn_top1": knn["top1"],
        "knn_top5": knn["top5"],
        "linear_top1": lin["top1"],
        "linear_top5": lin["top5"],
        "linear_train_top1": lin["train_top1"],
        "linear_iterations": lin["iterations"],
        "feature_time_s": t_feat,
        "knn_time_s": t_knn,
        "linear_time_s": lin["fit_time_s"],
        "feature_dim": int(f_train.shape[1]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="cifar10.npz (x_train y_train x_test y_test)")
    ap.add_argument("--width", type=int, default=8, help="ResNet-18 width (64 = standard)")
    ap.add_argument("--subset", type=int, default=40000, help="training images used by train()")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--out",
        default=str(Path(tempfile.gettempdir()) / "carlzoo_eval_real_cifar10"),
        help="folder for the run and results.json",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(f"command: {command}", flush=True)

    out = Path(args.out)
    run_dir = out / "run"
    if (run_dir / "checkpoints" / "last.safetensors").exists():
        sys.exit(f"{run_dir} already holds a run; remove it or pass another --out")
    data = {"dataset": "cifar10", "root": args.data, "subset": args.subset}
    cfg = load_config(
        "cifar10",
        data=data,
        model={"width": args.width},
        optim={"batch_size": args.batch_size},
        epochs=args.epochs,
        device="cpu",
        precision="fp32",
        knn_every=0,
        channels_last=False,
        checkpoint_every=0,
    )
    mean, std = cfg.augment.mean, cfg.augment.std
    train_set = load_split("cifar10", args.data, "train")
    test_set = load_split("cifar10", args.data, "test")
    print(
        f"probe splits: train {len(train_set)}, test {len(test_set)}; pretraining on the first "
        f"{args.subset} train images, ResNet-18 width {args.width}, {args.epochs} epochs, "
        f"batch {args.batch_size}, {args.threads} threads",
        flush=True,
    )

    torch.manual_seed(cfg.seed)  # train() seeds the same way before build_model
    random_model = build_model(cfg.model)
    t0 = time.perf_counter()
    res_random = probe(random_model, train_set, test_set, mean, std, args.batch_size)
    res_random["total_time_s"] = time.perf_counter() - t0
    print(f"random init: {json.dumps(res_random)}", flush=True)

    t0 = time.perf_counter()
    last = train(cfg, run_dir, progress=False)
    train_time = time.perf_counter() - t0
    print(f"trained in {train_time:.0f} s: {json.dumps(last)}", flush=True)

    trained, _, _ = load_run(run_dir)
    t0 = time.perf_counter()
    res_trained = probe(trained, train_set, test_set, mean, std, args.batch_size)
    res_trained["total_time_s"] = time.perf_counter() - t0

    print(
        f"\n{'encoder':<14}{'kNN top1':>10}{'kNN top5':>10}{'lin top1':>10}{'lin top5':>10}"
        f"{'probe s':>9}"
    )
    for name, r in (("random init", res_random), ("trained", res_trained)):
        print(
            f"{name:<14}{r['knn_top1']:>10.2f}{r['knn_top5']:>10.2f}{r['linear_top1']:>10.2f}"
            f"{r['linear_top5']:>10.2f}{r['total_time_s']:>9.0f}"
        )
    print(f"training: {train_time:.0f} s ({args.epochs} epochs on {args.subset} images)")
    result = {
        "command": command,
        "random_init": res_random,
        "trained": res_trained,
        "train_time_s": train_time,
        "train_last_epoch": last,
        "width": args.width,
        "subset": args.subset,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "threads": args.threads,
    }
    evaluate.write_json(result, out / "results.json")
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
