"""Load the reconstruction network out of any checkpoint this package writes.

Understood layouts (all read with ``weights_only=True`` and loaded strictly by name):

* model checkpoints (:func:`sftkd_fastmri.models.save_model_checkpoint`; also SFT exports);
* Lightning checkpoints of :class:`~sftkd_fastmri.pl_modules.DCCNNModule` (training and
  distillation runs: weights under ``model.``; distillation's learned loss parameters under
  ``distillation.`` are ignored);
* Lightning checkpoints of :class:`~sftkd_fastmri.pl_modules.SFTModule` (weights under
  ``sft.teacher.`` and ``sft.student.``; ``role`` picks one, the teacher by default).
"""

from __future__ import annotations

import os
from typing import Any, Tuple

from torch import nn

from ..models import DCCNN, CheckpointError, load_state_dict_strict, read_checkpoint
from ..models.checkpoint import FORMAT_KEY, strip_prefix

__all__ = ["ROLES", "load_reconstruction_model", "checkpoint_kind"]

ROLES = ("auto", "model", "teacher", "student")


def checkpoint_kind(ckpt: dict) -> str:
    """``"model"``, ``"lightning"`` (single network) or ``"sft"``."""
    if FORMAT_KEY in ckpt:
        return "model"
    hp = ckpt.get("hyper_parameters")
    if "state_dict" in ckpt and isinstance(hp, dict):
        if "teacher_preset" in hp and "student_preset" in hp:
            return "sft"
        if "model_preset" in hp or "preset" in hp:
            return "lightning"
    return "unknown"


def _select(ckpt: dict, kind: str, role: str, path: str) -> Tuple[Any, Any, dict]:
    hp = ckpt.get("hyper_parameters", {})
    if kind == "sft":
        which = "teacher" if role in ("auto", "teacher", "model") else "student"
        return (
            hp.get(f"{which}_preset"),
            hp.get(f"{which}_config"),
            strip_prefix(ckpt["state_dict"], f"sft.{which}."),
        )
    if kind == "lightning":
        return (
            hp.get("model_preset", hp.get("preset")),
            hp.get("model_config"),
            strip_prefix(ckpt["state_dict"], "model."),
        )
    meta = ckpt[FORMAT_KEY]
    return meta.get("preset"), meta.get("config"), ckpt["state_dict"]


def load_reconstruction_model(
    path: os.PathLike, role: str = "auto", map_location: Any = "cpu"
) -> nn.Module:
    """Rebuild the DC-CNN stored in ``path``.

    Args:
        path: a model checkpoint, or a Lightning checkpoint of a training, SFT or KD run.
        role: for SFT checkpoints, ``"teacher"`` (default for ``"auto"``) or ``"student"``
            (the student initialisation); ignored for single-network checkpoints.
        map_location: passed to ``torch.load``.

    Raises:
        CheckpointError: unreadable file, unknown layout, missing config, mismatching keys.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    ckpt = read_checkpoint(path, map_location)
    kind = checkpoint_kind(ckpt)
    if kind == "unknown":
        raise CheckpointError(
            f"{path}: not a checkpoint of this package (expected a model export, or a "
            "Lightning checkpoint of DCCNNModule or SFTModule)"
        )
    preset, config, state = _select(ckpt, kind, role, str(path))
    if not config:
        raise CheckpointError(f"{path}: checkpoint records no model config for role {role!r}")
    if not state:
        raise CheckpointError(f"{path}: checkpoint holds no weights for role {role!r}")
    model = DCCNN(**config)
    model.preset = preset
    load_state_dict_strict(model, state, source=str(path))
    return model
