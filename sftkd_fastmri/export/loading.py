"""Load the reconstruction network out of any checkpoint this package writes.

:func:`load_reconstruction_model` is :func:`sftkd_fastmri.models.load_model` (model exports,
Lightning checkpoints of training, distillation and SFT runs), re-exported here beside the
deployment export.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..models.checkpoint import ROLES, checkpoint_kind, load_model

__all__ = ["ROLES", "checkpoint_kind", "load_reconstruction_model"]


def load_reconstruction_model(
    path: os.PathLike, role: str = "auto", map_location: Any = "cpu"
) -> nn.Module:
    """Rebuild the DC-CNN stored in ``path`` (see :func:`sftkd_fastmri.models.load_model`)."""
    return load_model(path, role=role, map_location=map_location)
