import fastmri
import pytest
import torch

from sftkd_fastmri.models import DataConsistency

from .helpers import random_batch


def _kspace_of(image, sens):
    from sftkd_fastmri.models.data_consistency import channels_to_complex, sens_expand

    return fastmri.fft2c(sens_expand(channels_to_complex(image), sens))


def test_hard_dc_keeps_sampled_kspace_exactly():
    # single coil: sampled points equal the data, unsampled keep the estimate (multi-coil
    # SENSE DC is no projection; it is checked against its definition below)
    masked, mask, sens, _ = random_batch(coils=1, seed=1)
    dc = DataConsistency(chans=2, mode="hard")
    x = torch.randn(2, 2, 13, 10)
    out = dc(x, masked, mask, sens)
    k = _kspace_of(out, sens)
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
    dc = DataConsistency(2, "hard")
    out = dc(image.permute(0, 3, 1, 2), kspace * mask, mask, sens)
    torch.testing.assert_close(out, image.permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)
    # ... and an image that disagrees with the data is moved towards it
    wrong = image.permute(0, 3, 1, 2) + torch.randn(2, 2, 13, 10, generator=g)
    moved = dc(wrong, kspace * mask, mask, sens)
    before = (wrong - image.permute(0, 3, 1, 2)).norm()
    assert (moved - image.permute(0, 3, 1, 2)).norm() < 0.9 * before


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


@pytest.mark.parametrize("size", [(12, 10), (13, 11)], ids=["even", "odd"])
@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("chans", [1, 2])
@pytest.mark.parametrize("coils", [1, 3])
def test_dc_equals_its_definition_with_fastmri_centred_ffts(mode, chans, coils, size):
    # Even H and W take the shift-free path, odd ones the centred one; both must equal the
    # definition with fastMRI's centred FFTs (fastmri.fft2c / ifft2c), in value and gradient.
    masked, mask, sens, _ = random_batch(coils=coils, height=size[0], width=size[1], seed=11)
    dc = DataConsistency(chans, mode, init_lambda=2.5)
    x = torch.randn(2, chans, *size, requires_grad=True)
    out = dc(x, masked, mask, sens)
    kspace = fastmri.fft2c(sens_expand_of(x, sens))
    sampled = mask.to(torch.bool)
    if mode == "hard":
        kspace = torch.where(sampled, masked, kspace)
    else:
        kspace = torch.where(sampled, (kspace + 2.5 * masked) / 3.5, kspace)
    coil_images = fastmri.ifft2c(kspace)
    if sens is None:
        combined = coil_images[:, 0]
    else:
        combined = fastmri.complex_mul(coil_images, fastmri.complex_conj(sens)).sum(dim=1)
    expected = combined.permute(0, 3, 1, 2)[:, :chans]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


def sens_expand_of(x, sens):
    from sftkd_fastmri.models.data_consistency import channels_to_complex, sens_expand

    return sens_expand(channels_to_complex(x), sens)


def test_full_sampling_pattern_mask_and_lower_rank_masks():
    # A mask that varies along H and W (2-D pattern) and masks with fewer leading dimensions.
    g = torch.Generator().manual_seed(12)
    kspace = torch.randn(2, 1, 8, 6, 2, generator=g)
    pattern = torch.rand(8, 6, 1, generator=g) > 0.5
    x = torch.randn(2, 2, 8, 6, generator=g)
    dc = DataConsistency(2, "hard")
    out = dc(x, kspace * pattern, pattern)
    k = _kspace_of(out, None)
    torch.testing.assert_close(k * pattern, kspace * pattern, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k * ~pattern, _kspace_of(x, None) * ~pattern, atol=1e-5, rtol=1e-5)


def test_half_precision_estimate_gets_float32_data_consistency():
    # Under 16-bit autocast the block's output may be float16; DC runs its FFTs in float32.
    masked, mask, _, _ = random_batch(height=12, width=10, seed=13)
    x = torch.randn(2, 2, 12, 10)
    dc = DataConsistency(2, "hard")
    out = dc(x.half(), masked, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, dc(x.half().float(), masked, mask))


def test_traced_layer_keeps_the_size_generic_definition():
    # A trace records one code path; while tracing, DC uses the centred transforms, so a trace
    # made at an even size also holds at an odd one.
    masked, mask, _, _ = random_batch(height=12, width=10, seed=14)
    dc = DataConsistency(2, "hard")
    x = torch.randn(2, 2, 12, 10)
    traced = torch.jit.trace(dc, (x, masked, mask), check_trace=False)
    odd_masked, odd_mask, _, _ = random_batch(height=13, width=9, seed=15)
    y = torch.randn(2, 2, 13, 9)
    torch.testing.assert_close(traced(y, odd_masked, odd_mask), dc(y, odd_masked, odd_mask))


@pytest.mark.parametrize("height", [12, 13])
def test_multi_coil_kspace_without_sensitivity_maps_is_refused(height):
    masked, mask, _, _ = random_batch(coils=3, height=height, width=10, seed=16)
    with pytest.raises(ValueError, match="3 coils.*sensitivity maps"):
        DataConsistency(2, "hard")(torch.randn(2, 2, height, 10), masked, mask, None)


@pytest.mark.parametrize("chans", [1, 2])
def test_complex_to_channels_puts_the_channels_innermost(chans):
    """Channels-last for one channel too (stride 1 on the channel axis), so oneDNN keeps the
    blocks' activations channels-last; the values are the real (and imaginary) parts."""
    from sftkd_fastmri.models.data_consistency import complex_to_channels

    image = torch.randn(2, 5, 7, 2)
    out = complex_to_channels(image, chans)
    assert out.shape == (2, chans, 5, 7) and out.stride(1) == 1
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, image.permute(0, 3, 1, 2)[:, :chans])
