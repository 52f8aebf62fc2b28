"""Lightning 2 base module keeping fastMRI's ``MriModule`` metric contract.

fastMRI's :class:`fastmri.pl_modules.MriModule` (Zbontar et al., "fastMRI: An Open Dataset and
Benchmarks for Accelerated MRI", arXiv 1811.08839, 2018) defines what users of the ecosystem
compare: per slice the squared error, the target energy and SSIM (data range = the volume's
``max`` attribute) on UNNORMALISED images; per volume NMSE = mean(mse) / mean(|target|^2),
PSNR = 20 log10(max) - 10 log10(mean mse) and the slice-mean SSIM; then the mean over volumes.
It logs ``validation_loss`` and ``val_metrics/{nmse,ssim,psnr}`` and writes test
reconstructions to ``reconstructions/<fname>.h5``. Its hooks do not run on Lightning 2
(``validation_epoch_end``, ``validation_step_end``); this module keeps the contract with
Lightning 2 hooks.

Deviations from ``MriModule`` (all towards exactness):

* across DDP ranks the per-slice values are gathered and merged before the per-volume
  aggregation, so a volume split over ranks (Lightning's default ``DistributedSampler``) or a
  slice duplicated by sampler padding still counts once, exactly as in one process;
* ``validation_loss`` is the mean over slices (``MriModule`` averages batch means), each
  slice counted once: this package's modules hand :meth:`accumulate_loss` the loss of every
  slice, so one repeated by sampler padding (Lightning's ``DistributedSampler``, fastMRI's
  ``VolumeSampler``), alone or inside another batch, counts once, and the value, which picks
  the best checkpoint, is the same on any number of devices. Modules that give a batch's
  mean alone (fastMRI's, through :class:`Lightning2MriMixin`) count a repeated whole batch
  once and a slice repeated inside another batch twice, as in ``MriModule``. Other
  validation values handed over per slice (:meth:`accumulate_slice_values`, e.g.
  :class:`SFTModule`'s ``val/*`` loss terms) are averaged the same way;
* images are logged for evenly spaced, fixed validation batches (not random ones) and only
  when a TensorBoard logger is attached.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pytorch_lightning as pl
import torch
from fastmri.data.transforms import center_crop
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from .._precision import check_precision
from ..data import model_inputs  # one definition, re-exported for subclasses
from ..models.checkpoint import match_compiled_names, uncompiled_names
from .losses import create_loss
from .volume_metrics import (  # noqa: F401  (VolumeMetrics: its earlier name, imported from here)
    ReconstructionStore,
    VolumeMetricAccumulator,
    VolumeMetrics,
    _all_gather_object,
    _is_distributed,
)

__all__ = [
    "FastMRIMetricsMixin",
    "ReconModule",
    "ReconstructionStore",
    "VolumeMetricAccumulator",
    "crop_to_target",
    "has_target",
    "kspace_batch",
    "model_inputs",
    "target_size",
]


# -- batch helpers --------------------------------------------------------------------------
def has_target(batch: Any) -> bool:
    """Whether a collated batch carries targets (fastMRI test files have none)."""
    return batch.target.numel() > 0


def target_size(batch: Any) -> Tuple[int, int]:
    """The reconstruction size ``(h, w)``: the target's, or the batch's ``crop_size``."""
    if has_target(batch):
        return int(batch.target.shape[-2]), int(batch.target.shape[-1])
    # default_collate turns the (h, w) tuple into two (B,) tensors
    h, w = (int(v.reshape(-1)[0]) if isinstance(v, Tensor) else int(v) for v in batch.crop_size)
    return h, w


def crop_to_target(image: Tensor, batch: Any) -> Tensor:
    """Centre-crop ``(B, H, W)`` to the batch's reconstruction size (never beyond ``H, W``)."""
    h, w = target_size(batch)
    return center_crop(image, (min(h, image.shape[-2]), min(w, image.shape[-1])))


#: What a batch of :class:`~sftkd_fastmri.data.DCCNNSample` has and fastMRI's samples lack.
_KSPACE_FIELDS = ("masked_kspace", "mask", "sens_maps", "target", "scale", "max_value")


def kspace_batch(batch: Any, module: Any) -> Any:
    """``batch`` when it is a batch of :class:`~sftkd_fastmri.data.DCCNNSample` (the k-space
    samples of :class:`~sftkd_fastmri.pl_modules.FastMRIDataModule`), else a clear error.

    fastMRI's own samples have other fields: ``VarNetDataTransform``'s carry k-space in the
    files' units and neither ``sens_maps`` nor ``scale``, ``UnetDataTransform``'s images.

    Args:
        batch: a collated batch.
        module: the module that was given it (named in the error).

    Raises:
        TypeError: naming the sample type received and the samples expected.
    """
    missing = [name for name in _KSPACE_FIELDS if not hasattr(batch, name)]
    if not missing:
        return batch
    if hasattr(batch, "masked_kspace"):
        hint = (
            " (fastMRI's VarNetDataTransform samples, with k-space in the files' units: use "
            "FastMRIDataModule or SliceDataset with DCCNNDataTransform, or train fastMRI's "
            "VarNet with VarNetModule2)"
        )
    elif hasattr(batch, "image"):
        hint = " (fastMRI's UnetDataTransform samples: train a U-Net with UnetModule2)"
    else:
        hint = ""
    raise TypeError(
        f"{type(module).__name__} takes the k-space samples of FastMRIDataModule "
        f"(sftkd_fastmri.data.DCCNNSample from DCCNNDataTransform: {', '.join(_KSPACE_FIELDS)}"
        f", ...), got a {type(batch).__name__} without {', '.join(missing)}{hint}"
    )


# -- the Lightning side -----------------------------------------------------------------------
class FastMRIMetricsMixin:
    """Validation/test bookkeeping of the fastMRI metric contract, for any LightningModule.

    Shared by :class:`ReconModule` and the adapters of fastMRI's own modules
    (:mod:`~sftkd_fastmri.pl_modules.fastmri_compat`). Steps feed it through
    :meth:`accumulate_metrics`, :meth:`accumulate_loss`, :meth:`log_val_images` and
    :meth:`add_reconstructions`; its epoch hooks aggregate, log and write.

    Metric keys: ``""`` is the main output (``val_metrics/psnr``); any other key ``k`` logs
    ``val_metrics/k/psnr`` etc. (e.g. the student branches of SFT training). Further
    per-slice validation values (:meth:`accumulate_slice_values`) are logged under their
    own names.

    After an epoch: :attr:`val_metrics` / :attr:`test_metrics` (``{"psnr": ..., "branch1/psnr":
    ...}``), :attr:`val_volume_metrics` / :attr:`test_volume_metrics` (lists of per-volume rows
    ``fname, nmse, psnr, ssim, num_slices``, main output only) and :attr:`reconstruction_dir`.
    """

    val_metrics: Dict[str, float]
    test_metrics: Dict[str, float]
    val_volume_metrics: List[Dict[str, Any]]
    test_volume_metrics: List[Dict[str, Any]]
    reconstruction_dir: Optional[Path]

    # -- state ------------------------------------------------------------------------------
    def _fm_state(self) -> Dict[str, Any]:
        # created lazily: the mixin adds no __init__, so it composes with any module's
        state = self.__dict__.get("_fastmri_metric_state")
        if state is None:
            state = self.__dict__["_fastmri_metric_state"] = {}
            self._reset_stage("val")
            self._reset_stage("test")
        return state

    def _reset_stage(self, stage: str) -> None:
        state = self._fm_state()
        state[stage] = {
            "metrics": {},
            "loss_sum": 0.0,
            "loss_count": 0,
            "loss_batches": {},
            "slice_values": {},  # {name: {(fname, slice_num): value}}
            "slice_means": {},  # {name: mean over slices}, after the epoch
        }
        if stage == "test":
            state["recons"] = ReconstructionStore()

    def _current_stage(self) -> str:
        trainer = getattr(self, "_trainer", None)
        return "test" if trainer is not None and trainer.testing else "val"

    # -- feeding ----------------------------------------------------------------------------
    def accumulate_metrics(
        self,
        key: str,
        fnames: Sequence[str],
        slice_nums: Union[Tensor, Sequence[int]],
        output: Tensor,
        target: Tensor,
        max_values: Union[Tensor, Sequence[float]],
        stage: Optional[str] = None,
    ) -> None:
        """Add UNNORMALISED ``(B, h, w)`` outputs and targets under metric ``key``.

        Args:
            stage: ``"val"`` or ``"test"``; default: from the trainer state.
        """
        stage = stage or self._current_stage()
        metrics = self._fm_state()[stage]["metrics"]
        metrics.setdefault(key, VolumeMetricAccumulator()).update(
            fnames, slice_nums, output, target, max_values
        )

    def accumulate_loss(
        self,
        loss: Tensor,
        batch_size: int,
        fnames: Optional[Sequence[str]] = None,
        slice_nums: Optional[Union[Tensor, Sequence[int]]] = None,
    ) -> None:
        """Add a batch's validation loss: its mean (weighted by its size), or the ``(B,)``
        losses of its slices (:meth:`per_slice_loss`).

        With the batch's ``fnames`` and ``slice_nums``, a slice seen again (on this rank or
        another: DDP samplers pad the ranks with repeated slices) counts once when the
        losses are per slice; a batch mean seen again counts once as a whole batch (the
        whole batches :class:`~sftkd_fastmri.data.ShapeBatchSampler` repeats)."""
        state = self._fm_state()["val"]
        loss = loss.detach()
        if fnames is None or slice_nums is None:
            state["loss_sum"] += float(loss.sum()) if loss.ndim else float(loss) * batch_size
            state["loss_count"] += batch_size
            return
        numbers = slice_nums.tolist() if isinstance(slice_nums, Tensor) else list(slice_nums)
        slices = list(zip(map(str, fnames), map(int, numbers)))
        batches = state["loss_batches"]
        if loss.ndim == 1 and loss.numel() == len(slices) == batch_size:
            for slice_key, value in zip(slices, loss.float().tolist()):
                batches.setdefault((slice_key,), (value, 1))
            return
        batches.setdefault(tuple(slices), (float(loss) * batch_size, batch_size))

    def accumulate_slice_values(
        self,
        values: Mapping[str, Tensor],
        fnames: Sequence[str],
        slice_nums: Union[Tensor, Sequence[int]],
    ) -> None:
        """Add validation values of each slice, logged at the end of the epoch under their
        names as the mean over slices, each slice counted once as in ``validation_loss``.

        A slice seen again (on this rank or another: DDP samplers pad the ranks with repeated
        slices) keeps its first value, so the means are those of one process on any number
        of devices (a value logged with ``self.log(..., sync_dist=True)`` averages the ranks'
        batch means, duplicates included).

        Args:
            values: ``{name: (B,) values}``, e.g. ``{"val/teacher_rec": ...}``; each slice's
                value computed on that slice alone (for a mean-type loss, their mean is the
                batch's value).
            fnames: the batch's ``B`` file names.
            slice_nums: the batch's ``B`` slice indices.

        Raises:
            ValueError: a value is not one number per slice of the batch.
        """
        numbers = slice_nums.tolist() if isinstance(slice_nums, Tensor) else list(slice_nums)
        slices = list(zip(map(str, fnames), map(int, numbers)))
        store = self._fm_state()["val"]["slice_values"]
        for name, value in values.items():
            value = torch.as_tensor(value).detach()
            if value.ndim != 1 or value.numel() != len(slices):
                raise ValueError(
                    f"{name}: expected one value per slice, shape ({len(slices)},), got "
                    f"{tuple(value.shape)}"
                )
            per_slice = store.setdefault(name, {})
            for slice_key, number in zip(slices, value.float().tolist()):
                per_slice.setdefault(slice_key, number)

    def per_slice_loss(self, output: Tensor, target: Tensor, data_range: Tensor) -> Tensor:
        """``(B,)`` the reconstruction loss of each slice alone: their mean is the batch's
        loss (every loss is a mean over its elements, and a batch's slices share one shape),
        and :meth:`accumulate_loss` counts each slice once."""
        if output.shape[0] == 1:
            return self.loss_fn(output, target, data_range).reshape(1)
        ranges = data_range.reshape(-1)
        return torch.stack(
            [
                self.loss_fn(output[i : i + 1], target[i : i + 1], ranges[i : i + 1])
                for i in range(output.shape[0])
            ]
        )

    def add_reconstructions(
        self,
        fnames: Sequence[str],
        slice_nums: Union[Tensor, Sequence[int]],
        images: Union[Tensor, np.ndarray],
    ) -> None:
        """Keep ``(B, h, w)`` test reconstructions (file units) for writing at epoch end."""
        self._fm_state()["recons"].add(fnames, slice_nums, images)

    # -- images -----------------------------------------------------------------------------
    def _tensorboard_loggers(self) -> List[TensorBoardLogger]:
        return [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]

    def _val_log_indices(self) -> List[int]:
        num_images = int(getattr(self, "num_log_images", 0) or 0)
        counts = self.trainer.num_val_batches if self._trainer is not None else []
        total = counts[0] if counts else 0
        if num_images <= 0 or total == 0:
            return []
        if not np.isfinite(total):
            return list(range(num_images))
        # evenly spaced batches: the same slices every epoch, so images are comparable
        return sorted({int(i) for i in np.linspace(0, total - 1, num_images).round()})

    def log_val_images(self, batch_idx: int, output: Tensor, target: Tensor, key: str = "") -> None:
        """Log target, reconstruction and error of the first slice of a few fixed validation
        batches to every TensorBoard logger (nothing without one).

        Args:
            batch_idx: the validation batch index.
            output: ``(B, h, w)`` reconstruction.
            target: ``(B, h, w)`` target.
            key: metric key; non-empty keys go under ``.../<key>/``.
        """
        loggers = self._tensorboard_loggers()
        if not loggers or self.trainer.sanity_checking:
            return
        state = self._fm_state()["val"]
        if "log_indices" not in state:
            state["log_indices"] = set(self._val_log_indices())
        if batch_idx not in state["log_indices"]:
            return
        out = output.reshape(-1, *output.shape[-2:])[0].detach().float().cpu()
        tgt = target.reshape(-1, *target.shape[-2:])[0].detach().float().cpu()
        prefix = f"val_images_idx_{batch_idx}/" + (f"{key}/" if key else "")
        images = {"target": tgt, "reconstruction": out, "error": (tgt - out).abs()}
        for name, image in images.items():
            image = image / image.max().clamp_min(torch.finfo(image.dtype).tiny)
            for logger in loggers:
                logger.experiment.add_image(
                    prefix + name, image.unsqueeze(0), global_step=self.global_step
                )

    # -- epoch ends -------------------------------------------------------------------------
    def _log_metric_dict(self, prefix: str, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            # values are identical on every rank already; sync_dist only silences the
            # "epoch-level logging without sync" warning under DDP (mean of equal values)
            self.log(f"{prefix}/{name}", value, sync_dist=True)

    def _finish_stage(self, stage: str) -> Tuple[Dict[str, float], List[Dict[str, Any]]]:
        state = self._fm_state()[stage]
        # one collective per epoch: every rank must call it, whatever keys it has seen
        parts = _all_gather_object(
            (
                state["metrics"],
                state["loss_sum"],
                state["loss_count"],
                state["loss_batches"],
                state["slice_values"],
            )
        )
        keys = sorted({k for metrics, *_ in parts for k in metrics})
        values: Dict[str, float] = {}
        table: List[Dict[str, Any]] = []
        for key in keys:
            pieces = [m[key] for m, *_ in parts if key in m]
            merged = pieces[0].merge(pieces[1:])
            for name, value in merged.compute().items():
                values[f"{key}/{name}" if key else name] = value
            if key == "":
                table = merged.per_volume()
        batches: Dict[tuple, Tuple[float, int]] = {}
        for part in parts:
            for key, entry in part[3].items():
                batches.setdefault(key, entry)  # a repeated batch counts once
        state["loss_sum"] = sum(p[1] for p in parts) + sum(v for v, _ in batches.values())
        state["loss_count"] = sum(p[2] for p in parts) + sum(n for _, n in batches.values())
        per_slice: Dict[str, Dict[Tuple[str, int], float]] = {}
        for part in parts:
            for name, entries in part[4].items():
                merged_values = per_slice.setdefault(name, {})
                for slice_key, value in entries.items():
                    merged_values.setdefault(slice_key, value)  # a repeated slice counts once
        state["slice_means"] = {
            name: sum(entries.values()) / len(entries)
            for name, entries in sorted(per_slice.items())
            if entries
        }
        return values, table

    def on_validation_epoch_start(self) -> None:
        self._reset_stage("val")

    def on_validation_epoch_end(self) -> None:
        values, table = self._finish_stage("val")
        state = self._fm_state()["val"]
        if state["loss_count"]:
            self.log(
                "validation_loss",
                state["loss_sum"] / state["loss_count"],
                prog_bar=True,
                sync_dist=True,
            )
        self._log_metric_dict("val_metrics", values)
        for name, value in state["slice_means"].items():
            self.log(name, value, sync_dist=True)  # equal on every rank (see above)
        self.val_metrics, self.val_volume_metrics = values, table

    def on_test_epoch_start(self) -> None:
        self._reset_stage("test")

    def on_test_epoch_end(self) -> None:
        values, table = self._finish_stage("test")
        self._log_metric_dict("test_metrics", values)
        self.test_metrics, self.test_volume_metrics = values, table
        recons: ReconstructionStore = self._fm_state()["recons"]
        self.reconstruction_dir = None
        if recons.volumes or _is_distributed():
            out_dir = Path(self.reconstruction_root()) / "reconstructions"
            written = recons.save(out_dir)
            if written is not None:
                count = recons.saved_volumes
                rank_zero_info(f"Saved {count} reconstructed volume(s) to {written}")
            self.reconstruction_dir = out_dir

    def reconstruction_root(self) -> Path:
        """Where ``reconstructions/`` goes: ``output_dir`` if set, else the trainer's
        ``default_root_dir`` (fastMRI's choice), else the working directory."""
        output_dir = getattr(self, "output_dir", None)
        if output_dir:
            return Path(output_dir)
        if self._trainer is not None:
            return Path(self.trainer.default_root_dir)
        return Path.cwd()


class ReconModule(FastMRIMetricsMixin, pl.LightningModule):
    """Lightning 2 base for reconstruction networks on :class:`DCCNNSample` batches, with
    fastMRI's metric contract (Zbontar et al., arXiv 1811.08839, 2018; see module docstring).

    Subclasses implement :meth:`reconstruct` (and call ``self.save_hyperparameters()``); the
    default :meth:`training_step` minimises
    ``loss(reconstruct(batch), batch.target)`` in normalised units. Validation logs
    ``validation_loss`` and ``val_metrics/{nmse,ssim,psnr}``; testing writes
    ``<output_dir or default_root_dir>/reconstructions/<fname>.h5`` and, where the files carry
    targets, logs ``test_metrics/{nmse,ssim,psnr}`` and fills :attr:`test_volume_metrics`.

    Args:
        loss: reconstruction loss name (see :func:`~sftkd_fastmri.pl_modules.create_loss`).
        lr: Adam learning rate.
        lr_step_size: StepLR period in epochs.
        lr_gamma: StepLR decay factor.
        weight_decay: Adam weight decay.
        num_log_images: validation slices logged as images (TensorBoard only).
        output_dir: folder for test reconstructions (default: the trainer's
            ``default_root_dir``).
    """

    def __init__(
        self,
        loss: str = "l1",
        lr: float = 1e-3,
        lr_step_size: int = 40,
        lr_gamma: float = 0.1,
        weight_decay: float = 0.0,
        num_log_images: int = 4,
        output_dir: Optional[Union[str, os.PathLike]] = None,
    ):
        super().__init__()
        self.loss_fn = create_loss(loss)
        self.lr = lr
        self.lr_step_size = lr_step_size
        self.lr_gamma = lr_gamma
        self.weight_decay = weight_decay
        self.num_log_images = num_log_images
        self.output_dir = output_dir
        self.val_metrics, self.test_metrics = {}, {}
        self.val_volume_metrics, self.test_volume_metrics = [], []
        self.reconstruction_dir = None

    # -- to implement -----------------------------------------------------------------------
    def reconstruct(self, batch: Any) -> Tensor:
        """Normalised magnitude reconstruction ``(B, h, w)``, centre-cropped to the target
        size (see :func:`crop_to_target`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement reconstruct(batch)")

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def data_range(batch: Any) -> Tensor:
        """``(B,)`` volume maxima in normalised units (the SSIM loss's data range)."""
        max_value = torch.as_tensor(batch.max_value, device=batch.scale.device)
        return max_value.to(batch.scale.dtype) / batch.scale

    @staticmethod
    def unnormalise(image: Tensor, batch: Any) -> Tensor:
        """``(B, h, w)`` normalised image -> the file's units."""
        return image * batch.scale.reshape(-1, 1, 1)

    def update_metrics(self, key: str, output: Tensor, batch: Any) -> None:
        """Accumulate metrics of a NORMALISED output ``(B, h, w)`` under ``key`` (``""`` =
        main output); unnormalised with ``batch.scale`` first, as the contract requires."""
        self.accumulate_metrics(
            key,
            batch.fname,
            batch.slice_num,
            self.unnormalise(output, batch),
            self.unnormalise(batch.target, batch),
            batch.max_value,
        )

    # -- steps ------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        output = self.reconstruct(batch)
        loss = self.loss_fn(output, batch.target, self.data_range(batch))
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=output.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        output = self.reconstruct(batch)
        losses = self.per_slice_loss(output, batch.target, self.data_range(batch))
        self.accumulate_loss(losses, output.shape[0], batch.fname, batch.slice_num)
        loss = losses.mean()
        self.update_metrics("", output, batch)
        self.log_val_images(
            batch_idx, self.unnormalise(output, batch), self.unnormalise(batch.target, batch)
        )
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> None:
        output = self.reconstruct(batch)
        self.add_reconstructions(batch.fname, batch.slice_num, self.unnormalise(output, batch))
        if has_target(batch):
            self.update_metrics("", output, batch)

    def predict_step(self, batch: Any, batch_idx: int) -> Dict[str, Any]:
        """``{"fname", "slice_num", "reconstruction" (B, h, w) in the file's units}``."""
        output = self.unnormalise(self.reconstruct(batch), batch)
        return {"fname": batch.fname, "slice_num": batch.slice_num, "reconstruction": output}

    def setup(self, stage: str) -> None:
        """Record the data's ``challenge`` in the hyper-parameters (so in every checkpoint),
        when the trainer's data module has one: a deployment export then picks the single-
        or multi-coil input signature from the checkpoint alone."""
        if self._trainer is not None:
            check_precision(getattr(self._trainer, "precision", ""), "Trainer(precision={!r})")
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        challenge = getattr(datamodule, "input_challenge", getattr(datamodule, "challenge", None))
        if challenge in ("singlecoil", "multicoil"):
            self.hparams["challenge"] = challenge

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Weights under the plain networks' names: a network ``torch.compile``d in this
        module would write ``model._orig_mod.*``, which no plain module or loader knows."""
        checkpoint["state_dict"] = uncompiled_names(checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Weights to the names this module has now (plain or ``torch.compile``d networks)."""
        checkpoint["state_dict"] = match_compiled_names(
            checkpoint["state_dict"], self.state_dict().keys()
        )

    def configure_optimizers(self) -> Dict[str, Any]:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, self.lr_step_size, self.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler}}
