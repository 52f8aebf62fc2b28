"""FLOPs, latency, peak memory and parameter counts of :mod:`sftkd_fastmri.evaluation.profile`."""

from __future__ import annotations

import math

import fastmri
import pytest
import torch
from torch import nn

from sftkd_fastmri.evaluation.profile import (
    count_flops,
    count_parameters,
    fft_flops,
    measure_latency,
    measure_peak_memory,
    profile_model,
)
from sftkd_fastmri.models import DCCNN, create_model


def kspace_inputs(batch: int, coils: int, height: int, width: int):
    """``(masked_kspace, mask, sens_maps or None)`` on odd, non-square sizes."""
    g = torch.Generator().manual_seed(0)
    kspace = torch.randn(batch, coils, height, width, 2, generator=g)
    mask = torch.zeros(batch, 1, 1, width, 1, dtype=torch.bool)
    mask[..., ::3, :] = True
    sens = None
    if coils > 1:
        sens = torch.randn(batch, coils, height, width, 2, generator=g)
        sens = sens / fastmri.rss_complex(sens, dim=1)[:, None, ..., None]
    return kspace * mask, mask, sens


class FFT2c(nn.Module):
    def forward(self, x):
        return fastmri.fft2c(x)


def test_conv_flops_match_analytic_count():
    # torch's counter: a multiply-add is 2 FLOPs, bias not counted -> 2 Cin Cout k^2 H W.
    conv = nn.Conv2d(3, 5, 3, padding=1)
    flops = count_flops(conv, torch.randn(2, 3, 10, 7))
    assert flops["conv_matmul"] == 2 * 3 * 5 * 9 * 10 * 7
    assert flops["fft"] == 0
    assert flops["total"] == flops["conv_matmul"]
    assert flops["batch_size"] == 2


def test_fft2c_flops_follow_5_n_log2_n():
    x = torch.randn(2, 4, 10, 6, 2)  # 2 slices, 4 coils, a 10 x 6 2-D FFT each
    flops = count_flops(FFT2c(), (x,))
    n = 10 * 6
    assert flops["fft"] == pytest.approx(4 * 5 * n * math.log2(n))
    assert flops["conv_matmul"] == 0
    assert fft_flops(n, 4) == pytest.approx(flops["fft"])


def test_real_ffts_count_half():
    class RealFFT(nn.Module):
        def forward(self, x):
            return torch.fft.irfft2(torch.fft.rfft2(x), s=x.shape[-2:])

    flops = count_flops(RealFFT(), torch.randn(3, 8, 16))
    assert flops["fft"] == pytest.approx(2 * 2.5 * 128 * 7)


@pytest.mark.parametrize(
    "config, coils",
    [
        (dict(num_cascades=3, depth=3, chans=4, in_chans=2), 3),  # complex, multi-coil SENSE
        (dict(num_cascades=2, depth=2, chans=5, in_chans=1, residual=False, pad=2), 1),  # paper
    ],
)
def test_dccnn_flops_from_config(config, coils):
    model = DCCNN(**config)
    height, width = 12, 9
    flops = count_flops(model, kspace_inputs(2, coils, height, width))

    c = model.config
    widths = [c["in_chans"]] + [c["chans"]] * (c["depth"] - 1) + [c["in_chans"]]
    pixels = (height + 2 * c["pad"]) * (width + 2 * c["pad"])  # blocks see the padded image
    conv = c["num_cascades"] * sum(2 * a * b * 9 * pixels for a, b in zip(widths, widths[1:]))
    # One ifft2c for the zero-filled start, then fft2c + ifft2c per cascade, per coil.
    num_ffts = coils * (1 + 2 * c["num_cascades"])
    n = height * width
    assert flops["conv_matmul"] == conv
    assert flops["fft"] == pytest.approx(num_ffts * 5 * n * math.log2(n))
    assert flops["total"] == pytest.approx(conv + flops["fft"])


def test_flops_are_per_slice():
    model = DCCNN(num_cascades=1, depth=2, chans=4)
    one = count_flops(model, kspace_inputs(1, 1, 8, 6))
    three = count_flops(model, kspace_inputs(3, 1, 8, 6))
    assert one["total"] == pytest.approx(three["total"])


def test_latency_is_positive():
    model = DCCNN(num_cascades=1, depth=2, chans=4)
    latency = measure_latency(model, kspace_inputs(2, 1, 8, 6), warmup=1, repeats=3)
    assert 0 < latency["min_s"] <= latency["median_s"]
    # population statistics of the three per-slice times: the mean lies above the minimum,
    # and no time is further from the mean than sqrt(n - 1) standard deviations
    assert latency["min_s"] <= latency["mean_s"]
    assert latency["mean_s"] - latency["min_s"] <= 2**0.5 * latency["std_s"] + 1e-12
    assert latency["batch_size"] == 2 and latency["repeats"] == 3
    assert latency["device"] == "cpu"


class SlowStart(nn.Module):
    """Its first ``slow`` forwards take 50 ms more (what a process sets up once)."""

    def __init__(self, slow: int):
        super().__init__()
        self.calls, self.slow = 0, slow

    def forward(self, x):
        import time

        self.calls += 1
        if self.calls <= self.slow:
            time.sleep(0.05)
        return x * 2


def test_warm_up_lasts_long_enough_for_a_slow_start():
    """One or three warm-up forwards did not cover a slow start: the timed ones were charged
    for it (the first network a process timed looked many times slower)."""
    model = SlowStart(slow=3)  # 150 ms of slow start
    latency = measure_latency(model, torch.ones(1, 4), warmup=1, repeats=5, warmup_s=0.25)
    # every slow forward fell in the warm-up, none among the five timed ones (counted, not
    # timed: a loaded machine can stall any forward)
    assert latency["warmup"] >= 4 and model.calls == latency["warmup"] + 5
    # no warm-up asked for: none run, and the slow start is in the times
    model = SlowStart(slow=1)
    latency = measure_latency(model, torch.ones(1, 4), warmup=0, repeats=3)
    assert latency["warmup"] == 0 and latency["max_s"] > 0.04 and model.calls == 3


class Temporaries(nn.Module):
    """``y`` (N floats) and ``z`` (N/2, computed from a view of y) are alive together."""

    def forward(self, x):
        y = x * 2
        view = y[::2]  # a view: no new memory
        return view + 1


class Chain(nn.Module):
    """Each step frees the previous temporary, so at most two are alive at once."""

    def forward(self, x):
        for _ in range(5):
            x = x * 2
        return x


def test_cpu_peak_memory_counts_new_storages_only():
    x = torch.randn(256, 128)  # 128 KiB, not counted: allocated before the forward
    mib = x.nbytes / 2**20
    assert measure_peak_memory(Temporaries(), x) == pytest.approx(1.5 * mib)
    assert measure_peak_memory(Chain(), x) == pytest.approx(2 * mib)


def test_count_parameters_matches_preset_docs():
    assert count_parameters(create_model("dccnn_d3c5")) == 52_170
    model = nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    assert count_parameters(model) == 8
    assert count_parameters(model, trainable_only=True) == 6


@pytest.mark.parametrize("coils", [1, 3])
def test_profile_model_single_and_multi_coil(coils):
    model = DCCNN(num_cascades=2, depth=2, chans=4).train()
    model.cascades[0].eval()  # a frozen part kept in eval mode
    inputs = kspace_inputs(2, coils, 10, 7)
    profile = profile_model(model, inputs, "cpu", warmup=0, repeats=2)
    # every module's own mode restored (the top module's was given to all before)
    assert model.training and model.cascades[1].training
    assert not any(m.training for m in model.cascades[0].modules())
    # two cascades of conv 2->4 and conv 4->2 (3x3, with bias); hard DC has no parameters
    assert profile["params"] == 2 * ((2 * 4 * 9 + 4) + (4 * 2 * 9 + 2))
    assert profile["flops"]["fft"] > 0 and profile["flops"]["conv_matmul"] > 0
    assert profile["latency"]["median_s"] > 0
    assert profile["peak_memory_mib"] > 0
    assert profile["batch_size"] == 2
    assert profile["input_shapes"]["2"] == (None if coils == 1 else [2, coils, 10, 7, 2])


def test_bad_inputs_raise():
    with pytest.raises(TypeError, match="example_inputs"):
        count_flops(nn.Identity(), 3.0)
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(nn.Identity(), torch.zeros(1), repeats=0)
