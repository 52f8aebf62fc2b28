"""Deferred KD gradients (sftkd_fastmri.kd.deferred): the same gradients as plain autograd,
in every way a training step can use them."""

from __future__ import annotations

import copy

import fastmri
import pytest
import torch
import torch.nn.functional as F

from sftkd_fastmri.kd import FSP, AttentionTransfer, Distiller
from sftkd_fastmri.kd.deferred import deferred_slot, tap_feature
from sftkd_fastmri.kd.hooks import FeatureCapture
from sftkd_fastmri.models import create_model

H, W = 14, 10


def _inputs(batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 1, H, W, 2, generator=g, dtype=torch.float64)
    mask = torch.zeros(batch, 1, 1, W, 1, dtype=torch.bool)
    mask[..., ::2, :] = True
    target = fastmri.complex_abs(image[:, 0])
    return (fastmri.fft2c(image) * mask, mask), target


def _nets():
    torch.manual_seed(0)
    student = create_model("dccnn_d3c5", chans=4, num_cascades=3).double()
    teacher = create_model("dccnn_d5c5", chans=4, num_cascades=3).double()
    return student, teacher


def _step_grads(losses, defer: bool, recon: bool = True, **distiller_options):
    """Parameter gradients of one KD step (student and KD parameters) and the KD terms."""
    student, teacher = _nets()
    distiller = Distiller(student, teacher, losses, **distiller_options)
    distiller.defer_gradients = defer
    distiller.attach()
    inputs, target = _inputs()
    with distiller.step():
        output = student(*inputs)
        kd = distiller()
    total = kd.total + (F.l1_loss(output, target) if recon else 0.0)
    total.backward()
    tapped = distiller._student_capture._tap
    distiller.remove_hooks()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return grads, {k: v.item() for k, v in kd.terms.items()}, tapped


@pytest.mark.parametrize(
    "losses",
    [{"at": 1.0}, {"fsp": 1.0}, {"at": 0.7, "fsp": 2.0}, {"at": 1.0, "fsp": 1.0, "sp": 0.5}],
)
@pytest.mark.parametrize("recon", [True, False])  # False: the KD-only stage of two-stage KD
def test_deferred_gradients_equal_plain_autograd(losses, recon):
    plain, plain_terms, untapped = _step_grads(losses, defer=False, recon=recon)
    deferred, deferred_terms, tapped = _step_grads(losses, defer=True, recon=recon)
    assert not untapped and tapped  # the deferred path was really taken
    assert deferred_terms == pytest.approx(plain_terms, rel=1e-12)
    assert deferred.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(deferred[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_zero_weight_and_teacher_features_without_summaries():
    plain, _, _ = _step_grads({"at": 0.0, "fsp": 1.0}, False, summarize_teacher=False)
    deferred, _, _ = _step_grads({"at": 0.0, "fsp": 1.0}, True, summarize_teacher=False)
    for name, grad in plain.items():
        torch.testing.assert_close(deferred[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_only_at_and_fsp_student_layers_are_tapped():
    student, teacher = _nets()
    distiller = Distiller(student, teacher, {"at": 1.0, "sp": 1.0, "imitation": 1.0})
    at_layers = {s for s, _ in distiller.pairings["at"]}
    assert set(distiller._tapped_layers()) == at_layers
    assert Distiller(student, teacher, {"at": 1.0}, defer_gradients=False)._tapped_layers() == []
    p1 = Distiller(student, teacher, {"at": 1.0}, loss_options={"at": {"p": 1.0}})
    assert p1._tapped_layers() == []  # only the p = 2 energy has a deferred backward


def test_losses_on_tapped_tensors_outside_a_model():
    """A tapped leaf-derived tensor used only by the loss: the gradient is the plain one."""
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(4)]
    teacher = [torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(4)]
    for loss in (AttentionTransfer(), FSP()):
        grads = []
        for tap in (False, True):
            leaves = [d.clone().requires_grad_() for d in data]
            feats = [tap_feature(x * 1.0) if tap else x * 1.0 for x in leaves]
            assert all((deferred_slot(f) is not None) == tap for f in feats)
            loss(feats, teacher).backward()
            grads.append([x.grad for x in leaves])
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_tap_is_skipped_where_nothing_is_deferred():
    x = torch.randn(2, 3, 4, 4)
    assert tap_feature(x) is x  # no gradient wanted
    y = torch.randn(2, 3, 4, 4, requires_grad=True)
    with torch.no_grad():
        assert tap_feature(y) is y
    half = y.detach().half().requires_grad_()
    assert tap_feature(half) is half  # float16 / bfloat16 keep the plain path
    assert tap_feature("not a tensor") == "not a tensor"


def test_feature_capture_tap_option():
    student, _ = _nets()
    layer = "cascades.0.cnn.relu1"
    with pytest.raises(ValueError, match="not captured"):
        FeatureCapture(student, ["cascades.0.cnn.relu0"], tap=[layer])
    inputs, _ = _inputs()
    reference = copy.deepcopy(student)(*inputs)
    with FeatureCapture(student, [layer], tap=[layer]) as capture:
        output = student(*inputs)
        assert deferred_slot(capture[layer]) is not None
    torch.testing.assert_close(output, reference, rtol=0, atol=0)  # the values are unchanged


def _relu_hooked_out_of_place(model):
    """Force every block ReLU of ``model`` out of place: a forward hook that is not marked
    output-only (it could read the ReLU's input)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1].startswith("relu"):
            module.register_forward_hook(lambda m, args, out: None)


@pytest.mark.parametrize("losses", [{"at": 1.0, "fsp": 1.0}, {"fitnet": 1.0, "sp": 1.0}])
def test_kd_step_with_in_place_relus_equals_out_of_place(losses):
    # The capture's hooks read only outputs, so hooked ReLUs still run in place; the KD terms
    # and the gradients equal those of a student and teacher whose ReLUs keep their own outputs.
    results = []
    for force_out_of_place in (False, True):
        student, teacher = _nets()
        if force_out_of_place:
            _relu_hooked_out_of_place(student)
            _relu_hooked_out_of_place(teacher)
        distiller = Distiller(student, teacher, losses)
        distiller.attach()
        inputs, target = _inputs()
        with torch.profiler.profile() as prof:
            with distiller.step():
                output = student(*inputs)
                kd = distiller()
        in_place = sum(e.name == "aten::relu_" for e in prof.events())
        (kd.total + F.l1_loss(output, target)).backward()
        distiller.remove_hooks()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        results.append((in_place, {k: v.item() for k, v in kd.terms.items()}, grads))
    (in_place, terms, grads), (none_in_place, ref_terms, ref_grads) = results
    assert in_place == 3 * (2 + 4) and none_in_place == 0  # every student and teacher ReLU
    assert terms == pytest.approx(ref_terms, rel=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_block_relu_taps_add_into_the_arriving_gradient():
    # A DC-CNN block's ReLU output is consumed by the next convolution alone, whose input
    # gradient is fresh: the deferred terms are added into it in place (addcmul_ / baddbmm_),
    # and the gradients still equal plain autograd (test_deferred_gradients_equal_plain_autograd).
    student, teacher = _nets()
    distiller = Distiller(student, teacher, {"at": 1.0, "fsp": 1.0})
    distiller.attach()
    inputs, target = _inputs()
    with distiller.step():
        output = student(*inputs)
        kd = distiller()
    with torch.profiler.profile() as prof:
        (kd.total + F.l1_loss(output, target)).backward()
    distiller.remove_hooks()
    names = [e.name for e in prof.events()]
    assert "aten::addcmul_" in names and "aten::baddbmm_" in names
    assert "aten::addcmul" not in names and "aten::baddbmm" not in names


@pytest.mark.parametrize("owned", [False, True])
def test_taps_without_an_owned_gradient_never_write_into_it(owned):
    # t + u: autograd hands the same gradient tensor to t's tap and to u. A tap that is not
    # told it owns the arriving gradient must leave it alone; one that is (wrongly) told so
    # writes the deferred term into u's gradient too - which is why only a module that
    # guarantees a fresh gradient (BlockReLU.fresh_output_gradient) sets the flag.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = [torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)]
    u = w * 1.0  # made before the tap, so autograd runs the tap's backward first
    feat = tap_feature(x * 1.0, owned_gradient=owned)
    total = (feat + u).square().sum() / 2 + AttentionTransfer()([feat], teacher)
    total.backward()
    untouched = (x + w).detach()  # d/dw of |t + u|^2 / 2: the gradient both receive
    if owned:
        assert not torch.allclose(w.grad, untouched)
    else:
        torch.testing.assert_close(w.grad, untouched, rtol=0, atol=0)


class _InPlaceNet(torch.nn.Module):
    """conv -> ReLU(inplace=True) -> conv, as in fastMRI's U-Net (LeakyReLU(inplace=True))."""

    def __init__(self, chans: int):
        super().__init__()
        self.conv0 = torch.nn.Conv2d(1, chans, 3, padding=1)
        self.act = torch.nn.ReLU(inplace=True)
        self.conv1 = torch.nn.Conv2d(chans, 1, 3, padding=1)

    def forward(self, x):
        return self.conv1(self.act(self.conv0(x)))


@pytest.mark.parametrize("method", ["at", "fsp"])
def test_layers_whose_output_is_overwritten_in_place_are_not_tapped(method):
    """A tap passes on a view made inside an autograd function, which a later in-place layer
    may not overwrite: only modules that promise to keep their output are tapped, and the
    others train with the plain gradients."""
    grads = []
    for defer in (False, True):
        torch.manual_seed(0)
        # FSP compares Gram matrices of equal size: equal widths
        student, teacher = _InPlaceNet(4).double(), _InPlaceNet(6 if method == "at" else 4).double()
        layers = (
            [("conv0", "conv0")] if method == "at" else [("conv0", "conv0"), ("conv0", "conv0")]
        )
        distiller = Distiller(
            student, teacher, {method: 1.0}, layers={method: layers}, defer_gradients=defer
        )
        x = torch.randn(2, 1, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        with distiller, distiller.step():
            out = student(x)
            kd = distiller()
        (kd.total + out.mean()).backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-10, atol=1e-12)


def test_dccnn_block_layers_are_still_tapped():
    student, teacher = _nets()
    inputs, _ = _inputs()
    layers = ["cascades.0.cnn.relu0", "cascades.0.cnn.conv1"]
    with FeatureCapture(student, layers, tap=layers) as capture:
        student(*inputs)
        assert all(deferred_slot(capture[name]) is not None for name in layers)
