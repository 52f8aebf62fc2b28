"""Lightning module training one DC-CNN preset with fastMRI's metric contract."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Union

from torch import Tensor

from ..models import build_model, create_model, init_from_checkpoint
from ..models.varnet import low_frequency_kwargs
from .recon_module import ReconModule, crop_to_target, kspace_batch, model_inputs

__all__ = ["DCCNNModule"]

PathLike = Union[str, os.PathLike]


class DCCNNModule(ReconModule):
    """Train a DC-CNN (Schlemper et al., IEEE TMI 2018) built by preset name.

    Defaults follow SFT-KD-Recon (Matcha et al., MIDL 2023): Adam, lr 1e-3, StepLR(40, 0.1),
    no weight decay, L1 loss.

    The hyperparameters record ``model_preset`` and ``model_config`` (the network's full
    config: a DC-CNN's constructor dict, or the config of a
    :class:`~sftkd_fastmri.models.CascadedVarNet` built from the ``varnet`` preset), so
    :func:`sftkd_fastmri.models.load_model` rebuilds the network from a Lightning checkpoint
    of this module (weights under ``model.``), and ``DCCNNModule.load_from_checkpoint``
    rebuilds the module (with :func:`sftkd_fastmri.models.build_model`, as
    :class:`~sftkd_fastmri.pl_modules.SFTModule` rebuilds its networks).

    Data: the k-space samples of :class:`~sftkd_fastmri.pl_modules.FastMRIDataModule`
    (:class:`~sftkd_fastmri.data.DCCNNDataTransform`); fastMRI's own samples (e.g.
    ``VarNetDataTransform``'s) are refused with a ``TypeError`` saying so.

    Args:
        model_preset: preset name (see :func:`sftkd_fastmri.models.list_models`).
        model_overrides: constructor arguments replacing the preset's (e.g. ``{"chans": 8}``).
        model_config: the network's full config (a DC-CNN's constructor dict, or a config
            with ``architecture``, e.g. ``"cascaded_varnet"``; see
            :func:`sftkd_fastmri.models.build_model`); when given (as when reloading a
            checkpoint) it is used as is, and preset and overrides are only recorded.
        init_checkpoint: start from the weights of a model checkpoint or of a Lightning
            checkpoint of this package; the preset and configuration must match (loaded
            strictly). Not recorded in the hyperparameters: a checkpoint of this module holds
            the weights itself.
        init_checkpoint_prefix: for an SFT checkpoint, the network to take (``"teacher"``
            or ``"student"``; default: the teacher); ignored for single-network checkpoints,
            except that an SFT export of the other network is refused.
        loss, lr, lr_step_size, lr_gamma, weight_decay, num_log_images, output_dir: see
            :class:`~sftkd_fastmri.pl_modules.ReconModule`.

    Raises:
        CheckpointError: ``init_checkpoint`` is unreadable, holds another preset or another
            configuration, or its weights do not fit.
        ValueError: ``model_config`` builds no network (see
            :func:`~sftkd_fastmri.models.build_model`).
    """

    def __init__(
        self,
        model_preset: str = "dccnn_d5c5",
        model_overrides: Optional[Dict[str, Any]] = None,
        model_config: Optional[Dict[str, Any]] = None,
        init_checkpoint: Optional[PathLike] = None,
        init_checkpoint_prefix: Optional[str] = None,
        loss: str = "l1",
        lr: float = 1e-3,
        lr_step_size: int = 40,
        lr_gamma: float = 0.1,
        weight_decay: float = 0.0,
        num_log_images: int = 4,
        output_dir: Optional[PathLike] = None,
    ):
        super().__init__(
            loss=loss,
            lr=lr,
            lr_step_size=lr_step_size,
            lr_gamma=lr_gamma,
            weight_decay=weight_decay,
            num_log_images=num_log_images,
            output_dir=output_dir,
        )
        if model_config is not None:
            # any recorded architecture (a DC-CNN, or the varnet preset's CascadedVarNet)
            self.model = build_model(model_config)
            self.model.preset = model_preset
        else:
            self.model = create_model(model_preset, **dict(model_overrides or {}))
        self.save_hyperparameters(
            ignore=["init_checkpoint", "init_checkpoint_prefix", "output_dir", "model_config"]
        )
        self.hparams["model_config"] = dict(self.model.config)
        if init_checkpoint is not None:
            self.load_init_checkpoint(init_checkpoint, prefix=init_checkpoint_prefix)

    def load_init_checkpoint(self, path: PathLike, prefix: Optional[str] = None) -> None:
        """Load the weights of ``path`` into :attr:`model`, strictly (see class docstring)."""
        init_from_checkpoint(self.model, path, role=prefix or "auto")

    def forward(
        self,
        masked_kspace: Tensor,
        mask: Tensor,
        sens_maps: Optional[Tensor],
        num_low_frequencies: Any = None,
    ) -> Tensor:
        """Args:
            masked_kspace: ``(B, coils, H, W, 2)`` normalised acquired k-space.
            mask: ``(B, 1, 1, W, 1)`` sampling mask.
            sens_maps: ``(B, coils, H, W, 2)``, or ``None`` for single-coil data.
            num_low_frequencies: the batch's fully sampled centre columns, for a network
                that takes them (a VarNet, as fastMRI's ``VarNetModule`` passes them);
                ignored by a DC-CNN.

        Returns:
            ``(B, H, W)`` magnitude image (uncropped).
        """
        return self.model(
            masked_kspace, mask, sens_maps, **low_frequency_kwargs(self.model, num_low_frequencies)
        )

    def reconstruct(self, batch: Any) -> Tensor:
        """``(B, h, w)`` normalised magnitude, cropped to the target size.

        Raises:
            TypeError: ``batch`` is not a batch of :class:`~sftkd_fastmri.data.DCCNNSample`
                (e.g. fastMRI's ``VarNetSample``), see :func:`kspace_batch`.
        """
        batch = kspace_batch(batch, self)
        low = getattr(batch, "num_low_frequencies", None)
        return crop_to_target(self(*model_inputs(batch), low), batch)
