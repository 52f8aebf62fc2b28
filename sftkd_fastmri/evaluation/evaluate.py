"""Evaluate a reconstruction model on a fastMRI split: per-volume metrics and reconstructions.

Plain torch (no Lightning), so it serves the CLI, the pipeline and users' own scripts alike.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import fastmri
import numpy as np
import torch
from fastmri.data.transforms import center_crop
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .._io import save_reconstructions_atomic
from .._precision import check_precision
from ..data.transforms import model_inputs
from ..models.varnet import low_frequency_kwargs
from .metrics import VolumeMetrics, volume_metrics

__all__ = ["EvaluationResult", "evaluate_model", "model_inputs", "reconstruct_batch"]


def reconstruct_batch(model: nn.Module, batch, device: Union[str, torch.device]) -> Tensor:
    """Normalised magnitude reconstructions ``(B, h, w)`` cropped to the batch's crop size."""
    kspace, mask, sens = model_inputs(batch)
    low = low_frequency_kwargs(model, getattr(batch, "num_low_frequencies", None))
    out = model(
        kspace.to(device), mask.to(device), None if sens is None else sens.to(device), **low
    )
    h, w = (int(batch.crop_size[0][0]), int(batch.crop_size[1][0]))
    return center_crop(out, (min(h, out.shape[-2]), min(w, out.shape[-1])))


def _precision_mode(
    precision: Optional[str], device: Union[str, torch.device]
) -> Tuple[Optional[torch.dtype], torch.dtype]:
    """``(autocast dtype, network dtype)`` of a Lightning precision name (autocast None: none).
    ``32-true`` runs a float32 network (a float64 one, of a 64-true run, as a float32 copy of
    its weights for the evaluation); the mixed precisions run float32 weights under autocast,
    as Lightning's do (autocast leaves a float64 network's layers in float64, where they meet
    its bfloat16 activations and fail)."""
    name = check_precision(precision or "32-true", "evaluation precision {!r}")
    if name in ("32", "32-true"):
        return None, torch.float32
    if name in ("64", "64-true"):
        return None, torch.float64
    if name in ("bf16-mixed", "bf16"):
        return torch.bfloat16, torch.float32
    if name in ("16-mixed", "16"):
        # Lightning's 16-mixed is bfloat16 on the CPU (no float16 autocast kernels there)
        autocast = torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16
        return autocast, torch.float32
    raise ValueError(
        f"evaluation precision {name!r}: expected 32-true, 64-true, 16-mixed or bf16-mixed"
    )


def _at_precision(
    reconstruct: Callable, autocast: Optional[torch.dtype], dtype: Optional[torch.dtype]
) -> Callable:
    """``reconstruct`` with its inputs cast to the network's ``dtype``, under autocast when
    ``autocast`` is given."""

    def run(model: nn.Module, batch, device: Union[str, torch.device]) -> Tensor:
        if dtype is not None:
            batch = _batch_in(batch, dtype)
        if autocast is None:
            return reconstruct(model, batch, device).float()
        with torch.autocast(torch.device(device).type, dtype=autocast):
            return reconstruct(model, batch, device).float()

    return run


def _batch_in(batch, dtype: torch.dtype):
    """``batch`` (a :class:`DCCNNSample`) with its model inputs in ``dtype``."""
    cast = {
        name: getattr(batch, name).to(dtype)
        for name in ("masked_kspace", "sens_maps")
        if isinstance(getattr(batch, name, None), Tensor)
        and getattr(batch, name).is_floating_point()
    }
    return batch._replace(**cast) if hasattr(batch, "_replace") else batch


class EvaluationResult:
    """Per-volume metrics and reconstructions (in the files' units)."""

    def __init__(self, metrics: List[VolumeMetrics], reconstructions: Dict[str, np.ndarray]):
        self.metrics = metrics
        self.reconstructions = reconstructions

    def table(self) -> str:
        """A plain-text table, one row per volume plus the mean."""
        head = f"{'volume':<32}{'slices':>7}{'NMSE':>10}{'PSNR':>9}{'SSIM':>8}{'HFEN':>8}"
        lines = [head, "-" * len(head)]
        for m in self.metrics:
            lines.append(
                f"{m.fname:<32}{m.num_slices:>7}{m.nmse:>10.5f}{m.psnr:>9.2f}{m.ssim:>8.4f}"
                f"{m.hfen:>8.4f}"
            )
        if self.metrics:
            mean = {
                k: float(np.mean([getattr(m, k) for m in self.metrics]))
                for k in ("nmse", "psnr", "ssim", "hfen")
            }
            lines.append("-" * len(head))
            lines.append(
                f"{'mean':<32}{sum(m.num_slices for m in self.metrics):>7}{mean['nmse']:>10.5f}"
                f"{mean['psnr']:>9.2f}{mean['ssim']:>8.4f}{mean['hfen']:>8.4f}"
            )
        return "\n".join(lines)


@torch.no_grad()
def zero_filled_image(batch: Any) -> Tensor:
    """fastMRI's zero-filled baseline ``(B, h, w)``, in the batch's normalised units: the
    root-sum-of-squares over coils of the inverse FFT of the acquired k-space, centre-cropped
    to the reconstruction size (the magnitude for single-coil data). Not the networks' input
    ``batch.zero_filled``, which combines the coils with estimated sensitivities (SENSE)."""
    images = fastmri.complex_abs(fastmri.ifft2c(batch.masked_kspace))  # (B, coils, H, W)
    rss = fastmri.rss(images, dim=1)
    return center_crop(rss, tuple(batch.zero_filled.shape[-2:]))


@torch.no_grad()
def evaluate_model(
    model: Optional[nn.Module],
    loader: DataLoader,
    *,
    device: Union[str, torch.device] = "cpu",
    out_dir: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
    reconstruct: Optional[Callable] = None,
    precision: str = "32-true",
) -> EvaluationResult:
    """Run ``model`` over ``loader`` (batches of :class:`DCCNNSample`) and score each volume.

    Args:
        model: the network (``None`` evaluates the zero-filled baseline).
        loader: a DataLoader over a split with targets (volumes without targets are only
            reconstructed).
        device: where to run.
        out_dir: when given, reconstructions are written to ``out_dir/reconstructions``
            with :func:`fastmri.save_reconstructions` (each file whole or absent).
        progress: show a progress bar.
        reconstruct: custom ``(model, batch, device) -> (B, h, w)`` function.
        precision: Lightning's names: ``32-true`` (default), ``bf16-mixed`` / ``16-mixed``
            (a float32 network under autocast; 16-mixed is bfloat16 on a CPU, as in
            Lightning), ``64-true`` (the network and its inputs in float64). A network of
            another dtype than the precision's (float32, or float64 for 64-true; e.g. a
            64-true run's network evaluated at bf16-mixed) runs as a copy in that dtype;
            ``model`` itself is left as it is.

    Returns:
        :class:`EvaluationResult` with metrics for every volume that has a target.
    """
    autocast, dtype = _precision_mode(precision, device)
    network = model
    if model is not None:
        was_training = model.training
        model.eval().to(device)
        tensors = [*model.parameters(), *model.buffers()]
        if dtype is not None and any(t.is_floating_point() and t.dtype != dtype for t in tensors):
            # a copy: casting the caller's network there and back would round its weights
            network = copy.deepcopy(model).to(dtype)
        reconstruct = _at_precision(reconstruct or reconstruct_batch, autocast, dtype)
    slices: Dict[str, Dict[int, np.ndarray]] = defaultdict(dict)
    targets: Dict[str, Dict[int, np.ndarray]] = defaultdict(dict)
    max_values: Dict[str, float] = {}
    for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        if model is None:
            recon = zero_filled_image(batch)
        else:
            recon = reconstruct(network, batch, device).cpu()
        scale = batch.scale.reshape(-1, 1, 1)
        recon = (recon.float() * scale).numpy()
        has_target = batch.target.numel() > 0
        target = (batch.target * scale).numpy() if has_target else None
        for i, (fname, slice_num) in enumerate(zip(batch.fname, batch.slice_num.tolist())):
            slices[fname][slice_num] = recon[i]
            if target is not None:
                targets[fname][slice_num] = target[i]
                max_values[fname] = float(batch.max_value[i])
    if model is not None and was_training:
        model.train()

    reconstructions = {f: np.stack([s[k] for k in sorted(s)]) for f, s in slices.items()}
    metrics = []
    for fname in sorted(targets):
        gt = np.stack([targets[fname][k] for k in sorted(targets[fname])])
        metrics.append(volume_metrics(fname, gt, reconstructions[fname], max_values[fname]))
    if out_dir is not None:
        save_reconstructions_atomic(reconstructions, Path(out_dir) / "reconstructions")
    return EvaluationResult(metrics, reconstructions)
