"""fastMRI's VarNet (through CascadedVarNet) in this package's checkpoints: its config
rebuilds it, so SFT and model checkpoints of VarNets reload without the instances."""

import pytest
import torch
from fastmri.models import VarNet
from torch import nn

from sftkd_fastmri.models import (
    CascadedVarNet,
    CheckpointError,
    build_model,
    create_model,
    load_model,
    save_model_checkpoint,
)


def _varnet(**kwargs):
    args = dict(num_cascades=2, sens_chans=2, sens_pools=2, chans=3, pools=2)
    args.update(kwargs)
    return CascadedVarNet(VarNet(**args), num_low_frequencies=None)


def _inputs(coils=3, height=16, width=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    kspace = torch.randn(2, coils, height, width, 2, generator=g)
    mask = torch.zeros(2, 1, 1, width, 1, dtype=torch.bool)
    mask[..., ::2, :] = True
    mask[..., width // 2 - 2 : width // 2 + 2, :] = True
    return kspace * mask, mask


def test_config_reads_the_constructor_arguments_off_the_network():
    model = _varnet(chans=5, pools=1, sens_chans=4, sens_pools=1, mask_center=False)
    model.use_given_sens_maps = True
    assert model.config == {
        "architecture": "cascaded_varnet",
        "num_cascades": 2,
        "sens_chans": 4,
        "sens_pools": 1,
        "chans": 5,
        "pools": 1,
        "mask_center": False,
        "num_low_frequencies": None,
        "use_given_sens_maps": True,
    }
    rebuilt = build_model(model.config)
    assert isinstance(rebuilt, CascadedVarNet) and rebuilt.config == model.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_model_checkpoint_of_a_varnet_reloads_strictly_with_the_same_output(tmp_path):
    torch.manual_seed(0)
    model = _varnet().eval()
    path = save_model_checkpoint(model, tmp_path / "varnet.pt", role="teacher")
    loaded = load_model(path).eval()
    assert isinstance(loaded, CascadedVarNet)
    inputs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), model(*inputs), atol=0, rtol=0)
    # a checkpoint whose weights are of another VarNet size is refused by name
    state = torch.load(path, weights_only=True)
    state["sftkd_fastmri"]["config"]["chans"] = 4
    torch.save(state, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_model(tmp_path / "wrong.pt")


def test_configs_that_build_nothing_are_named():
    with pytest.raises(ValueError, match="unknown architecture 'unet'"):
        build_model({"architecture": "unet"})
    with pytest.raises(ValueError, match="missing: \\['sens_pools'\\]"):
        config = dict(_varnet().config)
        del config["sens_pools"]
        build_model(config)
    with pytest.raises(ValueError, match="not a DC-CNN config"):
        build_model({"num_cascades": 2, "bogus": 1})
    assert isinstance(build_model(create_model("dccnn_d3c5", chans=4).config), nn.Module)


def test_a_varnet_of_another_layout_has_no_config(tmp_path):
    model = _varnet()
    model.varnet.sens_net = nn.Identity()  # not fastMRI's sensitivity model
    assert getattr(model, "config", None) is None
    with pytest.raises(TypeError, match="not laid out as fastMRI's VarNet"):
        save_model_checkpoint(model, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_a_varnet_checkpoint_given_to_a_dccnn_names_both_kinds(tmp_path):
    from sftkd_fastmri.models import DCCNN, init_from_checkpoint

    path = save_model_checkpoint(_varnet(), tmp_path / "varnet.pt")
    # not a list of --model-overrides (no override turns a DC-CNN into a VarNet)
    with pytest.raises(CheckpointError, match="holds a cascaded_varnet network; .* a DC-CNN"):
        init_from_checkpoint(DCCNN(num_cascades=2, depth=3, chans=4), path)
    # the checkpoint records no preset: its kind is named, as for a DC-CNN without one
    with pytest.raises(CheckpointError, match="holds a cascaded_varnet network; .* a DC-CNN"):
        init_from_checkpoint(create_model("dccnn_d3c5", chans=4), path)
    with pytest.raises(
        CheckpointError, match="a cascaded_varnet without a preset, expected .dccnn_d3c5."
    ):
        load_model(path, expected_preset="dccnn_d3c5")


def test_a_varnet_written_from_an_instance_initialises_the_varnet_preset(tmp_path):
    """The SFT flow's CascadedVarNet(VarNet(...)) records no preset; a KD student built from
    the ``varnet`` preset with the same settings was refused it."""
    from sftkd_fastmri.models import init_from_checkpoint

    torch.manual_seed(0)
    sizes = dict(num_cascades=2, sens_chans=2, sens_pools=2, chans=3, pools=2)
    source = _varnet(**sizes)
    path = save_model_checkpoint(source, tmp_path / "sft_student_init.ckpt", role="student")
    target = create_model("varnet", **sizes)
    assert target.config == source.config
    init_from_checkpoint(target, path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_a_config_hint_builds_the_network_of_the_checkpoint(tmp_path):
    """``--model-overrides num_low_frequencies=None`` was read back as the string 'None', so
    following the hint failed again."""
    import re
    import shlex

    from sftkd_fastmri.cli.options import overrides_option
    from sftkd_fastmri.models import init_from_checkpoint

    sizes = dict(num_cascades=1, sens_chans=2, sens_pools=1, chans=2, pools=1)
    path = save_model_checkpoint(create_model("varnet", **sizes), tmp_path / "v.pt")
    with pytest.raises(CheckpointError) as err:
        init_from_checkpoint(create_model("varnet", **sizes, num_low_frequencies=4), path)
    hint = re.search(r"--model-overrides (.+), or the same", str(err.value)).group(1)
    assert hint == "num_low_frequencies=null"
    overrides = overrides_option(shlex.split(hint)[0])
    assert overrides == {"num_low_frequencies": None}
    init_from_checkpoint(create_model("varnet", **{**sizes, **overrides}), path)


def test_a_varnet_module_checkpoint_loads_as_its_varnet(tmp_path):
    """A Lightning checkpoint of VarNetModule2 (fastMRI's VarNetModule) was "not a sftkd_fastmri
    checkpoint": its hyper-parameters give the VarNet's sizes, its weights are under varnet."""
    from sftkd_fastmri.export import export_model
    from sftkd_fastmri.models import init_from_checkpoint
    from sftkd_fastmri.models.checkpoint import checkpoint_kind
    from sftkd_fastmri.pl_modules import VarNetModule2

    torch.manual_seed(0)
    sizes = dict(num_cascades=2, sens_chans=2, sens_pools=1, chans=3, pools=1)
    module = VarNetModule2(**sizes)
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    ckpt["pytorch-lightning_version"] = "2.5.0"
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    assert checkpoint_kind(path) == "varnet_module"
    loaded = load_model(path).eval()
    assert isinstance(loaded, CascadedVarNet) and loaded.preset is None
    assert loaded.config == create_model("varnet", **sizes).config
    inputs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(*inputs), module.eval().varnet(inputs[0], inputs[1]), atol=0, rtol=0
        )
    # the varnet preset of those sizes starts from it; the export rebuilds it alone
    init_from_checkpoint(create_model("varnet", **sizes), path)
    out = export_model(path, tmp_path / "last.model.pt", format="state_dict")
    assert load_model(out).config == loaded.config
    # a checkpoint of another size is refused by name, strictly
    ckpt["hyper_parameters"] = {**ckpt["hyper_parameters"], "chans": 4}
    torch.save(ckpt, tmp_path / "wrong.ckpt")
    with pytest.raises(CheckpointError, match="(?s)wrong.ckpt does not match.*shape mismatches"):
        load_model(tmp_path / "wrong.ckpt")


def test_other_lightning_checkpoints_say_how_to_load_them(tmp_path):
    from sftkd_fastmri.pl_modules import UnetModule2

    module = UnetModule2(chans=2, num_pool_layers=1)
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    torch.save(ckpt, tmp_path / "unet.ckpt")
    with pytest.raises(
        CheckpointError,
        match="not a sftkd_fastmri checkpoint .*VarNetModule2.*Lightning checkpoint of another "
        "module .*load_from_checkpoint",
    ):
        load_model(tmp_path / "unet.ckpt")
