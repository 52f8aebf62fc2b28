"""Random k-space batches for model tests."""

from __future__ import annotations

import fastmri
import torch


def random_sens(batch: int, coils: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth-ish random coil maps ``(B, coils, H, W, 2)`` with ``sum_c |S_c|^2 = 1``."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, coils, height, width, 2, generator=g, dtype=torch.float64)
    rss = fastmri.rss_complex(s, dim=1).unsqueeze(1).unsqueeze(-1)
    return (s / rss).float()


def random_batch(batch=2, coils=1, height=13, width=10, accel=3, seed=0):
    """(masked_kspace, mask, sens_maps or None, full_kspace) on odd, non-square sizes."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, height, width, 2, generator=g)
    sens = random_sens(batch, coils, height, width, seed) if coils > 1 else None
    coil_images = (
        image.unsqueeze(1) if sens is None else fastmri.complex_mul(image.unsqueeze(1), sens)
    )
    kspace = fastmri.fft2c(coil_images)
    mask = torch.zeros(batch, 1, 1, width, 1, dtype=torch.bool)
    mask[..., ::accel, :] = True
    mask[..., width // 2 - 1 : width // 2 + 2, :] = True
    return kspace * mask, mask, sens, kspace
