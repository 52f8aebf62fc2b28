"""Coil sensitivity estimation from the auto-calibration signal (ACS), no learned parameters.

The fully sampled k-space centre gives low-resolution coil images; dividing each by their
root-sum-of-squares gives smooth maps with ``sum_c |S_c|^2 = 1`` wherever there is signal
(the normalisation fastMRI's VarNet applies to its learned maps; cf. Sriram et al.,
"End-to-End Variational Networks for Accelerated MRI Reconstruction", MICCAI 2020, whose
sensitivity network starts from the same ACS estimate).
"""

from __future__ import annotations

import fastmri
import torch
from torch import Tensor

from .fourier import ifft2c_columns

__all__ = ["estimate_sensitivity_maps"]


def estimate_sensitivity_maps(
    masked_kspace: Tensor, mask: Tensor, num_low_frequencies: int, eps: float = 1e-6
) -> Tensor:
    """Estimate coil sensitivities from the ACS lines.

    Args:
        masked_kspace: ``(coils, H, W, 2)`` acquired k-space.
        mask: ``(1, 1, W, 1)`` sampling mask (used when ``num_low_frequencies`` is 0).
        num_low_frequencies: number of fully sampled centre columns.
        eps: relative floor of the root-sum-of-squares, against division by zero.

    Returns:
        ``(coils, H, W, 2)`` maps with ``sum_c |S_c|^2 = 1`` where there is signal.

    Raises:
        ValueError: the mask samples none of the centre columns.
    """
    num_cols = masked_kspace.shape[-2]
    num_low = int(num_low_frequencies)
    if num_low <= 0:
        # No known ACS: fall back to the sampled columns nearest the centre (at least 8).
        num_low = max(8, num_cols // 16)
    num_low = min(num_low, num_cols)
    start = (num_cols - num_low + 1) // 2  # fastMRI's centre-mask placement
    columns = torch.arange(start, start + num_low, device=masked_kspace.device)
    sampled = mask.reshape(-1).to(torch.bool)[columns]
    columns = columns[sampled]  # ACS columns the mask really acquired
    if columns.numel() == 0:
        raise ValueError(
            f"the mask samples none of the {num_low} centre columns "
            f"{start}..{start + num_low - 1} of {num_cols}: coil sensitivities are estimated "
            "from a sampled centre (ACS), so multi-coil data need a mask with one"
        )
    k = torch.view_as_complex(masked_kspace.contiguous())
    coil_images = ifft2c_columns(k, columns)  # low-resolution coil images (coils, H, W)
    rss = fastmri.rss_complex(torch.view_as_real(coil_images), dim=0)
    floor = eps * rss.max().clamp_min(torch.finfo(rss.dtype).tiny)
    return torch.view_as_real(coil_images / rss.clamp_min(floor))
