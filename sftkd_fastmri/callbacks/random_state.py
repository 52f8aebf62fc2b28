"""Resume a run with the random state it was saved with."""

from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

__all__ = ["RandomStateCheckpoint"]


class RandomStateCheckpoint(Callback):
    """Save the random generators of Python, NumPy and torch (CPU and CUDA) with every
    checkpoint, and restore them when a run resumes from one.

    Lightning checkpoints the weights, optimizers and loops but not the generators, so a
    resumed run draws other batch orders, masks and dropout than the run it continues would
    have drawn: the resumed model differs from an uninterrupted run's. With this callback
    a run resumed from the end of an epoch trains on as the uninterrupted run would (on the
    same machine, with the same settings; with DataLoader workers, as long as they are started
    afresh each epoch, ``FastMRIDataModule``'s default: persistent workers keep seeds and mask
    counts of their own, which a checkpoint does not hold, so a resumed run would draw other,
    equally random, masks). The states are saved as tensors and lists, so a
    ``weights_only`` load still reads the checkpoint. Checkpoints without them (other
    trainers) resume as before. Under DDP every rank restores the state saved by rank zero,
    as every rank started from the same seed.
    """

    KEY = "sftkd_random_state"

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Dict[str, Any]
    ) -> None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        state: Dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": {
                "kind": str(kind),
                "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "gauss": float(gauss),
            },
            "python": {"version": version, "internal": list(internal), "gauss": gauss_next},
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint[self.KEY] = state

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Dict[str, Any]
    ) -> None:
        state = checkpoint.get(self.KEY)
        if not isinstance(state, dict):
            return
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
        p = state["python"]
        random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available():
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
