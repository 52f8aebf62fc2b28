"""The model registry's extension point: a new architecture and its presets are built,
saved, reloaded and wrapped by SFT like the built-in ones."""

from __future__ import annotations

import fastmri
import pytest
import torch
from torch import nn

from sftkd_fastmri.models import (
    build_model,
    create_model,
    list_architectures,
    list_models,
    load_model,
    register_architecture,
    register_model,
    registry,
    save_model_checkpoint,
)
from sftkd_fastmri.models.data_consistency import (
    DataConsistency,
    complex_to_channels,
    sens_reduce,
)
from sftkd_fastmri.sft import StudentFriendlyTeacher


class TinyCascades(nn.Module):
    """A cascaded network that is not a DC-CNN: a two-layer block with a residual and DC."""

    def __init__(self, num_cascades: int = 2, chans: int = 4):
        super().__init__()
        self.num_cascades, self.chans = num_cascades, chans
        self.cascades = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2, chans, 3, padding=1), nn.Tanh(), nn.Conv2d(chans, 2, 1))
            for _ in range(num_cascades)
        )
        self.dc = DataConsistency(2)

    @property
    def config(self):
        return {"architecture": "tiny", "num_cascades": self.num_cascades, "chans": self.chans}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        assert config.pop("architecture") == "tiny"
        return cls(**config)

    def initial_state(self, masked_kspace, mask, sens_maps=None):
        return complex_to_channels(sens_reduce(fastmri.ifft2c(masked_kspace), sens_maps), 2)

    def cascade_step(self, index, state, masked_kspace, mask, sens_maps=None):
        return self.dc(state + self.cascades[index](state), masked_kspace, mask, sens_maps)

    def final_image(self, state):
        return state.pow(2).sum(dim=1).sqrt()

    def forward(self, masked_kspace, mask, sens_maps=None):
        state = self.initial_state(masked_kspace, mask, sens_maps)
        for i in range(self.num_cascades):
            state = self.cascade_step(i, state, masked_kspace, mask, sens_maps)
        return self.final_image(state)


@pytest.fixture
def own_registry(monkeypatch):
    """Registrations of a test stay in the test."""
    for name in ("_PRESETS", "_PRESET_CONFIGS", "_ARCHITECTURES"):
        monkeypatch.setattr(registry, name, dict(getattr(registry, name)))


def test_a_registered_architecture_is_built_saved_reloaded_and_wrapped(own_registry, tmp_path):
    with pytest.raises(ValueError, match="unknown architecture 'tiny'.*register_architecture"):
        register_model("tiny_c2", architecture="tiny", num_cascades=2)
    with pytest.raises(ValueError, match="unknown architecture 'tiny'.*register_architecture"):
        build_model({"architecture": "tiny", "num_cascades": 2})
    register_architecture("tiny", TinyCascades.from_config)
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("tiny", TinyCascades.from_config)
    register_model("tiny_c2_teacher", architecture="tiny", num_cascades=2, chans=6)
    register_model("tiny_c2_student", architecture="tiny", num_cascades=2, chans=3)
    assert "tiny" in list_architectures() and "tiny_c2_student" in list_models()

    torch.manual_seed(0)
    teacher = create_model("tiny_c2_teacher")
    assert isinstance(teacher, TinyCascades) and teacher.preset == "tiny_c2_teacher"
    assert create_model("tiny_c2_teacher", chans=5).chans == 5  # overrides reach from_config
    with pytest.raises(ValueError, match="not a tiny config"):
        create_model("tiny_c2_teacher", depth=3)

    path = save_model_checkpoint(teacher, tmp_path / "teacher.pt")
    loaded = load_model(path, expected_preset="tiny_c2_teacher")
    assert isinstance(loaded, TinyCascades)
    for name, value in teacher.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name

    masked_kspace = torch.randn(2, 1, 8, 6, 2)
    mask = torch.zeros(1, 1, 1, 6, 1, dtype=torch.bool)
    mask[..., ::2, :] = True
    masked_kspace = masked_kspace * mask
    sft = StudentFriendlyTeacher(teacher, create_model("tiny_c2_student"))
    out = sft(masked_kspace, mask)
    assert len(out.branches) == 1 and out.branches[0].shape == (2, 8, 6)
    with torch.no_grad():
        torch.testing.assert_close(sft.eval()(masked_kspace, mask), loaded(masked_kspace, mask))


def test_the_varnet_preset_is_fastmris_varnet_with_its_defaults():
    import inspect

    from fastmri.models import VarNet

    from sftkd_fastmri.models import CascadedVarNet

    defaults = {
        k: v.default
        for k, v in inspect.signature(VarNet.__init__).parameters.items()
        if v.default is not inspect.Parameter.empty
    }
    model = create_model("varnet")
    assert isinstance(model, CascadedVarNet) and model.preset == "varnet"
    assert {k: model.config[k] for k in defaults} == defaults
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in VarNet().parameters())
    small = create_model("varnet", num_cascades=2, chans=4)
    assert len(small.varnet.cascades) == 2 and small.config["chans"] == 4
    with pytest.raises(ValueError, match="depth"):
        create_model("varnet", depth=3)  # a DC-CNN option
