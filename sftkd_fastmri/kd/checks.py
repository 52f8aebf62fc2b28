"""A check run before training: can these KD losses distil this teacher into this student?
One KD step on copies of the networks and a synthetic batch (plain torch, no Lightning)."""

from __future__ import annotations

import copy
from typing import Any, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..models.checkpoint import compiled_inner
from .distiller import Distiller

__all__ = ["check_distillation"]


def _smallest_size(*networks: nn.Module) -> int:
    """The smallest image side on which every U-Net inside ``networks`` (fastMRI's, e.g. in
    a VarNet's cascades and sensitivity network) keeps more than one pixel at its deepest
    level, where its instance norms need more than one."""
    from fastmri.models.unet import Unet

    pools = [m.num_pool_layers for net in networks for m in net.modules() if isinstance(m, Unet)]
    return 2 ** (max(pools) + 1) if pools else 1


def check_distillation(
    student: nn.Module,
    teacher: nn.Module,
    losses: Mapping[str, Any],
    layers: Optional[Mapping[str, Sequence[Sequence[str]]]] = None,
    loss_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
    size: Tuple[int, int] = (16, 16),
) -> None:
    """Run one KD step of ``losses`` on copies of two networks called as
    ``network(masked_kspace, mask)`` (DC-CNNs, VarNets; with a one-coil map of ones for a
    VarNet that takes the batch's maps) with a synthetic single-coil batch of ``size`` slices
    (as many as the losses need, at least two; larger where a U-Net inside needs it), so that
    a pairing whose features cannot be compared (e.g. FSP between 8- and 16-channel layers)
    fails before any training rather than at the first KD step of a long run. The networks
    passed in and the random state are left as they were.

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
        height, width = (max(n, _smallest_size(student, teacher)) for n in size)
        mask = torch.zeros(batch, 1, 1, width, 1, dtype=torch.bool)
        mask[..., ::2, :] = True
        kspace = torch.randn(batch, 1, height, width, 2) * mask
        inputs = [kspace, mask]
        if any(
            getattr(compiled_inner(m), "use_given_sens_maps", False) for m in (student, teacher)
        ):
            sens_maps = torch.zeros_like(kspace)
            sens_maps[..., 0] = 1  # a VarNet that takes the batch's maps: one coil's, 1 + 0i
            inputs.append(sens_maps)
        try:
            with distiller, distiller.step():
                student(*inputs)
                distiller()
        except (ValueError, TypeError, KeyError, RuntimeError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            raise ValueError(
                f"KD losses {sorted(losses)} cannot distil this teacher "
                f"({type(teacher).__name__}) into this student ({type(student).__name__}): "
                f"{message}"
            ) from err
