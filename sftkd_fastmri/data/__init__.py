"""Data path: fastMRI transforms, mask functions, checked dataset reader, demo data."""

from .batching import ShapeBatchSampler, slice_shapes
from .datasets import CheckedSliceDataset, check_volume, split_dir
from .demo import DemoDataInfo, write_demo_data
from .masks import MASK_TYPES, FixedMaskFunc, create_mask_func, num_low_frequencies_of
from .sensitivity import estimate_sensitivity_maps
from .splits import HoldoutSplit, holdout_split
from .transforms import DataError, DCCNNDataTransform, DCCNNSample, crop_readout, model_inputs

__all__ = [
    "MASK_TYPES",
    "CheckedSliceDataset",
    "DCCNNDataTransform",
    "DCCNNSample",
    "DataError",
    "FixedMaskFunc",
    "DemoDataInfo",
    "HoldoutSplit",
    "ShapeBatchSampler",
    "check_volume",
    "create_mask_func",
    "crop_readout",
    "estimate_sensitivity_maps",
    "holdout_split",
    "model_inputs",
    "num_low_frequencies_of",
    "slice_shapes",
    "split_dir",
    "write_demo_data",
]
