"""FeatureCapture: forward hooks record exactly what a manual forward pass computes."""

from __future__ import annotations

import fastmri
import pytest
import torch

from sftkd_fastmri.kd.hooks import FeatureCapture, find_module
from sftkd_fastmri.models import create_model

H, W = 14, 10  # odd, non-square


def _inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 1, H, W, 2, generator=g)
    mask = torch.zeros(batch, 1, 1, W, 1, dtype=torch.bool)
    mask[..., ::2, :] = True
    return fastmri.fft2c(image) * mask, mask


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("dccnn_d3c5", chans=4, num_cascades=3)


def _manual(model, kspace, mask):
    """Cascade outputs, every ReLU activation and the final image, by hand."""
    feats = {}
    state = model.initial_state(kspace, mask)
    for i, cascade in enumerate(model.cascades):
        h = state
        for j in range(cascade.cnn.depth):
            h = getattr(cascade.cnn, f"conv{j}")(h)
            feats[f"cascades.{i}.cnn.conv{j}"] = h
            if j < cascade.cnn.depth - 1:
                h = torch.relu(h)
                feats[f"cascades.{i}.cnn.relu{j}"] = h
        state = cascade.dc(state + h, kspace, mask, None)
        feats[f"cascades.{i}"] = state
    feats[""] = model.final_image(state)
    return feats


def test_captured_features_equal_a_manual_forward(model):
    kspace, mask = _inputs()
    layers = ["cascades.2", "cascades.1.cnn.relu0", "cascades.0.cnn.conv2", ""]
    with torch.no_grad():
        expected = _manual(model, kspace, mask)
        with FeatureCapture(model, layers) as capture:
            out = model(kspace, mask)
            got = capture.features()
    assert len(got) == len(layers)
    for name, tensor in zip(layers, got):
        torch.testing.assert_close(tensor, expected[name], msg=name)
    assert got[-1] is out  # the root's output is the network's output itself
    assert got[1].shape == (2, 4, H, W)


def test_records_keep_firing_order_and_call_arguments(model):
    kspace, mask = _inputs()
    capture = FeatureCapture(model, ["cascades.1", "cascades.0"], record_calls=True)
    out = model(kspace, mask, sens_maps=None)
    assert [name for name, _ in capture.records] == ["cascades.0", "cascades.1"]
    assert capture.layers == ["cascades.1", "cascades.0"]
    call = capture.single_call()
    assert call.args[0] is kspace and call.args[1] is mask
    assert call.kwargs == {"sens_maps": None}
    assert call.output is out
    capture.remove()


def test_student_features_keep_gradients_and_detach_drops_them(model):
    kspace, mask = _inputs()
    with FeatureCapture(model, ["cascades.0.cnn.relu1"]) as capture:
        model(kspace, mask)
        feat = capture["cascades.0.cnn.relu1"]
        assert feat.requires_grad
        feat.sum().backward()
        assert model.cascades[0].cnn.conv0.weight.grad is not None
    with FeatureCapture(model, ["cascades.0.cnn.relu1"], detach=True) as capture:
        model(kspace, mask)
        assert not capture["cascades.0.cnn.relu1"].requires_grad


def test_clear_enabled_and_recording(model):
    kspace, mask = _inputs()
    capture = FeatureCapture(model, ["cascades.0"], record_calls=True, enabled=False)
    model(kspace, mask)
    assert capture.outputs("cascades.0") == [] and capture.calls == []
    with capture.recording():
        model(kspace, mask)
        assert len(capture.outputs("cascades.0")) == 1 and len(capture.calls) == 1
    assert not capture.enabled
    model(kspace, mask)  # disabled again: nothing more
    assert len(capture.outputs("cascades.0")) == 1
    capture.clear()
    assert capture.records == [] and capture.calls == []
    capture.remove()


def test_a_layer_must_run_exactly_once_per_step(model):
    kspace, mask = _inputs()
    with FeatureCapture(model, ["cascades.0"], record_calls=True) as capture:
        with pytest.raises(RuntimeError, match="ran 0 times"):
            capture["cascades.0"]
        model(kspace, mask)
        model(kspace, mask)
        with pytest.raises(RuntimeError, match="ran 2 times"):
            capture["cascades.0"]
        with pytest.raises(RuntimeError, match="exactly one forward call"):
            capture.single_call()
        with pytest.raises(KeyError, match="not captured"):
            capture["cascades.1"]


def test_remove_unregisters_every_hook(model):
    before = {
        n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()
    }
    with FeatureCapture(model, ["", "cascades.0.cnn.relu1"], record_calls=True) as capture:
        assert len(model._forward_hooks) == before[""][0] + 2
        assert capture.active
    after = {
        n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()
    }
    assert after == before and not capture.active
    capture.remove()  # idempotent


def test_unknown_layer_lists_similar_names(model):
    with pytest.raises(KeyError, match=r"cascades\.0\.cnn\.relu1") as info:
        FeatureCapture(model, ["cascades.0.cnn.relu3"], role="student")
    assert "student" in str(info.value) and "relu3" in str(info.value)
    with pytest.raises(KeyError, match="has no submodule"):
        find_module(model, "cascade.0")
    with pytest.raises(TypeError, match="sequence of names"):
        FeatureCapture(model, "cascades.0")
    # no hook was left behind by the failed constructions
    assert all(not m._forward_hooks for m in model.modules())
