"""The reduced study that ``sftkd-fastmri demo`` runs on the built-in demo data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from .options import GROUPS

DEMO_EPOCHS = 8
#: The demo's learning rate does not decay: a step this long, independent of the epochs, so
#: that a finished demo asked for more epochs trains on rather than counting as other settings.
DEMO_LR_STEP = 1000


def demo_config(
    data_dir: Path, out_dir: Path, epochs: Optional[int] = None, progress: bool = True
) -> Dict[str, Any]:
    """Brain multi-coil demo data at 4x, D5C5 teacher vs D3C5 student, two KD methods."""
    cfg: Dict[str, Any] = {o.name: o.default for group in GROUPS.values() for o in group}
    n = epochs or DEMO_EPOCHS
    cfg.update(
        data_path=str(data_dir),
        challenge="multicoil",
        accelerations=[4],
        center_fractions=[0.08],
        test_split="test_full",
        batch_size=4,
        accelerator="cpu",
        progress=progress,
        logger="csv",
        out_dir=str(out_dir),
        lr_step_size=DEMO_LR_STEP,  # no decay within the short schedule
        max_epochs=n,
        epochs={"teacher": n, "student": n, "sft": n, "kd": n},
        methods={"at": 1.0, "imitation": 1.0},
        title="SFT-KD demo (MNI152 brain, multi-coil, 4x)",
    )
    return cfg
