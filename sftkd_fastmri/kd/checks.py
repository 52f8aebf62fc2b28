"""A check run before training: can these KD losses distil this teacher into this student?
One KD step on copies of the networks and a synthetic batch (plain torch, no Lightning)."""

from __future__ import annotations

import copy
from typing import Any, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .distiller import Distiller

__all__ = ["check_distillation"]


def check_distillation(
    student: nn.Module,
    teacher: nn.Module,
    losses: Mapping[str, Any],
    layers: Optional[Mapping[str, Sequence[Sequence[str]]]] = None,
    loss_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
    size: Tuple[int, int] = (16, 16),
) -> None:
    """Run one KD step of ``losses`` on copies of two DC-CNN-style networks (called as
    ``network(masked_kspace, mask)``) with a synthetic single-coil batch of ``size`` slices
    (as many as the losses need, at least two), so that a pairing whose features cannot be
    compared (e.g. FSP between 8- and 16-channel layers) fails before any training rather
    than at the first KD step of a long run. The networks passed in and the random state are
    left as they were.

    Raises:
        KeyError / ValueError / TypeError: from building the pairing (unknown layer names,
            stray or bad options, layers of other channel counts), in their own words.
        ValueError: the KD step failed, naming the losses and what it reported.
    """
    student, teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # Its own errors (unknown layers, stray options) say what they are as they stand;
        # FitNet's regressors draw their initialisation from the forked random state.
        distiller = Distiller(student, teacher, losses, layers, loss_options)
        batch = max([2] + [loss.min_batch_size for loss in distiller.losses.values()])
        height, width = size
        mask = torch.zeros(batch, 1, 1, width, 1, dtype=torch.bool)
        mask[..., ::2, :] = True
        kspace = torch.randn(batch, 1, height, width, 2) * mask
        try:
            with distiller, distiller.step():
                student(kspace, mask)
                distiller()
        except (ValueError, TypeError, KeyError, RuntimeError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            raise ValueError(
                f"KD losses {sorted(losses)} cannot distil this teacher "
                f"({type(teacher).__name__}) into this student ({type(student).__name__}): "
                f"{message}"
            ) from err
