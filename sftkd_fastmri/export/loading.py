"""Load the reconstruction network out of any checkpoint this package writes.

:func:`load_reconstruction_model` is :func:`sftkd_fastmri.models.load_model` (model exports,
Lightning checkpoints of training, distillation and SFT runs, and of fastMRI's
``VarNetModule``), re-exported here beside the deployment export.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from torch import nn

from ..models.checkpoint import (
    FORMAT_KEY,
    ROLES,
    checkpoint_kind,
    load_model,
    read_checkpoint,
)

__all__ = ["ROLES", "check_role_applies", "checkpoint_kind", "load_reconstruction_model"]


def load_reconstruction_model(
    path: os.PathLike, role: str = "auto", map_location: Any = "cpu"
) -> nn.Module:
    """Rebuild the network stored in ``path`` (see :func:`sftkd_fastmri.models.load_model`)."""
    return load_model(path, role=role, map_location=map_location)


def check_role_applies(path: os.PathLike, role: str) -> None:
    """Raise ValueError when ``role`` asks for the teacher or the student of a checkpoint that
    holds one network only (only SFT checkpoints hold both), instead of silently returning
    that one network whatever it is. A model export asked for the network it records
    holding (``sft_student_init.ckpt`` as the student) is what was asked for."""
    if role == "auto":
        return
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    ckpt = read_checkpoint(path)
    kind = checkpoint_kind(ckpt)
    if kind == "sft":
        return
    meta = ckpt.get(FORMAT_KEY) if kind == "model" else None
    held = meta.get("role") if isinstance(meta, Mapping) else None
    if held == role:
        return
    if kind == "unknown":
        raise ValueError(
            f"{path}: not a checkpoint of this package's commands, so role {role!r} picks "
            "nothing in it; leave the role at 'auto'"
        )
    what = f"the {held} network" if held else "one network"
    name = {"varnet_module": "VarNetModule Lightning"}.get(kind, kind)
    raise ValueError(
        f"{path}: role {role!r} picks one network of an SFT checkpoint (a Lightning "
        f"checkpoint of the sft command, holding the teacher and the student); this "
        f"{name} checkpoint holds {what}: leave the role at 'auto'"
    )
