"""``carlzoo export`` / ``carlzoo push``: a real (tiny) training run -> model folder -> local Hub
-> ``carlzoo.load`` by Hub spec and by registry name, online and offline."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from hubserver import LocalHub
from tiny import MODEL_FILES, cli_error

import carlzoo
from carlzoo import registry
from carlzoo.cli.export_cmd import export, push
from carlzoo.export.card import parse_front_matter
from carlzoo.export.push import registry_snippet
from carlzoo.export.repo import (
    ExportError,
    check_parity,
    export_model,
    read_run_records,
    real_parity_images,
)
from carlzoo.model import ModelConfig
from carlzoo.pretrained import from_pretrained
from carlzoo.training.config import config_to_dict
from carlzoo.training.run import load_run

pytestmark = pytest.mark.filterwarnings(  # raised inside huggingface_hub's LFS upload
    "ignore:Use 'content=<...>':DeprecationWarning"
)


@pytest.fixture(scope="module")
def exported(run_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("export_out") / "carl-tiny"
    return export_model(run_dir, out)


def _no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".export-" in p.name or p.name.endswith(".old")]


def _measured_on(run: Path) -> dict[str, int]:
    """The fields a `carlzoo probe --out` result names the run's last checkpoint with."""
    _, _, ckpt = load_run(run)
    return {"model_epoch": ckpt.epoch, "model_step": ckpt.step}


def test_export_writes_the_runtime_folder(run_dir: Path, exported) -> None:
    out = exported.out_dir
    assert {p.name for p in out.iterdir()} == MODEL_FILES
    assert set(exported.files) == MODEL_FILES
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in exported.files.values())
    assert _no_leftovers(out.parent) == []

    cfg = json.loads((out / "config.json").read_text())
    _, train_cfg, ckpt = load_run(run_dir)
    assert cfg["format"] == "carlzoo/1" and cfg["name"] == "carl-tiny"
    assert cfg["architecture"] == ModelConfig(width=4, num_prototypes=10).to_dict()
    assert cfg["preprocessing"] == {
        "input_size": 16,
        "resize_size": 16,
        "interpolation": "bicubic",
        "mean": list(train_cfg.augment.mean),
        "std": list(train_cfg.augment.std),
    }
    prov = cfg["provenance"]
    assert prov["dataset"] == "npz" and prov["epochs"] == 1 == ckpt.epoch
    assert prov["code_version"] == carlzoo.__version__
    assert prov["weights_dtype"] == "float32" and prov["onnx_opset"] == 18
    assert prov["train_time_s"] > 0 and prov["hardware"].startswith("1 x CPU (")
    expected_cfg = config_to_dict(train_cfg)
    expected_cfg["data"]["root"] = "tiny.npz"  # local paths are not published
    assert prov["training_config"] == expected_cfg
    assert json.loads((out / "training_config.json").read_text()) == expected_cfg
    # knn_every=0 and no eval.json: nothing was measured, so nothing is claimed
    assert cfg["metrics"] == {} and exported.metrics == {}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["measured"] == {} and metrics["knn_monitor"] is None
    assert metrics["last_epoch"]["epoch"] == 1
    assert exported.roundtrip_max_abs_diff <= 1e-6


def test_card_claims_only_measured_results(exported) -> None:
    text = (exported.out_dir / "README.md").read_text()
    meta = parse_front_matter(text)
    assert meta == yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "carlzoo"
    assert meta["pipeline_tag"] == "image-feature-extraction"
    assert meta["license"] == "apache-2.0"
    assert {"carl", "self-supervised", "image-feature-extraction", "onnx"} <= set(meta["tags"])
    assert "model-index" not in meta and "metrics" not in meta
    assert "datasets" not in meta  # a custom npz dataset has no Hub id
    assert text.count("not measured") >= 2
    assert "$" not in text.split("```bash")[0]  # every template placeholder was filled
    assert "Ramírez Rivera, Adín" in text and "2112.15421" in text
    assert "Representation Learning via Consistent Assignment of Views to Clusters" in text


def test_onnx_parity_on_random_and_real_images(exported) -> None:
    par = exported.parity
    for key in ("random", "real"):
        check = par[key]
        assert check["scaled_diff"] <= 1e-4 and check["min_cosine"] > 1 - 1e-5
        assert check["max_abs_diff"] >= 0
    assert par["real"]["source"] == "8 images of the npz test split"
    cfg = json.loads((exported.out_dir / "config.json").read_text())
    assert cfg["provenance"]["onnx_parity"]["real"]["n"] == 8
    text = (exported.out_dir / "README.md").read_text()
    assert "ONNX vs PyTorch on 8 images of the npz test split" in text


def test_exported_folder_reproduces_the_checkpoint(run_dir: Path, exported) -> None:
    model, _, _ = load_run(run_dir)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).features
    for backend in ("torch", "onnx"):
        loaded = from_pretrained(exported.out_dir, backend=backend)
        got = loaded.embed(x, normalize=False)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_eval_json_metrics_reach_config_and_model_index(run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    probe = {
        "protocol": "linear",
        "dataset": "npz",
        "top1": 12.5,
        "top5": 50.0,
        "settings": {"layer": "backbone"},
        **_measured_on(run),
    }
    (run / "eval.json").write_text(json.dumps(probe))
    res = export_model(run, tmp_path / "m", onnx=False, name="carl-probed")
    assert res.metrics == {"linear_top1": 12.5, "linear_top5": 50.0}
    assert res.parity is None and not (tmp_path / "m" / "model.onnx").exists()
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["metrics"] == {"linear_top1": 12.5, "linear_top5": 50.0}
    meta = parse_front_matter((tmp_path / "m" / "README.md").read_text())
    (entry,) = meta["model-index"]
    assert entry["name"] == "carl-probed"
    (result,) = entry["results"]
    assert result["dataset"]["type"] == "npz" and result["task"]["type"] == "image-classification"
    assert [(m["type"], m["value"]) for m in result["metrics"]] == [
        ("accuracy", 12.5),
        ("top_5_accuracy", 50.0),
    ]
    card = (tmp_path / "m" / "README.md").read_text()
    assert "12.50%" in card and "--protocol linear" in card
    assert re.search(r"kNN top-1 accuracy \| .* \| not measured", card)


def test_a_probe_result_with_nan_is_published_without_it(run_dir: Path, tmp_path: Path) -> None:
    """`carlzoo probe` may write NaN (JSON that Python reads): export publishes the finite
    numbers and null for the others rather than failing on JSON that has no NaN."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    probe = {"protocol": "knn", "dataset": "npz", "top1": 12.5, "top5": float("nan"),
             "extra": {"loss": float("inf")}, **_measured_on(run)}  # fmt: skip
    (run / "eval.json").write_text(json.dumps(probe))  # NaN / Infinity, as json.dumps writes
    res = export_model(run, tmp_path / "m", onnx=False)
    assert res.metrics == {"knn_top1": 12.5}
    published = json.loads((tmp_path / "m" / "metrics.json").read_text())
    (ev,) = published["evaluations"]
    assert ev["top1"] == 12.5 and ev["top5"] is None and ev["extra"]["loss"] is None


def test_published_results_name_no_local_paths(run_dir: Path, tmp_path: Path) -> None:
    from carlzoo.training.evaluate import run_probe

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    data = run_dir.parent / "tiny.npz"
    probe = run_probe(run, "npz", data, "knn", k=5)  # the real `carlzoo probe` result
    assert probe["model"] == str(run)
    other = dict(probe, model=str(tmp_path), model_source="pretrained")  # a local folder
    zoo = dict(probe, model="carl-stl10", model_source="pretrained", dataset="stl10")
    (run / "eval.json").write_text(json.dumps([probe, other, zoo]))
    export_model(run, tmp_path / "m", onnx=False)
    for f in (tmp_path / "m").iterdir():
        assert str(tmp_path).encode() not in f.read_bytes(), f.name
    published = (tmp_path / "m" / "metrics.json").read_text()
    models = [e["model"] for e in json.loads(published)["evaluations"]]
    assert models == ["this model", tmp_path.name, "carl-stl10"]


def test_card_credits_the_script_that_measured_a_result(run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    command = "python benchmarks/gpu_cifar10.py --data c10.npz --out OUT"
    evals = [
        {"protocol": "knn", "dataset": "npz", "top1": 33.0, "command": command, **_measured_on(run)}
    ]
    (run / "eval.json").write_text(json.dumps(evals))
    export_model(run, tmp_path / "m", onnx=False)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "| 33.00% | `benchmarks/gpu_cifar10.py` (knn) |" in card
    assert command in card
    assert "--protocol knn --out RUN_DIR/eval.json" not in card
    assert "Cluster accuracy matches" not in card  # no clustering result: no note on it

    # A clustering result's Hungarian accuracy is explained where it is shown.
    cluster = {"protocol": "cluster", "dataset": "npz", "acc": 11.0, "purity": 70.0,
               "nmi": 0.4, "command": command, **_measured_on(run)}  # fmt: skip
    (run / "eval.json").write_text(json.dumps([*evals, cluster]))
    export_model(run, tmp_path / "m2", onnx=False)
    card = (tmp_path / "m2" / "README.md").read_text()
    assert "| 11.00% | `benchmarks/gpu_cifar10.py` (cluster) |" in card
    assert "with more prototypes (10) than classes, the unmatched prototypes' images" in card


def test_float16_export(run_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    res = export_model(run_dir, tmp_path / "h", dtype="float16", onnx=False)
    with safe_open(str(tmp_path / "h" / "model.safetensors"), framework="pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes["backbone.conv1.weight"] == torch.float16
    assert dtypes["backbone.bn1.running_var"] == torch.float32
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["provenance"]["weights_dtype"] == "float16"
    assert cfg["provenance"]["float16_max_abs_diff"] == res.roundtrip_max_abs_diff
    assert "float16" in (tmp_path / "h" / "README.md").read_text()


def test_run_records_count_each_epoch_once(tmp_path: Path) -> None:
    lines = [
        {"epoch": 1, "epoch_time_s": 10.0},
        {"epoch": 2, "epoch_time_s": 99.0, "knn_top1": 1.0},  # lost to a crash, then resumed
        {"epoch": 2, "epoch_time_s": 20.0, "knn_top1": 30.0, "knn_top5": 60.0},
        {"epoch": 3, "epoch_time_s": 30.0, "knn_top1": 40.0, "hardware": "1x GPU"},
    ]
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"epoch": 4, "los'  # killed mid-write
    (tmp_path / "metrics.jsonl").write_text(text)
    rec = read_run_records(tmp_path, last_epoch=2)
    assert [r["epoch"] for r in rec.records] == [1, 2]
    assert rec.train_time_s == 30.0 and rec.knn["knn_top1"] == 30.0 and rec.hardware is None
    assert read_run_records(tmp_path, last_epoch=9).hardware == "1x GPU"
    fallback = read_run_records(tmp_path / "none", 1, {"epoch": 1, "epoch_time_s": 5.0})
    assert fallback.train_time_s == 5.0 and fallback.knn is None


def test_knn_of_another_epoch_is_not_published_for_a_checkpoint(tmp_path: Path) -> None:
    # knn_every=2: epoch 3's checkpoint has no kNN result of its own; epoch 2's was measured
    # on other weights and is not this checkpoint's
    lines = [
        {"epoch": 1, "epoch_time_s": 1.0},
        {"epoch": 2, "epoch_time_s": 2.0, "knn_top1": 20.0, "knn_top5": 50.0},
        {"epoch": 3, "epoch_time_s": 3.0},
        {"epoch": 4, "epoch_time_s": 4.0, "knn_top1": 40.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert read_run_records(tmp_path, last_epoch=3).knn is None
    assert read_run_records(tmp_path, last_epoch=3, fallback=lines[2]).knn is None
    assert read_run_records(tmp_path, last_epoch=2).knn["knn_top1"] == 20.0
    # the checkpoint's own record of its epoch is its result
    own = {"epoch": 3, "epoch_time_s": 3.0, "knn_top1": 33.0}
    assert read_run_records(tmp_path, last_epoch=3, fallback=own).knn["knn_top1"] == 33.0
    stale = {"epoch": 2, "knn_top1": 20.0}  # a record of another epoch is not the checkpoint's
    assert read_run_records(tmp_path / "none", 3, stale).knn is None


def test_training_time_is_not_recorded_without_every_epoch(tmp_path: Path) -> None:
    # a lone checkpoint of epoch 3: its record holds one epoch's time, not the run's
    lone = read_run_records(tmp_path / "none", 3, {"epoch": 3, "epoch_time_s": 5.0})
    assert lone.train_time_s is None and len(lone.records) == 1
    lines = [{"epoch": 2, "epoch_time_s": 2.0}, {"epoch": 3, "epoch_time_s": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert read_run_records(tmp_path, 3).train_time_s is None  # epoch 1 is missing
    lines.insert(0, {"epoch": 1, "epoch_time_s": 1.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert read_run_records(tmp_path, 3).train_time_s == 6.0


def test_lone_checkpoint_of_a_later_epoch_records_no_training_time(
    run_dir: Path, tmp_path: Path
) -> None:
    import dataclasses

    from carlzoo.training.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.safetensors")
    later = dataclasses.replace(
        ckpt, epoch=3, step=12, metrics={**ckpt.metrics, "epoch": 3, "step": 12}
    )
    (tmp_path / "lone").mkdir()
    save_checkpoint(tmp_path / "lone" / "epoch_0003.safetensors", later)
    res = export_model(tmp_path / "lone" / "epoch_0003.safetensors", tmp_path / "m", onnx=False)
    prov = json.loads((res.out_dir / "config.json").read_text())["provenance"]
    assert prov["epochs"] == 3 and prov["train_time_s"] is None
    assert "- **Training time:** not recorded." in (res.out_dir / "README.md").read_text()


def test_probe_defaults_are_those_of_carlzoo_probe() -> None:
    import inspect

    from carlzoo.export import repo
    from carlzoo.training.evaluate import DEFAULT_EPOCHS, run_probe

    params = inspect.signature(run_probe).parameters
    assert repo._PROBE_DEFAULTS == {k: params[k].default for k in repo._PROBE_DEFAULTS}
    assert repo._DEFAULT_EPOCHS == DEFAULT_EPOCHS


def test_only_results_of_the_exported_checkpoint_are_published(
    run_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    here = _measured_on(run)
    ours = {"protocol": "linear", "dataset": "npz", "top1": 12.5, **here}
    later = {"protocol": "knn", "dataset": "npz", "top1": 70.0, "model_epoch": 9, "model_step": 36}
    unknown = {"protocol": "cluster", "dataset": "npz", "acc": 30.0, "nmi": 0.2}
    (run / "eval.json").write_text(json.dumps([ours, later]))
    (run / "eval-cluster-npz.json").write_text(json.dumps(unknown))
    res = export_model(run, tmp_path / "m", onnx=False)
    assert res.metrics == {"linear_top1": 12.5}
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["metrics"] == {"linear_top1": 12.5}
    published = json.loads((tmp_path / "m" / "metrics.json").read_text())["evaluations"]
    assert [e["protocol"] for e in published] == ["linear"]
    card = (tmp_path / "m" / "README.md").read_text()
    assert "70.00%" not in card and "0.2000" not in card
    assert len(res.warnings) == 2 and all("\n" not in w for w in res.warnings)
    w_later, w_unknown = res.warnings
    assert w_later.startswith(f"{run / 'eval.json'}: left out its knn result on npz")
    assert "epoch 9 (step 36)" in w_later
    assert f"(epoch {here['model_epoch']}, step {here['model_step']})" in w_later
    assert w_unknown.startswith(f"{run / 'eval-cluster-npz.json'}: left out its cluster")
    assert "no model_epoch/model_step" in w_unknown and "unknown checkpoint" in w_unknown
    # the command prints them
    result = CliRunner().invoke(export, [str(run), "--out", str(tmp_path / "m2"), "--no-onnx"])
    assert result.exit_code == 0, result.output
    warned = [ln for ln in result.output.splitlines() if ln.startswith("warning: ")]
    assert len(warned) == 2 and "epoch 9 (step 36)" in warned[0]


def test_results_with_other_settings_get_their_own_metric(run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    here = _measured_on(run)
    evals = [
        {"protocol": "linear", "dataset": "npz", "top1": 80.0, "settings": {"layer": "backbone"}},
        {"protocol": "linear", "dataset": "npz", "top1": 60.0, "settings": {"layer": "projection"}},
        {"protocol": "knn", "dataset": "npz", "top1": 50.0, "settings": {"k": 5, "t": 0.1}},
    ]
    (run / "eval.json").write_text(json.dumps([dict(e, **here) for e in evals]))
    res = export_model(run, tmp_path / "m", onnx=False, name="carl-variants")
    expected = {"linear_top1": 80.0, "linear_projection_top1": 60.0, "knn_k5_top1": 50.0}
    assert res.metrics == expected  # the default settings keep their key
    assert json.loads((tmp_path / "m" / "config.json").read_text())["metrics"] == expected
    meta = parse_front_matter((tmp_path / "m" / "README.md").read_text())
    names = [
        (r["task"]["name"], m["name"], m["value"])
        for r in meta["model-index"][0]["results"]
        for m in r["metrics"]
    ]
    assert names == [
        ("Linear probe on frozen CARL features", "Linear probe top-1 accuracy", 80.0),
        (
            "Linear probe on frozen CARL features (layer=projection)",
            "Linear probe top-1 accuracy (layer=projection)",
            60.0,
        ),
        ("kNN on frozen CARL features (k=5)", "kNN top-1 accuracy (k=5)", 50.0),
    ]
    # the same result in two files is listed once; two values for one metric are refused
    (run / "eval-linear-npz.json").write_text(json.dumps(dict(evals[0], **here)))
    res = export_model(run, tmp_path / "m2", onnx=False)
    assert res.metrics == expected
    (run / "eval-linear-npz.json").write_text(json.dumps(dict(evals[0], top1=81.0, **here)))
    msg = cli_error(_cli(export, [str(run), "--out", str(tmp_path / "m3"), "--no-onnx"]))
    assert str(run / "eval.json") in msg and str(run / "eval-linear-npz.json") in msg
    assert "Linear probe top-1 accuracy" in msg and "linear_top1" in msg and "81" in msg
    assert not (tmp_path / "m3").exists() and _no_leftovers(tmp_path) == []


def test_a_linear_probe_with_another_weight_decay_gets_its_own_metric_and_command(
    run_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    here = _measured_on(run)
    selection = {"grid": [1e-4, 1e-2], "val_top1": [70.0, 75.0], "val_fraction": 0.1,
                 "seed": 2, "n_val": 5}
    evals = [
        {"protocol": "linear", "dataset": "npz", "top1": 80.0,
         "settings": {"layer": "backbone", "weight_decay": 1e-4, "seed": 0}},
        {"protocol": "linear", "dataset": "npz", "top1": 82.0,
         "settings": {"layer": "backbone", "weight_decay": 0.01, "seed": 2,
                      "weight_decay_selection": selection}},
        {"protocol": "linear", "dataset": "npz", "top1": 78.0,
         "settings": {"layer": "backbone", "weight_decay": 0.003, "seed": 0}},
    ]
    (run / "eval.json").write_text(json.dumps([dict(e, **here) for e in evals]))
    res = export_model(run, tmp_path / "m", onnx=False)
    assert res.metrics == {
        "linear_top1": 80.0, "linear_wdauto_seed2_top1": 82.0, "linear_wd0.003_top1": 78.0
    }  # fmt: skip
    card = (tmp_path / "m" / "README.md").read_text()
    assert "Linear probe top-1 accuracy (weight_decay=auto, seed=2)" in card
    base = "carlzoo probe --model RUN_DIR --dataset npz --data-root DATA --protocol linear"
    assert (
        f"{base} --weight-decay auto --seed 2 --out RUN_DIR/eval-linear-npz-wdauto-seed2.json\n"
        in card
    )
    assert f"{base} --weight-decay 0.003 --out RUN_DIR/eval-linear-npz-wd0.003.json\n" in card


def test_card_commands_reproduce_the_settings_and_keep_other_results(
    run_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    knn = {
        "protocol": "knn",
        "dataset": "npz",
        "top1": 50.0,
        "settings": {"layer": "backbone", "k": 5, "k_used": 5, "t": 0.1, "seed": 0},
        **_measured_on(run),
    }
    semi = {
        "protocol": "semi10",
        "dataset": "npz",
        "top1": 20.0,
        "settings": {"layer": "projection", "epochs": 3, "seed": 1, "batch_size": 256},
        **_measured_on(run),
    }
    (run / "eval.json").write_text(json.dumps(knn))
    # the card's advice writes eval-PROTOCOL-DATASET.json next to eval.json: export reads both
    (run / "eval-semi10-npz-projection-ep3-seed1.json").write_text(json.dumps(semi))
    export_model(run, tmp_path / "m", onnx=False)
    card = (tmp_path / "m" / "README.md").read_text()
    base = "carlzoo probe --model RUN_DIR --dataset npz --data-root DATA"
    assert f"{base} --protocol knn --k 5 --out RUN_DIR/eval-knn-npz-k5.json\n" in card
    assert (
        f"{base} --protocol semi10 --layer projection --epochs 3 --seed 1 "
        "--out RUN_DIR/eval-semi10-npz-projection-ep3-seed1.json\n"
    ) in card
    assert "--out RUN_DIR/eval.json" not in card  # it would replace the results there
    assert (
        f"run `{base} --protocol PROTOCOL --out RUN_DIR/eval-PROTOCOL-npz.json` and export "
        "again" in card
    )
    assert "every `RUN_DIR/eval*.json`" in card
    assert re.search(r"Linear probe top-1 accuracy \| .* \| not measured", card)
    # a checkpoint that is not the run's last is named as such
    ckpt = run / "checkpoints" / "epoch_0001.safetensors"
    shutil.copy(run / "checkpoints" / "last.safetensors", ckpt)
    export_model(ckpt, tmp_path / "m1", onnx=False)
    card = (tmp_path / "m1" / "README.md").read_text()
    assert "carlzoo probe --model RUN_DIR/checkpoints/epoch_0001.safetensors --dataset" in card


def test_a_result_on_other_data_under_the_runs_dataset_name_is_left_out(
    run_dir: Path, tmp_path: Path
) -> None:
    # `carlzoo probe --dataset npz --data-root other.npz` on a run trained on another .npz:
    # cross_domain true under the run's own dataset name is not the model's npz metric
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    here = _measured_on(run)
    ours = {"protocol": "knn", "dataset": "npz", "top1": 40.0, "cross_domain": False, **here}
    unknown = {"protocol": "linear", "dataset": "npz", "top1": 12.5, "cross_domain": None, **here}
    other = {"protocol": "knn", "dataset": "npz", "top1": 70.0, "cross_domain": True, **here}
    named = {"protocol": "linear", "dataset": "cifar100", "top1": 30.0, "cross_domain": True}
    (run / "eval.json").write_text(json.dumps([ours, unknown, dict(named, **here)]))
    (run / "eval-knn-other.json").write_text(json.dumps(other))
    res = export_model(run, tmp_path / "m", onnx=False)
    # another dataset's name keeps its prefixed key; false and null (unknown) are as before
    expected = {"knn_top1": 40.0, "linear_top1": 12.5, "cifar100_linear_top1": 30.0}
    assert res.metrics == expected
    assert json.loads((tmp_path / "m" / "config.json").read_text())["metrics"] == expected
    assert "70.00%" not in (tmp_path / "m" / "README.md").read_text()
    (warning,) = res.warnings
    assert warning.startswith(f"{run / 'eval-knn-other.json'}: left out its knn result on npz")
    assert "other data than the run's training data under the same dataset name" in warning
    assert "\n" not in warning
    # alone, it is left out the same way: kNN is then not measured
    (run / "eval.json").unlink()
    res = export_model(run, tmp_path / "m2", onnx=False)
    assert res.metrics == {} and len(res.warnings) == 1
    card = (tmp_path / "m2" / "README.md").read_text()
    assert re.search(r"kNN top-1 accuracy \| .* \| not measured", card)


def _with_knn_monitor(
    run: Path, knn_k: int, top1: float, top5: float, bank: int | None = None
) -> None:
    """Rewrite ``run``'s checkpoint as one of a run whose kNN monitor ran with ``knn_k`` (and
    a bank of ``bank`` images drawn from a larger train split)."""
    import dataclasses

    from carlzoo.training.checkpoint import load_checkpoint, save_checkpoint

    path = run / "checkpoints" / "last.safetensors"
    ckpt = load_checkpoint(path)
    metrics = {**ckpt.metrics, "knn_top1": top1, "knn_top5": top5}
    metrics.pop("knn_bank", None)
    if bank is not None:
        metrics["knn_bank"] = bank
    config = {**ckpt.config, "knn_every": 1, "knn_k": knn_k}
    save_checkpoint(path, dataclasses.replace(ckpt, metrics=metrics, config=config))


def test_the_knn_monitor_with_other_settings_gets_its_own_metric(
    run_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    _with_knn_monitor(run, 200, 33.0, 66.0)  # carlzoo probe's k and t: the default key
    assert export_model(run, tmp_path / "m0", onnx=False).metrics == {
        "knn_top1": 33.0, "knn_top5": 66.0
    }  # fmt: skip
    _with_knn_monitor(run, 5, 33.0, 66.0)
    res = export_model(run, tmp_path / "m", onnx=False)
    assert res.metrics == {"knn_k5_top1": 33.0, "knn_k5_top5": 66.0}
    card = (tmp_path / "m" / "README.md").read_text()
    meta = parse_front_matter(card)
    (entry,) = meta["model-index"][0]["results"]
    assert entry["task"]["name"] == "kNN on frozen CARL features (k=5)"
    assert [m["name"] for m in entry["metrics"]] == [
        "kNN top-1 accuracy (k=5)", "kNN top-5 accuracy (k=5)"
    ]  # fmt: skip
    assert "kNN monitor of `carlzoo train`" in card and "k=5" in card
    # as for a probe result with k=5: no "not measured" kNN row, the linear one stays
    assert not re.search(r"kNN top-1 accuracy \| .* \| not measured", card)
    assert re.search(r"Linear probe top-1 accuracy \| .* \| not measured", card)
    # a probe result with the default settings is another metric: both are published
    here = _measured_on(run)
    probe = {"protocol": "knn", "dataset": "npz", "top1": 50.0, **here}
    (run / "eval.json").write_text(json.dumps(dict(probe, settings={"k": 200, "t": 0.1})))
    res = export_model(run, tmp_path / "m2", onnx=False)
    assert res.metrics == {"knn_top1": 50.0, "knn_k5_top1": 33.0, "knn_k5_top5": 66.0}
    # a probe result with the monitor's settings replaces the monitor's
    (run / "eval.json").write_text(json.dumps(dict(probe, settings={"k": 5, "t": 0.1})))
    res = export_model(run, tmp_path / "m3", onnx=False)
    assert res.metrics == {"knn_k5_top1": 50.0}


def test_a_knn_monitor_on_a_bank_smaller_than_the_train_split_gets_its_own_metric(
    run_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    _with_knn_monitor(run, 200, 33.0, 66.0, bank=40)  # knn_max_train=40 of a larger split
    res = export_model(run, tmp_path / "m", onnx=False)
    assert res.metrics == {"knn_bank40_top1": 33.0, "knn_bank40_top5": 66.0}
    card = (tmp_path / "m" / "README.md").read_text()
    assert "kNN top-1 accuracy (bank=40)" in card
    # the probe (the whole train split) is another number: both are published
    here = _measured_on(run)
    probe = {"protocol": "knn", "dataset": "npz", "top1": 50.0, **here}
    (run / "eval.json").write_text(json.dumps(probe))
    res = export_model(run, tmp_path / "m2", onnx=False)
    assert res.metrics == {"knn_top1": 50.0, "knn_bank40_top1": 33.0, "knn_bank40_top5": 66.0}


def test_parity_images_fall_back_to_example_images(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from PIL import Image

    from carlzoo.export import repo
    from carlzoo.pretrained import Preprocessing

    _, cfg, _ = load_run(run_dir)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(tmp_path / "gone")))
    pre = Preprocessing(input_size=16, resize_size=16)
    examples = tmp_path / "examples"
    examples.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 30), (60 * i, 100, 200)).save(examples / f"img{i}.png")
    (examples / "broken.jpg").write_bytes(b"not an image")
    monkeypatch.setattr(repo, "EXAMPLE_IMAGES", examples)
    x, source = real_parity_images(cfg, pre)
    assert tuple(x.shape) == (2, 3, 16, 16) and source == "2 bundled example images"
    monkeypatch.setattr(repo, "EXAMPLE_IMAGES", tmp_path / "no-examples")
    assert real_parity_images(cfg, pre) is None


# ---- bad input ---------------------------------------------------------------------------


def _cli(cmd, args: list[str]):
    return CliRunner().invoke(cmd, args, catch_exceptions=False)


def test_export_without_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty_run").mkdir()
    msg = cli_error(_cli(export, [str(tmp_path / "empty_run"), "--out", str(tmp_path / "m")]))
    assert "holds no checkpoint" in msg and "empty_run" in msg
    assert not (tmp_path / "m").exists() and _no_leftovers(tmp_path) == []
    msg = cli_error(_cli(export, [str(tmp_path / "nope"), "--out", str(tmp_path / "m")]))
    assert "not found" in msg


def test_export_of_corrupt_checkpoint_is_refused(run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ckpt = run / "checkpoints" / "last.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    msg = cli_error(_cli(export, [str(run), "--out", str(tmp_path / "m")]))
    assert "last.safetensors" in msg and "safetensors" in msg
    assert not (tmp_path / "m").exists() and _no_leftovers(tmp_path) == []


def test_existing_output_needs_overwrite_which_replaces_only_a_model_folder(
    run_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "m"
    (out / "photos").mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    msg = cli_error(_cli(export, [str(run_dir), "--out", str(out), "--no-onnx"]))
    assert "already exists" in msg and "--overwrite" in msg
    # A folder of other files, given by mistake, is not deleted by --overwrite.
    msg = cli_error(_cli(export, [str(run_dir), "--out", str(out), "--no-onnx", "--overwrite"]))
    assert msg == (
        f"Error: --out {out} holds keep.txt, photos, which no model export writes; "
        "--overwrite replaces only a model folder: choose another folder, or move those out first"
    )
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "photos"]
    (out / "keep.txt").unlink()
    (out / "photos").rmdir()
    for _ in range(2):  # an empty folder, then the model folder it became
        result = _cli(export, [str(run_dir), "--out", str(out), "--no-onnx", "--overwrite"])
        assert result.exit_code == 0, result.output
        assert {p.name for p in out.iterdir()} == MODEL_FILES - {"model.onnx"}
    assert "measured metrics: none" in result.output
    assert _no_leftovers(tmp_path) == []


def test_missing_folders_above_out_are_made_and_a_file_there_is_refused(
    run_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "models" / "zoo" / "m"  # as `carlzoo export RUN --out models/NAME`
    result = _cli(export, [str(run_dir), "--out", str(out), "--no-onnx"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == MODEL_FILES - {"model.onnx"}
    assert _no_leftovers(out.parent) == []
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    bad = blocker / "sub" / "m"
    msg = cli_error(_cli(export, [str(run_dir), "--out", str(bad), "--no-onnx"]))
    assert msg == f"Error: --out {bad}: {blocker} is a file, not a folder; choose another path"
    assert blocker.read_text() == "mine"


def test_out_may_not_replace_the_run_or_the_current_folder(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "runs" / "c10"
    shutil.copytree(run_dir, run)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    ckpt = run / "checkpoints" / "last.safetensors"
    cases = [
        (run, run, "is the source run folder"),
        (run, tmp_path / "runs", "contains the source run folder"),
        (run, tmp_path, "contains the source run folder"),
        (ckpt, run / "checkpoints", "is the checkpoint's folder"),
        (ckpt, run, "is the source run folder"),
        (run, run / "checkpoints" / ".." / "checkpoints", "is the checkpoint's folder"),
    ]
    for source, out, what in cases:
        msg = cli_error(_cli(export, [str(source), "--out", str(out), "--no-onnx", "--overwrite"]))
        assert what in msg and "choose a folder outside the run" in msg, msg
        msg = cli_error(_cli(export, [str(source), "--out", str(out), "--no-onnx"]))
        assert what in msg, msg  # not "pass --overwrite"
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    # "." and ".." resolve to the current folder and its parent
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    for out, what in ((".", "is the current folder"), ("..", "is a parent of the current")):
        msg = cli_error(_cli(export, [str(run), "--out", out, "--no-onnx", "--overwrite"]))
        assert msg.startswith(f"Error: --out {out} {what}"), msg
    assert list(cwd.iterdir()) == [] and [p.name for p in cwd.parent.iterdir()] == ["b"]
    assert _no_leftovers(tmp_path) == [] and _no_leftovers(cwd.parent) == []
    # a folder inside the run is fine
    result = _cli(export, [str(run), "--out", str(run / "model"), "--no-onnx"])
    assert result.exit_code == 0, result.output


def test_float16_overflow_is_an_error(run_dir: Path, tmp_path: Path) -> None:
    import dataclasses

    from carlzoo.training.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.safetensors")
    weights = dict(ckpt.model)
    bias = weights["backbone.bn1.bias"].clone()
    bias[0] = 7.0e4  # finite in float32, beyond float16's 65504
    weights["backbone.bn1.bias"] = bias
    source = tmp_path / "ovf.safetensors"
    save_checkpoint(source, dataclasses.replace(ckpt, model=weights))
    out = tmp_path / "out"
    out.mkdir()
    # --out under folders that do not exist yet: the failed export does not leave them.
    args = [str(source), "--out", str(out / "new1" / "new2" / "m"), "--dtype", "float16",
            "--no-onnx"]  # fmt: skip
    msg = cli_error(_cli(export, args))
    assert msg.startswith("Error: --dtype float16: the exported weights give non-finite")
    assert "backbone.bn1.bias" in msg and "--dtype float32" in msg
    assert list(out.iterdir()) == []
    res = export_model(source, out / "m32", onnx=False)  # float32 holds it
    assert res.roundtrip_max_abs_diff <= 1e-6


def test_a_killed_exports_staging_folder_is_removed(run_dir: Path, tmp_path: Path) -> None:
    from carlzoo.export import repo

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead = int(proc.stdout)  # a pid that no longer runs

    def staging(*names: str) -> list[Path]:
        for name in names:
            (tmp_path / name / "m").mkdir(parents=True)
            (tmp_path / name / "m" / "model.safetensors").write_bytes(b"half written")
        return [tmp_path / name for name in names]

    # the staging folders of exports by carlzoo versions that did not name the host
    stale = staging(f".m.export-{dead}-0123abcd")
    kept = staging(f".m.export-{os.getpid()}-01234567", f".other.export-{dead}-01234567")
    res = export_model(run_dir, tmp_path / "m", onnx=False)
    assert [p for p in stale if p.exists()] == [] and all(p.exists() for p in kept)
    assert res.warnings == (
        f"removed {stale[0]}: the temporary folder of an export (pid {dead}) that was killed",
    )
    # this version names the host: another host's pids are not ours to judge
    host = repo._host()
    stale = staging(f".m.export-{host}-{dead}-89abcdef")
    kept += staging(
        f".m.export-{host}-{os.getpid()}-89abcdef", f".m.export-otherhost-{dead}-01234567"
    )
    res = export_model(run_dir, tmp_path / "m", onnx=False, overwrite=True)
    assert [p for p in stale if p.exists()] == [] and all(p.exists() for p in kept)
    assert [w.split(":")[0] for w in res.warnings] == [f"removed {stale[0]}"]


def test_failed_onnx_export_leaves_nothing(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import carlzoo.export.repo

    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded\nwith a long traceback")

    monkeypatch.setattr(carlzoo.export.repo, "export_onnx", broken)
    msg = cli_error(_cli(export, [str(run_dir), "--out", str(tmp_path / "m")]))
    assert "ONNX export (opset 18) failed: RuntimeError: exporter exploded with" in msg
    assert not (tmp_path / "m").exists() and _no_leftovers(tmp_path) == []


def test_an_opset_the_exporter_cannot_write_is_refused_before_any_work(
    run_dir: Path, tmp_path: Path
) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    for opset in (0, 17, newest + 1):  # torch.onnx would write 18 for each of them
        args = [str(run_dir), "--out", str(tmp_path / "m"), "--opset", str(opset)]
        msg = cli_error(_cli(export, args))
        assert msg == (
            f"Error: --opset {opset} cannot be exported: use 18 to {newest} (the exporter's "
            "oldest, the installed onnx's newest; default 18)"
        )
        assert not (tmp_path / "m").exists() and _no_leftovers(tmp_path) == []


def test_export_command_prints_only_its_own_lines(run_dir: Path, tmp_path: Path) -> None:
    # The exporter's optimiser logs at INFO ("Removed 201 unused nodes", ...): not on our screen.
    proc = subprocess.run(
        [sys.executable, "-m", "carlzoo.cli", "export", str(run_dir), "--out", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert lines[0].startswith(f"wrote {tmp_path / 'm'}: ")
    ours = ("wrote ", "ONNX parity on ", "measured metrics: ")
    assert all(ln.startswith(ours) for ln in lines), lines


def test_parity_beyond_the_limit_is_an_error(exported) -> None:
    model = from_pretrained(exported.out_dir)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ExportError, match="ONNX parity check failed on 2 random"):
        check_parity(model, exported.out_dir / "model.onnx", x, None, tol=0.0)
    model.backbone.conv1.weight.data.mul_(1.5)  # the graph no longer matches the weights
    with pytest.raises(ExportError, match="does not reproduce the model"):
        check_parity(model, exported.out_dir / "model.onnx", x, None)


def test_push_without_token_fails_before_any_request(
    exported, local_hub: LocalHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    before = len(local_hub.requests)
    msg = cli_error(_cli(push, [str(exported.out_dir), "--repo-id", "test/no-token"]))
    assert "no Hugging Face token" in msg and "--token" in msg and "HF_TOKEN" in msg
    assert len(local_hub.requests) == before


def test_push_refuses_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    msg = cli_error(_cli(push, [str(tmp_path), "--repo-id", "test/x", "--token", "t"]))
    assert "not an exported model folder" in msg


def test_push_refuses_a_broken_config_before_any_request(
    exported, local_hub: LocalHub, tmp_path: Path
) -> None:
    folder = tmp_path / "m"
    shutil.copytree(exported.out_dir, folder)
    before = len(local_hub.requests)
    (folder / "config.json").write_text('{"format": "carlzoo/1", "name": ')  # cut short
    msg = cli_error(_cli(push, [str(folder), "--repo-id", "test/broken", "--token", "t"]))
    assert f"cannot read {folder / 'config.json'}" in msg and "carlzoo export" in msg
    (folder / "config.json").write_text('{"format": "carlzoo/0"}')
    msg = cli_error(_cli(push, [str(folder), "--repo-id", "test/broken", "--token", "t"]))
    assert "config format 'carlzoo/0' is not supported" in msg
    assert len(local_hub.requests) == before


# ---- publish and load back ---------------------------------------------------------------


def _separate_stderr() -> dict:
    """CliRunner's arguments for stdout without stderr (click < 8.2 mixes them by default)."""
    import inspect

    return {"mix_stderr": False} if "mix_stderr" in inspect.signature(CliRunner).parameters else {}


def _push(folder: Path, repo_id: str, *extra: str) -> tuple[str, dict]:
    result = _cli(push, [str(folder), "--repo-id", repo_id, "--token", "hf_test", *extra])
    assert result.exit_code == 0, result.output
    sha = re.search(r"commit ([0-9a-f]{40})", result.output).group(1)
    entry = json.loads(result.output[result.output.index("{") :])
    return sha, entry


def test_push_then_load_by_hub_spec_and_registry_name(
    exported, local_hub: LocalHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    repo_id = "carlzoo-test/carl-tiny"
    sha, entry = _push(exported.out_dir, repo_id, "--json")
    assert local_hub.head(repo_id) == sha
    assert entry["revision"] == sha and entry["repo_id"] == repo_id
    assert entry["files"] == exported.files  # sha256 of every file, as exported
    assert entry["name"] == "carl-tiny" and entry["status"] == "published"
    assert local_hub.is_lfs(repo_id, "model.safetensors") and local_hub.is_lfs(
        repo_id, "model.onnx"
    )
    assert not local_hub.is_lfs(repo_id, "config.json")

    # the printed Python snippet builds the same registry entry
    snippet = registry_snippet(entry)
    zoo_entry = eval(snippet, {"ZooEntry": registry.ZooEntry})
    assert zoo_entry == registry.ZooEntry(**entry)
    monkeypatch.setitem(registry.REGISTRY, "carl-tiny", zoo_entry)

    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    local = from_pretrained(exported.out_dir).embed(x)
    for backend in ("torch", "onnx"):
        for spec in (f"hf-hub:{repo_id}@{sha}", "carl-tiny"):
            got = carlzoo.load(spec, backend=backend).embed(x)
            torch.testing.assert_close(got, local, rtol=1e-5, atol=1e-5)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "local.npy", local.numpy())

    # the same loads from the Hugging Face cache alone, in a fresh offline process
    script = textwrap.dedent(f"""
        import json, sys, numpy as np, torch
        from huggingface_hub import constants
        import carlzoo
        from carlzoo import registry
        assert constants.HF_HUB_OFFLINE
        entry = json.loads(sys.argv[1])
        registry.REGISTRY["carl-tiny"] = registry.ZooEntry(**entry)
        x = torch.from_numpy(np.load({str(tmp_path / "x.npy")!r}))
        ref = torch.from_numpy(np.load({str(tmp_path / "local.npy")!r}))
        for backend in ("torch", "onnx"):
            for spec in ("hf-hub:{repo_id}@{sha}", "carl-tiny"):
                got = carlzoo.load(spec, backend=backend).embed(x)
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        print("ok")
    """)
    before = len(local_hub.requests)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(entry)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
    assert len(local_hub.requests) == before  # nothing reached the server


def test_push_to_a_branch_mirrors_the_folder(
    run_dir: Path, exported, local_hub: LocalHub, tmp_path: Path
) -> None:
    repo_id = "carlzoo-test/branchy"
    folder = tmp_path / "m"
    shutil.copytree(exported.out_dir, folder)
    main_sha, _ = _push(folder, repo_id, "--json")
    export_model(run_dir, folder, onnx=False, overwrite=True, name="carl-tiny")  # no model.onnx
    # --json: stdout is the entry alone; what else is said goes to stderr, the removed
    # model.onnx of the branch (made from main) among it.
    runner = CliRunner(**_separate_stderr())
    args = [str(folder), "--repo-id", repo_id, "--token", "t", "--revision", "dev", "--json"]
    result = runner.invoke(push, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)
    dev_sha = entry["revision"]
    assert f"commit {dev_sha}" in result.stderr
    assert f"removed from {repo_id}@dev (not in {folder}; still in the branch's history): " \
        "model.onnx" in result.stderr
    assert dev_sha != main_sha
    assert local_hub.head(repo_id, "dev") == dev_sha and local_hub.head(repo_id) == main_sha
    assert "model.onnx" not in local_hub.list_files(repo_id, "dev")
    assert "model.onnx" in local_hub.list_files(repo_id, "main")
    assert set(entry["files"]) == MODEL_FILES - {"model.onnx"}
    # an unchanged folder pushed again is the same commit; the default output is Python
    result = _cli(push, [str(folder), "--repo-id", repo_id, "--revision", "dev", "--token", "t"])
    assert result.exit_code == 0, result.output
    assert f"commit {dev_sha}" in result.output
    snippet = result.output[result.output.index("ZooEntry(") :]
    assert eval(snippet, {"ZooEntry": registry.ZooEntry}).revision == dev_sha


def test_export_into_the_bundled_folder_prints_the_registry_pins(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses
    import re

    from carlzoo import registry

    monkeypatch.setattr(registry, "BUNDLED_DIR", tmp_path / "models")
    out = tmp_path / "models" / "carl-cifar10"
    out.parent.mkdir()
    result = _cli(export, [str(run_dir), "--out", str(out), "--no-onnx"])
    assert result.exit_code == 0, result.output
    assert "carlzoo.load('carl-cifar10') loads it once" in result.output
    pins = dict(re.findall(r'^\s+"([^"]+)": "([0-9a-f]{64})",$', result.output, re.M))
    assert set(pins) == {p.name for p in out.iterdir()}
    # Pasted into the entry, the pins let the bundled copy through its sha256 check.
    entry = dataclasses.replace(registry.get_entry("carl-cifar10"), files=pins)
    registry.verify_files(entry, out, sorted(pins), source="bundled folder")
    # Exported anywhere else, or under a name the zoo does not have: no pins.
    (tmp_path / "elsewhere").mkdir()
    for other in (tmp_path / "elsewhere" / "carl-cifar10", tmp_path / "models" / "mine"):
        result = _cli(export, [str(run_dir), "--out", str(other), "--no-onnx"])
        assert result.exit_code == 0 and "registry.py pins" not in result.output


def test_a_named_copy_of_a_dataset_keeps_its_hub_id_and_says_it_is_a_copy() -> None:
    from carlzoo.export.card import _hub_dataset, dataset_title

    assert dataset_title("cifar10") == "CIFAR-10" and _hub_dataset("cifar10") == "uoft-cs/cifar10"
    assert dataset_title("cifar10_webp90") == "CIFAR-10 (copy cifar10_webp90)"
    assert _hub_dataset("cifar10_webp90") == "uoft-cs/cifar10"
    assert _hub_dataset("cifar100_x") == "uoft-cs/cifar100"  # not taken for cifar10
    assert dataset_title("stl10_small") == "STL-10 (copy stl10_small)"
    assert _hub_dataset("stl10_small") == "stl10_small"  # no certain Hub id
    assert dataset_title("mine") == "mine" and _hub_dataset("mine") == "mine"
