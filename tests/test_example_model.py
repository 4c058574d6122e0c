"""The example model shipped in examples/models and the demo that uses it."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import carlzoo

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "models" / "carl-cifar10-cpu-w8"
IMAGES = sorted((ROOT / "examples" / "images").glob("*_0*.*"))


def test_example_model_loads_in_both_backends_and_agrees():
    torch_model = carlzoo.load(str(EXAMPLE))
    onnx_model = carlzoo.load(str(EXAMPLE), backend="onnx")
    a = torch_model.embed([str(p) for p in IMAGES])
    b = onnx_model.embed([str(p) for p in IMAGES])
    assert a.shape == (len(IMAGES), 64)
    # float16 weights: ONNX folds BatchNorm before rounding (export.onnx.PARITY_TOL).
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999
    cfg = torch_model.config
    assert cfg.architecture.width == 8 and cfg.preprocessing.input_size == 32
    assert cfg.provenance["dataset"] == "cifar10"


def test_example_model_is_better_than_chance_on_the_example_images():
    model = carlzoo.load(str(EXAMPLE))
    emb = model.embed([str(p) for p in IMAGES]).numpy()
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    labels = [p.stem.rsplit("_", 1)[0] for p in IMAGES]
    same = sum(labels[i] == labels[j] for i, j in enumerate(sim.argmax(1)))
    # 18 images of 6 classes: a random neighbour shares the class 2 / 17 of the time
    # (about 2 images); the trained example model gets 5.
    assert same >= 4


def test_demo_runs_and_names_its_model():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # the best model at hand: the zoo model bundled in the package, with its measured scores
    assert "model:  bundled zoo model carl-cifar10 (" in result.stdout
    assert "cifar10 test kNN 78.2%, linear 83.2%" in result.stdout
    assert "Nearest neighbour by cosine similarity" in result.stdout
    assert "Images grouped by top prototype" in result.stdout


def _demo():
    import importlib.util

    spec = importlib.util.spec_from_file_location("carlzoo_demo", ROOT / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def test_demo_falls_back_to_the_example_model_without_a_bundled_one(tmp_path, monkeypatch):
    from carlzoo import registry

    monkeypatch.setattr(registry, "BUNDLED_DIR", tmp_path)
    spec, desc, trained = _demo().pick_model(tmp_path)
    assert spec == str(EXAMPLE) and trained and "not a zoo model" in desc


def test_demo_reports_a_bad_model_in_one_line(capsys):
    assert _demo().main(["--model", "carl-cifar11"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: ") and "carl-cifar10" in err[0]


def test_demo_on_a_single_image_says_it_needs_two(tmp_path, capsys):
    import shutil

    shutil.copy(IMAGES[0], tmp_path / IMAGES[0].name)
    assert _demo().main(["--images", str(tmp_path), "--model", str(EXAMPLE)]) == 0
    assert "need at least two images" in capsys.readouterr().out
