"""Loading networks out of any checkpoint, and exporting them for deployment."""

from .loading import ROLES, checkpoint_kind, load_reconstruction_model

__all__ = ["ROLES", "checkpoint_kind", "load_reconstruction_model"]
