"""Lightning 2 layer: fastMRI's metric contract, DC-CNN training, data module, and adapters
that run fastMRI's own ``UnetModule`` / ``VarNetModule`` on Lightning 2."""

from .data_module import FastMRIDataModule, fetch_dir, split_has_targets
from .dccnn_module import DCCNNModule
from .fastmri_compat import (
    Lightning2MriMixin,
    UnetModule2,
    VarNetModule2,
    lightning2_compatible,
)
from .losses import LOSSES, L1Loss, L1SSIMLoss, MSELoss, ReconLoss, SSIMLoss, create_loss
from .recon_module import (
    FastMRIMetricsMixin,
    ReconModule,
    ReconstructionStore,
    VolumeMetricAccumulator,
    crop_to_target,
    model_inputs,
    target_size,
)
from .sft_module import SFTModule

__all__ = [
    "LOSSES",
    "DCCNNModule",
    "FastMRIDataModule",
    "FastMRIMetricsMixin",
    "L1Loss",
    "L1SSIMLoss",
    "Lightning2MriMixin",
    "MSELoss",
    "ReconLoss",
    "ReconModule",
    "ReconstructionStore",
    "SFTModule",
    "SSIMLoss",
    "UnetModule2",
    "VarNetModule2",
    "VolumeMetricAccumulator",
    "create_loss",
    "crop_to_target",
    "fetch_dir",
    "lightning2_compatible",
    "model_inputs",
    "split_has_targets",
    "target_size",
]
