import pytest
import torch

from sftkd_fastmri.models import DCCNN, create_model, list_models, model_config
from sftkd_fastmri.models.dccnn import ConvBlock

from .helpers import random_batch

PAPER_COUNTS = {"dccnn_d5c5_paper": 141_765, "dccnn_d3c5_paper": 49_285}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,count", sorted(PAPER_COUNTS.items()))
def test_paper_parameter_counts(name, count):
    assert n_params(create_model(name)) == count


def test_complex_preset_counts_follow_the_block_formula():
    # 2 -> 32, (depth-2) x 32 -> 32, 32 -> 2, 3x3 convs with bias, x5 cascades
    def block(depth):
        return (2 * 9 + 1) * 32 + (depth - 2) * (32 * 9 + 1) * 32 + (32 * 9 + 1) * 2

    assert n_params(create_model("dccnn_d5c5")) == 5 * block(5)
    assert n_params(create_model("dccnn_d3c5")) == 5 * block(3)


def test_registry():
    assert {"dccnn_d5c5", "dccnn_d3c5", "dccnn_d5c5_paper", "dccnn_d3c5_paper"} <= set(
        list_models()
    )
    model = create_model("dccnn_d3c5", chans=8, num_cascades=2)
    assert len(model.cascades) == 2 and model.preset == "dccnn_d3c5"
    assert model.config["chans"] == 8
    with pytest.raises(KeyError, match="available"):
        create_model("unet_tiny")
    with pytest.raises(TypeError, match="colour"):
        model_config("dccnn_d3c5", colour="red")


def test_paper_mode_settings():
    cfg = model_config("dccnn_d5c5_paper")
    assert cfg["residual"] is False and cfg["pad"] == 5 and cfg["in_chans"] == 1


@pytest.mark.parametrize("name", ["dccnn_d3c5", "dccnn_d3c5_paper"])
@pytest.mark.parametrize("coils", [1, 4])
def test_shapes_odd_non_square(name, coils):
    masked, mask, sens, _ = random_batch(batch=2, coils=coils, height=13, width=10)
    model = create_model(name, chans=4)
    out = model(masked, mask, sens)
    assert out.shape == (2, 13, 10)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_output_is_data_consistent_single_coil():
    import fastmri

    masked, mask, _, _ = random_batch(coils=1, seed=3)
    model = create_model("dccnn_d3c5", chans=4)
    state = model.forward_state(masked, mask)
    k = fastmri.fft2c(state.permute(0, 2, 3, 1)).unsqueeze(1)
    torch.testing.assert_close(k * mask, masked, atol=1e-5, rtol=1e-5)


def test_residual_off_changes_the_output():
    masked, mask, _, _ = random_batch(seed=4)
    torch.manual_seed(0)
    a = DCCNN(num_cascades=2, depth=3, chans=4, residual=True)
    b = DCCNN(num_cascades=2, depth=3, chans=4, residual=False)
    b.load_state_dict(a.state_dict())
    assert not torch.allclose(a(masked, mask), b(masked, mask))


def test_named_activations_and_cascade_outputs_are_hookable():
    masked, mask, _, _ = random_batch()
    model = create_model("dccnn_d5c5", chans=4)
    names = dict(model.named_modules())
    for i in range(5):
        for j in range(4):
            assert f"cascades.{i}.cnn.relu{j}" in names
        assert f"cascades.{i}.cnn.conv4" in names and f"cascades.{i}" in names
    seen = {}
    for name in ("cascades.0.cnn.relu2", "cascades.4"):
        names[name].register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, o))
    model(masked, mask)
    assert seen["cascades.0.cnn.relu2"].shape == (2, 4, 13, 10)
    assert seen["cascades.4"].shape == (2, 2, 13, 10)
    assert (seen["cascades.0.cnn.relu2"] >= 0).all()


def test_input_errors_are_clear():
    masked, mask, sens, _ = random_batch(coils=3)
    model = create_model("dccnn_d3c5", chans=4)
    with pytest.raises(ValueError, match="sens_maps"):
        model(masked, mask)
    with pytest.raises(ValueError, match=r"\(B, coils, H, W, 2\)"):
        model(masked[:, 0], mask, sens)
    with pytest.raises(ValueError, match="mask"):
        model(masked, mask[..., :3, :], sens)


@pytest.mark.parametrize("height", [8, 7])  # even sizes ran silently, odd ones failed late
def test_a_batch_of_single_coil_fastmri_masks_is_refused_not_misread(height):
    """fastMRI's single-coil masks (1, W, 1) collate to (B, 1, W, 1), which broadcasts to
    (B, 1, H, W, 2) k-space with the batch on the coil axis: every sample would get sample
    0's mask. It is refused with the fix; the same masks with their coil axis work."""
    model = create_model("dccnn_d3c5", chans=4, num_cascades=1)
    batch, width = 3, 8
    mask = torch.zeros(batch, 1, width, 1, dtype=torch.bool)
    mask[0, 0, :4], mask[1, 0, 4:], mask[2, 0, ::2] = True, True, True
    kspace = torch.randn(batch, 1, height, width, 2) * mask.unsqueeze(1)
    with pytest.raises(ValueError, match=r"mask\.unsqueeze\(1\)"):
        model(kspace, mask)
    with pytest.raises(ValueError, match="one mask for all coils"):
        model(kspace, mask.unsqueeze(1).expand(batch, 2, 1, width, 1))
    with pytest.raises(ValueError, match="without enlarging"):
        model(kspace[:1], mask.unsqueeze(1))  # three masks for one sample
    assert model(kspace, mask.unsqueeze(1)).shape == (batch, height, width)
    assert model(kspace[:1], mask[0]).shape == (1, height, width)  # one (1, W, 1) mask


def _relu_ops(block, x):
    """Names of the ReLU operators a block's forward runs."""
    with torch.profiler.profile() as prof:
        block(x)
    return [e.name for e in prof.events() if e.name in ("aten::relu", "aten::relu_")]


def test_block_relu_in_place_only_when_unobserved():
    # No hooks: the ReLUs overwrite the convolution outputs in place; the values and gradients
    # equal those of the out-of-place path taken when a hook observes a layer.
    torch.manual_seed(0)
    block = ConvBlock(2, 8, 4)
    x = torch.randn(2, 2, 12, 10, requires_grad=True)
    assert _relu_ops(block, x) == ["aten::relu_"] * 3
    out = block(x)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x)
    grads_w = torch.autograd.grad(block(x).square().sum(), list(block.parameters()))

    seen = []
    handle = block.conv1.register_forward_hook(lambda m, i, o: seen.append(o))
    assert _relu_ops(block, x) == ["aten::relu_", "aten::relu", "aten::relu_"]
    seen.clear()
    hooked = block(x)
    # the hook's tensor is the pre-activation output (negative values kept), not overwritten
    assert (seen[0] < 0).any()
    torch.testing.assert_close(hooked, out)
    (hooked_grad_x,) = torch.autograd.grad(hooked.square().sum(), x)
    torch.testing.assert_close(hooked_grad_x, grad_x)
    handle.remove()
    hooked_grads = torch.autograd.grad(block(x).square().sum(), list(block.parameters()))
    for a, b in zip(hooked_grads, grads_w):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("where", ["conv", "relu", "global"])
def test_block_relu_respects_backward_and_global_hooks(where):
    # Full backward hooks wrap a module's outputs; writing into them in place would fail.
    torch.manual_seed(1)
    block = ConvBlock(2, 8, 3)
    x = torch.randn(2, 2, 12, 10, requires_grad=True)
    reference = block(x)
    grads = []
    if where == "global":
        # a global hook observes every module's output: the convolutions' must stay intact
        def keep_conv_outputs(module, args, output):
            if isinstance(module, torch.nn.Conv2d):
                grads.append(output)

        handle = torch.nn.modules.module.register_module_forward_hook(keep_conv_outputs)
    else:
        module = block.conv0 if where == "conv" else block.relu0
        handle = module.register_full_backward_hook(lambda m, gi, go: grads.append(go[0]))
    try:
        out = block(x)
        out.sum().backward()
        torch.testing.assert_close(out, reference)
        if where == "global":
            assert len(grads) == 3 and all((o < 0).any() for o in grads[:2])
        else:
            assert len(grads) == 1
    finally:
        handle.remove()


def test_output_only_hooks_keep_the_relu_in_place():
    from sftkd_fastmri.models.dccnn import output_only_hook

    torch.manual_seed(2)
    block = ConvBlock(2, 8, 3)
    x = torch.randn(2, 2, 12, 10)
    seen = []
    handle = block.relu0.register_forward_hook(output_only_hook(lambda m, a, o: seen.append(o)))
    assert _relu_ops(block, x) == ["aten::relu_", "aten::relu_"]
    assert (seen[0] >= 0).all()  # the ReLU's output
    handle.remove()
    # the same hook on a convolution: its output must survive, so that ReLU is not in place
    handle = block.conv1.register_forward_hook(output_only_hook(lambda m, a, o: seen.append(o)))
    seen.clear()
    assert _relu_ops(block, x) == ["aten::relu_", "aten::relu"]
    assert (seen[0] < 0).any()
    handle.remove()


def test_block_with_plain_relu_modules_still_runs():
    # A block pickled whole by an earlier version holds nn.ReLU submodules.
    torch.manual_seed(3)
    block = ConvBlock(2, 8, 3)
    x = torch.randn(2, 2, 12, 10)
    expected = block(x)
    for j in range(2):
        setattr(block, f"relu{j}", torch.nn.ReLU())
    torch.testing.assert_close(block(x), expected)
