import fastmri
import pytest
import torch

from sftkd_fastmri.models import DataConsistency

from .helpers import random_batch


def _kspace_of(image, sens):
    from sftkd_fastmri.models.data_consistency import channels_to_complex, sens_expand

    return fastmri.fft2c(sens_expand(channels_to_complex(image), sens))


@pytest.mark.parametrize("coils", [1, 4])
def test_hard_dc_keeps_sampled_kspace_exactly(coils):
    masked, mask, sens, _ = random_batch(coils=coils, seed=1)
    dc = DataConsistency(chans=2, mode="hard")
    x = torch.randn(2, 2, 13, 10)
    out = dc(x, masked, mask, sens)
    k = _kspace_of(out, sens)
    if coils == 1:
        # single coil: sampled points equal the data, unsampled keep the estimate
        torch.testing.assert_close(k * mask, masked, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k * ~mask, _kspace_of(x, None) * ~mask, atol=1e-5, rtol=1e-5)
        # idempotent: a second DC changes nothing
        torch.testing.assert_close(dc(out, masked, mask, sens), out, atol=1e-5, rtol=1e-5)


def test_sense_dc_keeps_a_consistent_image():
    # SENSE DC (expand, per-coil DC, combine) is not a projection, but an image that already
    # agrees with the data is a fixed point when sum_c |S_c|^2 = 1.
    g = torch.Generator().manual_seed(7)
    image = torch.randn(2, 13, 10, 2, generator=g)
    from .helpers import random_sens

    sens = random_sens(2, 4, 13, 10, seed=7)
    kspace = fastmri.fft2c(fastmri.complex_mul(image.unsqueeze(1), sens))
    mask = torch.zeros(2, 1, 1, 10, 1, dtype=torch.bool)
    mask[..., ::2, :] = True
    out = DataConsistency(2, "hard")(image.permute(0, 3, 1, 2), kspace * mask, mask, sens)
    torch.testing.assert_close(out, image.permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)


def test_soft_dc_large_weight_approaches_hard():
    masked, mask, _, _ = random_batch(seed=2)
    x = torch.randn(2, 2, 13, 10)
    hard = DataConsistency(2, "hard")(x, masked, mask)
    soft_big = DataConsistency(2, "soft", init_lambda=1e6)(x, masked, mask)
    soft_small = DataConsistency(2, "soft", init_lambda=1e-6)(x, masked, mask)
    torch.testing.assert_close(soft_big, hard, atol=1e-4, rtol=1e-4)
    # with lam -> 0 the estimate is kept everywhere
    torch.testing.assert_close(soft_small, x, atol=1e-4, rtol=1e-4)


def test_soft_dc_applies_weight_on_sampled_points_only():
    masked, mask, _, _ = random_batch(seed=3)
    x = torch.randn(2, 2, 13, 10)
    dc = DataConsistency(2, "soft", init_lambda=3.0)
    k_out = _kspace_of(dc(x, masked, mask), None)
    k_in = _kspace_of(x, None)
    torch.testing.assert_close(k_out * ~mask, k_in * ~mask, atol=1e-5, rtol=1e-5)
    expected = (k_in + 3.0 * masked) / 4.0
    torch.testing.assert_close(k_out * mask, expected * mask, atol=1e-5, rtol=1e-5)
    assert dc.lam.item() == pytest.approx(3.0)


def test_one_channel_keeps_real_part():
    masked, mask, _, _ = random_batch(seed=4)
    x = torch.randn(2, 1, 13, 10)
    out = DataConsistency(1, "hard")(x, masked, mask)
    assert out.shape == (2, 1, 13, 10)
    full = DataConsistency(2, "hard")(torch.cat([x, torch.zeros_like(x)], 1), masked, mask)
    torch.testing.assert_close(out[:, 0], full[:, 0])


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("coils", [1, 3])
def test_gradcheck(mode, coils):
    masked, mask, sens, _ = random_batch(batch=1, coils=coils, height=5, width=4, accel=2, seed=5)
    masked = masked.double()
    sens = None if sens is None else sens.double()
    dc = DataConsistency(2, mode).double()
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dc(t, masked, mask, sens), (x,))
    if mode == "soft":
        # gradient with respect to the learnable weight, through a functional call
        def with_log_lambda(log_lam):
            params = {"log_lambda": log_lam}
            return torch.func.functional_call(dc, params, (x.detach(), masked, mask, sens))

        log_lam = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(with_log_lambda, (log_lam,))


def test_bad_arguments():
    with pytest.raises(ValueError, match="chans"):
        DataConsistency(chans=3)
    with pytest.raises(ValueError, match="mode"):
        DataConsistency(mode="medium")
