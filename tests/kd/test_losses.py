"""KD losses against golden values computed here with numpy, plus the papers' invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sftkd_fastmri.kd import (
    FSP,
    AttentionTransfer,
    CorrelationCongruence,
    FitNet,
    KDLoss,
    OutputImitation,
    SimilarityPreserving,
    TeacherSummary,
    available_losses,
    create_loss,
    register_loss,
)

B, H, W = 3, 3, 5  # odd, non-square maps throughout


def _rand(*shape: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def _t(array: np.ndarray, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(array, dtype=torch.float64, requires_grad=requires_grad)


@pytest.fixture
def feats():
    """Two pairs with student/teacher channel counts (2, 4) and (3, 3), numpy and torch."""
    s_np = [_rand(B, 2, H, W, seed=1), _rand(B, 3, H, W, seed=2)]
    t_np = [_rand(B, 4, H, W, seed=3), _rand(B, 3, H, W, seed=4)]
    return s_np, t_np, [_t(a) for a in s_np], [_t(a) for a in t_np]


# ---------------------------------------------------------------- numpy references


def np_attention(f: np.ndarray, p: float, normalize: str) -> np.ndarray:
    a = (np.abs(f) ** p).sum(axis=1).reshape(f.shape[0], -1)
    axis = 1 if normalize == "sample" else 0
    return a / np.linalg.norm(a, axis=axis, keepdims=True)


def np_at(s_list, t_list, p=2.0, normalize="sample", squared=False) -> float:
    out = []
    for s, t in zip(s_list, t_list):
        d = np_attention(t, p, normalize) - np_attention(s, p, normalize)
        out.append((d**2).mean() if squared else np.sqrt((d**2).sum(axis=1)).mean())
    return float(np.mean(out))


def np_fsp_gram(f1: np.ndarray, f2: np.ndarray) -> np.ndarray:
    b, c1, h, w = f1.shape
    g = np.zeros((b, c1, f2.shape[1]))
    for n in range(b):
        for i in range(c1):
            for j in range(f2.shape[1]):
                g[n, i, j] = (f1[n, i] * f2[n, j]).sum() / (h * w)
    return g


def np_sp_matrix(f: np.ndarray) -> np.ndarray:
    q = f.reshape(f.shape[0], -1)
    g = q @ q.T
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def np_cc_matrix(f: np.ndarray, gamma: float, order: int, pool: bool) -> np.ndarray:
    e = f.mean(axis=(2, 3)) if pool else f.reshape(f.shape[0], -1)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    b = e.shape[0]
    c = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            dot = float(e[i] @ e[j])
            series = sum((2 * gamma) ** p / math.factorial(p) * dot**p for p in range(order + 1))
            c[i, j] = math.exp(-gamma * e[i] @ e[i]) * math.exp(-gamma * e[j] @ e[j]) * series
    return c


# ---------------------------------------------------------------- golden values


@pytest.mark.parametrize("normalize", ["sample", "batch"])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("p", [2.0, 1.0, 4.0, 3.0])
def test_at_golden(feats, normalize, squared, p):
    s_np, t_np, s, t = feats
    loss = AttentionTransfer(p=p, normalize=normalize, squared=squared)(s, t)
    expected = np_at(s_np, t_np, p=p, normalize=normalize, squared=squared)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_fitnet_golden_equal_channels(feats):
    s_np, _, s, _ = feats
    t_np = [_rand(*a.shape, seed=10 + k) for k, a in enumerate(s_np)]
    loss = FitNet()(s, [_t(a) for a in t_np])
    expected = np.mean([((a - b) ** 2).mean() for a, b in zip(s_np, t_np)])
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_fitnet_golden_with_regressor(feats):
    s_np, t_np, s, t = feats
    loss_fn = FitNet(student_channels=[2, 3], teacher_channels=[4, 3]).double()
    conv = loss_fn.regressors[0]
    weight = conv.weight.detach().numpy()[:, :, 0, 0]  # (C_t, C_s)
    bias = conv.bias.detach().numpy()
    mapped = np.einsum("ts,bshw->bthw", weight, s_np[0]) + bias[None, :, None, None]
    expected = np.mean([((mapped - t_np[0]) ** 2).mean(), ((s_np[1] - t_np[1]) ** 2).mean()])
    assert loss_fn(s, t).item() == pytest.approx(expected, rel=1e-10)


def test_fsp_golden():
    s_np = [_rand(B, 2, H, W, seed=20), _rand(B, 3, H, W, seed=21)]
    t_np = [_rand(B, 2, H, W, seed=22), _rand(B, 3, H, W, seed=23)]
    s_np += [_rand(B, 4, 2, 4, seed=24), _rand(B, 2, 2, 4, seed=25)]
    t_np += [_rand(B, 4, 2, 4, seed=26), _rand(B, 2, 2, 4, seed=27)]
    loss = FSP()([_t(a) for a in s_np], [_t(a) for a in t_np])
    diffs = [
        ((np_fsp_gram(s_np[k], s_np[k + 1]) - np_fsp_gram(t_np[k], t_np[k + 1])) ** 2).mean()
        for k in (0, 2)
    ]
    assert loss.item() == pytest.approx(np.mean(diffs), rel=1e-10)


def test_fsp_pools_the_larger_map():
    # (4, 6) is pooled to (2, 3) by averaging 2x2 blocks.
    big_s, small_s = _rand(B, 2, 4, 6, seed=30), _rand(B, 3, 2, 3, seed=31)
    big_t, small_t = _rand(B, 2, 4, 6, seed=32), _rand(B, 3, 2, 3, seed=33)

    def pool(f):
        return f.reshape(B, f.shape[1], 2, 2, 3, 2).mean(axis=(3, 5))

    expected = ((np_fsp_gram(pool(big_s), small_s) - np_fsp_gram(pool(big_t), small_t)) ** 2).mean()
    loss = FSP()([_t(big_s), _t(small_s)], [_t(big_t), _t(small_t)])
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_sp_golden(feats):
    s_np, t_np, s, t = feats
    expected = np.mean(
        [((np_sp_matrix(b) - np_sp_matrix(a)) ** 2).sum() / B**2 for a, b in zip(s_np, t_np)]
    )
    assert SimilarityPreserving()(s, t).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("gamma,order,pool", [(0.4, 2, False), (1.3, 3, True), (0.4, 0, False)])
def test_cc_golden(feats, gamma, order, pool):
    s_np, t_np, s, t = feats
    expected = np.mean(
        [
            ((np_cc_matrix(b, gamma, order, pool) - np_cc_matrix(a, gamma, order, pool)) ** 2).sum()
            / B**2
            for a, b in zip(s_np, t_np)
        ]
    )
    loss = CorrelationCongruence(gamma=gamma, order=order, pool=pool)(s, t)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_cc_high_order_matches_exact_rbf():
    f = _t(_rand(4, 3, H, W, seed=40))
    e = torch.nn.functional.normalize(f.flatten(1), dim=1).numpy()
    exact = np.exp(-0.4 * ((e[:, None, :] - e[None, :, :]) ** 2).sum(-1))
    approx = CorrelationCongruence(gamma=0.4, order=20).correlation(f).numpy()
    np.testing.assert_allclose(approx, exact, rtol=1e-12)


@pytest.mark.parametrize("shape", [(B, H, W), (B, 1, H, W), (B, 2, H, W, 2)])
def test_imitation_golden_any_shape(shape):
    s_np, t_np = _rand(*shape, seed=50), _rand(*shape, seed=51)
    s2_np, t2_np = _rand(B, H, W, seed=52), _rand(B, H, W, seed=53)
    loss = OutputImitation()([_t(s_np), _t(s2_np)], [_t(t_np), _t(t2_np)])
    expected = np.mean([np.abs(s_np - t_np).mean(), np.abs(s2_np - t2_np).mean()])
    assert loss.item() == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------- properties

ALL = [
    AttentionTransfer,
    FitNet,
    FSP,
    SimilarityPreserving,
    CorrelationCongruence,
    OutputImitation,
]


@pytest.mark.parametrize("cls", ALL)
def test_zero_when_student_equals_teacher(cls):
    f = [_t(_rand(B, 3, H, W, seed=60)), _t(_rand(B, 2, H, W, seed=61))]
    assert cls()(f, [x.clone() for x in f]).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("cls", ALL)
def test_gradients_reach_student_not_teacher(cls):
    s = [_t(_rand(B, 3, H, W, seed=70), True), _t(_rand(B, 2, H, W, seed=71), True)]
    t = [_t(_rand(B, 3, H, W, seed=72), True), _t(_rand(B, 2, H, W, seed=73), True)]
    cls()(s, t).backward()
    for x in s:
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for x in t:
        assert x.grad is None


@pytest.mark.parametrize("cls", ALL)
def test_finite_gradient_at_zero_loss(cls):
    s = [_t(_rand(B, 3, H, W, seed=80), True), _t(_rand(B, 2, H, W, seed=81), True)]
    cls()(s, [x.detach().clone() for x in s]).backward()
    for x in s:
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("scaled", [0, 1])
def test_sp_invariant_to_positive_scale(feats, scaled):
    _, _, s, t = feats
    loss_fn = SimilarityPreserving()
    pairs = [list(s), list(t)]
    scaled_pairs = [list(s), list(t)]
    scaled_pairs[scaled][0] = pairs[scaled][0] * 7.5
    assert loss_fn(*scaled_pairs).item() == pytest.approx(loss_fn(*pairs).item(), rel=1e-10)


def test_at_invariant_to_scaling_a_sample(feats):
    _, _, s, t = feats
    loss_fn = AttentionTransfer()
    factor = torch.tensor([5.0, 1.0, 0.2], dtype=torch.float64).view(B, 1, 1, 1)
    scaled = [s[0] * factor, s[1] * 3.0]
    assert loss_fn(scaled, t).item() == pytest.approx(loss_fn(s, t).item(), rel=1e-10)


def test_at_batch_normalisation_depends_on_other_samples():
    # Sample 0 is the same in both batches; sample 1 differs but is identical for student
    # and teacher, so its own term is zero. Only a per-batch normalisation can tell them apart.
    s0, t0 = _rand(1, 2, H, W, seed=90), _rand(1, 2, H, W, seed=91)
    other_a, other_b = _rand(1, 2, H, W, seed=92), _rand(1, 2, H, W, seed=93) * 10
    batch_a = ([_t(np.concatenate([s0, other_a]))], [_t(np.concatenate([t0, other_a]))])
    batch_b = ([_t(np.concatenate([s0, other_b]))], [_t(np.concatenate([t0, other_b]))])
    per_sample = AttentionTransfer(normalize="sample")
    per_batch = AttentionTransfer(normalize="batch")
    assert per_sample(*batch_a).item() == pytest.approx(per_sample(*batch_b).item(), rel=1e-10)
    assert per_batch(*batch_a).item() != pytest.approx(per_batch(*batch_b).item(), rel=1e-3)


def test_fitnet_regressors_are_trainable_parameters(feats):
    _, _, s, t = feats
    loss_fn = FitNet(student_channels=[2, 3], teacher_channels=[4, 3]).double()
    assert isinstance(loss_fn.regressors, nn.ModuleList)
    assert isinstance(loss_fn.regressors[0], nn.Conv2d)
    assert (loss_fn.regressors[0].in_channels, loss_fn.regressors[0].out_channels) == (2, 4)
    assert loss_fn.regressors[0].kernel_size == (1, 1)
    assert isinstance(loss_fn.regressors[1], nn.Identity)
    assert len(list(loss_fn.parameters())) == 2  # weight and bias of the one regressor
    loss_fn(s, t).backward()
    for param in loss_fn.parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_fitnet_without_channel_spec_raises_on_mismatch(feats):
    _, _, s, t = feats
    with pytest.raises(ValueError, match="student_channels"):
        FitNet()(s, t)


def test_fitnet_configuration_errors(feats):
    _, _, s, t = feats
    with pytest.raises(ValueError, match="both"):
        FitNet(student_channels=[2, 3])
    with pytest.raises(ValueError, match="one entry per pair"):
        FitNet(student_channels=[2], teacher_channels=[4, 3])
    with pytest.raises(ValueError, match=r"pair 0.*\(3, 4\)"):
        FitNet(student_channels=[3, 3], teacher_channels=[4, 3]).double()(s, t)
    with pytest.raises(ValueError, match="expected 2 pairs"):
        FitNet(student_channels=[2, 3], teacher_channels=[4, 3]).double()([s[0]], [t[0]])


@pytest.mark.parametrize("cls", [SimilarityPreserving, CorrelationCongruence])
def test_relational_losses_need_two_samples(cls):
    f = [_t(_rand(1, 2, H, W, seed=100))]
    with pytest.raises(ValueError, match="at least 2 samples"):
        cls()(f, f)


def test_fsp_errors():
    f = [_t(_rand(B, 2, H, W, seed=110 + k)) for k in range(3)]
    with pytest.raises(ValueError, match="even number"):
        FSP()(f, f)
    g = [_t(_rand(B, 3, H, W, seed=120)), f[1]]
    with pytest.raises(ValueError, match=r"FSP matrix shapes.*\(3, 3, 2\).*\(3, 2, 2\)"):
        FSP()(g, f[:2])


def test_validation_messages_name_loss_pair_and_shapes():
    a = _t(_rand(B, 2, H, W, seed=130))
    with pytest.raises(ValueError, match=r"AttentionTransfer \('at'\): expected as many"):
        AttentionTransfer()([a, a], [a])
    with pytest.raises(ValueError, match="at least one"):
        SimilarityPreserving()([], [])
    small = _t(_rand(B, 2, H, W - 1, seed=131))
    for loss_fn in (AttentionTransfer(), FitNet()):
        with pytest.raises(ValueError, match=r"pair 1: expected equal spatial.*\(3, 2, 3, 4\)"):
            loss_fn([a, a], [a, small])
    with pytest.raises(ValueError, match=r"'cc'\), pair 0: expected 4-D.*\(3, 3, 5\)"):
        CorrelationCongruence()([a[:, 0]], [a])
    with pytest.raises(ValueError, match="same batch size"):
        SimilarityPreserving()([a], [a[:2]])
    with pytest.raises(ValueError, match=r"'imitation'\), pair 0: expected equal.*\(3, 3, 4\)"):
        OutputImitation()([a[:, 0]], [small[:, 0]])
    with pytest.raises(TypeError, match="list or tuple"):
        FSP()(a, a)
    with pytest.raises(ValueError, match=r"expected features with a batch axis.*\(0-d"):
        OutputImitation()([torch.tensor(1.0)], [torch.tensor(2.0)])


def test_constructor_option_validation():
    with pytest.raises(ValueError, match="normalize"):
        AttentionTransfer(normalize="channel")
    with pytest.raises(ValueError, match="p must be a finite number >= 1"):
        AttentionTransfer(p=0)
    with pytest.raises(ValueError, match="p must be a finite number >= 1, got 0.5"):
        AttentionTransfer(p=0.5)  # NaN gradients at exact zeros
    with pytest.raises(ValueError, match=r"p must be a finite number >= 1, got '2'"):
        AttentionTransfer(p="2")  # e.g. from a config read as text
    with pytest.raises(ValueError, match="p must be a finite number >= 1, got inf"):
        AttentionTransfer(p=float("inf"))  # gave a NaN loss
    with pytest.raises(ValueError, match="gamma"):
        CorrelationCongruence(gamma=-1.0)
    with pytest.raises(ValueError, match="gamma must be a positive finite number, got inf"):
        CorrelationCongruence(gamma=float("inf"))  # gave a NaN loss
    with pytest.raises(ValueError, match="order"):
        CorrelationCongruence(order=1.5)


# ---------------------------------------------------------------- registry


def test_registry_lists_all_losses():
    assert available_losses() == ["at", "cc", "fitnet", "fsp", "imitation", "sp"]
    for name in available_losses():
        loss_fn = create_loss(name)
        assert isinstance(loss_fn, KDLoss) and loss_fn.name == name


def test_create_loss_passes_options():
    loss_fn = create_loss("cc", gamma=0.7, order=3, pool=True)
    assert isinstance(loss_fn, CorrelationCongruence)
    assert (loss_fn.gamma, loss_fn.order, loss_fn.pool) == (0.7, 3, True)
    fitnet = create_loss("fitnet", student_channels=[2], teacher_channels=[4])
    assert isinstance(fitnet.regressors[0], nn.Conv2d)


def test_create_loss_rejects_unknown_name_and_options():
    with pytest.raises(KeyError, match="available: at, cc, fitnet, fsp, imitation, sp"):
        create_loss("kd")
    with pytest.raises(TypeError, match="beta"):
        create_loss("at", beta=1000)
    with pytest.raises(TypeError, match="p"):
        create_loss("sp", p=2)


def test_register_loss_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):

        @register_loss("at")
        class Duplicate(KDLoss):
            pass

    assert create_loss("at").__class__ is AttentionTransfer


# ---------------------------------------------------------------- fast paths


@pytest.mark.parametrize("p", [2.0, 4.0, 1.5])
def test_at_gradcheck(p):
    """The fused p = 2 attention map (own autograd function) and the other paths."""
    s = _t(_rand(2, 3, H, W, seed=90), requires_grad=True)
    t = _t(_rand(2, 4, H, W, seed=91))
    loss = AttentionTransfer(p=p)
    assert torch.autograd.gradcheck(lambda x: loss([x], [t]), (s,))


@pytest.mark.parametrize("cls", ALL)
def test_channels_last_features_give_the_same_loss_and_gradient(cls):
    """DCCNN activations are channels-last; the losses' copy-free flattening must not change
    the result."""
    s_np = [_rand(B, 3, H, W, seed=100), _rand(B, 3, H, W, seed=101)]
    t_np = [_rand(B, 3, H, W, seed=102), _rand(B, 3, H, W, seed=103)]
    grads = []
    values = []
    for layout in (torch.contiguous_format, torch.channels_last):
        s = [_t(a).contiguous(memory_format=layout).requires_grad_() for a in s_np]
        t = [_t(a).contiguous(memory_format=layout) for a in t_np]
        value = cls()(s, t)
        value.backward()
        values.append(value.item())
        grads.append([x.grad.contiguous() for x in s])
    assert values[1] == pytest.approx(values[0], rel=1e-12)
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "cls", [AttentionTransfer, SimilarityPreserving, CorrelationCongruence, FSP]
)
@pytest.mark.parametrize("same_shapes", [True, False])
def test_all_pairs_at_once_equals_the_mean_of_single_pairs(cls, same_shapes):
    """The losses stack equal-shaped per-pair quantities and fall back to a loop otherwise;
    either way the result is the mean of the per-pair losses."""
    group = 2 if cls is FSP else 1
    shapes = [(B, 3, H, W)] * 3 * group
    if not same_shapes:  # other spatial sizes (AT, FSP) or batch sizes (SP, CC)
        other = (B, 3, H + 2, W - 1) if cls in (AttentionTransfer, FSP) else (B + 1, 3, H, W)
        shapes[-group:] = [other] * group
    s = [_t(_rand(*shape, seed=200 + k)) for k, shape in enumerate(shapes)]
    t = [_t(_rand(*shape, seed=300 + k)) for k, shape in enumerate(shapes)]
    loss = cls()
    singles = [loss(s[k : k + group], t[k : k + group]) for k in range(0, len(s), group)]
    assert loss(s, t).item() == pytest.approx(float(torch.stack(singles).mean()), rel=1e-12)


@pytest.mark.parametrize(
    "cls", [SimilarityPreserving, CorrelationCongruence, FSP, AttentionTransfer]
)
def test_zero_sample_gives_finite_loss_and_gradient(cls):
    """A sample whose feature is all zeros (a dead layer) must not produce NaN."""
    s = [_t(_rand(B, 3, H, W, seed=k)) for k in range(2)]
    for f in s:
        f[1] = 0.0
        f.requires_grad_()
    t = [_t(_rand(B, 3, H, W, seed=10 + k)) for k in range(2)]
    value = cls()(s, t)
    value.backward()
    assert torch.isfinite(value) and all(torch.isfinite(f.grad).all() for f in s)


@pytest.mark.parametrize("cls", [SimilarityPreserving, CorrelationCongruence, FSP])
def test_gram_products_do_not_overflow_under_float16_autocast(cls):
    """Under 16-bit mixed precision the Gram products run in float32: sums over many
    positions of float16 features would overflow float16's range (65504)."""
    g = torch.Generator().manual_seed(0)
    s = [(30 * torch.randn(2, 4, 64, 64, generator=g)).half() for _ in range(2)]
    t = [(30 * torch.randn(2, 4, 64, 64, generator=g)).half() for _ in range(2)]
    assert float(s[0][0].float().square().sum()) > 65504  # a float16 product would be inf
    with torch.autocast(device_type="cpu", dtype=torch.float16):
        value = cls()(s, t)
    reference = cls()([x.double() for x in s], [x.double() for x in t])
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(reference.item(), rel=1e-3)


@pytest.mark.parametrize("p", [2.0, 4.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_of_half_precision_features_does_not_overflow(p, dtype):
    """AT on 16-bit features of ordinary size sums their energies in float32: in float16 the
    norm an attention map is divided by overflows, and every map (and the loss) was 0."""
    g = torch.Generator().manual_seed(1)
    s = (20 * torch.rand(2, 32, 16, 16, generator=g)).to(dtype).requires_grad_()
    t = (20 * torch.rand(2, 32, 16, 16, generator=g)).to(dtype)
    energy = s.detach().double().abs().pow(p).sum(dim=1).flatten(1)
    assert float(energy.square().sum(dim=1).max()) > 65504  # its norm overflows float16
    value = AttentionTransfer(p=p)([s], [t])
    value.backward()
    reference = AttentionTransfer(p=p)([s.detach().double()], [t.double()])
    assert value.item() == pytest.approx(reference.item(), rel=2e-2)
    assert s.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [SimilarityPreserving, CorrelationCongruence, FSP])
def test_split_k_reduction_gives_the_same_loss_and_gradient(cls, monkeypatch):
    """On CUDA the long reductions of FSP, SP and CC are summed over chunks (split-K); forced
    on here, it must reproduce the single product in value and gradient."""
    from sftkd_fastmri.kd import grams as grams_module

    s_np = [_rand(B, 4, 6, 10, seed=120), _rand(B, 4, 6, 10, seed=121)]
    t_np = [_rand(B, 4, 6, 10, seed=122), _rand(B, 4, 6, 10, seed=123)]
    split = []

    def chunks_of_four(length, tensor):  # as on CUDA, with chunks of 4 entries
        split.append(length // 4)
        return length // 4

    results = []
    for forced in (False, True):
        if forced:
            monkeypatch.setattr(grams_module, "_split_k_chunks", chunks_of_four)
        s = [_t(a).requires_grad_() for a in s_np]
        value = cls()(s, [_t(a) for a in t_np])
        value.backward()
        results.append((value.item(), [x.grad for x in s]))
    assert split and all(n > 1 for n in split)  # 60 positions or 240 entries per sample
    (v0, g0), (v1, g1) = results
    assert v1 == pytest.approx(v0, rel=1e-12)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "cls", [AttentionTransfer, SimilarityPreserving, CorrelationCongruence, FSP]
)
def test_teacher_summaries_stand_in_for_teacher_features(cls):
    s = [_t(_rand(B, 3, H, W, seed=110)), _t(_rand(B, 3, H, W, seed=111))]
    t = [_t(_rand(B, 3, H, W, seed=112)), _t(_rand(B, 3, H, W, seed=113))]
    loss = cls()
    g = loss.teacher_group
    summaries = []
    for k in range(0, len(t), g):
        value = loss.summarize_teacher(t[k : k + g])
        summaries += [TeacherSummary(value if i == 0 else None, t[k + i].shape) for i in range(g)]
    assert loss(s, summaries).item() == pytest.approx(loss(s, t).item(), rel=1e-12)
    # the shape checks still apply to summaries
    with pytest.raises(ValueError, match="batch size"):
        loss(s, [TeacherSummary(x.value, (B + 1, *x.shape[1:])) for x in summaries])


def test_losses_that_need_teacher_tensors_reject_summaries(feats):
    _, _, s, t = feats
    with pytest.raises(ValueError, match="needs teacher tensors"):
        OutputImitation()(s, [TeacherSummary(None, x.shape) for x in t])
