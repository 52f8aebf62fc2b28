"""Run fastMRI's own Lightning modules (``UnetModule``, ``VarNetModule``, any ``MriModule``)
under Lightning 2, without editing fastMRI.

What breaks on Lightning 2 (fastmri 0.3.0) and what the adapter does about it:

* ``MriModule`` defines ``validation_epoch_end`` / ``test_epoch_end``; Lightning 2 refuses to
  run a module on which ``callable(getattr(module, "validation_epoch_end", None))`` holds
  (``pytorch_lightning/trainer/configuration_validator.py``). The adapter shadows both names
  with ``None`` (a non-callable class attribute passes that check) and does their work in
  ``on_validation_epoch_end`` / ``on_test_epoch_end``.
* ``validation_step_end`` (where ``MriModule`` computes the per-slice metrics) is never
  called. The adapter wraps ``validation_step``: it takes the dict fastMRI's step returns
  (``fname, slice_num, max_value, output, target, val_loss``) and feeds the per-slice metrics
  of :class:`~sftkd_fastmri.pl_modules.recon_module.FastMRIMetricsMixin`, the same code as
  :class:`~sftkd_fastmri.pl_modules.ReconModule`. Logged names are fastMRI's:
  ``validation_loss``, ``val_metrics/{nmse,ssim,psnr}``.
* ``trainer.val_dataloaders[0]`` (used to pick images to log) is no longer subscriptable;
  the mixin picks fixed, evenly spaced validation batches from ``trainer.num_val_batches``.
* ``log_image`` calls ``self.logger.experiment.add_image``, which exists on TensorBoard
  loggers only; here it writes to every TensorBoard logger and does nothing otherwise.
* ``test_epoch_end`` wrote ``reconstructions/<fname>.h5`` under ``trainer.default_root_dir``;
  the adapter collects the ``test_step`` outputs and writes them there with
  :func:`fastmri.save_reconstructions` (under DDP, rank 0 writes every rank's slices).
* fastMRI's modules have no ``predict_step``; the adapter's returns ``test_step``'s output as
  :meth:`~sftkd_fastmri.pl_modules.ReconModule.predict_step` does, so ``trainer.predict``
  works on either kind of module.
* :class:`VarNetModule2` computes fastMRI's SSIM loss in float32 under ``16-mixed`` /
  ``bf16-mixed`` autocast (fastMRI's ran its window means in 16 bits, where the variances
  cancel: a wrong training loss and a wrong ``validation_loss``, the checkpoint monitor), as
  :class:`~sftkd_fastmri.pl_modules.losses.SSIMLoss` does.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Type

import fastmri
import pytorch_lightning as pl
import torch
from fastmri.data.transforms import center_crop_to_smallest
from fastmri.pl_modules import MriModule, UnetModule, VarNetModule
from torch import Tensor

from ..models.varnet import batch_low_frequencies
from .recon_module import FastMRIMetricsMixin

__all__ = ["Lightning2MriMixin", "UnetModule2", "VarNetModule2", "lightning2_compatible"]

_VAL_KEYS = ("batch_idx", "fname", "slice_num", "max_value", "output", "target", "val_loss")
_TEST_KEYS = ("fname", "slice", "output")


def _as_batch(image: Tensor) -> Tensor:
    # fastMRI's steps may return (h, w) for a batch of one, as validation_step_end allowed
    return image.unsqueeze(0) if image.ndim == 2 else image


def _check_keys(logs: Any, keys: tuple, step: str, module: pl.LightningModule) -> Dict:
    if not isinstance(logs, dict) or any(k not in logs for k in keys):
        found = sorted(logs) if isinstance(logs, dict) else type(logs).__name__
        raise RuntimeError(
            f"{type(module).__name__}.{step} must return a dict with keys {list(keys)} "
            f"(fastMRI's MriModule contract), got {found}"
        )
    return logs


class Lightning2MriMixin(FastMRIMetricsMixin):
    """Put before a fastMRI ``MriModule`` subclass to run it on Lightning 2 (see module
    docstring): ``class MyNet2(Lightning2MriMixin, MyNet): pass``."""

    # Lightning 2 rejects a callable attribute of these names; None shadows MriModule's.
    validation_epoch_end = None
    test_epoch_end = None

    def validation_step(self, batch: Any, batch_idx: int) -> Dict[str, Any]:
        logs = _check_keys(
            super().validation_step(batch, batch_idx), _VAL_KEYS, "validation_step", self
        )
        output, target = _as_batch(logs["output"]), _as_batch(logs["target"])
        self.accumulate_loss(logs["val_loss"], output.shape[0], logs["fname"], logs["slice_num"])
        self.accumulate_metrics(
            "", logs["fname"], logs["slice_num"], output, target, logs["max_value"]
        )
        self.log_val_images(batch_idx, output, target)
        return logs

    _predicting = False

    def test_step(self, batch: Any, batch_idx: int) -> Dict[str, Any]:
        logs = _check_keys(super().test_step(batch, batch_idx), _TEST_KEYS, "test_step", self)
        output = logs["output"]
        if output.ndim == 2:
            output = output[None]
        if not self._predicting:
            self.add_reconstructions(logs["fname"], logs["slice"], output)
        return logs

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Dict[str, Any]:
        """``{"fname", "slice_num", "reconstruction" (B, h, w) in the files' units}``, as
        :meth:`~sftkd_fastmri.pl_modules.ReconModule.predict_step` returns: the output of
        the module's ``test_step`` (fastMRI's crop and units), with nothing written."""
        self._predicting = True
        try:
            logs = self.test_step(batch, batch_idx)
        finally:
            self._predicting = False
        output = torch.as_tensor(logs["output"])
        return {
            "fname": logs["fname"],
            "slice_num": logs["slice"],
            "reconstruction": output[None] if output.ndim == 2 else output,
        }

    def log_image(self, name: str, image: Tensor) -> None:
        """fastMRI's image hook, written to TensorBoard loggers only (no-op without one)."""
        for logger in self._tensorboard_loggers():
            logger.experiment.add_image(name, image, global_step=self.global_step)


def lightning2_compatible(
    module_cls: Type[MriModule], name: Optional[str] = None
) -> Type[MriModule]:
    """A Lightning 2 compatible subclass of a fastMRI ``MriModule`` subclass.

    Args:
        module_cls: e.g. :class:`fastmri.pl_modules.UnetModule` or a user's ``MriModule``.
        name: class name (default: ``module_cls.__name__ + "2"``).

    Returns:
        ``class <name>(Lightning2MriMixin, module_cls)``; constructor, hyperparameters and
        checkpoints are those of ``module_cls``. Strategies that pickle the module
        (``ddp_spawn``) need the class importable: define it at module level instead,
        ``class MyNet2(Lightning2MriMixin, MyNet): pass``.

    Raises:
        TypeError: ``module_cls`` is not a subclass of fastMRI's ``MriModule``.
    """
    if not (isinstance(module_cls, type) and issubclass(module_cls, MriModule)):
        raise TypeError(f"expected a subclass of fastmri.pl_modules.MriModule, got {module_cls!r}")
    if issubclass(module_cls, Lightning2MriMixin):
        return module_cls
    return type(
        name or f"{module_cls.__name__}2",
        (Lightning2MriMixin, module_cls),
        {
            "__module__": __name__,
            "__doc__": f"{module_cls.__name__} adapted to Lightning 2 (see {__name__}).",
        },
    )


class UnetModule2(Lightning2MriMixin, UnetModule):
    """fastMRI's :class:`~fastmri.pl_modules.UnetModule` (U-Net baseline of Zbontar et al.,
    arXiv 1811.08839) on Lightning 2; same arguments, metrics and outputs.

    Data: fastMRI's image-domain samples (``UnetDataTransform``: ``image``, ``target``,
    ``mean``, ``std``, ...), e.g. from fastMRI's ``SliceDataset``; not the k-space samples of
    :class:`~sftkd_fastmri.pl_modules.FastMRIDataModule`, which are refused with that said.
    """

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return super().training_step(_unet_batch(batch, self), batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> Dict[str, Any]:
        return super().validation_step(_unet_batch(batch, self), batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> Dict[str, Any]:
        return super().test_step(_unet_batch(batch, self), batch_idx)


def _unet_batch(batch: Any, module: pl.LightningModule) -> Any:
    """``batch`` when it is one of fastMRI's U-Net samples, else a clear error."""
    if not all(hasattr(batch, name) for name in ("image", "mean", "std")):
        raise TypeError(
            f"{type(module).__name__} takes fastMRI's U-Net samples (image, target, mean, std, "
            f"...; fastmri.data.transforms.UnetDataTransform), got a {type(batch).__name__}"
            + (
                " (the k-space samples of FastMRIDataModule, for cascaded networks: give "
                "the U-Net fastMRI's SliceDataset with UnetDataTransform)"
                if hasattr(batch, "masked_kspace")
                else ""
            )
        )
    return batch


class VarNetModule2(Lightning2MriMixin, VarNetModule):
    """fastMRI's :class:`~fastmri.pl_modules.VarNetModule` (E2E VarNet, Sriram et al., MICCAI
    2020) on Lightning 2; same arguments, metrics and outputs. Batches of more than one slice
    work too: the collated ``num_low_frequencies`` (one value per slice) is passed on as the
    one number fastMRI's VarNet takes (an error if the slices of a batch differ).

    Data: fastMRI's ``VarNetDataTransform`` (k-space in the files' units), or this package's
    :class:`~sftkd_fastmri.pl_modules.FastMRIDataModule`, whose samples are normalised by the
    zero-filled maximum (``batch.scale``). For the latter, the SSIM loss, the validation
    metrics and the test reconstructions are computed in the files' units (output and target
    multiplied by ``scale``), as fastMRI's ``data_range=max_value`` assumes. In training the
    network runs on the normalised k-space, so distillation terms on its output have the
    magnitudes they have for DC-CNNs; in validation and test on k-space in the files' units
    (the VarNet is scale-equivariant: the same result up to float rounding).

    Mixed precision: fastMRI's SSIM loss (``self.loss``, training and ``validation_loss``)
    runs in float32 outside autocast, whose 16-bit window means made it wrong by several
    percent (see :class:`~sftkd_fastmri.pl_modules.losses.SSIMLoss`); in 32 bits it is
    fastMRI's arithmetic unchanged, and its state-dict entries (``loss.w``) are fastMRI's.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        # VarNetModule's arguments; its save_hyperparameters records them as without this
        super().__init__(*args, **kwargs)
        if type(self.loss) is fastmri.SSIMLoss:
            loss = _Float32SSIMLoss(self.loss.win_size, self.loss.k1, self.loss.k2)
            loss.load_state_dict(self.loss.state_dict())
            self.loss = loss

    def forward(self, masked_kspace, mask, num_low_frequencies):
        return self.varnet(masked_kspace, mask, batch_low_frequencies(num_low_frequencies))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        scale = _scale_of(batch)
        if scale is None:
            return super().training_step(batch, batch_idx)
        # fastMRI's step, with output and target brought back to the files' units
        output = self(batch.masked_kspace, batch.mask, batch.num_low_frequencies)
        target, output = center_crop_to_smallest(batch.target, output)
        output, target = output * scale, target * scale
        loss = self.loss(output.unsqueeze(1), target.unsqueeze(1), data_range=batch.max_value)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Dict[str, Any]:
        return super().validation_step(_in_file_units(batch), batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> Dict[str, Any]:
        return super().test_step(_one_crop_size(_in_file_units(batch)), batch_idx)


class _Float32SSIMLoss(fastmri.SSIMLoss):
    """fastMRI's ``SSIMLoss`` (same arguments, window buffer and state-dict keys), computed
    with autocast disabled on images in the window's dtype promoted to at least float32: under
    autocast its convolutions ran in 16 bits, and ``E[x^2] - E[x]^2`` cancelled."""

    def forward(self, X: Tensor, Y: Tensor, data_range: Tensor, reduced: bool = True) -> Tensor:
        with torch.autocast(X.device.type, enabled=False):
            dtype = torch.promote_types(self.w.dtype, torch.float32)
            return super().forward(X.to(dtype), Y.to(dtype), data_range, reduced)


def _one_crop_size(batch: Any) -> Any:
    """The batch with one ``(h, w)`` crop size: collated, ``crop_size`` is two ``(B,)``
    tensors, which fastMRI's ``test_step`` compares as numbers (an error for ``B > 1``)."""
    crop = getattr(batch, "crop_size", None)
    if crop is None or not any(isinstance(v, Tensor) for v in crop):
        return batch
    values = [v.reshape(-1) if isinstance(v, Tensor) else torch.tensor([int(v)]) for v in crop]
    if any(bool((v != v[0]).any()) for v in values):
        sizes = sorted({tuple(int(v[i]) for v in values) for i in range(len(values[0]))})
        raise ValueError(
            f"a test batch of slices with different reconstruction sizes {sizes} (files "
            f"{sorted(set(batch.fname))}); use batch_size 1 or batches of one shape "
            "(FastMRIDataModule's ShapeBatchSampler)"
        )
    return batch._replace(crop_size=tuple(int(v[0]) for v in values))


def _scale_of(batch: Any) -> Optional[Tensor]:
    """``(B, 1, 1)`` normalisation scale of a :class:`~sftkd_fastmri.data.DCCNNSample` batch,
    ``None`` for fastMRI's own samples (already in the files' units)."""
    scale = getattr(batch, "scale", None)
    if not isinstance(scale, Tensor):
        return None
    return scale.reshape(-1, 1, 1).to(batch.masked_kspace.dtype)


def _in_file_units(batch: Any) -> Any:
    """A normalised batch with k-space and target in the files' units (a VarNet's output
    scales with its k-space), or the batch itself."""
    scale = _scale_of(batch)
    if scale is None:
        return batch
    target = batch.target * scale if batch.target.ndim == 3 else batch.target
    return batch._replace(masked_kspace=batch.masked_kspace * scale[..., None, None], target=target)
