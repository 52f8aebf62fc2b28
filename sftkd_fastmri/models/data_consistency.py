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
from typing import Optional, Tuple

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
    """Complex-last ``(B, H, W, 2)`` -> ``(B, chans, H, W)``; one channel keeps the real part.

    Both come out in the channels-last layout (the two-channel image as a view), so the
    blocks' convolutions keep their activations channels-last, where
    :class:`~sftkd_fastmri.models.conv.BlockConv2d` computes its gradients on the CPU. A
    one-channel tensor with NCHW strides would make oneDNN write NCHW activations."""
    if chans == 2:
        return image.permute(0, 3, 1, 2)
    if chans == 1:
        return image[..., :1].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
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


def _tracing() -> bool:
    """Whether the model is being traced or exported: keep the size-generic definition."""
    is_exporting = getattr(getattr(torch, "compiler", None), "is_exporting", None)  # 2.5+
    return (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or (is_exporting is not None and is_exporting())
    )


def _uncentred_measurements(masked_kspace: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Acquired k-space and sampling mask moved to the uncentred DFT layout (even sizes).

    Returns ``(c * ifftshift(y), ifftshift(M))`` with ``y`` as a complex ``(B, coils, H, W)``
    tensor and ``M`` a boolean mask of ``mask``'s shape without its complex dimension (see
    :meth:`DataConsistency._shift_free`).
    """
    height, width = masked_kspace.shape[-3], masked_kspace.shape[-2]
    acquired = torch.view_as_complex(masked_kspace.contiguous())
    acquired = torch.roll(acquired, (height // 2, width // 2), dims=(-2, -1))
    rows = 1 - 2 * (torch.arange(height, device=acquired.device) % 2)
    cols = 1 - 2 * (torch.arange(width, device=acquired.device) % 2)
    checkerboard = (rows[:, None] * cols[None, :]).to(acquired.real.dtype)
    sampled = mask.to(torch.bool)
    while sampled.dim() < 5:
        sampled = sampled.unsqueeze(0)
    sampled = sampled[..., 0]  # (.., H or 1, W or 1): a mask is the same for real and imag
    sampled = torch.roll(sampled, (height // 2, width // 2), dims=(-2, -1))
    return acquired * checkerboard, sampled


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

    The transforms are fastMRI's centred, orthonormal ones (:func:`fastmri.fft2c` /
    :func:`fastmri.ifft2c`). For even ``H`` and ``W`` the same result is computed without the
    image-domain shifts (see :meth:`_shift_free`): one D5C5 training step is ~3 % faster on
    single-coil 320 x 320 data and ~35 % faster on 15-coil 640 x 320 data on a 2-core CPU.
    Odd sizes, and tracing or exporting, use the definition. The FFTs run in float32 even when
    the block's output is 16-bit (mixed precision).

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
        if sens_maps is None and masked_kspace.shape[1] != 1:
            raise ValueError(
                f"multi-coil k-space ({masked_kspace.shape[1]} coils) needs sensitivity maps"
            )
        if image.dtype in (torch.float16, torch.bfloat16):
            image = image.float()  # FFTs in float32 (under autocast the block may give fp16)
        height, width = masked_kspace.shape[-3], masked_kspace.shape[-2]
        if _tracing() or height % 2 or width % 2:  # tracing first: no parity guard
            return self._centred(image, masked_kspace, mask, sens_maps)
        return self._shift_free(image, masked_kspace, mask, sens_maps)

    def _mix(self, estimate: Tensor, acquired: Tensor, sampled: Tensor) -> Tensor:
        """Hard or soft DC of an estimated k-space against the acquired one (any layout)."""
        if self.mode == "hard":
            return torch.where(sampled, acquired, estimate)
        lam = self.lam
        return torch.where(sampled, (estimate + lam * acquired) / (1 + lam), estimate)

    def _centred(
        self, image: Tensor, masked_kspace: Tensor, mask: Tensor, sens_maps: Optional[Tensor]
    ) -> Tensor:
        """The definition, with fastMRI's centred transforms (any size; traced exports)."""
        kspace = fastmri.fft2c(sens_expand(channels_to_complex(image), sens_maps))
        kspace = self._mix(kspace, masked_kspace, mask.to(torch.bool))
        combined = sens_reduce(fastmri.ifft2c(kspace), sens_maps)
        return complex_to_channels(combined, self.chans)

    def _shift_free(
        self, image: Tensor, masked_kspace: Tensor, mask: Tensor, sens_maps: Optional[Tensor]
    ) -> Tensor:
        """Same result as :meth:`_centred` for even ``H`` and ``W``, without image shifts.

        ``fft2c = fftshift . fft . ifftshift``. For an even length ``N`` both shifts are a
        roll by ``N / 2``, and a roll by ``N / 2`` before a DFT (after an inverse DFT) is a
        modulation of its output (input) by ``(-1)^k``. Hence, with the checkerboard
        ``c[k1, k2] = (-1)^(k1 + k2)``::

            ifft2c(mix(M, y, fft2c(x))) = ifft(mix(ifftshift(M), c * ifftshift(y), fft(x)))

        (``mix`` is pointwise in k-space and linear in its two k-spaces, so the modulation of
        the estimate cancels). The acquired side is shifted once per call instead of rolling
        the image before and after every FFT, in the forward and the backward pass; the
        multi-coil case works per coil image the same way.
        """
        x = torch.view_as_complex(channels_to_complex(image).contiguous())  # (B, H, W)
        if sens_maps is None:
            coils = x.unsqueeze(1)
        else:
            sens = torch.view_as_complex(sens_maps.to(image.dtype).contiguous())
            coils = x.unsqueeze(1) * sens
        estimate = torch.fft.fft2(coils, norm="ortho")
        acquired, sampled = _uncentred_measurements(masked_kspace, mask)
        coils = torch.fft.ifft2(self._mix(estimate, acquired, sampled), norm="ortho")
        combined = coils[:, 0] if sens_maps is None else (coils * sens.conj()).sum(dim=1)
        return complex_to_channels(torch.view_as_real(combined), self.chans)

    def extra_repr(self) -> str:
        return f"chans={self.chans}, mode={self.mode!r}"
