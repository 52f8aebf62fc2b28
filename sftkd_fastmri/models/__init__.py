"""DC-CNN models, the VarNet cascade adapter, data-consistency layers, presets and checkpoint
helpers (no Lightning)."""

from .checkpoint import (
    CheckpointError,
    init_from_checkpoint,
    load_model,
    load_state_dict_strict,
    read_checkpoint,
    save_model_checkpoint,
)
from .data_consistency import DataConsistency, sens_expand, sens_reduce
from .dccnn import DCCNN, ConvBlock, DCCNNCascade, check_inputs
from .registry import (
    build_model,
    create_model,
    list_architectures,
    list_models,
    model_config,
    register_architecture,
    register_model,
)
from .varnet import CascadedVarNet, check_varnet_inputs

__all__ = [
    "DCCNN",
    "CascadedVarNet",
    "CheckpointError",
    "ConvBlock",
    "DCCNNCascade",
    "DataConsistency",
    "check_inputs",
    "build_model",
    "check_varnet_inputs",
    "create_model",
    "init_from_checkpoint",
    "list_architectures",
    "list_models",
    "load_model",
    "load_state_dict_strict",
    "model_config",
    "read_checkpoint",
    "register_architecture",
    "register_model",
    "save_model_checkpoint",
    "sens_expand",
    "sens_reduce",
]
