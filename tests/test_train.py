import json
import logging
import math
import os
import stat

import numpy as np
import pytest
import torch
from tiny import random_npz

from carlzoo.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from carlzoo.training.config import load_config
from carlzoo.training.datasets import DatasetError, load_split
from carlzoo.training.run import load_run
from carlzoo.training.train import (
    CollapseError,
    _diffuse,
    _diffuse_message,
    cosine_schedule,
    effective_prototypes,
    train,
)


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    return random_npz(path, 96, size=16, classes=3, n_test=32)


def tiny_config(root, *extra: str):
    return load_config(
        None,
        [
            "model.width=4",
            "model.num_prototypes=10",
            "data.dataset=npz",
            f"data.root={root}",
            "data.image_size=16",
            "optim.batch_size=32",
            "epochs=2",
            "knn_every=1",
            "knn_k=5",
            "device=cpu",
            "precision=fp32",
            "checkpoint_every=2",
            *extra,
        ],
    )


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_epoch_run_writes_metrics_checkpoints_and_config(tmp_path, tiny_npz):
    run = tmp_path / "run"
    last = train(tiny_config(tiny_npz), run, progress=False)
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in (
        "loss",
        "consistency",
        "uniform_prior",
        "kl_weight",
        "lr",
        "prototypes_used",
        "effective_prototypes",
        "argmax_effective_prototypes",
        "assignment_entropy",
        "assignment_information",
        "images_per_s",
        "knn_top1",
    ):
        assert key in rows[0]
    for r in rows:  # I(image; prototype) = H(pbar) - mean H(p_i), within [0, H(pbar)]
        h_mean = math.log(r["effective_prototypes"])
        assert 0 <= r["assignment_entropy"] <= math.log(10) + 1e-6
        assert r["assignment_information"] == pytest.approx(
            max(h_mean - r["assignment_entropy"], 0.0)
        )
        assert 1 <= r["argmax_effective_prototypes"] <= r["prototypes_used"] + 1e-6
    assert rows[1]["step"] == 2 * (96 // 32)
    assert rows[0]["kl_weight"] == 4.0 and rows[1]["kl_weight"] < 4.0
    assert 1 <= rows[0]["prototypes_used"] <= 10
    assert last == rows[-1]
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.safetensors").is_file()
    assert (run / "checkpoints" / "epoch_0002.safetensors").is_file()
    ckpt = load_checkpoint(run / "checkpoints" / "last.safetensors")
    assert ckpt.epoch == 2 and ckpt.step == 6 and ckpt.optimizer is not None
    model, cfg, _ = load_run(run)
    assert cfg.model.width == 4
    torch.testing.assert_close(model.state_dict(), ckpt.model)


def test_cuda_math_flags_are_restored_after_the_run(tmp_path, tiny_npz, monkeypatch):
    # The CUDA branch of train() turns on cuDNN autotuning and TF32; a library call must
    # leave the process as it found it. With no GPU here, the run is pointed at "cuda"
    # until the first tensor moves there and fails, which also checks the error path.
    import carlzoo.training.train as train_mod

    monkeypatch.setattr(train_mod, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    seen = []
    real_check = train_mod._check_start
    monkeypatch.setattr(train_mod, "_check_start",
                        lambda *a: (seen.append(train_mod._cuda_math_flags()), real_check(*a)))
    before = train_mod._cuda_math_flags()
    try:
        train_mod._set_cuda_math_flags(False, False, False)
        with pytest.raises((RuntimeError, AssertionError)):
            train(tiny_config(tiny_npz), tmp_path / "run", progress=False)
        assert seen == [(True, True, True)]  # the run itself had them on
        assert train_mod._cuda_math_flags() == (False, False, False)
    finally:
        train_mod._set_cuda_math_flags(*before)


def test_a_training_set_smaller_than_a_batch_leaves_no_run_folder(tmp_path, tiny_npz):
    with pytest.raises(ValueError, match="has 96 images, fewer than one batch of 128"):
        train(tiny_config(tiny_npz, "optim.batch_size=128"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stop_after", [0, -1])
def test_stop_after_below_one_is_refused_before_the_run_folder(tmp_path, tiny_npz, stop_after):
    with pytest.raises(ValueError, match=f"stop_after must be >= 1 .*, got {stop_after}"):
        train(tiny_config(tiny_npz), tmp_path / "run", progress=False, stop_after=stop_after)
    assert not (tmp_path / "run").exists()


def test_resume_continues_with_the_same_losses(tmp_path, tiny_npz, caplog):
    cfg = tiny_config(tiny_npz, "epochs=3", "knn_every=0")
    full, split = tmp_path / "full", tmp_path / "split"
    train(cfg, full, progress=False)
    train(cfg, split, progress=False, stop_after=1)
    assert len(read_metrics(split)) == 1
    train(cfg, split, progress=False, resume=True)
    with caplog.at_level(logging.INFO, logger="carlzoo.train"):
        assert train(cfg, split, progress=False, resume=True) == {}
    assert f"nothing to train: the run in {split} has finished its 3 epochs" in caplog.text
    a, b = read_metrics(full), read_metrics(split)
    assert [r["epoch"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "consistency", "uniform_prior", "lr", "kl_weight", "step"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), key
    wa = load_checkpoint(full / "checkpoints" / "last.safetensors").model
    wb = load_checkpoint(split / "checkpoints" / "last.safetensors").model
    torch.testing.assert_close(wa, wb)


def test_splits_given_by_the_caller_are_trained_on_instead_of_reading_the_dataset(
    tmp_path, tiny_npz
):
    cfg = tiny_config(tiny_npz, "knn_every=1")
    splits = {s: load_split("npz", tiny_npz, s) for s in ("pretrain", "test")}
    train(cfg, tmp_path / "read", progress=False)
    moved = tiny_npz.with_name("moved.npz")
    tiny_npz.rename(moved)  # the run below cannot read the dataset file
    try:
        train(cfg, tmp_path / "given", progress=False, splits=splits)
        with pytest.raises(DatasetError, match="tiny.npz"):  # and it would have had to
            train(cfg, tmp_path / "unread", progress=False)
    finally:
        moved.rename(tiny_npz)
    a, b = read_metrics(tmp_path / "read"), read_metrics(tmp_path / "given")
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "knn_top1", "step"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), key


def test_on_epoch_end_sees_each_epoch_and_can_end_the_run(tmp_path, tiny_npz):
    seen = []

    def stop_at_two(record, model):
        seen.append((record["epoch"], model.model_config.width))
        return record["epoch"] == 2

    cfg = tiny_config(tiny_npz, "epochs=4", "knn_every=0")
    last = train(cfg, tmp_path / "run", progress=False, on_epoch_end=stop_at_two)
    assert seen == [(1, 4), (2, 4)]
    assert last["epoch"] == 2 and [r["epoch"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    # The run ended cleanly at epoch 2 of 4: --resume continues it on the 4-epoch schedule.
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors").epoch == 2
    last = train(cfg, tmp_path / "run", progress=False, resume=True)
    assert last["epoch"] == 4


class Killed(Exception):
    pass


def test_a_run_killed_between_saves_resumes_with_one_line_per_epoch(tmp_path, tiny_npz):
    cfg = tiny_config(tiny_npz, "epochs=4", "knn_every=0", "save_every=2", "checkpoint_every=0")
    full, run = tmp_path / "full", tmp_path / "run"
    train(cfg, full, progress=False)
    assert load_checkpoint(full / "checkpoints" / "last.safetensors").epoch == 4

    def kill_in_epoch_3(record, model):
        if record["epoch"] == 3:  # its metrics line is written, its checkpoint is not
            with open(run / "metrics.jsonl", "a") as f:
                f.write('{"epoch": 4, "lo')  # and a line cut short
            raise Killed

    with pytest.raises(Killed):
        train(cfg, run, progress=False, on_epoch_end=kill_in_epoch_3)
    assert load_checkpoint(run / "checkpoints" / "last.safetensors").epoch == 2
    train(cfg, run, progress=False, resume=True)
    a, b = read_metrics(full), read_metrics(run)
    assert [r["epoch"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-7)
    torch.testing.assert_close(
        load_checkpoint(full / "checkpoints" / "last.safetensors").model,
        load_checkpoint(run / "checkpoints" / "last.safetensors").model,
    )
    with pytest.raises(ValueError, match="save_every must be >= 1"):
        tiny_config(tiny_npz, "save_every=0")


def test_existing_run_is_not_overwritten_without_resume(tmp_path, tiny_npz):
    cfg = tiny_config(tiny_npz, "epochs=1", "knn_every=0")
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, tmp_path / "run", progress=False)


def test_resume_refuses_other_training_settings_but_not_runtime_ones(tmp_path, tiny_npz):
    cfg = tiny_config(tiny_npz, "epochs=3", "knn_every=0")
    run = tmp_path / "run"
    train(cfg, run, progress=False, stop_after=1)
    saved_yaml = (run / "config.yaml").read_text()
    with pytest.raises(ValueError) as info:
        train(tiny_config(tiny_npz, "epochs=3", "knn_every=0", "model.width=8"), run,
              progress=False, resume=True)  # fmt: skip
    assert str(info.value) == (
        f"--resume: the run in {run} was trained with other settings: model.width (4 -> 8); "
        f"resume it with its own (--config {run / 'config.yaml'}) or choose another --out"
    )
    changed = tiny_config(tiny_npz, "epochs=4", "knn_every=0", "optim.lr=5", "seed=1",
                          "augment.flip_p=0", "loss.kl_end=1")  # fmt: skip
    with pytest.raises(ValueError, match=r"other settings: augment.flip_p \(0.5 -> 0.0\), "
                       r"epochs \(3 -> 4\), loss.kl_end \(1.5 -> 1.0\), optim.lr \(0.6 -> 5.0\) "
                       r"and 1 more; resume"):  # fmt: skip
        train(changed, run, progress=False, resume=True)
    assert (run / "config.yaml").read_text() == saved_yaml  # refused before anything is written
    # Where the run happens, what it logs and how often it saves may change.
    runtime = tiny_config(tiny_npz, "epochs=3", "knn_every=1", "log_every=7", "save_every=2",
                          "precision=fp32", f"data.root={tiny_npz}")  # fmt: skip
    assert train(runtime, run, progress=False, resume=True)["epoch"] == 3


def test_checkpoint_metadata_is_read_without_the_tensors(tmp_path, tiny_npz, monkeypatch):
    cfg = tiny_config(tiny_npz, "epochs=1", "knn_every=0")
    train(cfg, tmp_path / "run", progress=False)
    import carlzoo.training.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "load_file", lambda *a, **k: pytest.fail("tensors read"))
    meta = read_checkpoint_meta(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert (meta["epoch"], meta["step"], meta["config"]["model"]["width"]) == (1, 3, 4)
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint_meta(tmp_path / "nope.safetensors")


def test_collapse_guard_stops_a_collapsing_run(tmp_path, tiny_npz):
    # Without the uniform prior the trivial solution (every image on one prototype)
    # minimises L_c; at a high lr it is reached within two epochs.
    cfg = tiny_config(
        tiny_npz,
        "epochs=6",
        "knn_every=0",
        "loss.kl_start=0",
        "loss.kl_end=0",
        "optim.lr=2.0",
        "collapse_patience=2",
    )
    with pytest.raises(CollapseError, match=r"collapsed .*loss\.kl_start"):
        train(cfg, tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["collapsed_epochs"] == 2 and rows[-1]["prototypes_used"] == 1
    assert len(rows) < 6


def test_diffuse_assignments_are_warned_of_and_trained_through(tmp_path, tiny_npz, caplog):
    # 256 prototypes against 64 views per batch: the uniform prior is met by giving every
    # image nearly the same spread-out assignment (measured on CIFAR-10 too: K=1024 and 2048
    # at batch 512). The mean assignment stays spread, so only the information it carries
    # about the image shows it; the run is warned, not stopped.
    cfg = tiny_config(tiny_npz, "epochs=3", "knn_every=0", "model.num_prototypes=256")
    with caplog.at_level(logging.WARNING, logger="carlzoo.train"):
        last = train(cfg, tmp_path / "run", progress=False)
    assert last["epoch"] == 3 and last["collapsed_epochs"] == 0
    assert last["effective_prototypes"] > 100 and last["assignment_information"] < math.log(2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("epoch 3: the assignments tell the images apart by")
    assert "model.num_prototypes=256, against 64 views per batch" in warnings[0]


@pytest.mark.parametrize(
    ("effective", "information", "diffuse"),
    [(100.0, 2.0, False), (1400.0, 0.06, True), (1.0, 0.0, False), (3.0, math.log(2), False)],
)
def test_diffuse_means_a_spread_mean_with_little_information(effective, information, diffuse):
    cfg = load_config(None, [])  # collapse_floor 2
    record = {"effective_prototypes": effective, "assignment_information": information}
    assert _diffuse(record, cfg) is diffuse


def test_the_diffuse_warning_names_the_prior_when_the_mean_has_shrunk():
    # Measured on the CPU proxy (width-8 ResNet-18, CIFAR-10, batch 512): K = 100 with the
    # prior's weight decayed to 0.5 left the mean on 6.6 prototypes and every argmax on one.
    # Fewer prototypes would not help there; a stronger prior would.
    cfg = load_config(None, ["optim.batch_size=512", "loss.kl_end=0.5"])
    record = {
        "epoch": 6,
        "effective_prototypes": 6.6,
        "assignment_information": 0.08,
        "argmax_effective_prototypes": 1.0,
        "kl_weight": 0.5,
    }
    assert _diffuse(record, cfg)
    message = _diffuse_message(record, cfg, 3)
    assert message.endswith(
        "raise the uniform prior's weight (loss.kl_start 4, loss.kl_end 0.5; lambda 0.50 now): "
        "the mean assignment has shrunk onto 7 of 100 prototypes"
    )
    assert "model.num_prototypes" not in message and "\n" not in message
    # The mean over 735 of 1,024 prototypes (measured at 1,024 views): the prior is met, and
    # the advice is the prototypes against the views.
    record |= {"effective_prototypes": 735.0, "kl_weight": 3.95}
    cfg = load_config(None, ["optim.batch_size=512", "model.num_prototypes=1024"])
    assert _diffuse_message(record, cfg, 3).endswith(
        "use fewer prototypes (model.num_prototypes=1024, against 1024 views per batch)"
    )


def test_resuming_keeps_the_count_of_collapsed_epochs(tmp_path, tiny_npz):
    # K = 10 prototypes are never used exactly uniformly: with the floor at 9.99 every epoch
    # counts as collapsed, so patience 3 stops the run after epoch 3, resumed or not.
    cfg = tiny_config(tiny_npz, "epochs=6", "knn_every=0", "collapse_floor=9.99",
                      "collapse_patience=3")
    run = tmp_path / "run"
    train(cfg, run, progress=False, stop_after=2)
    with pytest.raises(CollapseError, match="for 3 epochs"):
        train(cfg, run, progress=False, resume=True)
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3]


def test_a_new_start_drops_the_metrics_of_an_earlier_one_that_saved_nothing(tmp_path, tiny_npz):
    run = tmp_path / "run"
    run.mkdir()
    stale = [{"epoch": e, "loss": 9.0} for e in range(1, 6)]  # died before any checkpoint
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    train(tiny_config(tiny_npz, "knn_every=0"), run, progress=False)
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
    assert all(r["loss"] != 9.0 for r in read_metrics(run))


def test_a_warm_up_that_rounds_to_the_whole_run_still_reaches_the_lr(tmp_path, tiny_npz):
    # 3 steps per epoch: 0.9 epochs of warm-up round to 3 steps, the whole one-epoch run.
    cfg = tiny_config(tiny_npz, "epochs=1", "optim.warmup_epochs=0.9", "knn_every=0")
    last = train(cfg, tmp_path / "run", progress=False)
    assert last["lr"] == pytest.approx(cfg.optim.lr)


def test_resuming_a_checkpoint_of_another_model_is_one_line(tmp_path, tiny_npz):
    from carlzoo.model import ModelConfig, build_model

    last = tmp_path / "run" / "checkpoints" / "last.safetensors"
    last.parent.mkdir(parents=True)
    other = build_model(ModelConfig(width=8, num_prototypes=10)).state_dict()
    save_checkpoint(last, Checkpoint(model=other, epoch=1, step=3))  # no config to compare
    with pytest.raises(CheckpointError) as info:
        train(tiny_config(tiny_npz), tmp_path / "run", progress=False, resume=True)
    assert str(info.value).startswith(f"{last} does not fit this run's model or optimiser (")
    assert "\n" not in str(info.value)


def test_collapse_guard_quiet_on_a_healthy_run(tmp_path, tiny_npz):
    cfg = tiny_config(tiny_npz, "epochs=3", "knn_every=0", "collapse_patience=1")
    train(cfg, tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 3
    assert all(r["effective_prototypes"] >= 2.0 for r in rows)


def test_dataloader_pipeline_trains(tmp_path, tiny_npz):
    cfg = tiny_config(
        tiny_npz, "epochs=1", "knn_every=0", "data.pipeline=dataloader", "data.workers=0"
    )
    last = train(cfg, tmp_path / "run", progress=False)
    assert np.isfinite(last["loss"])


@pytest.mark.parametrize("where", ["out", "parent"])
def test_an_out_that_cannot_be_a_folder_is_refused_before_the_data_is_read(tmp_path, where):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    out = blocker if where == "out" else blocker / "sub" / "run"
    cfg = tiny_config(tmp_path / "missing.npz", "epochs=1")  # read first, it would fail
    with pytest.raises(ValueError) as info:
        train(cfg, out, progress=False)
    expected = (
        f"--out {out} is a file, not a folder; choose another --out"
        if where == "out"
        else f"--out {out} cannot be created: {blocker} is a file, not a folder; "
        "choose another --out"
    )
    assert str(info.value) == expected
    assert blocker.read_text() == "not a folder"


def test_the_run_records_its_data_root_as_an_absolute_path(tmp_path, tiny_npz, monkeypatch):
    monkeypatch.chdir(tiny_npz.parent)
    train(tiny_config(tiny_npz.name, "epochs=1"), tmp_path / "run", progress=False)
    _, cfg, _ = load_run(tmp_path / "run")
    assert cfg.data.root == str(tiny_npz.resolve())


@pytest.mark.parametrize(("max_train", "bank"), [(40, 40), (96, None)])
def test_the_knn_record_names_a_bank_smaller_than_the_train_split(
    tmp_path, tiny_npz, max_train, bank
):
    cfg = tiny_config(tiny_npz, "epochs=1", f"knn_max_train={max_train}")
    last = train(cfg, tmp_path / "run", progress=False)
    assert "knn_top1" in last and last.get("knn_bank") == bank


def test_missing_data_is_a_clear_error(tmp_path):
    cfg = tiny_config(tmp_path / "missing.npz", "epochs=1")
    with pytest.raises(DatasetError, match="missing.npz"):
        train(cfg, tmp_path / "run", progress=False)


def test_corrupt_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "last.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_run(tmp_path)


def test_checkpoint_is_replaced_whole_and_readable_as_the_umask_allows(tmp_path):
    path = tmp_path / "ckpt" / "last.safetensors"
    old = os.umask(0o027)
    try:
        save_checkpoint(path, Checkpoint(model={"w": torch.zeros(3)}, epoch=1))
        save_checkpoint(path, Checkpoint(model={"w": torch.ones(3)}, epoch=2))
    finally:
        os.umask(old)
    # safetensors on its own creates files 0600, unreadable by a run's group.
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in path.parent.iterdir()] == ["last.safetensors"]  # no temp left
    ckpt = load_checkpoint(path)
    assert ckpt.epoch == 2
    torch.testing.assert_close(ckpt.model["w"], torch.ones(3))


def test_effective_prototypes_known_answers():
    assert effective_prototypes(torch.tensor([1.0, 0, 0, 0])) == pytest.approx(1.0)
    assert effective_prototypes(torch.full((8,), 1 / 8)) == pytest.approx(8.0)


def test_cosine_schedule_warmup_and_ends():
    s = cosine_schedule(1.0, 0.01, total_steps=110, warmup_steps=10)
    assert len(s) == 110
    assert s[0] == 0.0 and s[9] < s[10] == pytest.approx(1.0)
    assert s[-1] == pytest.approx(0.01, abs=1e-3)
    assert np.all(np.diff(s[10:]) <= 1e-12)


def test_optimizer_groups_exclude_norms_and_biases_from_decay():
    from carlzoo.model import ModelConfig, build_model
    from carlzoo.training.config import TrainConfig
    from carlzoo.training.train import build_optimizer

    model = build_model(ModelConfig(width=4, num_prototypes=10))
    kinds = {}
    for name in ("sgd", "lars", "adamw"):
        cfg = load_config(None, [f"optim.optimizer={name}"])
        opt = build_optimizer(model, cfg, torch.device("cpu"))
        decay, no_decay = opt.param_groups
        assert decay["weight_decay"] == TrainConfig().optim.weight_decay
        assert no_decay["weight_decay"] == 0.0
        assert all(p.ndim > 1 for p in decay["params"])
        assert all(p.ndim <= 1 for p in no_decay["params"])
        n = sum(len(g["params"]) for g in opt.param_groups)
        assert n == len(list(model.parameters()))
        kinds[name] = opt
    assert type(kinds["lars"]).__name__ == "Lars"
    assert type(kinds["adamw"]) is torch.optim.AdamW
    cfg = load_config(None, ["optim.optimizer=adamw", "optim.momentum=0.8"])
    assert build_optimizer(model, cfg, torch.device("cpu")).defaults["betas"] == (0.8, 0.999)


def test_adamw_decay_is_decoupled_and_skips_norms_and_biases():
    """One AdamW step on zero gradients: weights shrink by lr x weight_decay, 1-d tensors stay."""
    from carlzoo.model import ModelConfig, build_model
    from carlzoo.training.train import build_optimizer

    model = build_model(ModelConfig(width=4, num_prototypes=10))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = load_config(None, ["optim.optimizer=adamw", "optim.lr=0.1", "optim.weight_decay=0.5"])
    build_optimizer(model, cfg, torch.device("cpu")).step()
    for p, q in zip(model.parameters(), before, strict=True):
        expected = q * (1 - 0.1 * 0.5) if p.ndim > 1 else q
        torch.testing.assert_close(p.detach(), expected)


def test_adamw_run_trains(tmp_path, tiny_npz):
    cfg = tiny_config(
        tiny_npz, "epochs=1", "knn_every=0", "optim.optimizer=adamw", "optim.lr=0.002"
    )
    assert np.isfinite(train(cfg, tmp_path / "run", progress=False)["loss"])


def test_lars_run_trains(tmp_path, tiny_npz):
    cfg = tiny_config(tiny_npz, "epochs=1", "knn_every=0", "optim.optimizer=lars")
    assert np.isfinite(train(cfg, tmp_path / "run", progress=False)["loss"])


def test_describe_hardware_on_cpu():
    from carlzoo.training.train import describe_hardware

    assert describe_hardware(torch.device("cpu"), 2).startswith("2 x CPU (")


def test_bf16_training_step_matches_the_fp32_step():
    """The step the GPU recipe runs (bf16 autocast; losses in fp32), here on the CPU."""
    import copy

    from carlzoo.model import ModelConfig, build_model
    from carlzoo.training.loss import CARLLoss
    from carlzoo.training.train import build_optimizer, training_step

    torch.manual_seed(0)
    base = build_model(ModelConfig(width=8, proj_hidden_dim=32, proj_dim=16, num_prototypes=10))
    xa, xb = torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32)
    cfg = load_config(None, [])
    steps = {}
    for amp in (False, True):
        model = copy.deepcopy(base)
        opt = build_optimizer(model, cfg, torch.device("cpu"))
        terms, logits = training_step(model, opt, CARLLoss(), xa, xb, 2.0, amp)
        assert logits.dtype == (torch.bfloat16 if amp else torch.float32)
        assert terms.total.dtype == torch.float32 and terms.mean_assignment.dtype == torch.float32
        pairs = zip(model.parameters(), base.parameters(), strict=True)
        moved = [(p - q).detach() for p, q in pairs]
        assert all(torch.isfinite(d).all() and d.abs().max() > 0 for d in moved)
        steps[amp] = (terms.total.item(), torch.cat([d.flatten() for d in moved]))
    assert steps[True][0] == pytest.approx(steps[False][0], rel=2e-2)
    # bf16 noise on a tiny random-input network: cosine 0.88-0.92 over seeds (0.99 at width 16
    # on CIFAR images); a gradient lost or flipped by the autocast path drops it far lower.
    cosine = torch.nn.functional.cosine_similarity(steps[True][1], steps[False][1], dim=0)
    assert cosine > 0.75, float(cosine)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize(
    ("before", "after"), [("cuda", "cuda"), ("cuda", "cpu"), ("cpu", "cuda")]
)
def test_resume_across_optimizer_kinds_keeps_buffer_layout_and_this_runs_flags(
    tmp_path, tiny_npz, monkeypatch, before, after, optimizer
):
    """On CUDA the optimizer is fused SGD / AdamW; its kernel needs state buffers laid out like
    their channels_last conv weights, which checkpoints store contiguous, and AdamW's step
    counts as float32 beside them. The CPU's fused kernels stand in (they compute wrong
    updates from such buffers rather than refusing them)."""
    import carlzoo.training.train as train_mod

    built = []
    real_build = train_mod.build_optimizer
    kind = {"device": before}

    def build(model, cfg, device):
        built.append(real_build(model, cfg, torch.device(kind["device"])))
        return built[-1]

    sets = [f"optim.optimizer={optimizer}"] + (["optim.lr=0.002"] if optimizer == "adamw" else [])
    cfg = tiny_config(tiny_npz, "epochs=2", "knn_every=0", "channels_last=true", *sets)
    train(cfg, tmp_path / "full", progress=False)  # the plain CPU optimizer throughout
    monkeypatch.setattr(train_mod, "build_optimizer", build)
    train(cfg, tmp_path / "split", progress=False, stop_after=1)
    kind["device"] = after
    train(cfg, tmp_path / "split", progress=False, resume=True)

    resumed = built[-1]
    buffers = ("exp_avg", "exp_avg_sq") if optimizer == "adamw" else ("momentum_buffer",)
    steps = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.safetensors").step
    for group in resumed.param_groups:
        assert bool(group["fused"]) == (after == "cuda")
        for p in group["params"]:
            state = resumed.state[p]
            for name in buffers:
                assert state[name].stride() == p.stride(), name
            if optimizer == "adamw":
                assert state["step"].dtype == torch.float32 and state["step"].ndim == 0
                assert float(state["step"]) == steps
    assert any(p.ndim == 4 and not p.is_contiguous() for p in resumed.param_groups[0]["params"])
    wa = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.safetensors").model
    wb = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.safetensors").model
    torch.testing.assert_close(wa, wb, rtol=1e-4, atol=1e-5)
