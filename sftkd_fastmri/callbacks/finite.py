"""Stop training on a non-finite loss, naming where it happened."""

from __future__ import annotations

import math
from typing import Any, List, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

__all__ = ["FiniteLossCheck", "NonFiniteLossError"]


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite."""


class FiniteLossCheck(Callback):
    """Raise :class:`NonFiniteLossError` before the backward pass of a NaN or infinite loss.

    A NaN loss turns every weight into NaN at the next optimizer step, and a run that goes on
    would select, export and report a network of NaNs as if it had trained. The error names
    the epoch, the step and the slices of the batch (``fname`` / ``slice_num`` of fastMRI-style
    batches), so the data or the setting (learning rate, loss weights) can be found. Costs one
    scalar read per step and, under DDP, one scalar all-reduce, so that every rank stops at
    the same step.
    """

    def __init__(self) -> None:
        super().__init__()
        self._slices: List[str] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._slices = _describe(batch)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        value = float(loss.detach())
        finite = math.isfinite(value)
        if trainer.world_size > 1:
            # every rank decides together: a rank stopping alone would leave the others
            # waiting in the gradient all-reduce (a hang, or a "connection closed" error)
            flag = torch.tensor(0.0 if finite else 1.0, device=loss.device)
            if float(trainer.strategy.reduce(flag, reduce_op="sum")) > 0 and finite:
                raise NonFiniteLossError(
                    f"the training loss is NaN or infinite on another rank at epoch "
                    f"{trainer.current_epoch}, step {trainer.global_step} (that rank's error "
                    "names its batch); stopped on every rank before it reached the weights"
                )
        if finite:
            return
        shown = ", ".join(self._slices[:4]) + (" ..." if len(self._slices) > 4 else "")
        raise NonFiniteLossError(
            f"the training loss is {value} at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}{f' (batch: {shown})' if shown else ''}; stopped before it "
            f"reached the weights. Check {'those slices' if shown else 'the batch'}, or lower "
            "the learning rate / loss weights"
        )


def _describe(batch: Any) -> List[str]:
    fnames: Optional[Any] = getattr(batch, "fname", None)
    slices: Optional[Any] = getattr(batch, "slice_num", None)
    if fnames is None or slices is None:
        return []
    try:
        numbers = slices.tolist() if hasattr(slices, "tolist") else list(slices)
        return [f"{f} slice {int(n)}" for f, n in zip(fnames, numbers)]
    except (TypeError, ValueError):
        return []
