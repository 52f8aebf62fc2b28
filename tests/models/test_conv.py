"""BlockConv2d: the CPU weight gradient of the DC-CNN blocks' convolutions."""

import fastmri
import pytest
import torch
import torch.nn.functional as F

from sftkd_fastmri.models import create_model
from sftkd_fastmri.models.conv import (
    BlockConv2d,
    neighbourhood_rows,
    shifted_weight_gradient,
    thin_input_gradients,
    thin_input_weight_gradient,
    thin_output_weight_gradient,
    use_native_weight_gradient,
)

from .helpers import random_batch


@pytest.fixture(autouse=True)
def small_images_take_the_path(monkeypatch):
    """The tests' images are below MIN_POSITIONS; let them take the path all the same."""
    import sftkd_fastmri.models.conv as conv

    monkeypatch.setattr(conv, "MIN_POSITIONS", 0)
    monkeypatch.setattr(conv, "MIN_POSITIONS_THIN_INPUT", 0)


def _channels_last(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "batch,c_in,c_out,height,width",
    [(2, 3, 4, 5, 7), (1, 2, 2, 1, 1), (1, 2, 3, 1, 6), (3, 2, 2, 6, 1), (2, 5, 3, 2, 2),
     (2, 16, 16, 9, 11), (1, 4, 4, 3, 2)],
)  # fmt: skip
def test_shifted_weight_gradient_is_the_convolutions_weight_gradient(
    batch, c_in, c_out, height, width
):
    """Against autograd through F.conv2d in float64, on sizes where every border case
    (a single row or column, wrapped pairs at both borders) occurs."""
    torch.manual_seed(0)
    x = _channels_last(batch, c_in, height, width, dtype=torch.float64)
    grad = _channels_last(batch, c_out, height, width, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, 3, 3, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(F.conv2d(x, weight, padding=1), weight, grad)
    # Independent of autograd too: the correlation written as explicit sums.
    padded = F.pad(x, (1, 1, 1, 1))
    by_hand = torch.stack(
        [
            torch.stack(
                [
                    torch.einsum("bohw,bihw->oi", grad, padded[:, :, ky : ky + height, kx : kx + width])
                    for kx in range(3)
                ],
                dim=-1,
            )
            for ky in range(3)
        ],
        dim=-2,
    )  # fmt: skip
    torch.testing.assert_close(by_hand, expected, rtol=1e-12, atol=1e-12)
    methods = (shifted_weight_gradient, thin_output_weight_gradient, thin_input_weight_gradient)
    for method in methods:
        got = method(x, grad)
        assert got.shape == (c_out, c_in, 3, 3)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_thin_input_gradients_include_the_bias_gradient():
    torch.manual_seed(0)
    x = _channels_last(2, 2, 5, 6, dtype=torch.float64)
    grad = _channels_last(2, 7, 5, 6, dtype=torch.float64)
    weight, bias = thin_input_gradients(x, grad)
    torch.testing.assert_close(bias, grad.sum(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weight, thin_input_weight_gradient(x, grad), rtol=0, atol=0)
    assert thin_input_gradients(x, grad, bias=False)[1] is None


def test_neighbourhood_rows_hold_the_shifted_planes():
    """Row 9 c + 3 ky + kx at position (b, h, w): t[b, c, h + ky - 1, w + kx - 1], mirrored
    t[b, c, h - ky + 1, w - kx + 1], zero outside; a last row of ones on request."""
    torch.manual_seed(0)
    t = _channels_last(2, 3, 4, 5)
    rows = neighbourhood_rows(t).view(3, 3, 3, 2, 4, 5)
    mirrored = neighbourhood_rows(t, mirrored=True).view(3, 3, 3, 2, 4, 5)
    for c, ky, kx, b, h, w in [(0, 0, 0, 0, 0, 0), (1, 2, 1, 1, 3, 4), (2, 1, 2, 0, 2, 3),
                               (1, 0, 2, 1, 1, 0), (2, 2, 0, 1, 2, 4)]:  # fmt: skip
        for got, (y, x) in ((rows, (h + ky - 1, w + kx - 1)), (mirrored, (h - ky + 1, w - kx + 1))):
            inside = 0 <= y < 4 and 0 <= x < 5
            assert got[c, ky, kx, b, h, w] == (t[b, c, y, x] if inside else 0)
    with_ones = neighbourhood_rows(t, ones=True)
    assert with_ones.shape == (28, 40)
    assert torch.equal(with_ones[-1], torch.ones(40))
    assert torch.equal(with_ones[:27], neighbourhood_rows(t))


def test_the_row_blocks_of_the_shifted_weight_gradient_add_up(monkeypatch):
    """Blocks of one row, and blocks that do not divide the image, give the same sums."""
    import sftkd_fastmri.models.conv as conv

    torch.manual_seed(0)
    x = _channels_last(2, 3, 7, 5, dtype=torch.float64)
    grad = _channels_last(2, 4, 7, 5, dtype=torch.float64)
    whole = shifted_weight_gradient(x, grad)  # one block: the image is far below BLOCK_BYTES
    for rows in (1, 2, 3):
        monkeypatch.setattr(conv, "BLOCK_BYTES", rows * 2 * 5 * 7 * 8)  # batch*W*(Ci+Co)*8 B
        torch.testing.assert_close(shifted_weight_gradient(x, grad), whole, rtol=0, atol=1e-12)


def _grads(conv, x, native):
    use_native_weight_gradient(native)
    try:
        y = conv(x)
        path = type(y.grad_fn).__name__
        grads = torch.autograd.grad(y.square().sum(), [x, conv.weight, conv.bias])
    finally:
        use_native_weight_gradient(False)
    return path, grads


@pytest.mark.parametrize(
    "c_in,c_out", [(16, 24), (16, 2), (2, 16), (1, 16)]
)  # the shifted products; the thin-output product; the thin-input product (2 and 1 channels)
def test_block_conv_takes_its_path_on_cpu_and_matches_pytorchs_gradients(c_in, c_out):
    torch.manual_seed(0)
    conv = BlockConv2d(c_in, c_out, 3, padding=1)
    x = _channels_last(2, c_in, 12, 10).requires_grad_(True)
    path, ours = _grads(conv, x, native=False)
    native_path, native = _grads(conv, x, native=True)
    assert "ShiftedWeightGrad" in path and "ShiftedWeightGrad" not in native_path
    for got, expected in zip(ours, native):  # input, weight, bias
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(ours[0], native[0])  # the input gradient is PyTorch's own kernel


@pytest.mark.parametrize("c_in,c_out", [(16, 16), (16, 2), (2, 16)])
def test_block_conv_second_derivatives_match(c_in, c_out):
    """Through the input gradient (PyTorch's kernel) and through the weight gradient (the
    products, differentiable torch operations)."""
    torch.manual_seed(0)
    conv = BlockConv2d(c_in, c_out, 3, padding=1)
    x = _channels_last(2, c_in, 6, 7).requires_grad_(True)
    results = []
    for native in (True, False):
        use_native_weight_gradient(native)
        try:
            (grad_x,) = torch.autograd.grad(conv(x).square().sum(), x, create_graph=True)
            results.append(torch.autograd.grad(grad_x.square().sum(), conv.weight)[0])
            (grad_w,) = torch.autograd.grad(conv(x).square().sum(), conv.weight, create_graph=True)
            results.append(torch.autograd.grad(grad_w.square().sum(), x)[0])
        finally:
            use_native_weight_gradient(False)
    torch.testing.assert_close(results[2], results[0], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(results[3], results[1], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "case",
    ["contiguous", "thin_both", "middle_input", "middle_output", "no_grad", "float64", "env",
     "autocast", "stride", "small", "small_thin_input", "no_bias", "no_bias_thin_input"],
)  # fmt: skip
def test_block_conv_falls_back_to_pytorch_where_its_path_does_not_apply(case, monkeypatch):
    torch.manual_seed(0)
    c_in = {"thin_both": 2, "middle_input": 8}.get(case, 2 if "thin_input" in case else 16)
    c_out = {"thin_both": 2, "middle_output": 8}.get(case, 16)
    conv = BlockConv2d(
        c_in, c_out, 3, padding=1, stride=2 if case == "stride" else 1, bias="no_bias" not in case
    )
    dtype = torch.float64 if case == "float64" else torch.float32
    conv = conv.to(dtype)
    x = torch.randn(2, c_in, 8, 8, dtype=dtype)
    if case != "contiguous":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    if case == "env":
        monkeypatch.setenv("SFTKD_FASTMRI_CONV", "native")
    if case.startswith("small"):  # one position fewer than the threshold that applies
        import sftkd_fastmri.models.conv as conv_module

        name = "MIN_POSITIONS_THIN_INPUT" if case == "small_thin_input" else "MIN_POSITIONS"
        monkeypatch.setattr(conv_module, name, 2 * 8 * 8 + 1)
    if case == "no_grad":
        with torch.no_grad():
            y = conv(x)
        assert y.grad_fn is None
        torch.testing.assert_close(y, F.conv2d(x, conv.weight, conv.bias, padding=1))
        return
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
    else:
        y = conv(x)
    if case.startswith("no_bias"):  # no bias is not a reason to fall back
        assert "ShiftedWeightGrad" in type(y.grad_fn).__name__
        (grad_w,) = torch.autograd.grad(y.sum(), conv.weight)
        (expected,) = torch.autograd.grad(
            F.conv2d(x, conv.weight, None, padding=1).sum(), conv.weight
        )
        torch.testing.assert_close(grad_w, expected, rtol=1e-4, atol=1e-4)
        return
    assert "ShiftedWeightGrad" not in type(y.grad_fn).__name__


@pytest.mark.parametrize("preset", ["dccnn_d3c5", "dccnn_d3c5_paper"])  # 2- and 1-channel
def test_a_dccnn_trains_alike_with_either_weight_gradient(preset):
    """One training step's gradients of a D3C5 with the CPU path and with PyTorch's backward;
    every block convolution takes the path (the activations stay channels-last, the
    one-channel image included); the state-dict keys are those of nn.Conv2d."""
    masked, mask, _, kspace = random_batch(batch=2, coils=1, height=24, width=20)
    target = fastmri.complex_abs(fastmri.ifft2c(kspace))[:, 0]
    model = create_model(preset).train()
    paths = []
    convs = [m for m in model.modules() if isinstance(m, BlockConv2d)]
    hooks = [
        c.register_forward_hook(lambda m, i, o: paths.append(type(o.grad_fn).__name__))
        for c in convs
    ]
    model(masked, mask)
    for hook in hooks:
        hook.remove()
    assert len(paths) == len(convs) == 15 and all("ShiftedWeightGrad" in p for p in paths), paths
    grads = []
    for native in (True, False):
        torch.manual_seed(0)
        model = create_model(preset).train()
        use_native_weight_gradient(native)
        try:
            F.l1_loss(model(masked, mask), target).backward()
        finally:
            use_native_weight_gradient(False)
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert "cascades.0.cnn.conv1.weight" in grads[0] and "cascades.0.cnn.conv1.bias" in grads[0]
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[1][name], expected, rtol=1e-3, atol=1e-6, msg=name)
    conv = create_model(preset).cascades[0].cnn.conv1
    assert isinstance(conv, BlockConv2d) and isinstance(conv, torch.nn.Conv2d)


def test_block_conv_steps_aside_for_torch_func_forward_ad_and_fx(monkeypatch):
    """Its autograd function has no vmap rule or jvp, and its path checks are control flow
    an FX trace cannot follow: torch.func.grad, forward-mode AD and fx.symbolic_trace failed
    where nn.Conv2d works."""
    import sftkd_fastmri.models.conv as conv_module

    monkeypatch.setattr(conv_module, "MIN_POSITIONS", 1)
    torch.manual_seed(0)
    conv = BlockConv2d(16, 16, 3, padding=1)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    assert "ShiftedWeightGrad" in type(conv(x.requires_grad_()).grad_fn).__name__  # the path
    x = x.detach()
    params = dict(conv.named_parameters())

    def loss(p):
        return torch.func.functional_call(conv, p, (x,)).square().sum()

    grads = torch.func.grad(loss)(params)
    expected = torch.autograd.grad(
        F.conv2d(x, conv.weight, conv.bias, padding=1).square().sum(), conv.weight
    )[0]
    torch.testing.assert_close(grads["weight"], expected)
    import torch.autograd.forward_ad as fwAD

    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        out = conv(fwAD.make_dual(x, tangent))
        jvp = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(jvp, F.conv2d(tangent, conv.weight, None, padding=1))
    traced = torch.fx.symbolic_trace(conv)
    torch.testing.assert_close(traced(x), conv(x))
