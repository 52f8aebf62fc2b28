"""DC-CNN models, data-consistency layers, presets and checkpoint helpers (no Lightning)."""

from .checkpoint import (
    CheckpointError,
    load_model,
    load_state_dict_strict,
    read_checkpoint,
    save_model_checkpoint,
)
from .data_consistency import DataConsistency, sens_expand, sens_reduce
from .dccnn import DCCNN, ConvBlock, DCCNNCascade, check_inputs
from .registry import create_model, list_models, model_config, register_model

__all__ = [
    "DCCNN",
    "CheckpointError",
    "ConvBlock",
    "DCCNNCascade",
    "DataConsistency",
    "check_inputs",
    "create_model",
    "list_models",
    "load_model",
    "load_state_dict_strict",
    "model_config",
    "read_checkpoint",
    "register_model",
    "save_model_checkpoint",
    "sens_expand",
    "sens_reduce",
]
