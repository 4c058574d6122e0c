import pytest
import yaml

from carlzoo.training.augment import AugmentConfig
from carlzoo.training.config import (
    PRESETS,
    ConfigError,
    DataConfig,
    OptimConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    preset_names,
    save_config,
)


def test_defaults_are_the_paper_settings():
    cfg = TrainConfig()
    assert cfg.optim.batch_size == 256
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay) == (0.6, 0.0006, 5e-4)
    assert (cfg.loss.kl_start, cfg.loss.kl_end, cfg.loss.kl_decay_epochs) == (4.0, 1.5, 100.0)
    assert cfg.model.logits == "cosine" and cfg.model.temperature == 0.1


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads(name):
    cfg = load_config(name)
    assert cfg.data.dataset == name


def test_a_preset_name_is_found_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cifar10").mkdir()  # e.g. the run folder of `--out cifar10`
    (tmp_path / "cifar10_fast").mkdir()
    assert load_config("cifar10").data.dataset == "cifar10"
    assert load_config("cifar10_fast").optim.batch_size == 512
    (tmp_path / "mine").write_text("epochs: 7\n")  # a file without a suffix is still a file
    assert load_config("mine").epochs == 7
    with pytest.raises(ConfigError, match=r"no preset named 'cifar11'; presets: cifar10, c"):
        load_config("cifar11")
    assert "cifar10_fast" in preset_names() and set(PRESETS) <= set(preset_names())


def test_the_adamw_candidate_changes_only_the_optimizer_of_the_fast_recipe():
    """cifar10_adamw is a one-factor change of cifar10_fast, so that their runs compare."""
    from carlzoo.training.config import config_to_dict, flat_config

    names = ("cifar10_fast", "cifar10_adamw")
    fast, adamw = (flat_config(config_to_dict(load_config(n))) for n in names)
    changed = {k: (fast[k], adamw[k]) for k in fast if fast[k] != adamw[k]}
    assert changed == {
        "optim.optimizer": ("sgd", "adamw"),
        "optim.lr": (0.6, 0.004),
        "optim.min_lr": (0.0006, 0.000004),
        "optim.warmup_epochs": (10, 2),
        "optim.weight_decay": (0.0005, 0.000001),
    }


def test_preset_prototype_counts_follow_the_paper():
    assert load_config("cifar10").model.num_prototypes == 100
    assert load_config("cifar100").model.num_prototypes == 300
    assert load_config("stl10").model.num_prototypes == 300
    assert load_config("imagenet64").model.num_prototypes == 3000


def test_overrides_parse_yaml_values_and_win_over_the_file():
    cfg = load_config(
        "cifar10",
        ["optim.lr=0.3", "augment.crop_scale=[0.2, 1.0]", "compile=true", "epochs=5"],
        data={"root": "/d"},
    )
    assert cfg.optim.lr == 0.3
    assert cfg.augment.crop_scale == (0.2, 1.0)
    assert cfg.compile is True and cfg.epochs == 5 and cfg.data.root == "/d"
    assert cfg.model.num_prototypes == 100  # from the preset


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-6 as a string; a float field takes it as the number it is.
    cfg = load_config(None, ["optim.weight_decay=1e-6", "optim.lr=5E-1"])
    assert cfg.optim.weight_decay == 1e-6 and cfg.optim.lr == 0.5
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  min_lr: 6e-4\n  warmup_epochs: 1e1\n")
    cfg = load_config(path)
    assert cfg.optim.min_lr == 6e-4 and cfg.optim.warmup_epochs == 10.0


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key optim\.lrr.*valid keys.*lr"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="unknown config key epochz"):
        config_from_dict({"epochz": 3})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("optim.lr=nan", "optim.lr: expected a number, got 'nan'"),
        ("optim.weight_decay=inf", "optim.weight_decay: expected a number, got 'inf'"),
        ("epochs=2.5", "epochs: expected an integer"),
        ("epochs=0", "epochs must be >= 1"),
        ("optim.warmup_epochs=200", r"optim.warmup_epochs=200 must be shorter than epochs=200"),
        ("save_every=0", "save_every must be >= 1"),
        ("compile=maybe", "compile: expected true or false"),
        ("data.pipeline=gpu", "data.pipeline='gpu': expected one of"),
        ("data.dataset=mnist", r"data.dataset='mnist': expected one of \['cifar10', 'cifar100'"),
        (
            "optim.optimizer=adam",
            r"optim.optimizer='adam': expected one of \['sgd', 'lars', 'adamw'\]",
        ),
        ("precision=fp16", r"precision='fp16': expected one of \['bf16', 'fp32'\]"),
        ("device=gpu", r"device='gpu' is not a device name; use auto, cpu, cuda or cuda:N"),
        ("device=cuda:x", r"device='cuda:x' is not a device name"),
        ("model.backbone=vgg", "model.backbone"),
        ("optim=3", "optim: expected a mapping"),
        ("lr", "expected section.key=value"),
        ("optim.batch_size=0", r"optim.batch_size must be >= 1, got 0"),
        ("optim.lr=0", r"optim.lr must be > 0, got 0.0"),
        ("optim.lr=-1", r"optim.lr must be > 0, got -1.0"),
        ("optim.weight_decay=-1e-4", r"optim.weight_decay must be >= 0, got -0.0001"),
        ("optim.momentum=1", r"optim.momentum must be in \[0, 1\), got 1.0"),
        ("optim.warmup_epochs=-1", r"optim.warmup_epochs must be >= 0"),
        ("optim.min_lr=5", r"optim.min_lr=5 must not exceed optim.lr=0.6"),
        ("data.subset=-5", r"data.subset must be >= 0, got -5"),
        ("data.image_size=0", r"data.image_size must be >= 1"),
        ("augment.flip_p=3", r"augment.flip_p must be in \[0, 1\], got 3.0"),
        ("augment.hue=0.6", r"augment.hue must be in \[0, 0.5\]"),
        ("augment.std=[0, 1, 1]", r"each number of augment.std must be > 0, got \[0.0, 1.0, 1.0\]"),
        ("augment.crop_scale=[0.9, 0.1]", r"augment.crop_scale must be \[low, high\] with low"),
        ("knn_k=0", r"knn_k must be >= 1, got 0"),
        ("knn_t=0", r"knn_t must be > 0"),
        ("knn_every=-1", r"knn_every must be >= 0"),
        ("knn_max_train=0", r"knn_max_train must be >= 1"),
        ("log_every=0", r"log_every must be >= 1"),
        ("collapse_patience=0", r"collapse_patience must be >= 1"),
        ("model.proj_hidden_dim=0", r"model.proj_hidden_dim"),
        ("augment.blur_kernel=4", r"augment.blur_kernel must be odd \(or 0"),
        ("optim.lr=.inf", r"optim.lr must be > 0, got inf"),
        ("loss.kl_start=.inf", r"loss.kl_start must be >= 0, got inf"),
        ("knn_t=.nan", r"knn_t must be > 0, got nan"),
        ("seed=18446744073709551616", r"seed must be in \[0, 9.22337e\+18\], got 18446744"),
        ("seed=-1", r"seed must be in \[0, "),
    ],
)
def test_bad_values_are_refused_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["augment.blur_p=0.5", "augment.blur_kernel=41", "data.image_size=16"],
         r"^the blur kernel \(41 px, augment.blur_kernel\) is too large for data.image_size=16;"),
        (["model.num_prototypes=2"],
         r"^collapse_floor=2 must be below model.num_prototypes=2 .*or 0 turns the check off$"),
        (["compile_augment=true", "data.pipeline=dataloader"],
         r"^compile_augment=true compiles the augmentation of data.pipeline=device; "
         r"data.pipeline=dataloader augments with torchvision in worker processes: drop one"),
    ],
)
def test_settings_that_cannot_work_together_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)
    # the ways out the messages name
    load_config(None, [*overrides, "augment.blur_p=0", "collapse_floor=0", "compile_augment=false"])


@pytest.mark.parametrize(
    "override",
    [
        "optim.weight_decay=0",
        "optim.momentum=0",
        "optim.min_lr=0.6",
        "data.subset=0",
        "data.workers=0",
        "augment.blur_p=0",
        "augment.hue=0.5",
        "knn_every=0",
        "checkpoint_every=0",
        "loss.kl_decay_epochs=0",
    ],
)
def test_values_on_the_edge_of_their_range_are_accepted(override):
    key, raw = override.split("=")
    node = config_to_dict(load_config(None, [override]))
    for part in key.split("."):
        node = node[part]
    assert node == float(raw)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no preset named 'cifar11'"):
        load_config("cifar11")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("stl10", ["optim.lr=0.1"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_config_dataclasses_built_in_python_check_their_ranges_too():
    with pytest.raises(ValueError, match=r"optim.momentum must be in \[0, 1\), got 1.5"):
        OptimConfig(momentum=1.5)
    with pytest.raises(ValueError, match=r"augment.crop_ratio must be \[low, high\]"):
        AugmentConfig(crop_ratio=(2.0, 0.5))
    with pytest.raises(ValueError, match=r"knn_t must be > 0, got 0"):
        TrainConfig(knn_t=0)


def test_config_dataclasses_built_in_python_check_their_choices_too():
    with pytest.raises(ValueError, match=r"optim.optimizer='adam': expected one of"):
        OptimConfig(optimizer="adam")
    with pytest.raises(ValueError, match=r"data.pipeline='gpu': expected one of"):
        DataConfig(pipeline="gpu")
    with pytest.raises(ValueError, match=r"data.dataset='mnist': expected one of"):
        DataConfig(dataset="mnist")
    with pytest.raises(ValueError, match=r"device='gpu' is not a device name"):
        TrainConfig(device="gpu")


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_device_names_are_accepted_without_the_device_at_hand(device):
    # A recipe for a GPU machine is written and checked on a CPU-only one.
    assert TrainConfig(device=device).device == device
