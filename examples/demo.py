"""carlzoo demo: embed and assign the example images, then summarise what the model sees.

    python examples/demo.py [--images examples/images] [--model SPEC]

Runs ``carlzoo embed`` and ``carlzoo assign`` (the CLI commands, in this process) on a folder
of images with the best model available offline: a zoo model bundled in the package
(``carlzoo/models/<name>/``) when there is one, otherwise the small example model in
``examples/models/`` (a narrow CARL ResNet-18 trained for a few minutes on a CPU), otherwise a
randomly initialised CARL ResNet-18 saved to a temp folder; the output says which. Then
prints, for each image, its nearest neighbour by cosine similarity, and the images grouped by
top prototype.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
from collections import defaultdict
from pathlib import Path

import click
import numpy as np

HERE = Path(__file__).resolve().parent
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
EXAMPLE_DESCRIPTION = (
    "examples/models/carl-cifar10-cpu-w8: a small example model, not a zoo model: CARL ResNet-18\n"
    "        at width 8, trained 5 epochs on 40k CIFAR-10 images on a 2-core CPU (8 min);\n"
    "        CIFAR-10 test kNN 40.1%, linear 45.4% (a full zoo model is far stronger)"
)


def pick_model(tmp: Path) -> tuple[str, str, bool]:
    """(model spec, description, trained?)."""
    from carlzoo import registry

    for name in registry.list_models():
        if registry.bundled_path(name) is not None:
            entry = registry.get_entry(name)
            measured = [
                f"{label} {entry.metrics[key]:.1f}%"
                for key, label in (("knn_top1", "kNN"), ("linear_top1", "linear"))
                if isinstance(entry.metrics.get(key), float)
            ]
            scores = f"; {entry.dataset} test {', '.join(measured)}" if measured else ""
            return name, f"bundled zoo model {name} ({entry.description}{scores})", True
    example = HERE / "models" / "carl-cifar10-cpu-w8"
    if (example / "config.json").is_file():
        return str(example), EXAMPLE_DESCRIPTION, True
    import torch

    from carlzoo.model import ModelConfig, build_model
    from carlzoo.pretrained import Preprocessing, ZooConfig, save_pretrained

    torch.manual_seed(0)
    model = build_model(ModelConfig()).eval()
    pre = Preprocessing(input_size=32, resize_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    cfg = ZooConfig(
        model.model_config,
        pre,
        name="random-carl-resnet18",
        provenance={"note": "randomly initialised, not trained"},
    )
    folder = save_pretrained(model, tmp / "random-carl-resnet18", cfg)
    return str(folder), f"randomly initialised CARL ResNet-18 in {folder}", False


def label_of(path: str) -> str:
    """The class in a file name such as ``cat_01.png``."""
    return Path(path).stem.rsplit("_", 1)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(HERE / "images"), help="folder of images")
    parser.add_argument("--model", default=None, help="model spec (default: see above)")
    args = parser.parse_args(argv)

    from carlzoo.cli.zoo_cmd import assign, embed

    with tempfile.TemporaryDirectory(prefix="carlzoo-demo-") as tmp_name:
        tmp = Path(tmp_name)
        if args.model:
            spec, desc, trained = args.model, args.model, True
        else:
            spec, desc, trained = pick_model(tmp)
            if not trained:
                print("No trained weights are available offline (carlzoo/models/ and")
                print("examples/models/ are empty),")
                print("so this demo uses a RANDOMLY INITIALISED CARL ResNet-18: the neighbours and")
                print("groups below show the pipeline working, not what a trained model sees.\n")
        print(f"model:  {desc}")
        print(f"images: {args.images}\n")

        emb_out, asg_out = tmp / "embeddings.npz", tmp / "assignments.npz"
        common = ["--model", spec, "--no-progress", "--workers", "0"]
        print(f"$ carlzoo embed {args.images} --model {spec} --out embeddings.npz", flush=True)
        try:
            embed.main([args.images, "--out", str(emb_out), *common], standalone_mode=False)
            print(
                f"$ carlzoo assign {args.images} --model {spec} --out assignments.npz --top-k 3",
                flush=True,
            )
            assign.main(
                [args.images, "--out", str(asg_out), "--top-k", "3", *common],
                standalone_mode=False,
            )
        except click.ClickException as e:  # a bad --model or --images: its one-line message
            e.show()
            return e.exit_code

        with np.load(emb_out) as z:
            paths, emb, skipped = z["paths"].tolist(), z["embeddings"], z["skipped"].tolist()
        with np.load(asg_out) as z:
            ids, probs = z["ids"], z["probs"]
        import carlzoo

        emb_k = carlzoo.load(spec).config.architecture.num_prototypes

    print(
        f"\n{len(paths)} images embedded ({emb.shape[1]}-d, L2-normalised backbone features)"
        + (f", {len(skipped)} skipped: {', '.join(skipped)}" if skipped else "")
    )
    if len(paths) < 2:
        print("\nNeighbours and groups need at least two images; give --images a folder of more.")
        return 0
    sim = emb @ emb.T  # cosine similarity: rows are unit vectors
    np.fill_diagonal(sim, -np.inf)
    nearest = sim.argmax(axis=1)
    width = max(len(p) for p in paths)
    print("\nNearest neighbour by cosine similarity:")
    same = 0
    for i, p in enumerate(paths):
        j = nearest[i]
        match = label_of(p) == label_of(paths[j])
        same += match
        print(
            f"  {p:<{width}} -> {paths[j]:<{width}}  cos {sim[i, j]:.3f}"
            + ("  (same class)" if match else "")
        )
    labels = [label_of(p) for p in paths]
    chance = np.mean([(labels.count(c) - 1) / (len(labels) - 1) for c in labels])
    print(f"  same class for {same}/{len(paths)} images (chance about {chance * len(paths):.1f})")

    groups: dict[int, list[str]] = defaultdict(list)
    for p, k, pr in zip(paths, ids[:, 0], probs[:, 0], strict=True):
        groups[int(k)].append(f"{p} ({pr:.2f})")
    print(
        f"\nImages grouped by top prototype ({len(groups)} of {emb_k} prototypes used, "
        "probability in brackets):"
    )
    for k in sorted(groups, key=lambda k: (-len(groups[k]), k)):
        text = f"prototype {k:>4}: {', '.join(groups[k])}"
        print(textwrap.fill(text, width=100, initial_indent="  ", subsequent_indent=" " * 18))
    if not trained:
        print(
            "\n(Random weights: train a model with `carlzoo train --config cifar10 ...`, export "
            "it with `carlzoo export`, then rerun with --model models/NAME.)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
