"""fastMRI's per-volume metrics of validation and test, accumulated over batches and merged
across DDP ranks (:class:`VolumeMetricAccumulator`), and the test reconstructions written as
fastMRI writes them (:class:`ReconstructionStore`); see :mod:`.recon_module` for the contract
(Zbontar et al., "fastMRI: An Open Dataset and Benchmarks for Accelerated MRI", 2018)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from fastmri import evaluate
from torch import Tensor

from .._io import save_reconstructions_atomic

__all__ = ["METRIC_NAMES", "ReconstructionStore", "VolumeMetricAccumulator"]

METRIC_NAMES = ("nmse", "ssim", "psnr")


# -- distributed helpers --------------------------------------------------------------------
def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather_object(obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` in a single process."""
    if not _is_distributed():
        return [obj]
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _gather_object_to_zero(obj: Any) -> Optional[List[Any]]:
    """Objects of every rank on rank 0 (``None`` elsewhere); ``[obj]`` in a single process."""
    if not _is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def _to_numpy(x: Tensor) -> np.ndarray:
    # float64: per-slice sums over 320 x 320 pixels lose digits in float32
    return x.detach().to("cpu", torch.float64).numpy()


# -- metric accumulation ----------------------------------------------------------------------
class VolumeMetricAccumulator:
    """Per-slice fastMRI metrics, aggregated per volume and then averaged over volumes.

    Slices are keyed by ``(fname, slice_num)``, so a slice seen twice (sampler padding, or
    merged from two ranks) counts once.
    """

    def __init__(self) -> None:
        # fname -> slice_num -> (mse, mean |target|^2, ssim)
        self.slices: Dict[str, Dict[int, Tuple[float, float, float]]] = {}
        self.max_values: Dict[str, float] = {}

    def __len__(self) -> int:
        return len(self.slices)

    def update(
        self,
        fnames: Sequence[str],
        slice_nums: Union[Tensor, Sequence[int]],
        output: Tensor,
        target: Tensor,
        max_values: Union[Tensor, Sequence[float]],
    ) -> None:
        """Add a batch of UNNORMALISED slices.

        Args:
            fnames: ``B`` file names.
            slice_nums: ``(B,)`` slice indices.
            output: ``(B, h, w)`` reconstructions (or ``(h, w)`` for one slice).
            target: ``(B, h, w)`` targets, same shape.
            max_values: ``(B,)`` volume maxima (the SSIM/PSNR data range).
        """
        if output.ndim == 2:
            output, target = output.unsqueeze(0), target.unsqueeze(0)
        if output.ndim != 3 or output.shape != target.shape:
            raise ValueError(
                f"metrics need output and target of the same shape (B, h, w), got "
                f"{tuple(output.shape)} and {tuple(target.shape)}"
            )
        if len(fnames) != output.shape[0]:
            raise ValueError(f"{len(fnames)} file names for a batch of {output.shape[0]}")
        outputs, targets = _to_numpy(output), _to_numpy(target)
        for i, fname in enumerate(fnames):
            max_value = float(max_values[i])
            gt, pred = targets[i], outputs[i]
            self.slices.setdefault(fname, {})[int(slice_nums[i])] = (
                float(evaluate.mse(gt, pred)),
                float(evaluate.mse(gt, np.zeros_like(gt))),
                float(evaluate.ssim(gt[None], pred[None], maxval=max_value)[0]),
            )
            self.max_values[fname] = max_value

    def merge(self, others: Sequence[VolumeMetricAccumulator]) -> VolumeMetricAccumulator:
        """A new accumulator holding this one's slices and those of ``others``."""
        merged = VolumeMetricAccumulator()
        for part in (self, *others):
            for fname, slices in part.slices.items():
                merged.slices.setdefault(fname, {}).update(slices)
            merged.max_values.update(part.max_values)
        return merged

    def per_volume(self) -> List[Dict[str, Any]]:
        """One row per volume: ``fname, nmse, psnr, ssim, num_slices``, sorted by name."""
        rows = []
        for fname in sorted(self.slices):
            values = np.array(list(self.slices[fname].values()), dtype=np.float64)
            mse, norm, ssim = values.mean(axis=0)
            if not norm > 0:
                raise ValueError(
                    f"{fname}: the target volume is all zero; validation cannot score it"
                )
            with np.errstate(divide="ignore"):  # a perfect reconstruction has infinite PSNR
                psnr = 20 * np.log10(self.max_values[fname]) - 10 * np.log10(mse)
            rows.append(
                dict(
                    fname=fname,
                    nmse=float(mse / norm),
                    psnr=float(psnr),
                    ssim=float(ssim),
                    num_slices=len(values),
                )
            )
        return rows

    def compute(self) -> Dict[str, float]:
        """``{"nmse", "ssim", "psnr"}`` averaged over volumes (empty without slices)."""
        rows = self.per_volume()
        if not rows:
            return {}
        return {name: float(np.mean([row[name] for row in rows])) for name in METRIC_NAMES}


# Earlier name, kept for callers already using it; evaluation.VolumeMetrics is another thing
# (one volume's results), hence the rename.
VolumeMetrics = VolumeMetricAccumulator


class ReconstructionStore:
    """Test-time reconstructions, per volume, ordered by slice; written as fastMRI does."""

    def __init__(self) -> None:
        self.volumes: Dict[str, Dict[int, np.ndarray]] = {}
        self.saved_volumes: Optional[int] = None  # written by the last save (every rank)

    def __len__(self) -> int:
        return len(self.volumes)

    def add(
        self,
        fnames: Sequence[str],
        slice_nums: Union[Tensor, Sequence[int]],
        images: Union[Tensor, np.ndarray],
    ) -> None:
        """Add ``(B, h, w)`` reconstructions in the file's units."""
        if isinstance(images, Tensor):
            images = images.detach().to("cpu", torch.float32).numpy()
        for i, fname in enumerate(fnames):
            self.volumes.setdefault(fname, {})[int(slice_nums[i])] = images[i]

    def stacked(self) -> Dict[str, np.ndarray]:
        """``fname -> (slices, h, w)`` in slice order."""
        return {
            fname: np.stack([img for _, img in sorted(slices.items())])
            for fname, slices in self.volumes.items()
        }

    def save(self, out_dir: Union[str, os.PathLike]) -> Optional[Path]:
        """Write ``out_dir/<fname>`` (dataset ``reconstruction``) with
        :func:`fastmri.save_reconstructions` (each file whole or absent); under DDP, rank 0
        writes every rank's slices.

        Returns:
            ``out_dir`` on the writing rank, ``None`` on the others; :attr:`saved_volumes`
            then holds the number of volumes written (of every rank).
        """
        parts = _gather_object_to_zero(self.volumes)
        if parts is None:
            return None
        merged = ReconstructionStore()
        for volumes in parts:
            for fname, slices in volumes.items():
                merged.volumes.setdefault(fname, {}).update(slices)
        self.saved_volumes = len(merged.volumes)
        out_dir = Path(out_dir)
        return save_reconstructions_atomic(merged.stacked(), out_dir)
