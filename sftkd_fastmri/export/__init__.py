"""Loading networks out of any checkpoint, and exporting them for deployment."""

from .deploy import EXPORT_FORMATS, export_model, load_pt2_export, load_torchscript_export
from .loading import ROLES, checkpoint_kind, load_reconstruction_model

__all__ = [
    "EXPORT_FORMATS",
    "ROLES",
    "checkpoint_kind",
    "export_model",
    "load_pt2_export",
    "load_reconstruction_model",
    "load_torchscript_export",
]
