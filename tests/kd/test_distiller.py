"""Distiller: losses not defined on a step's batch size are left out on request."""

from __future__ import annotations

import fastmri
import pytest
import torch

from sftkd_fastmri.kd import Distiller, available_losses, check_distillation, create_loss
from sftkd_fastmri.models import create_model

H, W = 12, 10


def _inputs(batch: int):
    g = torch.Generator().manual_seed(batch)
    image = torch.randn(batch, 1, H, W, 2, generator=g)
    mask = torch.zeros(batch, 1, 1, W, 1, dtype=torch.bool)
    mask[..., ::2, :] = True
    return fastmri.fft2c(image) * mask, mask


def _kd(losses, batch: int, **options):
    torch.manual_seed(0)
    student = create_model("dccnn_d3c5", chans=4, num_cascades=2)
    teacher = create_model("dccnn_d5c5", chans=4, num_cascades=2)
    with Distiller(student, teacher, losses) as distiller:
        with distiller.step():
            student(*_inputs(batch))
            return distiller(**options)


def test_min_batch_size_of_each_loss():
    sizes = {name: create_loss(name).min_batch_size for name in available_losses()}
    assert sizes == {"at": 1, "cc": 2, "fitnet": 1, "fsp": 1, "imitation": 1, "sp": 2}


def test_relational_losses_are_left_out_of_single_sample_steps_on_request():
    losses = {"sp": 1.0, "cc": 0.5, "imitation": 2.0}
    with pytest.raises(ValueError, match="at least 2 samples"):
        _kd(losses, batch=1)
    kd = _kd(losses, batch=1, skip_small_batches=True)
    assert kd.skipped == ("sp", "cc") and set(kd.terms) == {"imitation"}
    torch.testing.assert_close(kd.total, 2.0 * kd.terms["imitation"])
    assert kd.total.requires_grad
    # a batch of two: nothing left out, same result as without the option
    full, plain = _kd(losses, batch=2, skip_small_batches=True), _kd(losses, batch=2)
    assert full.skipped == () and set(full.terms) == set(losses)
    torch.testing.assert_close(full.total, plain.total)


def test_every_loss_left_out_gives_a_zero_total():
    kd = _kd({"sp": 1.0}, batch=1, skip_small_batches=True)
    assert kd.skipped == ("sp",) and kd.terms == {}
    assert kd.total.item() == 0.0 and kd.total.dim() == 0


def test_a_teacher_that_cannot_take_the_students_inputs_is_explained():
    """A DC-CNN teacher behind a student called like fastMRI's VarNet (masked_kspace, mask,
    num_low_frequencies): the first failing teacher call says why, not only a shape."""

    class VarNetLike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, kspace, mask, num_low_frequencies):
            return kspace[:, 0, ..., 0] * self.scale

    teacher = create_model("dccnn_d5c5", chans=4, num_cascades=1)
    kspace, mask = _inputs(2)
    kspace = kspace.repeat(1, 2, 1, 1, 1)  # two coils
    student = VarNetLike()
    layers = {"imitation": [["", ""]]}
    with Distiller(student, teacher, {"imitation": 1.0}, layers=layers) as distiller:
        with distiller.step():
            student(kspace, mask, torch.tensor([4, 4]))
            with pytest.raises(ValueError, match=r"failed on the student's inputs \(tensor "
                               r"\(2, 2, 12, 10, 2\), tensor \(2, 1, 1, 10, 1\), tensor \(2,\)\)"
                               r".*both must take the same inputs"):  # fmt: skip
                distiller()
    # fastMRI's VarNet passes num_low_frequencies as an int, which the DC-CNN fails on with an
    # AttributeError deep inside: explained all the same
    with Distiller(student, teacher, {"imitation": 1.0}, layers=layers) as distiller:
        with distiller.step():
            student(kspace, mask, 8)
            with pytest.raises(TypeError, match=r"failed on the student's inputs \(.*, 8\): "
                               r"'int' object has no attribute"):  # fmt: skip
                distiller()


def test_a_dccnn_teacher_is_not_handed_a_varnet_students_centre_columns():
    """A VarNet student gets the batch's centre-column count as a keyword; a DC-CNN teacher,
    which has no such parameter, runs on the other arguments (a teacher that takes it gets
    it)."""
    teacher = create_model("dccnn_d5c5", chans=4, num_cascades=1)
    kspace, mask = _inputs(2)
    seen = {}

    class VarNetLike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, kspace, mask, sens_maps=None, num_low_frequencies=None):
            seen["low"] = num_low_frequencies
            return torch.view_as_complex(kspace[:, 0].contiguous()).abs() * self.scale

    layers = {"imitation": [["", ""]]}
    low = torch.tensor([3, 3])
    for other in (teacher, VarNetLike()):
        student = VarNetLike()
        with Distiller(student, other, {"imitation": 1.0}, layers=layers) as distiller:
            with distiller.step():
                student(kspace, mask, None, num_low_frequencies=low)
                seen.clear()
                assert torch.isfinite(distiller().total)
        # the DC-CNN ran without it (it would raise on the keyword); a VarNet teacher gets it
        assert seen.get("low") is (None if other is teacher else low)
    # a compiled DC-CNN teacher (its wrapper's forward takes anything), and fastMRI's own
    # VarNet, whose third positional parameter is num_low_frequencies (here the student's
    # sens_maps, None): both run on the student's positional arguments alone
    from fastmri.models import VarNet

    raw = VarNet(num_cascades=1, chans=2, sens_chans=2, pools=1, sens_pools=1)
    given = []
    raw.sens_net.register_forward_pre_hook(lambda m, args: given.append(args[2]))
    for other in (torch.compile(teacher, backend="eager"), raw):
        student = VarNetLike()
        with Distiller(student, other, {"imitation": 1.0}, layers=layers) as distiller:
            with distiller.step():
                student(kspace, mask, None, num_low_frequencies=low)
                total = distiller().total  # the call is the point: no TypeError
                assert total.dim() == 0 and (other is raw or torch.isfinite(total))
    assert given == [3]  # fastMRI's VarNet got the batch's count, as one number


def test_check_distillation_fits_its_batch_to_the_networks():
    """fastMRI's VarNet defaults (4 pooling layers in the cascades' and the sensitivity
    network's U-Nets) need more than 16 x 16 pixels; a VarNet that takes the batch's coil
    maps gets them."""
    teacher = create_model("varnet", num_cascades=2, chans=4, sens_chans=2)
    student = create_model("varnet", num_cascades=1, chans=2, sens_chans=2)
    check_distillation(student, teacher, {"imitation": 1.0, "at": 1.0})
    given = dict(pools=1, sens_pools=1, use_given_sens_maps=True, sens_chans=2)
    teacher = create_model("varnet", num_cascades=2, chans=4, **given)
    check_distillation(
        create_model("varnet", num_cascades=1, chans=2, **given), teacher, {"at": 1.0}
    )
    check_distillation(create_model("dccnn_d3c5", chans=4), teacher, {"imitation": 1.0})


def test_check_distillation_runs_a_step_on_copies():
    teacher = create_model("dccnn_d5c5", chans=8)
    student = create_model("dccnn_d3c5", chans=4)
    flags = [p.requires_grad for p in teacher.parameters()]
    state = torch.random.get_rng_state()
    check_distillation(student, teacher, {"at": 1.0, "fitnet": 1.0, "sp": 1.0, "cc": 1.0})
    hint = {"fitnet": [("cascades.0.cnn.relu0", "cascades.0.cnn.relu0")]}  # 4 -> 8: a regressor
    check_distillation(student, teacher, {"fitnet": 1.0}, layers=hint)
    with pytest.raises(ValueError, match=r"FSP matrices differ.*student 4x4, teacher 8x8"):
        check_distillation(student, teacher, {"fsp": 1.0})
    with pytest.raises(KeyError, match="has no submodule 'nope'"):  # its own words
        check_distillation(student, teacher, {"at": 1.0}, layers={"at": [("nope", "")]})
    assert torch.equal(torch.random.get_rng_state(), state)
    assert teacher.training and [p.requires_grad for p in teacher.parameters()] == flags
    assert all(not m._forward_hooks for m in [*student.modules(), *teacher.modules()])
