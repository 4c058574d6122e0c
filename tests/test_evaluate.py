"""Tests for carlzoo.training.evaluate and `carlzoo probe`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from carlzoo.cli import probe_cmd
from carlzoo.cli.probe_cmd import probe
from carlzoo.model import ModelConfig, build_model
from carlzoo.training import evaluate
from carlzoo.training.config import load_config
from carlzoo.training.knn import knn_scores

torch.set_num_threads(2)

TINY = ModelConfig(width=4, num_prototypes=10)


def _blobs(n_per_class: int, n_classes: int = 5, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 10.0
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[y] + rng.normal(size=(y.size, dim))
    return x.astype(np.float32), y.astype(np.int64)


# --------------------------------------------------------------------------------------------
# kNN and linear probe
# --------------------------------------------------------------------------------------------


def test_knn_and_linear_separate_blobs():
    xtr, ytr = _blobs(40, seed=0)
    xte, yte = _blobs(20, seed=0)
    xte = xte + np.random.default_rng(1).normal(size=xte.shape).astype(np.float32) * 0.1
    knn = evaluate.knn_eval(xtr, ytr, xte, yte, k=20)
    lin = evaluate.linear_eval(xtr, ytr, xte, yte)
    assert knn["top1"] == pytest.approx(100.0)
    assert lin["top1"] == pytest.approx(100.0)
    assert lin["top5"] == pytest.approx(100.0)


@pytest.mark.parametrize("probe", [evaluate.linear_eval, evaluate.knn_eval])
@pytest.mark.parametrize("which", ["train", "test"])
def test_non_finite_features_are_refused_by_name(probe, which):
    x, y = _blobs(10)
    bad = x.copy()
    bad[3, 2], bad[5, 0] = np.nan, np.inf
    args = (bad, y, x, y) if which == "train" else (x, y, bad, y)
    with pytest.raises(ValueError) as e:
        probe(*args)
    assert str(e.value).startswith(
        f"{which}_features hold 2 non-finite value(s) (NaN or inf); a probe needs finite"
    )


@pytest.mark.parametrize("probe", [evaluate.linear_eval, evaluate.knn_eval,
                                   lambda x, y, *_: evaluate.select_weight_decay(x, y)])
def test_features_and_labels_that_do_not_pair_up_are_refused(probe):
    x, y = _blobs(10)  # 50 rows
    with pytest.raises(ValueError) as e:
        probe(x, y[:40], x, y)
    assert str(e.value) == (
        "train_features (50, 16) and train_labels (40,) do not pair up: expected (N, D) "
        "features and (N,) labels"
    )


def test_shuffled_labels_give_chance():
    rng = np.random.default_rng(0)
    n_classes = 4
    xtr = rng.normal(size=(800, 8)).astype(np.float32)
    ytr = rng.integers(0, n_classes, 800)
    xte = rng.normal(size=(2000, 8)).astype(np.float32)
    yte = rng.integers(0, n_classes, 2000)
    chance = 100.0 / n_classes
    assert abs(evaluate.knn_eval(xtr, ytr, xte, yte)["top1"] - chance) < 5.0
    assert abs(evaluate.linear_eval(xtr, ytr, xte, yte)["top1"] - chance) < 5.0


def test_knn_k_larger_than_train_set():
    xtr, ytr = _blobs(2, n_classes=3)
    xte, yte = _blobs(5, n_classes=3)
    res = evaluate.knn_eval(xtr, ytr, xte, yte, k=200, t=0.1)
    assert res["k_used"] == 6 and res["k"] == 200
    assert res["top1"] == pytest.approx(100.0)


def test_knn_vote_is_exact_at_a_small_temperature():
    # Query (1, 0); class 0 has three neighbours at cosine 0.95, class 1 one at 0.999. At
    # T = 0.01: 3 exp(95) against exp(99.9), so class 1 wins, although exp(95) is beyond
    # float32. The shares are the exact ones.
    def at(cos: float) -> list[float]:
        return [cos, (1 - cos**2) ** 0.5]

    xtr = torch.tensor([at(0.95), at(0.95), at(0.95), at(0.999)])
    ytr = torch.tensor([0, 0, 0, 1])
    scores = knn_scores(xtr, ytr, torch.tensor([[1.0, 0.0]]), k=4, t=0.01)
    share1 = 1 / (1 + 3 * math.exp((0.95 - 0.999) / 0.01))
    torch.testing.assert_close(scores, torch.tensor([[1 - share1, share1]]))
    res = evaluate.knn_eval(xtr, ytr, torch.tensor([[1.0, 0.0]]), torch.tensor([1]), k=4, t=0.01)
    assert res["top1"] == 100.0


def test_knn_accuracy_is_exact_in_percent():
    xtr, ytr = _blobs(10, n_classes=3)
    xte, yte = _blobs(2, n_classes=3)
    yte[0] = (yte[0] + 1) % 3  # one of six test points mislabelled
    top1 = evaluate.knn_eval(xtr, ytr, xte, yte, k=5)["top1"]
    assert top1 == pytest.approx(100 * 5 / 6, rel=1e-12)


def test_knn_chunks_leave_the_scores_unchanged_and_follow_the_memory_budget(monkeypatch):
    from carlzoo.training import knn

    g = torch.Generator().manual_seed(0)
    xtr, ytr = torch.randn(50, 8, generator=g), torch.randint(0, 4, (50,), generator=g)
    xte = torch.randn(23, 8, generator=g)
    whole = knn.knn_scores(xtr, ytr, xte, k=10, chunk_size=23)
    torch.testing.assert_close(knn.knn_scores(xtr, ytr, xte, k=10, chunk_size=4), whole)
    # The default chunk keeps each (rows, N_train) similarity block within the budget.
    monkeypatch.setattr(knn, "SIM_BLOCK_ELEMENTS", 3 * 50)  # 3 test rows per block
    blocks = []
    real_topk = torch.Tensor.topk
    monkeypatch.setattr(torch.Tensor, "topk", lambda x, *a, **kw: blocks.append(x.shape)
                        or real_topk(x, *a, **kw))
    torch.testing.assert_close(knn.knn_scores(xtr, ytr, xte, k=10), whole)
    assert blocks == [(3, 50)] * 7 + [(2, 50)]
    for bad in (0, -2):  # a negative step would score no test row at all
        with pytest.raises(ValueError, match=rf"^chunk_size must be >= 1 .*, got {bad}$"):
            knn.knn_scores(xtr, ytr, xte, chunk_size=bad)


def test_knn_eval_runs_on_the_device_asked_for():
    xtr, ytr = _blobs(20, n_classes=3)
    xte, yte = _blobs(5, n_classes=3)
    assert evaluate.knn_eval(xtr, ytr, xte, yte, k=5, device="cpu") == evaluate.knn_eval(
        xtr, ytr, xte, yte, k=5)
    with pytest.raises(ValueError, match=r"^device='gpu' is not a device name; use auto, cpu"):
        evaluate.knn_eval(xtr, ytr, xte, yte, device="gpu")


def test_linear_eval_preconditioning_reaches_the_same_optimum_in_fewer_iterations():
    # Features on very different scales and correlated: plain L-BFGS crawls, whitened does not.
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3000, 64))
    x = (z @ rng.normal(size=(64, 64)) * np.logspace(0, 1, 64)).astype(np.float32)
    y = (z[:, :4] @ rng.normal(size=(4, 5))).argmax(1)
    kw = dict(standardize=False, weight_decay=1e-2, max_iter=3000)
    plain = evaluate.linear_eval(x, y, x, y, precondition=False, **kw)
    fast = evaluate.linear_eval(x, y, x, y, precondition=True, **kw)
    assert fast["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-4)
    assert fast["iterations"] * 5 < plain["iterations"] < 3000  # both converged


# ---- the weight decay chosen on held-out training rows --------------------------------------


def test_select_weight_decay_fits_on_the_rest_and_scores_on_a_balanced_held_out_split(
    monkeypatch,
):
    x, y = _blobs(20, n_classes=5)
    calls = []
    scripted = {1e-5: 60.0, 1e-3: 80.0, 1e-1: 70.0}

    def fake_linear_eval(xtr, ytr, xte, yte, *, weight_decay, **kw):
        calls.append((xtr, ytr, xte, yte))
        return {"top1": scripted[weight_decay]}

    monkeypatch.setattr(evaluate, "linear_eval", fake_linear_eval)
    sel = evaluate.select_weight_decay(x, y, grid=(1e-5, 1e-3, 1e-1), val_fraction=0.2, seed=3)
    assert sel["weight_decay"] == 1e-3 and sel["val_top1"] == [60.0, 80.0, 70.0]
    assert sel["grid"] == [1e-5, 1e-3, 1e-1] and (sel["seed"], sel["n_val"]) == (3, 20)
    held = evaluate.held_out_rows(y, 0.2, seed=3)
    assert np.array_equal(held, evaluate.balanced_subset(y, 0.2, seed=3))  # balanced labels
    for xtr, ytr, xte, yte in calls:  # the same split for every value
        assert torch.equal(xte, torch.from_numpy(x[held]))
        assert yte.tolist() == y[held].tolist()
        assert xtr.shape[0] == 80 and ytr.numel() == 80
        rows = {tuple(r) for r in xtr.tolist()}
        assert not rows & {tuple(r) for r in x[held].tolist()}
    assert np.bincount(y[held], minlength=5).tolist() == [4] * 5


def test_held_out_rows_take_the_fraction_of_each_class_and_leave_every_class_a_row():
    y = np.repeat([0, 1, 2, 3], [990, 10, 3, 1])
    held = evaluate.held_out_rows(y, 0.1, seed=0)
    # 99 of 990 and 1 of 10; a class of 3 gives 1 (at least one), a class of 1 keeps its row
    assert np.bincount(y[held], minlength=4).tolist() == [99, 1, 1, 0]
    assert np.array_equal(held, np.sort(held)) and len(set(held.tolist())) == held.size
    assert np.array_equal(held, evaluate.held_out_rows(y, 0.1, seed=0))
    assert not np.array_equal(held, evaluate.held_out_rows(y, 0.1, seed=1))
    assert np.bincount(y[evaluate.held_out_rows(y, 0.9)], minlength=4).tolist() == [891, 9, 2, 0]


def test_select_weight_decay_needs_a_class_with_two_rows():
    x, y = _blobs(1, n_classes=5)
    with pytest.raises(ValueError) as e:
        evaluate.select_weight_decay(x, y)
    assert str(e.value) == (
        "no training row can be held out to choose the weight decay: each of the 5 rows is "
        "its class's only one; give at least 2 rows of a class"
    )


def test_select_weight_decay_breaks_ties_towards_more_regularisation():
    x, y = _blobs(30, n_classes=3)  # far apart: every value scores 100%
    sel = evaluate.select_weight_decay(x, y, grid=(1e-6, 1e-2, 1e-4))
    assert sel["val_top1"] == [100.0, 100.0, 100.0] and sel["weight_decay"] == 1e-2


def test_select_weight_decay_prefers_regularisation_where_the_probe_overfits():
    rng = np.random.default_rng(0)

    def make(n):  # 300 features, one of them informative: 400 fitting rows overfit
        y = rng.integers(0, 2, n)
        x = rng.normal(size=(n, 300)).astype(np.float32)
        x[:, 0] += (2 * y - 1) * 1.5
        return x, y

    x, y = make(500)
    xt, yt = make(4000)
    sel = evaluate.select_weight_decay(x, y, grid=(1e-6, 1e-1), val_fraction=0.2)
    assert sel["weight_decay"] == 1e-1 and sel["val_top1"][1] > sel["val_top1"][0]
    weak = evaluate.linear_eval(x, y, xt, yt, weight_decay=1e-6)["top1"]
    chosen = evaluate.linear_eval(x, y, xt, yt, weight_decay=sel["weight_decay"])["top1"]
    assert chosen > weak + 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"grid": ()}, "grid must hold weight decays >= 0, got []"),
     ({"grid": (1e-4, -1.0)}, "grid must hold weight decays >= 0, got [0.0001, -1.0]"),
     ({"val_fraction": 1.0}, "val_fraction must be in (0, 1), got 1.0")],
)
def test_select_weight_decay_refuses_bad_settings(kwargs, message):
    x, y = _blobs(4)
    with pytest.raises(ValueError) as e:
        evaluate.select_weight_decay(x, y, **kwargs)
    assert str(e.value) == message


# --------------------------------------------------------------------------------------------
# Balanced subsets
# --------------------------------------------------------------------------------------------


def test_balanced_subset_counts_and_determinism():
    y = np.repeat(np.arange(10), 100)
    np.random.default_rng(0).shuffle(y)
    idx = evaluate.balanced_subset(y, 0.1, seed=3)
    assert len(idx) == 100 and len(np.unique(idx)) == 100
    assert np.bincount(y[idx], minlength=10).tolist() == [10] * 10
    assert np.array_equal(idx, evaluate.balanced_subset(y, 0.1, seed=3))
    assert not np.array_equal(idx, evaluate.balanced_subset(y, 0.1, seed=4))
    small = evaluate.balanced_subset(y, 0.01, seed=0)
    assert np.bincount(y[small], minlength=10).tolist() == [1] * 10


def test_balanced_subset_excludes_held_out_indices():
    y = np.repeat(np.arange(4), 50)
    held_out = np.arange(0, 200, 2)  # e.g. a test split carved from the same array
    idx = evaluate.balanced_subset(y, 0.2, seed=0, exclude=held_out)
    assert not set(idx.tolist()) & set(held_out.tolist())
    assert np.bincount(y[idx]).tolist() == [10] * 4
    with pytest.raises(ValueError):
        evaluate.balanced_subset(y, 0.0)


# --------------------------------------------------------------------------------------------
# Clustering metrics
# --------------------------------------------------------------------------------------------


def test_assignment_stats_known_answers():
    k = 8
    same = evaluate.assignment_stats(torch.zeros(6, k))  # every image uniform over K
    assert same["assignment_entropy"] == pytest.approx(math.log(k))
    assert same["effective_prototypes"] == pytest.approx(k)
    assert same["assignment_information"] == pytest.approx(0.0, abs=1e-12)
    assert same["argmax_effective_prototypes"] == pytest.approx(1.0)  # ties: prototype 0
    sure = torch.full((6, k), -1e4)
    sure[torch.arange(6), torch.tensor([0, 1, 2, 3, 0, 1])] = 0.0  # certain, 4 prototypes
    res = evaluate.assignment_stats(sure)
    assert res["assignment_entropy"] == pytest.approx(0.0, abs=1e-12)
    h = -(2 * (2 / 6) * math.log(2 / 6) + 2 * (1 / 6) * math.log(1 / 6))
    assert res["assignment_information"] == pytest.approx(h)
    assert res["effective_prototypes"] == pytest.approx(math.exp(h))
    assert res["argmax_effective_prototypes"] == pytest.approx(math.exp(h))
    with pytest.raises(ValueError, match=r"expected \(N, K\) logits with N >= 1"):
        evaluate.assignment_stats(torch.zeros(0, k))


def test_cluster_metrics_permuted_labelling_is_perfect():
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    a = np.array([7, 7, 3, 3, 5, 5, 5])
    res = evaluate.cluster_metrics(a, y, num_prototypes=10)
    assert res["nmi"] == pytest.approx(1.0)
    assert res["ari"] == pytest.approx(1.0)
    assert res["acc"] == pytest.approx(100.0)
    assert res["prototypes_used"] == 3 and res["num_prototypes"] == 10


def test_cluster_accuracy_known_confusion():
    # Contingency (clusters x classes): c0 -> [3, 1], c1 -> [2, 4]. Best one-to-one matching:
    # c0 -> class 0, c1 -> class 1: (3 + 4) / 10 = 70%. Purity: (3 + 4) / 10 as well.
    y = np.array([0, 0, 0, 1, 0, 0, 1, 1, 1, 1])
    a = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    res = evaluate.cluster_metrics(a, y)
    assert res["acc"] == pytest.approx(70.0)
    # Three clusters, two classes: one-to-one leaves the third cluster unmatched.
    a3 = np.array([0, 0, 0, 2, 1, 1, 1, 1, 1, 1])
    res3 = evaluate.cluster_metrics(a3, y)
    assert res3["acc"] == pytest.approx(70.0)
    assert res3["purity"] == pytest.approx(80.0)


# --------------------------------------------------------------------------------------------
# Feature cache
# --------------------------------------------------------------------------------------------


def test_feature_cache_is_keyed_by_model(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, cache_dir=tmp_path, device="cpu",
              cache_tag={"model": "m", "dataset": "d", "split": "train"})
    torch.manual_seed(0)
    m1 = build_model(TINY)
    f1 = evaluate.compute_features(m1, images, **kw)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and "m-d-train-backbone" in files[0].name
    assert torch.equal(evaluate.compute_features(m1, images, **kw), f1)
    m2 = build_model(TINY)
    f2 = evaluate.compute_features(m2, images, **kw)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert not torch.equal(f1, f2)


def test_feature_cache_is_keyed_by_settings_outside_the_weights(tmp_path):
    # The same weights scored with another prototype temperature give other logits.
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, cache_dir=tmp_path, device="cpu",
              layer="logits")
    torch.manual_seed(0)
    model = build_model(TINY)
    cold = evaluate.compute_features(model, images, **kw)
    model.prototypes.temperature = 0.5
    warm = evaluate.compute_features(model, images, **kw)
    torch.testing.assert_close(warm, cold * 0.1 / 0.5)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_a_damaged_feature_cache_file_is_computed_again(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, cache_dir=tmp_path, device="cpu")
    torch.manual_seed(0)
    model = build_model(TINY)
    feats = evaluate.compute_features(model, images, **kw)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:20])  # e.g. a copy cut short
    with pytest.warns(UserWarning, match=rf"feature cache {path} is unreadable .*computing it"):
        assert torch.equal(evaluate.compute_features(model, images, **kw), feats)
    assert torch.equal(evaluate.compute_features(model, images, **kw), feats)  # repaired


# --------------------------------------------------------------------------------------------
# End to end: a tiny run folder from the real training loop, probed through the CLI
# --------------------------------------------------------------------------------------------


def _npz(path: Path, size: int, n_train: int = 48, n_test: int = 24, n_classes: int = 4) -> Path:
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (n_classes, 3))

    def make(n):
        y = np.arange(n) % n_classes
        x = colours[y][:, None, None, :] + rng.normal(0, 20, (n, size, size, 3))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    xtr, ytr = make(n_train)
    xte, yte = make(n_test)
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from carlzoo.training.train import train

    root = tmp_path_factory.mktemp("probe")
    data = _npz(root / "tiny.npz", 16)
    cfg = load_config(model={"width": 4, "num_prototypes": 10},
                      data={"dataset": "npz", "root": str(data), "image_size": 16},
                      optim={"batch_size": 16}, epochs=1, knn_every=0, device="cpu",
                      precision="fp32", channels_last=False)
    train(cfg, root / "run", progress=False)
    return root / "run", data


@pytest.mark.parametrize("protocol", ["knn", "linear", "cluster"])
def test_cli_writes_documented_json(tiny_run, tmp_path, protocol):
    run, data = tiny_run
    out = tmp_path / "res.json"
    res = CliRunner().invoke(probe, ["--model", str(run), "--dataset", "npz", "--data-root",
                                     str(data), "--protocol", protocol, "--out", str(out),
                                     "--device", "cpu", "--cache", str(tmp_path / "cache"),
                                     *(["--k", "5"] if protocol == "knn" else [])])
    assert res.exit_code == 0, res.output
    table = [line for line in res.output.splitlines() if line.startswith("  ")]
    assert len({line.rindex(" ") for line in table}) == 1  # one column of values
    doc = json.loads(out.read_text())
    assert doc["protocol"] == protocol and doc["dataset"] == "npz"
    assert doc["model"] == str(run) and doc["model_train_dataset"] == "npz"
    assert (doc["model_epoch"], doc["model_step"]) == (1, 3)  # the checkpoint measured
    assert doc["n_test"] == 24 and doc["n_train"] == (0 if protocol == "cluster" else 48)
    if protocol == "cluster":
        assert {"nmi", "ari", "acc", "prototypes_used", "assignment_information"} <= set(doc)
        assert 0 <= doc["assignment_information"] <= math.log(10)
        assert "assignment_information" in res.output
        assert doc["num_prototypes"] == 10
    else:
        assert 0.0 <= doc["top1"] <= 100.0 and "top5" in doc
        assert doc["settings"]["layer"] == "backbone"
    if protocol == "knn":
        assert doc["settings"]["k"] == 5 and doc["settings"]["t"] == 0.1
    assert list((tmp_path / "cache").glob("*.safetensors"))
    assert "top1" in res.output or "nmi" in res.output


def _refused_before_any_work(tmp_path, protocol, *options):
    """`carlzoo probe` with a model that must never be read; asserts no --out was written."""
    out = tmp_path / "res.json"
    res = CliRunner().invoke(probe, ["--model", str(tmp_path / "never-read"), "--dataset", "npz",
                                     "--data-root", str(tmp_path), "--protocol", protocol,
                                     "--out", str(out), *options])
    assert not out.exists()
    return res


@pytest.mark.parametrize(
    ("option", "value", "range_"),
    [("--k", "0", "x>=1"), ("--t", "0", "x>0"), ("--batch-size", "0", "x>=1"),
     ("--epochs", "-3", "x>=1")],
)
def test_cli_names_the_option_out_of_range(tmp_path, option, value, range_):
    res = _refused_before_any_work(tmp_path, "semi1", option, value)
    assert res.exit_code == 2
    assert f"Invalid value for '{option}': {value}" in res.output and range_ in res.output


def test_cli_linear_probe_with_the_weight_decay_chosen_on_held_out_rows(tiny_run, tmp_path):
    run, data = tiny_run
    out = tmp_path / "res.json"
    res = CliRunner().invoke(probe, ["--model", str(run), "--dataset", "npz", "--data-root",
                                     str(data), "--protocol", "linear", "--out", str(out),
                                     "--device", "cpu", "--weight-decay", "auto", "--seed", "2"])
    assert res.exit_code == 0, res.output
    settings = json.loads(out.read_text())["settings"]
    sel = settings["weight_decay_selection"]
    assert sel["grid"] == list(evaluate.WEIGHT_DECAY_GRID) and len(sel["val_top1"]) == 11
    assert (sel["seed"], sel["val_fraction"], sel["n_val"]) == (2, 0.1, 4)  # 1 of 12 per class
    best = max(sel["val_top1"])
    assert settings["weight_decay"] == max(
        wd for wd, acc in zip(sel["grid"], sel["val_top1"], strict=True) if acc == best
    )
    # A number is used as it is, with no selection.
    res = CliRunner().invoke(probe, ["--model", str(run), "--dataset", "npz", "--data-root",
                                     str(data), "--protocol", "linear", "--out", str(out),
                                     "--device", "cpu", "--weight-decay", "0.02"])
    assert res.exit_code == 0, res.output
    settings = json.loads(out.read_text())["settings"]
    assert settings["weight_decay"] == 0.02 and "weight_decay_selection" not in settings


@pytest.mark.parametrize("value", ["often", "-1", "nan", "inf"])
def test_cli_refuses_a_weight_decay_that_is_neither_a_number_nor_auto(tmp_path, value):
    res = _refused_before_any_work(tmp_path, "linear", "--weight-decay", value)
    assert res.exit_code == 2
    assert (f"Invalid value for '--weight-decay': {value!r} is not a number >= 0 or 'auto'"
            in res.output)


def test_cli_refuses_a_weight_decay_for_a_protocol_without_one(tmp_path):
    res = _refused_before_any_work(tmp_path, "knn", "--weight-decay", "auto")
    assert res.exit_code == 2
    assert "Error: --weight-decay is for --protocol linear, not knn" in res.output


@pytest.mark.parametrize(
    ("protocol", "option", "value", "users"),
    [("linear", "--k", "20", "knn"), ("semi1", "--t", "0.2", "knn"),
     ("knn", "--epochs", "5", "semi1 or semi10 or finetune"),
     ("cluster", "--seed", "3", "linear or semi1 or semi10 or finetune"),
     ("cluster", "--layer", "projection", "knn or linear or semi1 or semi10 or finetune")],
)
def test_cli_refuses_an_option_the_protocol_does_not_use(tmp_path, protocol, option, value,
                                                         users):
    res = _refused_before_any_work(tmp_path, protocol, option, value)
    assert res.exit_code == 2
    assert f"Error: {option} is for --protocol {users}, not {protocol}" in res.output


def test_cli_bad_device_name_is_one_line_before_any_work(tmp_path):
    res = _refused_before_any_work(tmp_path, "knn", "--device", "gpu")
    assert res.exit_code == 1
    assert res.output.strip() == (
        "Error: device='gpu' is not a device name; use auto, cpu, cuda or cuda:N"
    )


@pytest.mark.parametrize("protocol", ["semi1", "finetune"])
def test_semi_and_finetune_end_to_end(tiny_run, tmp_path, protocol):
    run, data = tiny_run
    res = evaluate.run_probe(run, "npz", data, protocol, epochs=1, batch_size=16, device="cpu")
    assert res["n_train"] == 48 and 0.0 <= res["top1"] <= 100.0
    assert res["settings"]["epochs"] == 1
    if protocol == "semi1":
        # 1% of 48 over 4 classes: one labelled image per class, indices saved.
        idx = res["subset_indices"]
        assert len(idx) == 4 and res["n_labelled"] == 4
        assert res["settings"]["fraction"] == 0.01
        again = evaluate.run_probe(run, "npz", data, protocol, epochs=1, batch_size=16,
                                   device="cpu")
        assert again["subset_indices"] == idx
    else:
        assert res["n_labelled"] == 48 and "subset_indices" not in res


def test_finetune_learns_separable_classes(tmp_path):
    data = np.load(_npz(tmp_path / "c.npz", 16, n_train=64, n_test=32))
    torch.manual_seed(0)
    res = evaluate.finetune_eval(build_model(TINY), data["x_train"], data["y_train"],
                                 data["x_test"], data["y_test"], mean=(0.5,) * 3,
                                 std=(0.25,) * 3, size=16, epochs=8, batch_size=16,
                                 device="cpu")
    assert res["top1"] >= 90.0 and res["n_labelled"] == 64


def test_projection_layer_and_model_untouched(tiny_run):
    run, data = tiny_run
    pm = evaluate.load_probe_model(run)
    before = {k: v.clone() for k, v in pm.model.state_dict().items()}
    res = evaluate.run_probe(pm, "npz", data, "semi10", epochs=1, batch_size=16,
                             layer="projection")
    assert res["settings"]["layer"] == "projection"
    after = pm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cross_domain_probe_of_a_model_folder(tiny_run, tmp_path):
    from carlzoo.pretrained import Preprocessing, ZooConfig, save_pretrained

    _, data = tiny_run
    torch.manual_seed(0)
    model = build_model(TINY)
    cfg = ZooConfig(architecture=TINY, preprocessing=Preprocessing(input_size=16, resize_size=16),
                    name="tiny", provenance={"dataset": "cifar10"})
    folder = save_pretrained(model, tmp_path / "tiny_model", cfg)
    res = evaluate.run_probe(str(folder), "npz", data, "knn", k=5, device="cpu")
    assert res["model_source"] == "pretrained"
    assert res["model_train_dataset"] == "cifar10" and res["probe_dataset"] == "npz"
    assert res["cross_domain"] is None  # an .npz may hold CIFAR-10 itself


def test_cross_domain_of_a_generic_loader_compares_the_data_paths(tiny_run, tmp_path):
    run, data = tiny_run  # trained with --dataset npz on `data`
    other = _npz(tmp_path / "other.npz", 16, n_train=40)  # other images
    same = evaluate.run_probe(run, "npz", data, "knn", k=5, device="cpu")
    moved = evaluate.run_probe(run, "npz", other, "knn", k=5, device="cpu")
    assert same["cross_domain"] is False and moved["cross_domain"] is True
    copy = tmp_path / "copy.npz"  # the same bytes at another path: the same data
    copy.write_bytes(Path(data).read_bytes())
    pm_run = evaluate.load_probe_model(run)
    assert evaluate._cross_domain(pm_run, "npz", copy) is False
    pm = evaluate.ProbeModel(build_model(TINY), 16, (0.5,) * 3, (0.5,) * 3, "tiny", "pretrained")
    assert evaluate.run_probe(pm, "npz", data, "knn", k=5)["cross_domain"] is None  # unknown


def test_cross_domain_is_unknown_for_a_run_that_recorded_a_relative_data_root(tiny_run):
    run, data = tiny_run
    pm = evaluate.load_probe_model(run)
    assert Path(pm.train_data_root).is_absolute()
    # A relative root names its data from a folder that is not known: neither the same
    # file (reached from elsewhere) nor another file of that name can be told apart.
    old = dataclasses.replace(pm, train_data_root=data.name)
    assert evaluate.run_probe(old, "npz", data, "knn", k=5, device="cpu")["cross_domain"] is None


@pytest.mark.parametrize(
    ("trained_on", "probed_on", "expected"),
    [("cifar10", "npz", None), ("npz", "cifar10", None), ("imagefolder", "npz", None),
     ("cifar10", "cifar100", True), ("cifar10", "cifar10", False)],
)
def test_cross_domain_across_dataset_names_is_unknown_where_a_generic_loader_is_one_side(
    tiny_run, trained_on, probed_on, expected
):
    # an .npz may hold CIFAR-10 itself: a generic loader's name says nothing of its data
    run, data = tiny_run
    pm = dataclasses.replace(evaluate.load_probe_model(run), train_dataset=trained_on)
    assert evaluate._cross_domain(pm, probed_on, data) is expected


def test_the_linear_probe_of_one_training_row_is_refused_in_one_line():
    x, y = torch.randn(1, 8), torch.tensor([0])
    with pytest.raises(ValueError) as info:
        evaluate.linear_eval(x, y, torch.randn(3, 8), torch.tensor([0, 1, 0]))
    assert str(info.value) == (
        "the linear probe needs at least 2 training rows, got 1; give it a larger train split"
    )


def test_resize_refuses_preprocessing_it_cannot_reproduce(tiny_run, tmp_path):
    from carlzoo.pretrained import Preprocessing, ZooConfig, save_pretrained

    _, data = tiny_run
    cfg = ZooConfig(architecture=TINY, name="tiny",
                    preprocessing=Preprocessing(input_size=12, resize_size=14))
    folder = save_pretrained(build_model(TINY), tmp_path / "m", cfg)
    with pytest.raises(evaluate.ProbeError) as info:
        evaluate.run_probe(str(folder), "npz", data, "knn", resize=True, device="cpu")
    assert str(info.value) == (
        f"model {folder} preprocesses with resize_size 14 and bicubic interpolation; the probe "
        "resizes only as carlzoo's models do (shorter side to 12 px, bicubic, centre crop): "
        "give it the images at 12x12 px"
    )


def test_errors_are_one_line(tiny_run, tmp_path):
    run, data = tiny_run
    runner = CliRunner()
    base = ["--model", str(run), "--device", "cpu"]

    missing = runner.invoke(probe, base + ["--dataset", "npz", "--data-root",
                                           str(tmp_path / "nope.npz"), "--protocol", "knn"])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    assert "Traceback" not in missing.output

    big = _npz(tmp_path / "big.npz", 24)
    mismatch = runner.invoke(probe, base + ["--dataset", "npz", "--data-root", str(big),
                                            "--protocol", "knn"])
    assert mismatch.exit_code == 1
    assert "expects 16 px" in mismatch.output and "--resize" in mismatch.output
    ok = runner.invoke(probe, base + ["--dataset", "npz", "--data-root", str(big),
                                      "--protocol", "knn", "--resize", "--k", "3"])
    assert ok.exit_code == 0, ok.output

    bad = runner.invoke(probe, base + ["--dataset", "npz", "--data-root", str(data),
                                       "--protocol", "nearest"])
    assert bad.exit_code == 1 and "unknown protocol" in bad.output
    assert "valid: knn, linear" in bad.output and "Traceback" not in bad.output
    assert probe_cmd._PROTOCOLS == evaluate.PROTOCOLS  # what --help lists is what runs
    with pytest.raises(evaluate.ProbeError, match="unknown protocol"):
        evaluate.run_probe(run, "npz", data, "nearest")

    no_run = runner.invoke(probe, ["--model", str(tmp_path / "no_such_model"), "--dataset",
                                   "npz", "--data-root", str(data), "--protocol", "knn"])
    assert no_run.exit_code == 1 and "Traceback" not in no_run.output


def test_out_that_cannot_be_written_is_refused_before_the_probe(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "sub" / "res.json"
    res = CliRunner().invoke(probe, ["--model", str(tmp_path / "never-read"), "--dataset", "npz",
                                     "--data-root", str(tmp_path), "--protocol", "knn",
                                     "--out", str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"Invalid value for '--out': {blocker} is a file, not a folder" in res.output


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--t", "nan"], "Invalid value for '--t': nan is not a finite number > 0"),
     (["--t", "inf"], "Invalid value for '--t': inf is not a finite number > 0"),
     (["--seed", "-1"], "Invalid value for '--seed': -1 is not in the range"),
     (["--seed", str(2**64 - 1)], "Invalid value for '--seed': 18446744073709551615 is not in"),
     (["--cache", "{file}/feats"], "Invalid value for '--cache': {file} is a file, not a folder"),
     (["--cache", "/proc/feats"], "Invalid value for '--cache': output '/proc/feats': cannot "
      "create a file in '/proc'")],
)  # fmt: skip
def test_bad_probe_options_are_refused_by_name_before_the_probe(tmp_path, option, message):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    option = [o.replace("{file}", str(blocker)) for o in option]
    if option[-1].startswith("/proc") and not Path("/proc").is_dir():
        pytest.skip("no /proc here")
    res = CliRunner().invoke(probe, ["--model", str(tmp_path / "never-read"), "--dataset", "npz",
                                     "--data-root", str(tmp_path), "--protocol", "knn", *option])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert message.replace("{file}", str(blocker)) in res.output, res.output


@pytest.mark.parametrize(("device", "why"), [
    ("meta", "meta tensors hold no data, so nothing can be computed on them"),
    ("xpu", "this torch cannot compute on xpu"),
])  # fmt: skip
def test_a_device_this_torch_cannot_compute_on_is_one_line_before_any_work(tmp_path, device, why):
    if device == "xpu" and torch.xpu.is_available():
        pytest.skip("this machine has an XPU")
    res = CliRunner().invoke(probe, ["--model", str(tmp_path / "never-read"), "--dataset", "npz",
                                     "--data-root", str(tmp_path), "--protocol", "knn",
                                     "--device", device])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1].startswith(
        f"Error: device='{device}' asked for, but {why}"
    )


def test_knn_refuses_a_temperature_or_k_it_cannot_vote_with():
    from carlzoo.training.knn import knn_scores

    x, y = torch.randn(8, 4), torch.arange(8) % 2
    for t in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match=r"the kNN temperature must be a finite number > 0"):
            knn_scores(x, y, x, k=3, t=t)
    with pytest.raises(ValueError, match=r"the kNN neighbour count must be an integer >= 1"):
        knn_scores(x, y, x, k=0)


def test_an_empty_split_is_named(tmp_path):
    data = tmp_path / "empty.npz"
    x = np.zeros((0, 16, 16, 3), np.uint8)
    np.savez(data, x_train=x, y_train=np.zeros(0, np.int64), x_test=x,
             y_test=np.zeros(0, np.int64))
    pm = evaluate.ProbeModel(build_model(TINY), 16, (0.5,) * 3, (0.5,) * 3, "tiny", "run")
    with pytest.raises(evaluate.ProbeError, match=rf"^npz: the test split of {data} holds no"):
        evaluate.run_probe(pm, "npz", data, "cluster", device="cpu")


def test_finetuning_batches_hold_at_least_two_images_and_the_global_rng_is_kept():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8), np.array([0, 1, 0])
    kw = dict(num_classes=2, mean=(0.5,) * 3, std=(0.25,) * 3, size=16, epochs=1,
              layer="projection", device="cpu")
    with pytest.raises(evaluate.ProbeError, match="batches of at least 2 images .*batch_size=1"):
        evaluate.finetune_classifier(build_model(TINY), x, y, batch_size=1, **kw)
    # Three images at batch 2 used to be split 2 + 1, and BatchNorm1d refuses one. The
    # caller's global RNG is left as it was.
    model = build_model(TINY)
    before = torch.random.get_rng_state()
    evaluate.finetune_classifier(model, x, y, batch_size=2, **kw)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize(
    ("n", "batch_size", "steps"),
    [(10, 10, 1), (14, 10, 2), (19, 10, 2), (21, 10, 3), (3, 2, 1), (5, 2, 2), (1000, 256, 4)],
)
def test_finetuning_batches_stay_within_the_batch_size(n, batch_size, steps):
    assert evaluate.finetune_steps(n, batch_size) == steps
    sizes = [len(i) for i in torch.tensor_split(torch.arange(n), steps)]
    assert min(sizes) >= 2 and sum(sizes) == n
    if n // 2 >= -(-n // batch_size):  # two images per batch (BN) allow it
        assert max(sizes) <= batch_size and min(sizes) >= batch_size // 2


@pytest.mark.parametrize(("layer", "width"),
                         [("backbone", 32), ("projection", 128), ("logits", 10)])
def test_features_of_no_images_have_the_layer_width(layer, width):
    from carlzoo.training.features import extract_features

    empty = np.zeros((0, 16, 16, 3), np.uint8)
    feats = extract_features(build_model(TINY), empty, mean=(0.5,) * 3, std=(0.25,) * 3,
                             layer=layer)
    assert feats.shape == (0, width)


def test_unlabelled_dataset_is_refused(tmp_path, monkeypatch):
    from carlzoo.training import datasets

    def fake(name, root, split, **kw):
        return datasets.ImageArrays(np.zeros((4, 16, 16, 3), np.uint8), None, None)

    monkeypatch.setattr(datasets, "load_split", fake)
    pm = evaluate.ProbeModel(build_model(TINY), 16, (0.5,) * 3, (0.5,) * 3, "tiny", "run")
    with pytest.raises(evaluate.ProbeError, match="no labels"):
        evaluate.run_probe(pm, "stl10", tmp_path, "knn", device="cpu")


@pytest.mark.parametrize(("height", "width", "size"),
                         [(64, 64, 32), (64, 48, 32), (96, 96, 64), (20, 30, 32)])
def test_features_resize_images_as_the_models_preprocessing_does(height, width, size):
    # The kNN monitor sees the pixels a zoo model's preprocessing gives (shorter side,
    # bicubic, centre crop), not a squashed bilinear copy.
    from PIL import Image

    from carlzoo.images import resize_crop
    from carlzoo.training.features import normalize_uint8

    img = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ref = np.asarray(resize_crop(Image.fromarray(img), size, size), dtype=np.float32)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    out = normalize_uint8(x, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), size)
    assert out.shape == (1, 3, size, size)
    levels = np.abs(out[0].permute(1, 2, 0).numpy() * 255 - ref)
    assert levels.mean() < 0.5  # noise images: the filters differ at the borders only
    assert np.allclose(levels, np.round(levels), atol=1e-3)  # 8-bit levels, as PIL's
