"""StudentFriendlyTeacher: branch wiring, weight sharing, gradient flow, eval = plain teacher."""

from __future__ import annotations

import sys
from collections import Counter
from typing import Optional, Tuple

import fastmri
import pytest
import torch
from torch import Tensor

from sftkd_fastmri.models import DCCNN, create_model
from sftkd_fastmri.sft import (
    CascadeModel,
    SFTLoss,
    SFTOutput,
    StudentFriendlyTeacher,
    check_cascade_model,
)

PAIRS = {
    "complex": ("dccnn_d5c5", "dccnn_d3c5"),
    "paper": ("dccnn_d5c5_paper", "dccnn_d3c5_paper"),
}


# -- helpers (also imported by the other SFT tests) ---------------------------------------------
def random_sens(batch: int, coils: int, height: int, width: int, seed: int = 0) -> Tensor:
    """Random coil maps ``(B, coils, H, W, 2)`` normalised to ``sum_c |S_c|^2 = 1``."""
    g = torch.Generator().manual_seed(seed + 100)
    s = torch.randn(batch, coils, height, width, 2, generator=g, dtype=torch.float64)
    rss = fastmri.rss_complex(s, dim=1).unsqueeze(1).unsqueeze(-1)
    return (s / rss).float()


def make_batch(
    batch: int = 2, coils: int = 1, height: int = 13, width: int = 10, seed: int = 0
) -> Tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """``(masked_kspace, mask, sens_maps or None, target (B, H, W))`` on odd, non-square sizes."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, height, width, 2, generator=g)
    sens = random_sens(batch, coils, height, width, seed) if coils > 1 else None
    coil_images = (
        image.unsqueeze(1) if sens is None else fastmri.complex_mul(image.unsqueeze(1), sens)
    )
    kspace = fastmri.fft2c(coil_images)
    mask = torch.zeros(batch, 1, 1, width, 1, dtype=torch.bool)
    mask[..., ::3, :] = True
    mask[..., width // 2 - 1 : width // 2 + 2, :] = True
    return kspace * mask, mask, sens, fastmri.complex_abs(image)


def make_pair(kind: str = "complex", seed: int = 0, **overrides) -> Tuple[DCCNN, DCCNN]:
    """Small teacher / student (chans=4) of a preset pair."""
    torch.manual_seed(seed)
    teacher_name, student_name = PAIRS[kind]
    return (
        create_model(teacher_name, chans=4, **overrides),
        create_model(student_name, chans=4, **overrides),
    )


def make_sft(kind: str = "complex", seed: int = 0, **options) -> StudentFriendlyTeacher:
    teacher, student = make_pair(kind, seed)
    return StudentFriendlyTeacher(teacher, student, **options)


def count_cascade_calls(sft: StudentFriendlyTeacher, batch_sizes: Optional[dict] = None):
    """Forward hooks counting the calls of every cascade, keyed ``("teacher"|"student", k)``."""
    calls: Counter = Counter()
    handles = []
    for role in ("teacher", "student"):
        for k, cascade in enumerate(getattr(sft, role).cascades):

            def hook(module, inputs, output, key=(role, k)):
                calls[key] += 1
                if batch_sizes is not None:
                    batch_sizes.setdefault(key, []).append(inputs[0].shape[0])

            handles.append(cascade.register_forward_hook(hook))
    return calls, handles


def perturb_(module: torch.nn.Module, amount: float = 0.1) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(amount)


# -- wiring ------------------------------------------------------------------------------------
@pytest.mark.parametrize("branch0", [False, True])
def test_each_branch_runs_the_right_student_cascades(branch0):
    sft = make_sft(train_first_student_cascade=branch0)
    calls, handles = count_cascade_calls(sft)
    masked_kspace, mask, sens, target = make_batch()
    out = sft(masked_kspace, mask, sens)
    for h in handles:
        h.remove()

    n = 5
    assert isinstance(out, SFTOutput)
    assert len(out.branches) == (n if branch0 else n - 1)
    assert sft.branch_starts == (list(range(n)) if branch0 else list(range(1, n)))
    assert out.teacher.shape == target.shape
    assert all(b.shape == target.shape for b in out.branches)
    # The teacher runs once; student cascade S_k (1-based) serves the branches i < k.
    for k in range(1, n + 1):
        assert calls[("teacher", k - 1)] == 1
        assert calls[("student", k - 1)] == (k if branch0 else k - 1)
    assert calls[("student", 0)] == (1 if branch0 else 0)  # paper: S_1 never used


@pytest.mark.parametrize("branch0", [False, True])
def test_branches_equal_manual_unrolling(branch0):
    sft = make_sft(train_first_student_cascade=branch0)
    teacher, student = sft.teacher, sft.student
    masked_kspace, mask, sens, _ = make_batch(seed=1)
    out = sft(masked_kspace, mask, sens)

    x = [teacher.initial_state(masked_kspace, mask, sens)]
    for i in range(5):
        x.append(teacher.cascades[i](x[-1], masked_kspace, mask, sens))
    assert torch.equal(out.teacher, teacher.final_image(x[5]))
    expected = []
    for i in sft.branch_starts:  # branch i: teacher state x_i through S_{i+1} .. S_N
        b = x[i]
        for k in range(i, 5):
            b = student.cascades[k](b, masked_kspace, mask, sens)
        expected.append(student.final_image(b))
    for got, want in zip(out.branches, expected):
        assert torch.equal(got, want)
    if branch0:  # branch 0 is the student's own forward
        assert torch.equal(out.branches[0], student(masked_kspace, mask, sens))


def test_last_student_cascade_is_shared_by_every_branch():
    sft = make_sft()
    masked_kspace, mask, sens, _ = make_batch()
    before = sft(masked_kspace, mask, sens)

    perturb_(sft.student.cascades[-1])
    after = sft(masked_kspace, mask, sens)
    assert torch.equal(after.teacher, before.teacher)
    for b0, b1 in zip(before.branches, after.branches):
        assert not torch.allclose(b0, b1)


def test_untouched_cascades_do_not_affect_branches():
    sft = make_sft()
    masked_kspace, mask, sens, _ = make_batch()
    before = sft(masked_kspace, mask, sens)

    perturb_(sft.student.cascades[0])  # S_1: unused in the paper's SFT stage
    perturb_(sft.teacher.cascades[-1])  # T_N: feeds the teacher output only
    after = sft(masked_kspace, mask, sens)
    assert not torch.allclose(after.teacher, before.teacher)
    for b0, b1 in zip(before.branches, after.branches):
        assert torch.equal(b0, b1)


# -- gradients ---------------------------------------------------------------------------------
def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(sum(g.abs().sum() for g in grads)) if grads else 0.0


def test_branch_losses_train_teacher_cascades_except_the_last():
    sft = make_sft()
    masked_kspace, mask, sens, target = make_batch()
    out = sft(masked_kspace, mask, sens)
    branch_only = SFTLoss(teacher_weight=0.0, imitation_weight=0.0)
    branch_only(out, target).total.backward()

    for i in range(4):  # T_1 .. T_{N-1}: nothing is detached
        assert _grad_norm(sft.teacher.cascades[i]) > 0
    assert all(p.grad is None for p in sft.teacher.cascades[4].parameters())
    for k in range(1, 5):
        assert _grad_norm(sft.student.cascades[k]) > 0
    assert all(p.grad is None for p in sft.student.cascades[0].parameters())


def test_full_loss_reaches_every_teacher_cascade():
    sft = make_sft()
    masked_kspace, mask, sens, target = make_batch()
    SFTLoss()(sft(masked_kspace, mask, sens), target).total.backward()
    for cascade in sft.teacher.cascades:
        assert _grad_norm(cascade) > 0


def test_branch_zero_trains_the_first_student_cascade():
    sft = make_sft(train_first_student_cascade=True)
    masked_kspace, mask, sens, target = make_batch()
    SFTLoss()(sft(masked_kspace, mask, sens), target).total.backward()
    for cascade in sft.student.cascades:
        assert _grad_norm(cascade) > 0


# -- eval mode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("coils", [1, 4])
def test_eval_output_is_the_plain_teacher(kind, coils):
    sft = make_sft(kind, train_first_student_cascade=True)
    masked_kspace, mask, sens, target = make_batch(coils=coils)
    train_out = sft(masked_kspace, mask, sens)

    plain = DCCNN(**sft.teacher.config)
    plain.load_state_dict(sft.teacher.state_dict())
    plain.eval()
    sft.eval()
    out = sft(masked_kspace, mask, sens)
    assert isinstance(out, Tensor) and out.shape == target.shape
    assert torch.equal(out, plain(masked_kspace, mask, sens))
    torch.testing.assert_close(train_out.teacher, out, rtol=0, atol=1e-6)


# -- data and presets --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("coils", [1, 3])
@pytest.mark.parametrize("branch0", [False, True])
def test_single_and_multicoil_with_both_presets(kind, coils, branch0):
    sft = make_sft(kind, train_first_student_cascade=branch0)
    masked_kspace, mask, sens, target = make_batch(batch=2, coils=coils, height=13, width=10)
    out = sft(masked_kspace, mask, sens)
    assert out.teacher.shape == (2, 13, 10)
    assert len(out.branches) == (5 if branch0 else 4)
    for b in [out.teacher, *out.branches]:
        assert b.shape == (2, 13, 10) and torch.isfinite(b).all()


@pytest.mark.parametrize("coils", [1, 3])
@pytest.mark.parametrize("branch0", [False, True])
def test_batched_branches_match_sequential_branches(coils, branch0):
    sequential = make_sft(train_first_student_cascade=branch0)
    batched = StudentFriendlyTeacher(
        sequential.teacher,
        sequential.student,
        train_first_student_cascade=branch0,
        batch_branches=True,
    )
    masked_kspace, mask, sens, _ = make_batch(batch=2, coils=coils)
    sizes: dict = {}
    calls, handles = count_cascade_calls(batched, sizes)
    got = batched(masked_kspace, mask, sens)
    for h in handles:
        h.remove()
    want = sequential(masked_kspace, mask, sens)

    # A mask shared by the batch, (1, 1, 1, W, 1), broadcasts instead of being tiled.
    shared_mask = batched(masked_kspace, mask[:1], sens)

    torch.testing.assert_close(got.teacher, want.teacher, rtol=0, atol=0)
    for g, s, w in zip(got.branches, shared_mask.branches, want.branches):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s, w, rtol=1e-5, atol=1e-6)
    first = 0 if branch0 else 1
    for k in range(first, 5):  # one call per student cascade, all active branches stacked
        assert calls[("student", k)] == 1
        assert sizes[("student", k)] == [2 * (k - first + 1)]


def test_batch_branches_default_is_sequential_on_cpu_and_with_batch_norm():
    """``batch_branches=None`` batches on CUDA inputs only (tests/gpu checks that side), and
    never a student whose batch normalisation would mix the branches."""
    sft = make_sft()
    assert sft.batch_branches is None and not sft._student_mixes_samples
    masked_kspace, mask, sens, _ = make_batch(batch=2)
    sizes: dict = {}
    calls, handles = count_cascade_calls(sft, sizes)
    sft(masked_kspace, mask, sens)
    for h in handles:
        h.remove()
    for k in range(1, 5):  # one call per active branch, each of the batch size
        assert calls[("student", k)] == k and set(sizes[("student", k)]) == {2}

    teacher, student = make_pair("complex", 0)
    student.cascades[1].cnn.add_module("norm", torch.nn.BatchNorm2d(2))
    assert StudentFriendlyTeacher(teacher, student)._student_mixes_samples


def test_forward_states():
    sft = make_sft()
    masked_kspace, mask, sens, _ = make_batch()
    states = sft.forward_states(masked_kspace, mask, sens)
    assert len(states.teacher) == 6 and len(states.branches) == 4
    assert states.teacher[0].shape == (2, 2, 13, 10)
    out = sft(masked_kspace, mask, sens)
    assert torch.equal(sft.teacher.final_image(states.teacher[-1]), out.teacher)
    assert torch.equal(sft.student.final_image(states.branches[-1]), out.branches[-1])


# -- validation --------------------------------------------------------------------------------
def test_mismatched_cascade_counts_raise():
    teacher = create_model("dccnn_d5c5", chans=4)
    student = create_model("dccnn_d3c5", chans=4, num_cascades=4)
    with pytest.raises(ValueError, match=r"teacher has 5 cascades but student has 4"):
        StudentFriendlyTeacher(teacher, student)


def test_other_invalid_pairs_raise():
    teacher = create_model("dccnn_d5c5", chans=4)
    with pytest.raises(ValueError, match="in_chans=2 but student has in_chans=1"):
        StudentFriendlyTeacher(teacher, create_model("dccnn_d3c5_paper", chans=4))
    with pytest.raises(ValueError, match="two different modules"):
        StudentFriendlyTeacher(teacher, teacher)
    with pytest.raises(TypeError, match="student .*Conv2d.*initial_state"):
        StudentFriendlyTeacher(teacher, torch.nn.Conv2d(2, 2, 3))
    one_t, one_s = make_pair(num_cascades=1)
    with pytest.raises(ValueError, match="single cascade"):
        StudentFriendlyTeacher(one_t, one_s)
    sft = StudentFriendlyTeacher(one_t, one_s, train_first_student_cascade=True)
    masked_kspace, mask, sens, _ = make_batch()
    assert len(sft(masked_kspace, mask, sens).branches) == 1


def test_input_validation():
    sft = make_sft()
    masked_kspace, mask, sens, _ = make_batch(coils=3)
    with pytest.raises(ValueError, match="need sens_maps"):
        sft(masked_kspace, mask, None)
    with pytest.raises(ValueError, match=r"\(B, coils, H, W, 2\)"):
        sft(masked_kspace[:, 0], mask, None)


def test_protocol():
    teacher, _ = make_pair()
    assert check_cascade_model(teacher, "teacher") == 5
    if sys.version_info < (3, 12):  # later versions look attributes up statically
        assert isinstance(teacher, CascadeModel)
    with pytest.raises(TypeError, match="cascade_step.*final_image.*'cascades'"):
        check_cascade_model(torch.nn.Linear(2, 2), "teacher")
