"""carlzoo.export.onnx and the onnx backend: graph contract, parity, OnnxCARL == PretrainedCARL."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper, numpy_helper
from PIL import Image
from tiny import SIZE, TINY

from carlzoo.cli.zoo_cmd import assign, embed
from carlzoo.export import onnx as onnx_export
from carlzoo.export.onnx import add_onnx, export_onnx, main, onnx_parity
from carlzoo.model import CARLModel, build_model
from carlzoo.pretrained import (
    OnnxCARL,
    Preprocessing,
    PretrainedCARL,
    ZooConfig,
    ZooError,
    _onnx_device,
    _onnx_providers,
    from_pretrained,
    load,
    save_pretrained,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> CARLModel:
    torch.manual_seed(0)
    m = build_model(TINY)
    m.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        m(torch.randn(16, 3, SIZE, SIZE) * 1.5 + 0.3)
    return m.eval()


@pytest.fixture(scope="module")
def folder(model: CARLModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder with model.onnx from the default (dynamo) exporter: exported once."""
    out = save_pretrained(
        model,
        tmp_path_factory.mktemp("onnx") / "tiny",
        ZooConfig(TINY, Preprocessing(input_size=SIZE, resize_size=SIZE)),
    )
    export_onnx(model, out / "model.onnx", input_size=SIZE)
    return out


def test_graph_contract(folder: Path) -> None:
    proto = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    [inp] = proto.graph.input
    assert inp.name == "images"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[0]  # symbolic (dynamic) batch axis
    assert dims[1:] == [3, SIZE, SIZE]
    assert [o.name for o in proto.graph.output] == ["features", "projection", "logits"]
    out_dims = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        for o in proto.graph.output
    }
    assert out_dims["features"][1:] == [32] and out_dims["logits"][1:] == [10]
    assert all(not init.external_data for init in proto.graph.initializer)  # one file
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "model.onnx"}


@pytest.mark.parametrize("batch", [1, 7])
def test_parity_with_pytorch_on_any_batch_size(model: CARLModel, folder: Path, batch: int) -> None:
    x = torch.randn(batch, 3, SIZE, SIZE)
    res = onnx_parity(model, folder / "model.onnx", x)
    assert set(res) == {
        "max_abs_diff",
        "min_cosine",
        "output_scale",
        "scaled_diff",
        "worst_output",
        "outputs",
        "non_finite",
    }
    assert res["max_abs_diff"] < 1e-4 and res["non_finite"] == []
    outs = res["outputs"]
    assert list(outs) == ["features", "projection", "logits"]
    for o in outs.values():
        assert o["scaled_diff"] == o["max_abs_diff"] / max(1.0, o["output_scale"])
    assert res["scaled_diff"] == outs[res["worst_output"]]["scaled_diff"]
    assert res["scaled_diff"] == max(o["scaled_diff"] for o in outs.values())
    assert res["max_abs_diff"] == max(o["max_abs_diff"] for o in outs.values())
    assert res["output_scale"] == max(o["output_scale"] for o in outs.values())
    assert res["min_cosine"] == min(o["min_cosine"] for o in outs.values()) > 1 - 1e-6
    assert onnx_export.parity_failure(res) is None


def test_onnx_backend_agrees_with_torch(folder: Path, tmp_path: Path) -> None:
    pt = from_pretrained(folder)
    ox = load(str(folder), backend="onnx")
    assert isinstance(ox, OnnxCARL) and isinstance(pt, PretrainedCARL)
    assert ox.config == pt.config
    x = torch.randn(5, 3, SIZE, SIZE)
    for layer in ("backbone", "projection"):
        for normalize in (True, False):
            torch.testing.assert_close(
                ox.embed(x, layer=layer, normalize=normalize),
                pt.embed(x, layer=layer, normalize=normalize),
                atol=1e-4,
                rtol=0,
            )
    a, b = ox.assign(x, top_k=3), pt.assign(x, top_k=3)
    torch.testing.assert_close(a.probabilities, b.probabilities, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.probabilities.sum(1), torch.ones(5))
    assert torch.equal(a.ids[:, 0], b.ids[:, 0])
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8))
    img.save(tmp_path / "x.png")
    torch.testing.assert_close(ox.embed(tmp_path / "x.png"), pt.embed(img), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="expected 16x16 images"):
        ox.embed(torch.randn(1, 3, 32, 32))


def test_cli_backends_agree(folder: Path, tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), np.uint8)).save(root / f"{i}.png")
    outs = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / f"{backend}.npz"
        res = CliRunner().invoke(
            embed,
            [
                str(root),
                "-m",
                str(folder),
                "-o",
                str(out),
                "--backend",
                backend,
                "-j",
                "0",
                "--no-progress",
            ],
        )
        assert res.exit_code == 0, res.output
        outs[backend] = np.load(out)["embeddings"]
    np.testing.assert_allclose(outs["onnx"], outs["torch"], atol=1e-4)
    res = CliRunner().invoke(
        assign,
        [
            str(root),
            "-m",
            str(folder),
            "-o",
            str(tmp_path / "a.npz"),
            "--backend",
            "onnx",
            "-j",
            "0",
            "--no-progress",
            "-k",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "a.npz")["ids"].shape == (5, 2)


def test_missing_onnx_file_says_how_to_export(model: CARLModel, tmp_path: Path) -> None:
    out = save_pretrained(model, tmp_path / "m", ZooConfig(TINY, Preprocessing(SIZE, SIZE)))
    with pytest.raises(
        ZooError,
        match=f"no model.onnx in {out}: add one with `python -m carlzoo.export.onnx {out}`",
    ):
        load(str(out), backend="onnx")
    (out / "README.md").write_text("---\n---\n")  # a `carlzoo export --no-onnx` folder's card
    with pytest.raises(ZooError) as info:  # python -m carlzoo.export.onnx refuses such folders
        load(str(out), backend="onnx")
    assert str(info.value) == (
        f"no model.onnx in {out}: export its run again without --no-onnx (`carlzoo export RUN "
        f"--out {out} --overwrite`), or use backend='torch'"
    )
    (out / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(ZooError, match=f"cannot load ONNX model {out / 'model.onnx'}"):
        load(str(out), backend="onnx")


def test_the_opset_asked_for_is_the_opset_written(
    model: CARLModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = export_onnx(model, tmp_path / "m20.onnx", input_size=SIZE, opset=20)
    written = onnx.load(str(path)).opset_import
    assert [i.version for i in written if i.domain in ("", "ai.onnx")] == [20]
    with pytest.raises(ValueError, match=r"^opset 17 cannot be exported: use 18 to"):
        export_onnx(model, tmp_path / "m17.onnx", input_size=SIZE, opset=17)
    # Were the range check to let 17 through, torch.onnx would quietly write opset 18.
    monkeypatch.setattr(onnx_export, "check_opset", lambda opset: opset)
    with pytest.raises(ValueError, match="the exporter wrote opset 18, not the 17 asked for"):
        export_onnx(model, tmp_path / "m17.onnx", input_size=SIZE, opset=17)
    assert not (tmp_path / "m17.onnx").exists()


def test_both_backends_refuse_a_device_they_cannot_use(folder: Path) -> None:
    with pytest.raises(ZooError, match=r"^device='gpu' is not a device name; use cpu, cuda or"):
        load(str(folder), device="gpu")
    with pytest.raises(ZooError, match=r"device='gpu' is not supported by the onnx backend"):
        load(str(folder), device="gpu", backend="onnx")
    with pytest.raises(ZooError, match=r"device='mps' is not supported by the onnx backend"):
        load(str(folder), device="mps", backend="onnx")


def test_add_onnx_command_and_fp16_weights(
    model: CARLModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m carlzoo.export.onnx FOLDER``; float16 storage via the torchscript exporter."""
    out = save_pretrained(model, tmp_path / "m", ZooConfig(TINY, Preprocessing(SIZE, SIZE)))
    half = tmp_path / "half.onnx"
    export_onnx(model, half, input_size=SIZE, dtype="float16", exporter="torchscript")
    proto = onnx.load(str(half))
    types = {i.name: i.data_type for i in proto.graph.initializer}
    assert any(t == onnx.TensorProto.FLOAT16 for t in types.values())
    assert all(
        t != onnx.TensorProto.FLOAT16
        for n, t in types.items()
        if n.endswith(("running_mean", "running_var"))
    )
    [inp] = proto.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # inputs stay float32
    x = torch.randn(3, 3, SIZE, SIZE)
    res = onnx_parity(model, half, x)
    assert res["max_abs_diff"] < 5e-2 and res["min_cosine"] > 0.999

    # The command adds a checked model.onnx to the folder (the faster exporter, for speed).
    real_export = onnx_export.export_onnx

    def fast_export(*args: object, **kwargs: object) -> Path:
        return real_export(*args, **{**kwargs, "exporter": "torchscript"})

    monkeypatch.setattr(onnx_export, "export_onnx", fast_export)
    assert main([str(out)]) == 0
    assert (out / "model.onnx").is_file()
    assert not list(out.glob(".*tmp"))
    assert onnx_parity(model, out / "model.onnx", x)["max_abs_diff"] < 1e-4
    assert main([str(tmp_path / "nothing")]) == 1


def test_export_is_atomic_and_validates_arguments(
    model: CARLModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="dtype='int8'"):
        export_onnx(model, path, input_size=SIZE, dtype="int8")
    with pytest.raises(ValueError, match="exporter='magic'"):
        export_onnx(model, path, input_size=SIZE, exporter="magic")

    def broken_checker(*args: object, **kwargs: object) -> None:
        raise onnx.checker.ValidationError("bad graph")

    monkeypatch.setattr(onnx.checker, "check_model", broken_checker)
    with pytest.raises(onnx.checker.ValidationError):
        export_onnx(model, path, input_size=SIZE, exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_add_onnx_refuses_an_export_that_differs(
    model: CARLModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = save_pretrained(model, tmp_path / "m", ZooConfig(TINY, Preprocessing(SIZE, SIZE)))
    real_export = onnx_export.export_onnx

    def wrong_model(m: CARLModel, path: Path, **kwargs: object) -> Path:
        torch.manual_seed(1)
        return real_export(build_model(TINY).eval(), path, **{**kwargs, "exporter": "torchscript"})

    monkeypatch.setattr(onnx_export, "export_onnx", wrong_model)
    with pytest.raises(ValueError, match="differs from PyTorch"):
        add_onnx(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_onnx_providers_name_the_gpu_asked_for() -> None:
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    cuda1 = [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert _onnx_providers(_onnx_device("cuda:1"), both) == cuda1
    assert _onnx_providers(_onnx_device("cuda"), both)[0] == (
        "CUDAExecutionProvider",
        {"device_id": 0},
    )
    assert _onnx_device(0) == torch.device("cuda", 0)  # an int is a CUDA index, as in torch
    assert _onnx_providers(_onnx_device("cuda"), ["CPUExecutionProvider"]) == [
        "CPUExecutionProvider"
    ]
    assert _onnx_providers(_onnx_device(None), both) == ["CPUExecutionProvider"]


@pytest.mark.parametrize("listed", [True, False])
def test_onnx_backend_says_so_when_cuda_runs_on_the_cpu(
    folder: Path, monkeypatch: pytest.MonkeyPatch, listed: bool
) -> None:
    """onnxruntime-gpu lists CUDAExecutionProvider even when its CUDA libraries do not load,
    and then runs the session on the CPU; the CPU package does not list it at all."""
    import onnxruntime as ort

    if listed:
        monkeypatch.setattr(
            ort,
            "get_available_providers",
            lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        )
    why = "could not start its CUDAExecutionProvider" if listed else "has no CUDAExecutionProvider"
    with pytest.warns(UserWarning, match=f"^device='cuda:1': onnxruntime {why}") as seen:
        gpu = load(str(folder), device="cuda:1", backend="onnx")
    assert [w.filename for w in seen] == [__file__]  # the caller's line, not carlzoo's
    assert gpu.providers == ["CPUExecutionProvider"]
    assert "CUDA" not in repr(gpu)
    x = torch.rand(2, 3, SIZE, SIZE)
    torch.testing.assert_close(gpu.embed(x), load(str(folder), backend="onnx").embed(x))


def test_parity_is_measured_against_a_cpu_float32_copy(model: CARLModel, tmp_path: Path) -> None:
    """A model elsewhere than the CPU in float32 (a GPU, whose convolutions may use TF32, or
    here float64) is checked through a float32 copy: the figures measure the export alone."""
    path = export_onnx(model, tmp_path / "m.onnx", input_size=SIZE)
    x = torch.rand(3, 3, SIZE, SIZE)
    wide = build_model(TINY)
    wide.load_state_dict(model.state_dict())
    wide = wide.double().train()
    assert onnx_parity(wide, path, x) == onnx_parity(model, path, x)
    assert next(wide.parameters()).dtype == torch.float64 and wide.training  # left as it was


# ---- the parity check judges each output on its own scale, and NaN fails it -------------


def _add_to_logits(src: Path, dst: Path, value: np.ndarray) -> Path:
    """A copy of the graph ``src`` whose logits output is the original logits + ``value``."""
    proto = onnx.load(str(src))
    for node in proto.graph.node:
        for i, name in enumerate(node.output):
            if name == "logits":
                node.output[i] = "logits_raw"
    proto.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), "delta"))
    proto.graph.node.append(helper.make_node("Add", ["logits_raw", "delta"], ["logits"]))
    onnx.save(proto, str(dst))
    return dst


@pytest.fixture(scope="module")
def big_projection(
    model: CARLModel, tmp_path_factory: pytest.TempPathFactory
) -> tuple[CARLModel, Path]:
    """The tiny model with a projection z of magnitude ~1e4 (cosine logits stay ~10), as a
    trained model's can be, and its export (the faster exporter)."""
    big = build_model(TINY)
    big.load_state_dict(model.state_dict())
    with torch.no_grad():
        big.head.layers[-1].weight.mul_(1e4)
        big.head.layers[-1].bias.mul_(1e4)
    big.eval()
    path = tmp_path_factory.mktemp("big") / "big.onnx"
    export_onnx(big, path, input_size=SIZE, exporter="torchscript")
    return big, path


def test_a_large_projection_does_not_loosen_the_limit_on_the_logits(
    big_projection: tuple[CARLModel, Path], tmp_path: Path
) -> None:
    big, path = big_projection
    x = onnx_export.parity_inputs(SIZE)
    ok = onnx_parity(big, path, x)
    assert ok["output_scale"] > 1e3  # the premise: the projection is large
    assert onnx_export.parity_failure(ok) is None  # a faithful export still passes
    delta = np.zeros((1, TINY.num_prototypes), np.float32)
    delta[0, 3] = 0.01  # 100x the limit on logits of magnitude ~10
    bad = _add_to_logits(path, tmp_path / "bad.onnx", delta)
    res = onnx_parity(big, bad, x)
    failure = onnx_export.parity_failure(res)
    assert failure is not None and failure.startswith("logits: max abs diff 0.01 at output")
    logits = res["outputs"]["logits"]
    assert logits["max_abs_diff"] == pytest.approx(0.01, rel=1e-3)
    assert logits["output_scale"] < 100
    assert res["worst_output"] == "logits" and res["scaled_diff"] == logits["scaled_diff"]
    assert res["output_scale"] == res["outputs"]["projection"]["output_scale"]


def test_non_finite_outputs_fail_the_parity_check(model: CARLModel, tmp_path: Path) -> None:
    path = export_onnx(model, tmp_path / "m.onnx", input_size=SIZE, exporter="torchscript")
    x = onnx_export.parity_inputs(SIZE)
    for value, what in ((np.nan, "NaN"), (np.inf, "inf")):
        bad = _add_to_logits(
            path, tmp_path / f"{what}.onnx", np.full((1, TINY.num_prototypes), value)
        )
        res = onnx_parity(model, bad, x)
        assert onnx_export.parity_failure(res) == (
            "non-finite values (NaN or inf) in logits (ONNX)"
        )
        assert res["non_finite"] == ["logits (ONNX)"]
        assert res["worst_output"] == "logits"
        assert not math.isfinite(res["scaled_diff"]) and not math.isfinite(res["max_abs_diff"])
    # NaN figures fail too, whatever produced them
    res = onnx_parity(model, path, x)
    assert onnx_export.parity_failure({**res, "min_cosine": math.nan}) is not None
    assert onnx_export.parity_failure({**res, "scaled_diff": math.nan}) is not None


def test_add_onnx_refuses_an_export_with_nan_outputs(
    model: CARLModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = save_pretrained(model, tmp_path / "m", ZooConfig(TINY, Preprocessing(SIZE, SIZE)))
    before = (out / "config.json").read_bytes()
    real_export = onnx_export.export_onnx

    def nan_logits(m: CARLModel, path: Path, **kwargs: object) -> Path:
        real_export(m, path, **{**kwargs, "exporter": "torchscript"})
        nan = np.full((1, TINY.num_prototypes), np.nan)
        return _add_to_logits(Path(path), Path(path), nan)

    monkeypatch.setattr(onnx_export, "export_onnx", nan_logits)
    with pytest.raises(ValueError, match=r"differs from PyTorch: non-finite values .* logits"):
        add_onnx(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert (out / "config.json").read_bytes() == before


# ---- add_onnx records the export in config.json; a folder with a card is re-exported ------


@pytest.fixture
def fast_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    real_export = onnx_export.export_onnx

    def fast_export(*args: object, **kwargs: object) -> Path:
        return real_export(*args, **{**kwargs, "exporter": "torchscript"})

    monkeypatch.setattr(onnx_export, "export_onnx", fast_export)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.usefixtures("fast_exporter")
def test_add_onnx_records_the_export_in_config_json(model: CARLModel, tmp_path: Path) -> None:
    cfg = ZooConfig(TINY, Preprocessing(SIZE, SIZE), provenance={"onnx_opset": None})
    out = save_pretrained(model, tmp_path / "m", cfg)
    assert main([str(out), "--opset", "20"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.onnx",
        "model.safetensors",
    ]
    data = json.loads((out / "config.json").read_text())
    prov = data["provenance"]
    assert prov["onnx_opset"] == 20 and prov["weights_dtype"] == "float32"
    parity = prov["onnx_parity"]
    assert parity["tol"] == 1e-4 and parity["real"] is None
    assert parity["random"]["n"] == 4 and parity["random"]["source"] == "4 random N(0, 1) inputs"
    assert parity["random"]["scaled_diff"] <= 1e-4
    assert set(parity["random"]["outputs"]) == {"features", "projection", "logits"}
    assert from_pretrained(out).config.provenance == prov  # still a valid config.json
    # Exported again without the check, the old figures would not describe the new file.
    add_onnx(out, check=False)
    prov = json.loads((out / "config.json").read_text())["provenance"]
    assert prov["onnx_opset"] == 18 and "onnx_parity" not in prov
    assert _leftovers(out) == []


@pytest.mark.usefixtures("fast_exporter")
def test_add_onnx_refuses_a_folder_with_a_model_card(
    model: CARLModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = save_pretrained(model, tmp_path / "m", ZooConfig(TINY, Preprocessing(SIZE, SIZE)))
    (out / "README.md").write_text("---\nlibrary_name: carlzoo\n---\n\n- No ONNX export.\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {out} holds a model card (README.md)")
    assert f"`carlzoo export RUN_DIR --out {out} --overwrite`" in err
    with pytest.raises(ValueError, match="holds a model card"):
        add_onnx(out, out=out / "model.onnx")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # An export elsewhere (the onnx backend's cache of a bundled model) leaves the folder alone.
    elsewhere = add_onnx(out, out=tmp_path / "cache.onnx")
    assert elsewhere.is_file() and {p.name: p.read_bytes() for p in out.iterdir()} == before
