"""fastMRI's VarNet through the cascade protocol, as SFT teacher and student."""

import fastmri
import pytest
import torch
from fastmri.models import VarNet

from sftkd_fastmri.models import CascadedVarNet
from sftkd_fastmri.sft import SFTLoss, StudentFriendlyTeacher

from .test_wrapper import count_cascade_calls

N = 3


def _varnet(chans: int, seed: int) -> VarNet:
    torch.manual_seed(seed)
    return VarNet(num_cascades=N, sens_chans=4, sens_pools=2, chans=chans, pools=2)


def _inputs(batch=2, coils=3, h=20, w=18, seed=0):
    g = torch.Generator().manual_seed(seed)
    kspace = torch.randn(batch, coils, h, w, 2, generator=g)
    lines = torch.rand(batch, 1, 1, w, 1, generator=g) < 0.4
    lines[:, :, :, w // 2 - 2 : w // 2 + 2] = True  # fully sampled centre for the maps
    mask = lines.float()
    target = torch.rand(batch, h, w, generator=g)
    return kspace * mask, mask, target


def _pair(**kwargs):
    teacher, student = CascadedVarNet(_varnet(8, 0)), CascadedVarNet(_varnet(4, 1))
    return teacher, student, StudentFriendlyTeacher(teacher, student, **kwargs)


def test_protocol_path_equals_fastmri_varnet():
    varnet = _varnet(8, 0)
    model = CascadedVarNet(varnet)
    masked, mask, _ = _inputs()
    expected = varnet(masked, mask.bool())
    assert torch.equal(model(masked, mask), expected)
    state = model.initial_state(masked, mask)
    assert state.shape == (2, 6, 20, 18, 2)
    for i in range(N):
        state = model.cascade_step(i, state, masked, mask)
    torch.testing.assert_close(model.final_image(state), expected, rtol=0, atol=1e-6)


def test_takes_fastmri_varnet_arguments():
    varnet = _varnet(8, 0)
    model = CascadedVarNet(varnet)
    masked, mask, _ = _inputs()
    low = torch.tensor([4])  # as fastMRI collates it at its VarNet batch size of 1
    assert torch.equal(model(masked, mask, low), varnet(masked, mask.bool(), low))
    assert torch.equal(model(masked, mask, 2), varnet(masked, mask.bool(), 2))
    assert not torch.allclose(model(masked, mask, 2), model(masked, mask), atol=1e-5)
    assert torch.equal(model(masked, mask, num_low_frequencies=2), model(masked, mask, 2))


def test_given_maps_are_ignored_unless_asked_for():
    varnet = _varnet(8, 0)
    masked, mask, _ = _inputs()
    maps = varnet.sens_net(masked, mask.bool())
    other = fastmri.complex_conj(maps)  # other maps, another image
    default = CascadedVarNet(varnet)
    assert torch.equal(default(masked, mask, other), default(masked, mask))
    assert torch.equal(
        default.initial_state(masked, mask, other), default.initial_state(masked, mask)
    )
    given = CascadedVarNet(varnet, use_given_sens_maps=True)
    torch.testing.assert_close(given(masked, mask, maps), default(masked, mask), rtol=0, atol=1e-6)
    assert not torch.allclose(given(masked, mask, other), default(masked, mask), atol=1e-4)
    assert torch.equal(given.initial_state(masked, mask, other)[:, 3:], other)


def test_sft_wrapper_drives_varnets():
    teacher, student, sft = _pair()
    masked, mask, target = _inputs()
    sft.eval()
    assert torch.equal(sft(masked, mask), teacher.varnet(masked, mask.bool()))
    sft.train()
    out = sft(masked, mask)
    assert len(out.branches) == N - 1
    # branch i: teacher state after cascade i (k-space and the teacher's maps), then S_{i+1}..S_N
    states = sft.forward_states(masked, mask)
    for b, start in enumerate(sft.branch_starts):
        state = states.teacher[start]
        for k in range(start, N):
            state = student.cascade_step(k, state, masked, mask)
        torch.testing.assert_close(out.branches[b], student.final_image(state))
    # the branch losses reach the teacher's first N-1 blocks and its sensitivity network, not
    # the student's sensitivity network (no branch 0)
    losses = SFTLoss(teacher_weight=0.0, imitation_weight=0.0)(out, target)
    losses.total.backward()
    for i in range(N - 1):
        grads = [p.grad for p in teacher.cascades[i].parameters()]
        # (block 0's DC weight multiplies acquired - acquired = 0: a zero gradient is right)
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, i
    assert all(p.grad is None for p in teacher.cascades[N - 1].parameters())
    for name, p in teacher.varnet.sens_net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in student.varnet.sens_net.parameters())


def test_branch_zero_trains_the_student_sensitivity_network():
    _, student, sft = _pair(train_first_student_cascade=True)
    masked, mask, target = _inputs()
    out = sft.train()(masked, mask)
    torch.testing.assert_close(out.branches[0], student.varnet(masked, mask.bool()))
    SFTLoss()(out, target).total.backward()
    for name, p in student.varnet.sens_net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_batched_branches_equal_sequential():
    masked, mask, _ = _inputs()
    batch = masked.shape[0]
    _, _, seq = _pair(batch_branches=False)
    _, _, bat = _pair(batch_branches=True)
    seq_sizes: dict = {}
    bat_sizes: dict = {}
    seq_calls, handles = count_cascade_calls(seq, seq_sizes)
    bat_calls, more = count_cascade_calls(bat, bat_sizes)
    a, b = seq.train()(masked, mask), bat.train()(masked, mask)
    for h in handles + more:
        h.remove()
    assert len(a.branches) == len(b.branches) == N - 1
    for x, y in zip(a.branches, b.branches):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    # branches start after teacher cascades 1 .. N-1: student cascade k (0-based) serves the k
    # branches that started before it; S_1 (k = 0) serves none
    assert seq_calls[("student", 0)] == bat_calls[("student", 0)] == 0
    for k in range(1, N):
        # sequential: one call per active branch, each of the batch size
        assert seq_calls[("student", k)] == k and seq_sizes[("student", k)] == [batch] * k, k
        # batched: one call per student cascade, the active branches stacked along the batch
        assert bat_calls[("student", k)] == 1 and bat_sizes[("student", k)] == [k * batch], k


def test_bad_inputs_are_refused_with_the_shapes():
    _, _, sft = _pair()
    masked, mask, _ = _inputs()
    with pytest.raises(ValueError, match=r"mask as \(B, 1, 1, W, 1\).*got \(1, 1, 1, 18, 1\)"):
        sft.train()(masked, mask[:1])
    with pytest.raises(ValueError, match=r"masked_kspace must be \(B, coils, H, W, 2\)"):
        sft(masked[..., 0], mask)
    with pytest.raises(TypeError, match="expected a fastmri.models.VarNet"):
        CascadedVarNet(torch.nn.Linear(2, 2))


def test_a_dccnn_and_a_varnet_are_not_paired():
    from sftkd_fastmri.models import create_model

    dccnn = create_model("dccnn_d3c5", num_cascades=N, chans=4)
    with pytest.raises(ValueError, match=r"states are image \(B, 2, H, W\) but student"):
        StudentFriendlyTeacher(dccnn, CascadedVarNet(_varnet(4, 1)))


def test_the_batchs_low_frequencies_reach_the_sensitivity_networks():
    """fastMRI's VarNetModule gives its VarNet the batch's num_low_frequencies; SFT ran the
    sensitivity networks on the centre they find from the mask instead (another output)."""
    teacher, student, sft = _pair(train_first_student_cascade=True)
    masked, mask, _ = _inputs()
    low = 2  # the mask's symmetric centre gives 4
    assert not torch.allclose(teacher(masked, mask, low), teacher(masked, mask), atol=1e-5)
    sft.eval()
    assert torch.equal(sft(masked, mask, None, low), teacher(masked, mask, low))
    sft.train()
    out = sft(masked, mask, None, low)
    torch.testing.assert_close(out.teacher, teacher(masked, mask, low), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.branches[0], student(masked, mask, low), rtol=0, atol=1e-6)


def test_given_maps_are_required_when_asked_for():
    """Called as fastMRI's VarNet (a KD teacher), a model built to take the batch's maps ran
    its untrained sensitivity network instead, without a word."""
    given = CascadedVarNet(_varnet(8, 0), use_given_sens_maps=True)
    masked, mask, _ = _inputs()
    calls = (
        lambda: given(masked, mask),
        lambda: given(masked, mask, 4),
        lambda: given.initial_state(masked, mask),
    )
    for call in calls:
        with pytest.raises(ValueError, match="use_given_sens_maps=True: it needs the batch's"):
            call()
