"""Deployment exports (state dict, TorchScript, torch.export, ONNX) from every checkpoint layout."""

from __future__ import annotations

import json
from pathlib import Path

import fastmri
import pytest
import torch

from sftkd_fastmri.cli.main import main
from sftkd_fastmri.export import EXPORT_FORMATS, deploy, export_model, onnx_export
from sftkd_fastmri.export.deploy import (
    ExportError,
    default_export_path,
    load_pt2_export,
    load_torchscript_export,
    resolve_role,
)
from sftkd_fastmri.models import create_model, load_model, save_model_checkpoint

SHAPE = (16, 12)


def _inputs(batch=1, coils=1, height=16, width=12, seed=0):
    """Under-sampled k-space of a random image, a column mask, normalised coil maps."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, height, width, 2, generator=g)
    mask = torch.zeros(batch, 1, 1, width, 1, dtype=torch.bool)
    mask[..., ::2, :] = True
    if coils == 1:
        return fastmri.fft2c(image.unsqueeze(1)) * mask, mask
    sens = torch.randn(batch, coils, height, width, 2, generator=g)
    sens = sens / fastmri.rss_complex(sens, dim=1)[:, None, ..., None]
    kspace = fastmri.fft2c(fastmri.complex_mul(image.unsqueeze(1), sens))
    return kspace * mask, mask, sens


def _eager(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(*inputs) if len(inputs) == 3 else model(*inputs, None)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One checkpoint of each layout, and the network each export must reproduce."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    trained = create_model("dccnn_d3c5", chans=4)
    lightning_net = create_model("dccnn_d3c5", chans=4)
    teacher = create_model("dccnn_d5c5", chans=4)
    student = create_model("dccnn_d3c5", chans=4)

    model_ckpt = save_model_checkpoint(trained, root / "model.pt", role="student")

    # A distillation run's Lightning checkpoint: the network under "model.", learned loss
    # parameters under "distillation." (ignored by the export).
    lightning_state = {f"model.{k}": v for k, v in lightning_net.state_dict().items()}
    lightning_state["distillation.proj.weight"] = torch.ones(2, 2)
    lightning_ckpt = root / "kd.ckpt"
    torch.save(
        {
            "state_dict": lightning_state,
            "hyper_parameters": {
                "model_preset": "dccnn_d3c5",
                "model_config": lightning_net.config,
            },
        },
        lightning_ckpt,
    )

    sft_state = {f"sft.teacher.{k}": v for k, v in teacher.state_dict().items()}
    sft_state.update({f"sft.student.{k}": v for k, v in student.state_dict().items()})
    sft_ckpt = root / "sft.ckpt"
    torch.save(
        {
            "state_dict": sft_state,
            "hyper_parameters": {
                "teacher_preset": "dccnn_d5c5",
                "teacher_config": teacher.config,
                "student_preset": "dccnn_d3c5",
                "student_config": student.config,
            },
        },
        sft_ckpt,
    )
    return {
        "model": (model_ckpt, "auto", trained, "student"),
        "lightning": (lightning_ckpt, "auto", lightning_net, "model"),
        "sft-teacher": (sft_ckpt, "auto", teacher, "teacher"),
        "sft-student": (sft_ckpt, "student", student, "student"),
    }


def _leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- state dict ---------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["model", "lightning", "sft-teacher", "sft-student"])
def test_state_dict_export_rebuilds_the_network_strictly(sources, source, tmp_path):
    ckpt, role, expected, role_name = sources[source]
    out = export_model(ckpt, tmp_path / "net.pt", format="state_dict", role=role)
    rebuilt = load_model(out)  # strict, by name
    assert _same_weights(rebuilt, expected)
    assert rebuilt.config == expected.config
    meta = torch.load(out, weights_only=True)["sftkd_fastmri"]
    assert meta["role"] == role_name and meta["extra"]["exported_from"] == str(ckpt)
    assert _leftovers(tmp_path) == []


# -- TorchScript --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "source, coils",
    [("model", 3), ("lightning", 1), ("sft-teacher", 1), ("sft-student", 2)],
)
def test_torchscript_reproduces_eager_output(sources, source, coils, tmp_path):
    ckpt, role, expected, role_name = sources[source]
    out = export_model(
        ckpt,
        tmp_path / "net.ts.pt",
        format="torchscript",
        role=role,
        example_shape=SHAPE,
        coils=coils,
    )
    module, meta = load_torchscript_export(out)
    assert meta["role"] == role_name and meta["coils"] == coils
    assert meta["inputs"][-1] == ("sens_maps" if coils > 1 else "mask")
    assert meta["method"] in ("script", "trace") and meta["example_shape"] == list(SHAPE)
    # At the traced size, and - the trace records fftshift's shape arithmetic - at another
    # batch, odd size and (multi-coil) coil count.
    for kwargs in ({}, {"batch": 2, "height": 15, "width": 11, "coils": coils + (coils > 1)}):
        inputs = _inputs(**{"coils": coils, **kwargs}, seed=1)
        with torch.no_grad():
            got = module(*inputs)
        torch.testing.assert_close(got, _eager(expected, inputs), atol=1e-5, rtol=0)
    assert meta["dynamic_shapes"] is True
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_the_one_channel_paper_preset_exports_like_the_eager_model(fmt, tmp_path):
    """The authors' 1-channel real-image DC-CNN (padded blocks, a channels-last real image)."""
    if fmt == "onnx":
        for module in ("onnx", "onnxruntime", "onnxscript"):
            pytest.importorskip(module)
    torch.manual_seed(0)
    model = create_model("dccnn_d3c5_paper").eval()
    out = export_model(model, tmp_path / f"paper.{fmt}", format=fmt, example_shape=SHAPE)
    inputs = _inputs(batch=2, height=15, width=11, seed=5)
    if fmt == "torchscript":
        module, _ = load_torchscript_export(out)
        with torch.no_grad():
            got = module(*inputs)
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        got = torch.from_numpy(session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0])
    torch.testing.assert_close(got, _eager(model, inputs), atol=1e-4, rtol=1e-4)


def test_traced_module_fixed_to_its_size_is_recorded(monkeypatch, tmp_path):
    # Simulate a trace that bakes the size in: the second-size check fails.
    model = create_model("dccnn_d3c5", chans=4, num_cascades=1)

    def broken_other_inputs(shape, coils):
        kspace, mask = deploy._example_inputs((shape[0] + 1, shape[1] + 1), coils, batch=2)
        return kspace, mask[..., :-1, :]  # does not broadcast: raises like a baked size

    monkeypatch.setattr(deploy, "_other_inputs", broken_other_inputs)
    with pytest.warns(UserWarning, match="only at the traced size 16 x 12"):
        out = export_model(
            model, tmp_path / "fixed.ts.pt", format="torchscript", example_shape=SHAPE
        )
    module, meta = load_torchscript_export(out)
    assert meta["dynamic_shapes"] is False and meta["example_shape"] == [16, 12]
    inputs = _inputs()
    torch.testing.assert_close(module(*inputs), _eager(model, inputs), atol=1e-5, rtol=0)


# -- torch.export -------------------------------------------------------------------------
@pytest.mark.parametrize("source, coils", [("lightning", 1), ("sft-student", 3)])
def test_pt2_program_reproduces_eager_output_at_any_batch_size_and_coil_count(
    sources, source, coils, tmp_path
):
    ckpt, role, expected, role_name = sources[source]
    out = export_model(
        ckpt, tmp_path / "net.pt2", format="pt2", role=role, example_shape=SHAPE, coils=coils
    )
    module, meta = load_pt2_export(out)
    assert meta["format"] == "pt2" and meta["role"] == role_name and meta["coils"] == coils
    assert meta["dynamic_shapes"] is True and meta["example_shape"] == list(SHAPE)
    program = torch.export.load(str(out)).module()  # torch alone, without this package
    # odd sizes too: the data-consistency layers' even-size shortcut must not be baked in
    for kwargs in ({}, {"batch": 3, "height": 15, "width": 11, "coils": coils + (coils > 1)}):
        inputs = _inputs(**{"coils": coils, **kwargs}, seed=1)
        want = _eager(expected, inputs)
        with torch.no_grad():
            torch.testing.assert_close(module(*inputs), want, atol=1e-5, rtol=0)
            torch.testing.assert_close(program(*inputs), want, atol=1e-5, rtol=0)
    kspace, mask, sens = _inputs(coils=3)
    if coils == 1:  # multi-coil k-space into a single-coil export: refused, never coil 0
        with pytest.raises(ValueError, match="single-coil .* has 3 coils"):
            module(kspace, mask)
        with pytest.raises((AssertionError, RuntimeError)):  # torch.export's shape guard
            program(kspace, mask)
    else:
        with pytest.raises(ValueError, match="sens_maps must have the k-space's shape"):
            module(kspace, mask, sens[:, :2])
    with pytest.raises(ValueError, match="mask must be"):
        module(*_inputs(coils=coils)[:1], mask[..., :5, :], *_inputs(coils=coils)[2:])
    assert _leftovers(tmp_path) == []


def test_exports_take_fastmri_float_masks_and_name_missing_sens_maps(tmp_path):
    torch.manual_seed(0)
    net = create_model("dccnn_d3c5", chans=4, num_cascades=2)
    kspace, mask, sens = _inputs(batch=2, coils=3)
    want = _eager(net, (kspace, mask, sens))
    pt2 = export_model(net, tmp_path / "m.pt2", format="pt2", coils=3)  # default 320 x 320
    # the example k-space is not stored: the file holds the program and the weights
    assert pt2.stat().st_size < 1_000_000
    ts = export_model(net, tmp_path / "m.ts.pt", format="torchscript", coils=3, example_shape=SHAPE)
    from sftkd_fastmri.models import CheckpointError, read_checkpoint

    with pytest.raises(CheckpointError, match="is a torch.export .pt2. export"):
        read_checkpoint(pt2)
    assert load_pt2_export(pt2)[0].eval() is not None  # a mode switch is no error
    shared = mask[:1]  # one mask for the whole batch, as the eager network broadcasts it
    assert mask.shape[0] > 1 and (mask == shared).all()
    for module in (load_pt2_export(pt2)[0], load_torchscript_export(ts)[0]):
        torch.testing.assert_close(module(kspace, mask.float(), sens), want, atol=1e-5, rtol=0)
        # the pt2 program alone refuses a batch-1 mask (its batch dimension is one symbol)
        torch.testing.assert_close(module(kspace, shared, sens), want, atol=1e-5, rtol=0)
        with pytest.raises(Exception, match="mask has a batch of 3 for k-space of batch 2"):
            module(kspace, torch.cat([mask, shared]), sens)
        with pytest.raises(Exception, match="pass the coil sensitivities as sens_maps"):
            module(kspace, mask, None)


def test_varnet_traces_that_freeze_the_mask_are_refused(tmp_path):
    """fastMRI's VarNet reads its sampled centre from the mask with data-dependent
    operations: a trace freezes them, and is right only for the example's mask."""
    from fastmri.models import VarNet

    from sftkd_fastmri.models import CascadedVarNet

    torch.manual_seed(0)
    net = CascadedVarNet(VarNet(num_cascades=1, sens_chans=2, sens_pools=1, chans=2, pools=1))
    out = tmp_path / "v.ts.pt"
    with pytest.raises(ExportError, match="another sampling mask.*format='state_dict'"):
        export_model(net, out, format="torchscript", coils=3, example_shape=(32, 24))
    assert not out.exists() and _leftovers(tmp_path) == []
    assert export_model(net, tmp_path / "v.pt", format="state_dict").is_file()


def test_cli_export_pt2_names_the_file_after_the_checkpoint(sources, capsys):
    ckpt, _, net, _ = sources["lightning"]
    assert main(["export", str(ckpt), "--format", "pt2", "--shape", "16", "12"]) == 0
    out = ckpt.with_name("kd.pt2")
    assert str(out) in capsys.readouterr().out
    module, _ = load_pt2_export(out)
    inputs = _inputs(seed=3)
    torch.testing.assert_close(module(*inputs), _eager(net, inputs), atol=1e-5, rtol=0)
    out.unlink()


# -- ONNX ---------------------------------------------------------------------------------
@pytest.mark.parametrize("coils", [1, 3])
def test_onnx_export_runs_in_onnxruntime_like_the_eager_model(sources, coils, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ckpt, role, expected, _ = sources["sft-student"]
    out = export_model(
        ckpt, tmp_path / "net.onnx", format="onnx", role=role, example_shape=SHAPE, coils=coils
    )
    meta = json.loads(
        {p.key: p.value for p in onnx.load(str(out)).metadata_props}[deploy.METADATA_NAME]
    )
    assert meta["format"] == "onnx" and meta["coils"] == coils and meta["dynamic_shapes"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == ["masked_kspace", "mask", "sens_maps"][: 2 + (coils > 1)]
    for kwargs in ({}, {"batch": 3, "height": 15, "width": 11, "coils": coils + (coils > 1)}):
        inputs = _inputs(**{"coils": coils, **kwargs}, seed=4)
        got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]
        want = _eager(expected, inputs)
        torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)
    assert _leftovers(tmp_path) == []


def test_onnx_without_its_packages_explains_what_to_install(sources, monkeypatch, tmp_path):
    """Without onnx/onnxscript only the TorchScript-based exporter is there, which cannot
    translate the complex FFTs: the error says so, and nothing is written."""
    ckpt, role, _, _ = sources["sft-student"]
    monkeypatch.setattr(onnx_export, "_have", lambda *modules: False)
    out = tmp_path / "net.onnx"
    with pytest.raises(ExportError) as err:
        export_model(ckpt, out, format="onnx", role=role, example_shape=SHAPE)
    message = str(err.value)
    assert "FFT" in message and "pip install onnx onnxscript" in message
    assert "format='torchscript'" in message
    assert not out.exists() and _leftovers(tmp_path) == []


def test_an_onnx_opset_the_export_cannot_have_is_refused(sources, tmp_path):
    """Below opset 17 there is no DFT operator, and torch's exporter raised such a request to
    its own minimum without a word: the file was not what was asked for."""
    from types import SimpleNamespace

    ckpt, role, _, _ = sources["sft-student"]
    out = tmp_path / "net.onnx"
    with pytest.raises(ExportError, match="ONNX opset 13: .*DFT operator.*opset >= 17"):
        export_model(ckpt, out, format="onnx", role=role, example_shape=SHAPE, opset=13)
    assert not out.exists() and _leftovers(tmp_path) == []
    program = SimpleNamespace(model=SimpleNamespace(opset_imports={"": 18, "pkg.onnxscript": 1}))
    assert onnx_export._default_opset(program) == 18  # compared with the opset asked for
    assert onnx_export._default_opset(SimpleNamespace()) is None


# -- atomic writes, validation, naming ----------------------------------------------------
def test_failed_export_leaves_previous_file_and_no_temporary(sources, monkeypatch, tmp_path):
    ckpt, _, _, _ = sources["model"]
    out = tmp_path / "net.pt"
    out.write_bytes(b"previous export")
    other = create_model("dccnn_d3c5", chans=4)  # different random weights
    monkeypatch.setattr(deploy, "load_model", lambda path: other)
    with pytest.raises(ExportError, match="does not rebuild the same weights"):
        export_model(ckpt, out, format="state_dict")
    assert out.read_bytes() == b"previous export"
    assert _leftovers(tmp_path) == []


def test_bad_arguments_are_refused(sources, tmp_path):
    ckpt, _, _, _ = sources["model"]
    assert EXPORT_FORMATS == ("state_dict", "torchscript", "pt2", "onnx")
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(ckpt, tmp_path / "x", format="tflite")
    with pytest.raises(ValueError, match="role must be one of"):
        export_model(ckpt, tmp_path / "x", role="assistant")
    with pytest.raises(ValueError, match="example_shape"):
        export_model(ckpt, tmp_path / "x", format="torchscript", example_shape=(16,))
    with pytest.raises(ValueError, match="overwrite the source"):
        export_model(ckpt, ckpt, format="state_dict")


def test_default_names_follow_the_selected_role(sources):
    model_ckpt, lightning_ckpt, sft_ckpt = (
        sources[k][0] for k in ("model", "lightning", "sft-teacher")
    )
    assert resolve_role(model_ckpt) == "student"  # recorded in the model checkpoint
    assert resolve_role(lightning_ckpt) == "model"
    assert resolve_role(sft_ckpt) == "teacher" and resolve_role(sft_ckpt, "student") == "student"
    assert default_export_path(sft_ckpt, "torchscript", "student").name == "sft.student.ts.pt"
    assert default_export_path(sft_ckpt, "onnx").name == "sft.teacher.onnx"
    assert default_export_path(model_ckpt, "state_dict").name == "model.student.pt"
    assert default_export_path(lightning_ckpt, "pt2").name == "kd.pt2"


# -- command line -------------------------------------------------------------------------
def test_cli_export_writes_the_student(sources, capsys):
    ckpt, _, student, _ = sources["sft-student"]
    argv = ["export", str(ckpt), "--format", "torchscript", "--role", "student"]
    assert main(argv + ["--shape", "16", "12"]) == 0
    out = ckpt.with_name("sft.student.ts.pt")
    assert out.is_file() and str(out) in capsys.readouterr().out
    module, meta = load_torchscript_export(out)
    assert meta["preset"] == "dccnn_d3c5" and meta["config"] == student.config
    inputs = _inputs(seed=2)
    torch.testing.assert_close(module(*inputs), _eager(student, inputs), atol=1e-5, rtol=0)
    out.unlink()


def test_cli_export_reports_errors_without_a_traceback(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.ckpt"), "--format", "state_dict"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_state_dict_to_chosen_path(sources, tmp_path, capsys):
    ckpt, _, expected, _ = sources["lightning"]
    out = tmp_path / "deploy" / "student.pt"
    assert main(["export", str(ckpt), "--format", "state_dict", "--out", str(out)]) == 0
    assert _same_weights(load_model(out), expected)
    assert str(out) in capsys.readouterr().out
    # a path the user names is not replaced without --overwrite (it may be another checkpoint)
    before = out.read_bytes()
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err and out.read_bytes() == before
    argv = ["export", str(ckpt), "--format", "state_dict", "--out", str(out), "--overwrite"]
    assert main(argv) == 0 and _same_weights(load_model(out), expected)


def test_torchscript_exports_check_their_inputs_and_follow_the_recorded_challenge(tmp_path):
    """A trace keeps no Python checks: without the export's own guard, a single-coil export
    reconstructs multi-coil k-space from its first coil without a word."""
    torch.manual_seed(0)
    net = create_model("dccnn_d3c5", chans=4)
    plain = save_model_checkpoint(net, tmp_path / "plain.pt")
    multi = save_model_checkpoint(net, tmp_path / "mc.pt", extra={"challenge": "multicoil"})

    single_ts = export_model(plain, tmp_path / "single.ts.pt", format="torchscript")
    module, meta = load_torchscript_export(single_ts)
    assert meta["inputs"] == ["masked_kspace", "mask"] and "challenge" not in meta
    kspace, mask, sens = _inputs(coils=3)
    with pytest.raises(Exception, match="single-coil .* has 3 coils"):
        module(kspace, mask)
    with pytest.raises(Exception, match="mask must be"):
        module(*_inputs(coils=1)[:1], mask[..., :5, :])

    multi_ts = export_model(multi, tmp_path / "multi.ts.pt", format="torchscript")
    module, meta = load_torchscript_export(multi_ts)
    assert meta["inputs"] == ["masked_kspace", "mask", "sens_maps"]
    assert meta["challenge"] == "multicoil"
    torch.testing.assert_close(module(kspace, mask, sens), _eager(net, (kspace, mask, sens)))
    with pytest.raises(Exception, match="sens_maps must have the k-space's shape"):
        module(kspace, mask, sens[:, :2])
    # an explicit coil count wins over the record, with a word
    with pytest.warns(UserWarning, match="trained on multicoil data, but the export is made for 1"):
        assert export_model(multi, tmp_path / "s2.ts.pt", format="torchscript", coils=1)
    assert load_torchscript_export(tmp_path / "s2.ts.pt")[1]["inputs"] == ["masked_kspace", "mask"]


def test_commands_record_the_challenge_beside_the_weights(tmp_path):
    from sftkd_fastmri.models import read_checkpoint

    torch.manual_seed(0)
    net = create_model("dccnn_d3c5", chans=4)
    ckpt = save_model_checkpoint(net, tmp_path / "m.pt", extra={"challenge": "multicoil"})
    out = export_model(ckpt, tmp_path / "again.pt")  # a state-dict re-export keeps it
    assert read_checkpoint(out)["sftkd_fastmri"]["extra"]["challenge"] == "multicoil"
    plain = save_model_checkpoint(net, tmp_path / "model.pt")  # role "model"
    assert default_export_path(plain, "torchscript").name == "model.ts.pt"


def test_lightning_checkpoints_record_the_challenge_of_their_data(demo_root, tmp_path):
    """Trained through the Python API (no CLI), a multi-coil network still exports with the
    multi-coil signature; an unrecorded checkpoint exports single-coil with a warning."""
    import pytorch_lightning as pl

    from sftkd_fastmri.pl_modules import DCCNNModule, FastMRIDataModule

    module = DCCNNModule("dccnn_d3c5", model_overrides={"chans": 4, "num_cascades": 1})
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=FastMRIDataModule(demo_root, "multicoil", batch_size=2))
    trainer.save_checkpoint(tmp_path / "mc.ckpt")
    assert (
        torch.load(tmp_path / "mc.ckpt", weights_only=True)["hyper_parameters"]["challenge"]
        == "multicoil"
    )
    out = export_model(tmp_path / "mc.ckpt", tmp_path / "mc.ts.pt", format="torchscript")
    assert load_torchscript_export(out)[1]["inputs"][-1] == "sens_maps"
    plain = save_model_checkpoint(create_model("dccnn_d3c5", chans=4), tmp_path / "p.pt")
    with pytest.warns(UserWarning, match="does not record whether its data"):
        export_model(plain, tmp_path / "p.ts.pt", format="torchscript")


def test_pt2_on_a_torch_without_dim_auto_says_which_torch_it_needs(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.export, "Dim", object())  # as torch.export before 2.6
    out = tmp_path / "m.pt2"
    with pytest.raises(ExportError, match=r"torch >= 2.6.*format='torchscript'"):
        export_model(create_model("dccnn_d3c5", chans=4), out, format="pt2", coils=1)
    assert not out.exists()


def test_a_float64_network_is_exported_as_a_float32_copy(tmp_path):
    """The traced signature takes float32 k-space: a float64 network failed with a dtype
    error in every traced format."""
    torch.manual_seed(0)
    model = create_model("dccnn_d3c5", chans=4).double().eval()
    with pytest.warns(UserWarning, match="float64 network; the torchscript export takes float32"):
        out = export_model(model, tmp_path / "d.ts.pt", format="torchscript", example_shape=SHAPE)
    assert model.cascades[0].cnn.conv0.weight.dtype == torch.float64  # the caller's is kept
    module, _ = load_torchscript_export(out)
    inputs = _inputs(batch=1, height=SHAPE[0], width=SHAPE[1], seed=3)
    with torch.no_grad():
        got = module(*inputs)
    torch.testing.assert_close(got, _eager(model.float(), inputs), atol=1e-4, rtol=1e-4)


def test_exporter_errors_are_plain_text_and_name_the_export_that_works_for_a_varnet():
    from sftkd_fastmri.export.checks import _error_text, _first_line
    from sftkd_fastmri.export.onnx_export import _onnx_failure

    coloured = RuntimeError("\x1b[96mThis is step 1/3\x1b[0m of exporting: it failed")
    assert _first_line(coloured) == "RuntimeError: This is step 1/3 of exporting: it failed"
    assert "\x1b" not in _error_text(ValueError("outer")) + _error_text(coloured)
    message = str(_onnx_failure(coloured, dynamo=True, opset=None))
    assert "\x1b" not in message and "format='state_dict'" in message


def test_a_torchscript_export_bound_to_its_traced_size_refuses_other_sizes(tmp_path):
    """A traced VarNet (its U-Nets pad to multiples of 16, sizes a trace freezes) reproduces
    the network only at the traced size: it returned a wrong image at 80 x 56 without a
    word, although its metadata said so."""
    import warnings

    from sftkd_fastmri.export.deploy import export_model, load_torchscript_export
    from sftkd_fastmri.models import create_model

    torch.manual_seed(0)
    small = dict(num_cascades=1, chans=4, pools=2, sens_chans=2, sens_pools=1)
    net = create_model("varnet", use_given_sens_maps=True, **small).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_model(
            net, tmp_path / "v.ts", format="torchscript", example_shape=(64, 48), coils=4
        )
    module, meta = load_torchscript_export(path)
    assert meta["dynamic_shapes"] is False and meta["method"] == "trace"

    def inputs(h, w):
        mask = torch.zeros(1, 1, 1, w, 1, dtype=torch.bool)
        mask[..., ::3, :] = True
        mask[..., w // 2 - 3 : w // 2 + 3, :] = True
        return torch.randn(1, 4, h, w, 2) * mask, mask, torch.randn(1, 4, h, w, 2)

    kspace, mask, sens = inputs(64, 48)
    with torch.no_grad():
        torch.testing.assert_close(module(kspace, mask, sens), net(kspace, mask.float(), sens))
        kspace, mask, sens = inputs(80, 56)
        assert not torch.allclose(net(kspace, mask.float(), sens), module.inner(kspace, mask, sens))
        with pytest.raises(Exception, match=r"only for masked_kspace of .* \[1, 4, 64, 48\]"):
            module(kspace, mask, sens)


@pytest.mark.parametrize("fmt, noted", [("pt2", True), ("onnx", True), ("state_dict", False)])
def test_cli_export_notes_an_unrecorded_challenge_for_every_format_with_inputs(
    sources, monkeypatch, capsys, tmp_path, fmt, noted
):
    """The note (single-coil signature assumed) was printed for TorchScript only; the
    library's warning is filtered out for every format, so pt2 and ONNX said nothing."""
    from sftkd_fastmri.cli import export_command

    ckpt, _, _, _ = sources["lightning"]  # records no challenge
    written = []

    def fake_export(checkpoint, out, **kwargs):  # the note does not depend on the file
        written.append(kwargs)
        return out

    monkeypatch.setattr(export_command, "export_model", fake_export)
    assert main(["export", str(ckpt), "--format", fmt]) == 0
    assert written and written[0]["format"] == fmt
    out = capsys.readouterr().out
    assert ("does not record its data's challenge" in out) is noted, out
    # given --coils, or for a checkpoint that records its challenge: no note
    assert main(["export", str(ckpt), "--format", fmt, "--coils", "1"]) == 0
    assert "does not record" not in capsys.readouterr().out
    multi = tmp_path / "mc.pt"
    save_model_checkpoint(sources["model"][2], multi, extra={"challenge": "multicoil"})
    assert main(["export", str(multi), "--format", fmt]) == 0
    assert "does not record" not in capsys.readouterr().out


def test_a_pt2_export_takes_its_inputs_by_name_like_torchscript(tmp_path):
    """TorchScript exports took ``masked_kspace=..., mask=..., sens_maps=...``; a loaded pt2
    export refused every keyword."""
    torch.manual_seed(0)
    net = create_model("dccnn_d3c5", chans=4, num_cascades=2)
    out = export_model(net, tmp_path / "m.pt2", format="pt2", coils=3, example_shape=SHAPE)
    module, meta = load_pt2_export(out)
    assert meta["inputs"] == ["masked_kspace", "mask", "sens_maps"]
    inputs = _inputs(batch=2, coils=3)
    want = _eager(net, inputs)
    named = dict(zip(meta["inputs"], inputs))
    with torch.no_grad():
        torch.testing.assert_close(module(**named), want, atol=1e-5, rtol=0)
        reordered = {"sens_maps": inputs[2], "masked_kspace": inputs[0], "mask": inputs[1]}
        torch.testing.assert_close(module(**reordered), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            module(inputs[0], inputs[1], sens_maps=inputs[2]), want, atol=1e-5, rtol=0
        )
    signature = r"\(masked_kspace, mask, sens_maps\)"
    with pytest.raises(TypeError, match=f"{signature}; unknown input name.*: kspace"):
        module(kspace=inputs[0], mask=inputs[1], sens_maps=inputs[2])
    with pytest.raises(TypeError, match=f"{signature}; missing: sens_maps"):
        module(masked_kspace=inputs[0], mask=inputs[1])
    with pytest.raises(TypeError, match="got mask both by position and by name"):
        module(inputs[0], inputs[1], mask=inputs[1], sens_maps=inputs[2])
    with pytest.raises(TypeError, match="takes 3 inputs .* got 4 by position"):
        module(*inputs, inputs[2], sens_maps=inputs[2])
