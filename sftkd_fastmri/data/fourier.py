"""Centred 2-D inverse FFT of k-space that is zero outside some phase-encode columns.

Undersampled k-space (and its ACS part) is zero on most columns; the transform
:func:`fastmri.ifft2c` computes anyway, with two full-size copies per centring shift.
"""

from __future__ import annotations

import fastmri
import torch
from torch import Tensor

__all__ = ["ifft2c_columns"]


def ifft2c_columns(kspace: Tensor, columns: Tensor) -> Tensor:
    """:func:`fastmri.ifft2c` (centred, orthonormal) of the columns ``columns`` of a complex
    ``(..., H, W)`` k-space, the others taken as zero.

    The 2-D transform is separable: the inverse transform along H runs on the given columns
    only, and the centring shifts along W, which would copy the full array twice, act on those
    columns alone. For an even ``W`` a roll by ``W / 2`` after an inverse DFT is a modulation
    of its input by ``(-1)^p``, so each column is placed at its shifted position ``p`` with
    that sign and one unshifted inverse DFT along W finishes the transform. Odd ``W`` takes
    the full transform.

    Args:
        kspace: complex ``(..., H, W)`` k-space.
        columns: 1-D integer tensor of column indices (W axis) to keep.

    Returns:
        complex ``(..., H, W)`` image.
    """
    width = kspace.shape[-1]
    if columns.numel() == 0:
        return torch.zeros_like(kspace)
    if width % 2:
        kept = torch.zeros_like(kspace)
        kept[..., columns] = kspace[..., columns]
        return torch.view_as_complex(fastmri.ifft2c(torch.view_as_real(kept)).contiguous())
    part = kspace.index_select(-1, columns)  # (..., H, L)
    part = torch.fft.fftshift(
        torch.fft.ifft(torch.fft.ifftshift(part, dim=-2), dim=-2, norm="ortho"), dim=-2
    )
    position = (columns + width // 2) % width  # ifftshift along W
    sign = (1 - 2 * (position % 2)).to(part.real.dtype)  # fftshift along W, moved to the input
    rows = kspace.new_zeros(kspace.shape)
    rows[..., position] = part * sign
    return torch.fft.ifft(rows, dim=-1, norm="ortho")
