"""Data-consistency layers for cascaded reconstruction networks.

Layout conventions used throughout :mod:`sftkd_fastmri.models`:

* image state: real tensor ``(B, C, H, W)``; ``C == 2`` holds (real, imaginary) of a complex
  image, ``C == 1`` a real image;
* k-space: fastMRI layout ``(B, coils, H, W, 2)`` (complex as a trailing dimension of 2),
  ``coils == 1`` for single-coil data; centred, orthonormal FFT (:func:`fastmri.fft2c`);
* mask: broadcastable to the k-space, typically ``(B, 1, 1, W, 1)``; non-zero = sampled;
* sensitivity maps: ``(B, coils, H, W, 2)`` or ``None`` for single-coil data.
"""

from __future__ import annotations

import math
from typing import Optional

import fastmri
import torch
from torch import Tensor, nn

__all__ = [
    "DataConsistency",
    "channels_to_complex",
    "complex_to_channels",
    "sens_expand",
    "sens_reduce",
]


def channels_to_complex(image: Tensor) -> Tensor:
    """``(B, C, H, W)`` with C in {1, 2} -> complex-last ``(B, H, W, 2)``."""
    if image.shape[1] == 2:
        return image.permute(0, 2, 3, 1)
    if image.shape[1] == 1:
        real = image[:, 0]
        return torch.stack((real, torch.zeros_like(real)), dim=-1)
    raise ValueError(f"expected an image of 1 or 2 channels (B, C, H, W), got {tuple(image.shape)}")


def complex_to_channels(image: Tensor, chans: int) -> Tensor:
    """Complex-last ``(B, H, W, 2)`` -> ``(B, chans, H, W)``; one channel keeps the real part."""
    if chans == 2:
        return image.permute(0, 3, 1, 2)
    if chans == 1:
        return image[..., 0].unsqueeze(1)
    raise ValueError(f"chans must be 1 or 2, got {chans}")


def sens_expand(image: Tensor, sens_maps: Optional[Tensor]) -> Tensor:
    """Complex image ``(B, H, W, 2)`` -> coil images ``(B, coils, H, W, 2)``."""
    if sens_maps is None:
        return image.unsqueeze(1)
    return fastmri.complex_mul(image.unsqueeze(1), sens_maps)


def sens_reduce(coil_images: Tensor, sens_maps: Optional[Tensor]) -> Tensor:
    """Coil images ``(B, coils, H, W, 2)`` -> combined complex image ``(B, H, W, 2)``.

    With sensitivity maps normalised to ``sum_c |S_c|^2 = 1`` this is the adjoint of
    :func:`sens_expand` and its left inverse.
    """
    if sens_maps is None:
        if coil_images.shape[1] != 1:
            raise ValueError(
                f"multi-coil k-space ({coil_images.shape[1]} coils) needs sensitivity maps"
            )
        return coil_images[:, 0]
    return fastmri.complex_mul(coil_images, fastmri.complex_conj(sens_maps)).sum(dim=1)


class DataConsistency(nn.Module):
    """Data-consistency (DC) layer of Schlemper et al., "A Deep Cascade of Convolutional
    Neural Networks for Dynamic MR Image Reconstruction", IEEE TMI 2018 (arXiv 1704.02422).

    For each coil image ``c = S x`` with k-space ``k = F c`` and acquired samples ``y`` on the
    mask ``M``:

    * hard DC (noise-free case): ``k' = (1 - M) k + M y``;
    * soft DC (noisy case): ``k' = (1 - M) k + M (k + lam y) / (1 + lam)`` with a learnable
      ``lam >= 0``. The weighted average is applied on sampled points only; unsampled points
      keep the network's prediction (a slip seen in one public implementation applies the
      noisy formula everywhere, which shrinks unsampled k-space by ``1 / (1 + lam)``).

    Multi-coil data use SENSE: the image is expanded with the coil sensitivities, DC is applied
    per coil and the coils are combined with the conjugate sensitivities. A one-channel image
    keeps only the real part of the result, as in the SFT-KD-Recon authors' code.

    Args:
        chans: 1 (real image) or 2 (complex image as real/imaginary channels).
        mode: ``"hard"`` or ``"soft"``.
        init_lambda: initial ``lam`` for soft DC (stored as a log, so it stays positive).
    """

    def __init__(self, chans: int = 2, mode: str = "hard", init_lambda: float = 1.0):
        super().__init__()
        if chans not in (1, 2):
            raise ValueError(f"chans must be 1 or 2, got {chans}")
        if mode not in ("hard", "soft"):
            raise ValueError(f"DC mode must be 'hard' or 'soft', got {mode!r}")
        if mode == "soft" and init_lambda <= 0:
            raise ValueError(f"init_lambda must be > 0, got {init_lambda}")
        self.chans = chans
        self.mode = mode
        if mode == "soft":
            self.log_lambda = nn.Parameter(torch.tensor(math.log(init_lambda)))

    @property
    def lam(self) -> Optional[Tensor]:
        """The soft-DC weight (``None`` for hard DC)."""
        return self.log_lambda.exp() if self.mode == "soft" else None

    def forward(
        self,
        image: Tensor,
        masked_kspace: Tensor,
        mask: Tensor,
        sens_maps: Optional[Tensor] = None,
    ) -> Tensor:
        """Args:
            image: ``(B, C, H, W)`` network estimate.
            masked_kspace: ``(B, coils, H, W, 2)`` acquired k-space (zeros where unsampled).
            mask: broadcastable to the k-space; non-zero where sampled.
            sens_maps: ``(B, coils, H, W, 2)`` or ``None`` for single-coil data.

        Returns:
            ``(B, C, H, W)`` data-consistent image.
        """
        kspace = fastmri.fft2c(sens_expand(channels_to_complex(image), sens_maps))
        sampled = mask.to(torch.bool)
        if self.mode == "hard":
            kspace = torch.where(sampled, masked_kspace, kspace)
        else:
            lam = self.lam
            kspace = torch.where(sampled, (kspace + lam * masked_kspace) / (1 + lam), kspace)
        combined = sens_reduce(fastmri.ifft2c(kspace), sens_maps)
        return complex_to_channels(combined, self.chans)

    def extra_repr(self) -> str:
        return f"chans={self.chans}, mode={self.mode!r}"
