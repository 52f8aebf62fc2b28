"""Reconstruction losses by name: ``"l1"``, ``"l2"`` / ``"mse"``, ``"ssim"``, ``"l1+ssim"``.

Every loss has one signature, ``loss(output, target, data_range) -> scalar`` with
``output`` and ``target`` of shape ``(B, H, W)`` and ``data_range`` of shape ``(B,)`` (the
per-sample maximum in the same units as the images; only SSIM uses it). Knowledge-distillation
losses live in :mod:`sftkd_fastmri.kd`, not here.
"""

from __future__ import annotations

from typing import Tuple

import fastmri
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LOSSES", "L1Loss", "L1SSIMLoss", "MSELoss", "ReconLoss", "SSIMLoss", "create_loss"]


class ReconLoss(nn.Module):
    """Base class: ``forward(output, target, data_range)`` on ``(B, H, W)`` magnitude images."""

    def forward(self, output: Tensor, target: Tensor, data_range: Tensor) -> Tensor:
        raise NotImplementedError


class L1Loss(ReconLoss):
    """Mean absolute error (the SFT-KD-Recon and KD-MRI training loss)."""

    def forward(self, output: Tensor, target: Tensor, data_range: Tensor) -> Tensor:
        del data_range
        return F.l1_loss(output, target)


class MSELoss(ReconLoss):
    """Mean squared error."""

    def forward(self, output: Tensor, target: Tensor, data_range: Tensor) -> Tensor:
        del data_range
        return F.mse_loss(output, target)


class SSIMLoss(ReconLoss):
    """``1 - SSIM`` with a 7x7 uniform window: :class:`fastmri.SSIMLoss` (fastMRI's VarNet loss).

    Args:
        win_size: SSIM window size.
    """

    def __init__(self, win_size: int = 7):
        super().__init__()
        self.ssim = fastmri.SSIMLoss(win_size=win_size)
        # fastMRI registers the window as a persistent buffer, which would put a constant
        # into every checkpoint and make changing the loss break strict checkpoint loading.
        window = self.ssim._buffers.pop("w")
        self.ssim.register_buffer("w", window, persistent=False)

    def forward(self, output: Tensor, target: Tensor, data_range: Tensor) -> Tensor:
        # fastmri.SSIMLoss takes (B, 1, H, W) images and a (B,) data range of their dtype. Its
        # window means are convolutions, which autocast runs in 16 bits, and the variances
        # E[x^2] - E[x]^2 then cancel to garbage (1 - SSIM below 0): float32 here, always.
        with torch.autocast(output.device.type, enabled=False):
            dtype = torch.promote_types(output.dtype, torch.float32)
            output, target = output.to(dtype), target.to(dtype)
            data_range = data_range.to(device=output.device, dtype=dtype)
            return self.ssim(output.unsqueeze(1), target.unsqueeze(1), data_range)


class L1SSIMLoss(ReconLoss):
    """``w * (1 - SSIM) + (1 - w) * L1``, the mixed loss of Zhao et al., "Loss Functions for
    Image Restoration with Neural Networks", IEEE TCI 2017.

    Deviation: Zhao et al. mix L1 with multi-scale SSIM (Gaussian window); this uses fastMRI's
    single-scale SSIM with a 7x7 uniform window, the same SSIM the metrics report.

    Args:
        ssim_weight: ``w`` in [0, 1]; 0.84 as in Zhao et al.
        win_size: SSIM window size.
    """

    def __init__(self, ssim_weight: float = 0.84, win_size: int = 7):
        super().__init__()
        if not 0.0 <= ssim_weight <= 1.0:
            raise ValueError(f"ssim_weight must be in [0, 1], got {ssim_weight}")
        self.ssim_weight = ssim_weight
        self.ssim = SSIMLoss(win_size)

    def forward(self, output: Tensor, target: Tensor, data_range: Tensor) -> Tensor:
        w = self.ssim_weight
        return w * self.ssim(output, target, data_range) + (1 - w) * F.l1_loss(output, target)


LOSSES: Tuple[str, ...] = ("l1", "l2", "mse", "ssim", "l1+ssim")


def create_loss(name: str = "l1", **kwargs) -> ReconLoss:
    """Build a reconstruction loss by name (one of :data:`LOSSES`).

    Args:
        name: ``"l1"`` (default), ``"l2"`` or ``"mse"``, ``"ssim"``, ``"l1+ssim"``.
        **kwargs: passed to the loss (``win_size`` for SSIM losses, ``ssim_weight`` for
            ``"l1+ssim"``).

    Raises:
        ValueError: unknown name.
    """
    key = name.lower().replace(" ", "")
    if key == "l1":
        return L1Loss(**kwargs)
    if key in ("l2", "mse"):
        return MSELoss(**kwargs)
    if key == "ssim":
        return SSIMLoss(**kwargs)
    if key in ("l1+ssim", "ssim+l1"):
        return L1SSIMLoss(**kwargs)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
