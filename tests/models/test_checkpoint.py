import pytest
import torch

from sftkd_fastmri.models import (
    CheckpointError,
    create_model,
    load_model,
    load_state_dict_strict,
    save_model_checkpoint,
)


def test_round_trip(tmp_path):
    model = create_model("dccnn_d3c5", chans=4)
    path = save_model_checkpoint(model, tmp_path / "m.pt", role="student")
    loaded = load_model(path, expected_preset="dccnn_d3c5")
    assert list(model.state_dict()) == list(loaded.state_dict())
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temporary file left


def test_a_save_that_fails_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    """atomic_torch_save writes elsewhere and renames: a save that dies after writing part of
    the file (disk full, interrupt) leaves the previous checkpoint whole and no partial file."""
    from sftkd_fastmri.models import checkpoint as checkpoint_module

    model = create_model("dccnn_d3c5", chans=4)
    path = save_model_checkpoint(model, tmp_path / "m.pt")
    before = path.read_bytes()
    real_save = torch.save

    def dies_midway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_midway)
    with pytest.raises(OSError, match="No space left"):
        save_model_checkpoint(create_model("dccnn_d3c5", chans=8), path)
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    load_model(path, expected_preset="dccnn_d3c5")


def test_other_preset_is_refused(tmp_path):
    path = save_model_checkpoint(create_model("dccnn_d5c5", chans=4), tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="dccnn_d5c5.*expected 'dccnn_d3c5'"):
        load_model(path, expected_preset="dccnn_d3c5")


def test_strict_loading_reports_missing_unexpected_and_shapes():
    student = create_model("dccnn_d3c5", chans=4)
    teacher = create_model("dccnn_d5c5", chans=4)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(student, teacher.state_dict(), source="teacher.pt")
    text = str(err.value)
    assert "teacher.pt" in text and "unexpected keys" in text and "cascades.0.cnn.conv4" in text
    wide = create_model("dccnn_d3c5", chans=8)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_state_dict_strict(student, wide.state_dict())
    partial = dict(student.state_dict())
    partial.pop("cascades.1.cnn.conv0.bias")
    with pytest.raises(CheckpointError, match="missing keys.*cascades.1.cnn.conv0.bias"):
        load_state_dict_strict(student, partial)


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt.*expected a file written by torch.save"):
        load_model(junk)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # a whole module: needs pickle
    with pytest.raises(CheckpointError, match="pickled.pt.*weights_only=True"):
        load_model(pickled)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="not a sftkd_fastmri checkpoint"):
        load_model(other)


def test_malformed_and_diverged_checkpoints_are_refused_by_name(tmp_path):
    import math

    net = create_model("dccnn_d3c5", chans=4)
    good = save_model_checkpoint(net, tmp_path / "good.pt")
    ckpt = torch.load(good, weights_only=True)

    def variant(name, change):
        obj = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ckpt.items()}
        obj["sftkd_fastmri"] = dict(ckpt["sftkd_fastmri"])
        change(obj)
        torch.save(obj, tmp_path / name)
        return tmp_path / name

    first = next(iter(ckpt["state_dict"]))
    nan = variant(
        "nan.pt", lambda o: o["state_dict"].__setitem__(first, o["state_dict"][first] * math.nan)
    )
    with pytest.raises(
        CheckpointError, match=f"nan.pt: weights hold NaN or Inf in 1 tensor.*{first}"
    ):
        load_model(nan)
    number = variant("number.pt", lambda o: o["state_dict"].__setitem__(first, 1.5))
    with pytest.raises(CheckpointError, match=f"must be tensors; not tensors: {first}"):
        load_model(number)
    no_weights = variant("no_weights.pt", lambda o: o.pop("state_dict"))
    with pytest.raises(CheckpointError, match="no_weights.pt: a model export .* 'state_dict'"):
        load_model(no_weights)
    int_key = variant("int_key.pt", lambda o: o["state_dict"].__setitem__(3, torch.zeros(1)))
    with pytest.raises(CheckpointError, match="keys must be parameter names .* not names: 3"):
        load_model(int_key)
    meta = variant("meta.pt", lambda o: o.__setitem__("sftkd_fastmri", "v1"))
    with pytest.raises(CheckpointError, match="meta.pt: 'sftkd_fastmri' entry is not a mapping"):
        load_model(meta)

    def bad_config(o):
        o["sftkd_fastmri"]["config"] = {**o["sftkd_fastmri"]["config"], "foo": 1}

    config = variant("config.pt", bad_config)
    with pytest.raises(CheckpointError, match="config.pt: the recorded model config .* does not"):
        load_model(config)


def test_plain_state_dicts_get_a_hint(tmp_path):
    net = create_model("dccnn_d3c5", chans=4)
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain state dict: build the network"):
        load_model(tmp_path / "plain.pt")


def test_networks_without_config_and_torchscript_files_are_named(tmp_path):
    with pytest.raises(
        TypeError, match="Linear has none: wrap a fastMRI VarNet .* or save its state_dict"
    ):
        save_model_checkpoint(torch.nn.Linear(2, 2), tmp_path / "lin.pt")
    assert not (tmp_path / "lin.pt").exists()
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(scripted, str(tmp_path / "lin.ts.pt"))
    with pytest.raises(CheckpointError, match="lin.ts.pt is a TorchScript export"):
        load_model(tmp_path / "lin.ts.pt")


def test_checkpoint_kind_takes_a_file_or_a_dict(tmp_path):
    from sftkd_fastmri.models.checkpoint import checkpoint_kind

    path = save_model_checkpoint(create_model("dccnn_d3c5", chans=4), tmp_path / "m.pt")
    assert checkpoint_kind(path) == checkpoint_kind(torch.load(path, weights_only=True)) == "model"


def test_a_lightning_checkpoint_with_a_damaged_state_dict_is_named(tmp_path):
    hp = {"model_preset": "dccnn_d3c5", "model_config": {"num_cascades": 1}}
    torch.save({"state_dict": [1, 2], "hyper_parameters": hp}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="bad.ckpt: its 'state_dict' entry is a list"):
        load_model(tmp_path / "bad.ckpt")


def test_a_compiled_network_is_saved_and_initialised_as_the_network_it_wraps(tmp_path):
    """torch.compile's wrapper keys every weight ``_orig_mod.``: written as is, the file
    could not be loaded (every weight missing)."""
    from sftkd_fastmri.models import init_from_checkpoint

    torch.manual_seed(0)
    model = create_model("dccnn_d3c5", chans=4)
    compiled = torch.compile(model)  # wraps only; nothing compiles until it is called
    path = save_model_checkpoint(compiled, tmp_path / "c.pt")
    assert list(load_model(path).state_dict()) == list(model.state_dict())
    target = torch.compile(create_model("dccnn_d3c5", chans=4))
    init_from_checkpoint(target, path)
    for key, value in model.state_dict().items():
        assert torch.equal(target._orig_mod.state_dict()[key], value)


def test_a_lightning_checkpoint_of_a_compiled_network_loads_as_the_plain_one(tmp_path):
    """A module whose network was torch.compile'd saved ``model._orig_mod.*``: loading,
    evaluating and exporting it failed with every weight missing."""
    torch.manual_seed(0)
    model = create_model("dccnn_d3c5", chans=4)
    compiled = torch.compile(model)  # wraps only
    state = {f"model.{k}": v for k, v in compiled.state_dict().items()}
    assert any("_orig_mod." in k for k in state)
    hp = {"model_preset": "dccnn_d3c5", "model_config": dict(model.config)}
    torch.save({"state_dict": state, "hyper_parameters": hp}, tmp_path / "c.ckpt")
    loaded = load_model(tmp_path / "c.ckpt")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_a_float64_network_stays_float64(tmp_path):
    """The rebuilt network was float32 whatever the weights: 64-true runs lost precision."""
    torch.manual_seed(0)
    model = create_model("dccnn_d3c5", chans=4).double()
    with torch.no_grad():
        model.cascades[0].cnn.conv0.bias[0] = 1 + 1e-12
    loaded = load_model(save_model_checkpoint(model, tmp_path / "d.pt"))
    assert loaded.cascades[0].cnn.conv0.bias.dtype == torch.float64
    assert loaded.cascades[0].cnn.conv0.bias[0].item() == 1 + 1e-12


def test_a_checkpoint_without_a_preset_initialises_a_preset_network_of_its_config(tmp_path):
    """A network written from an instance (``DCCNN(...)``, the SFT flow's instances) records
    no preset: init_from_checkpoint refused it whatever its config; the config comparison and
    the strict key loading decide."""
    from sftkd_fastmri.models import DCCNN, init_from_checkpoint

    torch.manual_seed(0)
    preset_net = create_model("dccnn_d3c5", chans=4, num_cascades=2)
    plain = DCCNN(**preset_net.config)
    path = save_model_checkpoint(plain, tmp_path / "nopreset.pt")
    target = create_model("dccnn_d3c5", chans=4, num_cascades=2)
    assert init_from_checkpoint(target, path) is target
    for key, value in plain.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)
    assert target.preset == "dccnn_d3c5"
    # another configuration is still refused, with the overrides that build it
    with pytest.raises(CheckpointError, match="chans: expected 8, found 4.*--model-overrides"):
        init_from_checkpoint(create_model("dccnn_d3c5", chans=8, num_cascades=2), path)
    # load_model's own expected_preset stays strict (it compares no config)
    with pytest.raises(CheckpointError, match="a network without a preset, expected"):
        load_model(path, expected_preset="dccnn_d3c5")
    # a recorded preset of another name is still refused
    other = save_model_checkpoint(create_model("dccnn_d5c5", chans=4), tmp_path / "d5.pt")
    with pytest.raises(CheckpointError, match="holds preset 'dccnn_d5c5', expected 'dccnn_d3c5'"):
        init_from_checkpoint(create_model("dccnn_d3c5", chans=4), other)


@pytest.mark.parametrize(
    "value, kind",
    [([torch.zeros(2)], "list"), (torch.zeros(3), "Tensor"), ({0: torch.zeros(1)}, None)],
)
def test_a_model_export_whose_state_dict_is_not_named_tensors_is_named(tmp_path, value, kind):
    """A damaged model export crashed with AttributeError / RuntimeError."""
    config = create_model("dccnn_d3c5", chans=4).config
    meta = {"kind": "model", "preset": "dccnn_d3c5", "config": config}
    path = tmp_path / "damaged.pt"
    torch.save({"sftkd_fastmri": meta, "state_dict": value}, path)
    if kind is None:
        match = "damaged.pt: its 'state_dict' keys must be parameter names .* not names: 0"
    else:
        match = f"damaged.pt: its 'state_dict' entry is a {kind}; expected a mapping of param"
    with pytest.raises(CheckpointError, match=match):
        load_model(path)
    # the Lightning layouts alike (the prefixes were stripped from non-names before)
    hp = {"model_preset": "dccnn_d3c5", "model_config": config}
    torch.save({"state_dict": value, "hyper_parameters": hp}, path)
    with pytest.raises(CheckpointError, match=match):
        load_model(path)


def test_the_loaders_named_for_deployment_files_are_importable_as_written(tmp_path):
    """The TorchScript hint named sftkd_fastmri.export.load_torchscript_export, which that
    package did not export."""
    import importlib
    import re

    from sftkd_fastmri.models import read_checkpoint

    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(scripted, str(tmp_path / "lin.ts.pt"))
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))
    torch.export.save(program, str(tmp_path / "lin.pt2"))
    for name in ("lin.ts.pt", "lin.pt2"):
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(tmp_path / name)
        named = re.findall(r"sftkd_fastmri\.export\.[\w.]+", str(err.value))
        assert named, str(err.value)
        for qualified in named:
            module, _, function = qualified.rpartition(".")
            assert callable(getattr(importlib.import_module(module), function)), qualified
    from sftkd_fastmri.export import __all__ as exported

    assert {"load_torchscript_export", "load_pt2_export"} <= set(exported)


@pytest.mark.parametrize(
    "overrides",
    [
        {"chans": 8},
        {"num_low_frequencies": None, "mask_center": True, "residual": False},
        {"dc_mode": "soft", "init_lambda": 1e-5, "pad": -1},
        {"name": "null"},  # strings YAML reads as something else stay strings
        {"name": "None", "other": "true", "float_text": "1.5"},
        {"name": "a,b"},  # the items' separator: the JSON form
        {"sizes": [1, 2]},
        {"quote": "it's", "space": "two words"},
    ],
)
def test_the_overrides_of_a_config_hint_read_back_as_the_values(overrides):
    """The hint wrote str(value): ``key=None`` came back from --model-overrides as 'None'."""
    import shlex

    from sftkd_fastmri.cli.options import overrides_option
    from sftkd_fastmri.models.checkpoint import overrides_text

    words = shlex.split(overrides_text(overrides))  # as the shell hands it to the command
    assert len(words) == 1
    assert overrides_option(words[0]) == overrides
