from click.testing import CliRunner
from tiny import TINY_TRAIN_SETS, random_npz, set_args

import carlzoo
from carlzoo.cli.main import main


def test_help_and_version():
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "train" in result.output
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and carlzoo.__version__ in result.output


def test_train_bad_key_is_one_clear_line(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--config",
            "cifar10",
            "--data-root",
            "x",
            "--out",
            str(tmp_path / "r"),
            "--set",
            "optim.lrr=1",
        ],
    )
    assert result.exit_code != 0
    assert "unknown config key optim.lrr" in result.output
    assert "Traceback" not in result.output


def test_train_missing_data_root(tmp_path):
    result = CliRunner().invoke(main, ["train", "--config", "cifar10", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--data-root" in result.output


def test_train_missing_dataset_names_path(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--config",
            "cifar10",
            "--data-root",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code != 0
    assert "nowhere" in result.output and "--download" in result.output
    assert not (tmp_path / "r").exists()  # the run folder is written once the data has loaded


def test_train_bad_device_name_is_one_line_before_the_run_folder(tmp_path):
    data = random_npz(tmp_path / "d.npz", 8, size=16, classes=2, n_test=4)
    args = ["train", "--dataset", "npz", "--data-root", str(data), "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(main, [*args, "--set", "device=gpu"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: device='gpu' is not a device name; use auto, cpu, cuda or cuda:N"
    )
    assert not (tmp_path / "r").exists()


def test_train_command_runs_end_to_end(tmp_path):
    data = random_npz(tmp_path / "d.npz", 40, size=16, classes=2, n_test=8, seed=1)
    args = [
        "train",
        "--dataset",
        "npz",
        "--data-root",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--no-progress",
        *set_args(*TINY_TRAIN_SETS),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "kNN top-1" in result.output
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").is_file()


def test_train_stop_after_must_be_at_least_one(tmp_path):
    result = CliRunner().invoke(
        main, ["train", "--data-root", "x", "--out", str(tmp_path / "r"), "--stop-after", "0"]
    )
    assert result.exit_code == 2
    assert "Invalid value for '--stop-after': 0 is not in the range x>=1" in result.output
    assert not (tmp_path / "r").exists()


def test_train_interrupted_says_how_to_continue(tmp_path, monkeypatch):
    import carlzoo.training.train

    def interrupted(cfg, out_dir, **kwargs):
        if kwargs["resume"]:  # the second call: a checkpoint was saved before the interrupt
            (out_dir / "checkpoints").mkdir(parents=True)
            (out_dir / "checkpoints" / "last.safetensors").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(carlzoo.training.train, "train", interrupted)
    args = ["train", "--data-root", "x", "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130
    assert result.output.strip() == "interrupted before the first checkpoint: nothing to resume"
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 130
    saved = tmp_path / "r" / "checkpoints" / "last.safetensors"
    assert result.output.strip() == (
        f"interrupted: {saved} holds the last saved epoch; continue with the same command and "
        "--resume"
    )
