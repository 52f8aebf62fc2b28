"""Volume metrics with fastMRI's conventions, plus HFEN.

NMSE, PSNR and SSIM come from :mod:`fastmri.evaluate` (volume-wise, data range = the volume's
``max`` attribute, SSIM with a 7 x 7 window averaged over slices) - the convention of the
fastMRI leaderboard (Zbontar et al., arXiv 1811.08839) and of the SFT-KD-Recon paper.
The volumes are scored at the size given (the target's); fastMRI's ``evaluate.py`` script
first crops both to a centred ``W x W`` square, which changes nothing for the 320 x 320
knee and brain targets but does for non-square ones such as the demo's (brain FLAIR volumes,
whose images are 320 x 203: see the README, "Real fastMRI data").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from fastmri import evaluate as fm_eval

__all__ = ["VolumeMetrics", "hfen", "log_kernel", "summarize", "volume_metrics"]


def log_kernel(size: int = 15, sigma: float = 1.5) -> np.ndarray:
    """Zero-mean Laplacian-of-Gaussian kernel ``(size, size)``."""
    half = size // 2
    y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    r2 = (x**2 + y**2) / (2 * sigma**2)
    kernel = -(1.0 / (math.pi * sigma**4)) * (1 - r2) * np.exp(-r2)
    return kernel - kernel.mean()


def hfen(gt: np.ndarray, pred: np.ndarray, size: int = 15, sigma: float = 1.5) -> float:
    """High-frequency error norm of Ravishankar & Bresler, "MR Image Reconstruction From Highly
    Undersampled k-Space Data by Dictionary Learning", IEEE TMI 2011:
    ``||LoG(pred) - LoG(gt)||_2 / ||LoG(gt)||_2`` with a 15 x 15 LoG filter, sigma 1.5, applied
    slice by slice to a volume ``(slices, H, W)`` (zero padding at the borders).
    """
    kernel = torch.from_numpy(log_kernel(size, sigma))[None, None]
    g = torch.from_numpy(np.asarray(gt, dtype=np.float64))[:, None]
    p = torch.from_numpy(np.asarray(pred, dtype=np.float64))[:, None]
    log_g = F.conv2d(g, kernel, padding=size // 2)
    log_p = F.conv2d(p, kernel, padding=size // 2)
    return float(torch.linalg.vector_norm(log_p - log_g) / torch.linalg.vector_norm(log_g))


@dataclass
class VolumeMetrics:
    """Metrics of one volume."""

    fname: str
    num_slices: int
    nmse: float
    psnr: float
    ssim: float
    hfen: float

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)

    def as_json_dict(self) -> Dict[str, Optional[float]]:
        """:meth:`as_dict` for strict JSON: a number that is not finite becomes ``None``
        (``null``), as in the study's ``report.json``. The one that occurs is the PSNR of a
        reconstruction equal to its target (no error: ``inf``); JSON has no infinity, and
        Python's ``json`` would write ``Infinity``, which strict readers refuse."""
        return {
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in asdict(self).items()
        }


def volume_metrics(
    fname: str, gt: np.ndarray, pred: np.ndarray, max_value: Optional[float] = None
) -> VolumeMetrics:
    """fastMRI metrics of a volume ``(slices, H, W)``; ``max_value`` (the data range of PSNR
    and SSIM, the file's ``max`` attribute) defaults to ``gt.max()``.

    Raises:
        ValueError: naming ``fname``, for volumes of other shapes, an all-zero target, a
            target or reconstruction holding NaN or Inf (their metrics would be NaN), or a
            ``max_value`` that is not a finite number > 0.
    """
    gt = np.asarray(gt, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if gt.shape != pred.shape:
        raise ValueError(f"{fname}: target {gt.shape} and reconstruction {pred.shape} differ")
    if not np.isfinite(gt).all():
        raise ValueError(
            f"{fname}: the target holds NaN or Inf ({_slices(gt)}); its metrics would be NaN"
        )
    if not np.any(gt):
        raise ValueError(f"{fname}: the target volume is all zero; there is nothing to score")
    if not np.isfinite(pred).all():
        raise ValueError(
            f"{fname}: the reconstruction holds NaN or Inf ({_slices(pred)}); a diverged "
            "model? Its metrics would be NaN"
        )
    maxval = _data_range(fname, gt, max_value)
    with np.errstate(divide="ignore"):  # a reconstruction equal to its target: PSNR inf
        psnr = _scalar(fm_eval.psnr(gt, pred, maxval))
    return VolumeMetrics(
        fname=fname,
        num_slices=int(gt.shape[0]),
        nmse=_scalar(fm_eval.nmse(gt, pred)),
        psnr=psnr,
        ssim=_scalar(fm_eval.ssim(gt, pred, maxval)),  # fastMRI returns a (1,) array
        hfen=hfen(gt, pred),
    )


def _slices(volume: np.ndarray) -> str:
    """The slices of ``volume`` that hold NaN or Inf, for an error: ``slices [0, 3]``."""
    bad = sorted({int(i) for i in np.nonzero(~np.isfinite(volume))[0]})
    return f"slices {bad[:8]}{' ...' if len(bad) > 8 else ''}"


def _data_range(fname: str, gt: np.ndarray, max_value: Optional[float]) -> float:
    """The data range of PSNR and SSIM: ``max_value``, else the target's maximum; either
    must be a finite number > 0 (NaN gave NaN metrics; 0 or less was quietly replaced by
    the target's maximum, scoring the volume with another range than asked)."""
    if max_value is None:
        value, what = float(gt.max()), "the target's maximum"
    else:
        try:
            value = float(max_value)
        except (TypeError, ValueError):
            value = math.nan
        what = "max_value (the volume's 'max' attribute)"
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{fname}: {what} is {max_value if max_value is not None else value!r}; expected "
            "a finite number > 0, the data range of PSNR and SSIM"
        )
    return value


def _scalar(value) -> float:
    return float(np.asarray(value, dtype=np.float64).reshape(-1)[0])


def summarize(rows: Iterable[VolumeMetrics]) -> Dict[str, float]:
    """Mean and (population) standard deviation over volumes of every metric."""
    rows = list(rows)
    out: Dict[str, float] = {"volumes": float(len(rows))}
    for key in ("nmse", "psnr", "ssim", "hfen"):
        values: List[float] = [getattr(r, key) for r in rows]
        out[f"{key}_mean"] = float(np.mean(values)) if values else float("nan")
        out[f"{key}_std"] = float(np.std(values)) if values else float("nan")
    return out
