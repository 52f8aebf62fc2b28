"""Load the reconstruction network out of any checkpoint this package writes.

:func:`load_reconstruction_model` is :func:`sftkd_fastmri.models.load_model` (model exports,
Lightning checkpoints of training, distillation and SFT runs), re-exported here beside the
deployment export.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..models.checkpoint import ROLES, checkpoint_kind, load_model, read_checkpoint

__all__ = ["ROLES", "check_role_applies", "checkpoint_kind", "load_reconstruction_model"]


def load_reconstruction_model(
    path: os.PathLike, role: str = "auto", map_location: Any = "cpu"
) -> nn.Module:
    """Rebuild the DC-CNN stored in ``path`` (see :func:`sftkd_fastmri.models.load_model`)."""
    return load_model(path, role=role, map_location=map_location)


def check_role_applies(path: os.PathLike, role: str) -> None:
    """Raise ValueError when ``role`` asks for the teacher or the student of a checkpoint that
    holds one network only (only SFT checkpoints hold both), instead of silently returning
    that one network whatever it is."""
    if role == "auto":
        return
    kind = checkpoint_kind(read_checkpoint(path))
    if kind != "sft":
        raise ValueError(
            f"{path}: role {role!r} picks one network of an SFT checkpoint (a Lightning "
            f"checkpoint of the sft command, holding the teacher and the student); this "
            f"{kind or 'unknown'} checkpoint holds one network: leave the role at 'auto'"
        )
