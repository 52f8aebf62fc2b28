"""SFTLoss: golden values computed with numpy, weights, reductions, detaching, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sftkd_fastmri.sft import SFTLoss, SFTOutput, StudentFriendlyTeacher

from .test_wrapper import make_batch, make_pair


def random_output(n_branches: int = 4, shape=(2, 13, 10), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.rand(shape, generator=g, requires_grad=True)
    branches = [torch.rand(shape, generator=g, requires_grad=True) for _ in range(n_branches)]
    target = torch.rand(shape, generator=g)
    return SFTOutput(teacher, branches), target


def numpy_terms(output, target, distance="l1", reduction="mean"):
    """The three unweighted terms, computed independently with numpy in float64."""

    def d(a, b):
        diff = a.detach().double().numpy() - b.detach().double().numpy()
        return np.mean(np.abs(diff)) if distance == "l1" else np.mean(diff**2)

    reduce = np.mean if reduction == "mean" else np.sum
    y, t = target, output.teacher
    return (
        d(t, y),
        reduce([d(b, y) for b in output.branches]),
        reduce([d(b, t) for b in output.branches]),
    )


@pytest.mark.parametrize("distance", ["l1", "l2"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.5, 2.0, 3.0)])
def test_terms_match_numpy(distance, reduction, weights):
    output, target = random_output()
    loss = SFTLoss(
        distance,
        teacher_weight=weights[0],
        branch_weight=weights[1],
        imitation_weight=weights[2],
        branch_reduction=reduction,
    )
    terms = loss(output, target)
    teacher_rec, branch_rec, imitation = numpy_terms(output, target, distance, reduction)
    assert terms.teacher_rec.item() == pytest.approx(teacher_rec, rel=1e-6)
    assert terms.branch_rec.item() == pytest.approx(branch_rec, rel=1e-6)
    assert terms.imitation.item() == pytest.approx(imitation, rel=1e-6)
    total = weights[0] * teacher_rec + weights[1] * branch_rec + weights[2] * imitation
    assert terms.total.item() == pytest.approx(total, rel=1e-6)
    assert len(terms.branch_rec_each) == len(terms.imitation_each) == 4


def test_default_is_l1_mean_with_unit_weights():
    output, target = random_output(n_branches=3, seed=1)
    terms = SFTLoss()(output, target)
    expected = sum(numpy_terms(output, target, "l1", "mean"))
    assert terms.total.item() == pytest.approx(expected, rel=1e-6)


def test_mean_reduction_does_not_depend_on_the_number_of_branches():
    output, target = random_output(n_branches=1, seed=2)
    many = SFTOutput(output.teacher, output.branches * 4)
    assert SFTLoss()(many, target).total.item() == pytest.approx(
        SFTLoss()(output, target).total.item(), rel=1e-6
    )


def test_zero_imitation_weight_drops_the_term():
    output, target = random_output()
    terms = SFTLoss(imitation_weight=0.0)(output, target)
    teacher_rec, branch_rec, imitation = numpy_terms(output, target)
    assert terms.total.item() == pytest.approx(teacher_rec + branch_rec, rel=1e-6)
    assert terms.imitation.item() == pytest.approx(imitation, rel=1e-6)  # still logged
    assert not terms.imitation.requires_grad

    terms.total.backward()
    grads = [output.teacher.grad.clone()] + [b.grad.clone() for b in output.branches]
    for t in [output.teacher, *output.branches]:
        t.grad = None
    reference = (
        torch.nn.functional.l1_loss(output.teacher, target)
        + torch.stack([torch.nn.functional.l1_loss(b, target) for b in output.branches]).mean()
    )
    reference.backward()
    for g, t in zip(grads, [output.teacher, *output.branches]):
        torch.testing.assert_close(g, t.grad)


@pytest.mark.parametrize("detach", [False, True])
def test_detach_teacher_in_imitation(detach):
    output, target = random_output()
    loss = SFTLoss(
        teacher_weight=0.0,
        branch_weight=0.0,
        imitation_weight=1.0,
        detach_teacher_in_imitation=detach,
    )
    loss(output, target).total.backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in output.branches)
    if detach:
        assert output.teacher.grad is None
    else:
        assert output.teacher.grad.abs().sum() > 0


def test_as_dict_for_logging():
    output, target = random_output(n_branches=2)
    terms = SFTLoss()(output, target)
    logged = terms.as_dict("train/", branch_ids=[3, 4])
    assert set(logged) == {
        "train/loss",
        "train/teacher_rec",
        "train/branch_rec",
        "train/imitation",
        "train/branch3_rec",
        "train/branch3_imitation",
        "train/branch4_rec",
        "train/branch4_imitation",
    }
    assert logged["train/loss"] is terms.total
    with pytest.raises(ValueError, match="branch ids"):
        terms.as_dict(branch_ids=[1])


def test_invalid_inputs_and_options_raise():
    output, target = random_output()
    with pytest.raises(ValueError, match="crop the outputs"):
        SFTLoss()(output, target[:, :-1])
    bad = SFTOutput(output.teacher, [output.branches[0][:, :-1]])
    with pytest.raises(ValueError, match=r"branch 0 output \(2, 12, 10\)"):
        SFTLoss()(bad, target)
    with pytest.raises(ValueError, match="no student branch"):
        SFTLoss()(SFTOutput(output.teacher, []), target)
    # the wrapper's eval-mode output (the teacher's image) was unpacked along the batch axis
    for batch in (2, 3):
        with pytest.raises(TypeError, match=r"training-mode output .* call it after \.train\(\)"):
            SFTLoss()(torch.zeros(batch, 12, 10), torch.zeros(batch, 12, 10))
    assert SFTLoss()(tuple(output), target).total == SFTLoss()(output, target).total
    with pytest.raises(ValueError, match="distance"):
        SFTLoss("ssim")
    with pytest.raises(ValueError, match="branch_reduction"):
        SFTLoss(branch_reduction="max")
    with pytest.raises(ValueError, match="imitation_weight"):
        SFTLoss(imitation_weight=-1.0)
    with pytest.raises(ValueError, match="at least one"):
        SFTLoss(teacher_weight=0.0, branch_weight=0.0, imitation_weight=0.0)


@pytest.mark.parametrize("branch0", [False, True])
def test_sft_trains(branch0):
    """A few Adam steps on one batch reduce the SFT loss (plain torch, no Lightning)."""
    teacher, student = make_pair(seed=3)
    sft = StudentFriendlyTeacher(teacher, student, train_first_student_cascade=branch0)
    loss_fn = SFTLoss()
    masked_kspace, mask, sens, target = make_batch(batch=2, coils=3, seed=4)
    optimizer = torch.optim.Adam(sft.parameters(), lr=1e-3)
    sft.train()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        terms = loss_fn(sft(masked_kspace, mask, sens), target)
        terms.total.backward()
        optimizer.step()
        losses.append(terms.total.item())
    assert losses[-1] < losses[0]
