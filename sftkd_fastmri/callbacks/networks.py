"""What :class:`~sftkd_fastmri.callbacks.DistillationCallback` finds in a LightningModule and
checks before a fit: which submodule is the network (for an SFT teacher, which of its two
networks), its dtype and device, and whether the training batches are large enough for every
KD loss asked for."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..kd.registry import loss_class
from ..sft import StudentFriendlyTeacher

__all__ = ["check_batch_size", "find_network", "sft_network"]

#: ``teacher_prefix`` values and the network of a student-friendly teacher each takes.
_SFT_ROLES = {None: "teacher", "auto": "teacher", "teacher": "teacher", "student": "student"}

_NETWORK_ATTRS = ("model", "varnet", "unet")


def find_network(
    module: nn.Module,
    attr: Optional[str] = None,
    exclude: Sequence[str] = (),
    role: str = "student",
) -> nn.Module:
    """The reconstruction network inside a LightningModule.

    Args:
        module: The LightningModule (or any module holding the network).
        attr: Attribute name to use; default: the first of ``model``, ``varnet``, ``unet``
            that is a module, else the only child module with parameters.
        exclude: Child names never chosen automatically.
        role: Used in error messages.

    Raises:
        ValueError: If ``attr`` is not a submodule, or no single network can be identified.
    """
    children = {n: c for n, c in module.named_children() if n not in exclude}
    if attr is not None:
        found = getattr(module, attr, None)
        if not isinstance(found, nn.Module):
            raise ValueError(
                f"{type(module).__name__} has no submodule {attr!r} ({role}_attr); child "
                f"modules: {sorted(children) or 'none'}"
            )
        return found
    for name in _NETWORK_ATTRS:
        if isinstance(children.get(name), nn.Module):
            return children[name]
    with_params = [n for n, c in children.items() if any(True for _ in c.parameters())]
    if len(with_params) == 1:
        return children[with_params[0]]
    raise ValueError(
        f"cannot tell which submodule of {type(module).__name__} is the {role} network "
        f"(child modules with parameters: {with_params or 'none'}); pass {role}_attr=<name>"
    )


def sft_network(network: nn.Module, prefix: Optional[str] = None) -> nn.Module:
    """One network of a :class:`~sftkd_fastmri.sft.StudentFriendlyTeacher` (the wrapper that
    :class:`~sftkd_fastmri.pl_modules.SFTModule` trains), ``network`` itself otherwise.

    The wrapper runs the teacher in eval mode and is no network to distil from (its
    submodules hold the student too): as for an SFT checkpoint, the teacher is taken, or the
    student with ``prefix="student"``.

    Args:
        network: a network, or a ``StudentFriendlyTeacher``.
        prefix: ``"teacher"`` (also ``None`` and ``"auto"``) or ``"student"``.

    Raises:
        ValueError: ``network`` is a ``StudentFriendlyTeacher`` and ``prefix`` another value.
    """
    if not isinstance(network, StudentFriendlyTeacher):
        return network
    if prefix not in _SFT_ROLES:
        raise ValueError(
            f"teacher_prefix for a student-friendly teacher (SFTModule) must be 'teacher' or "
            f"'student', got {prefix!r}"
        )
    return getattr(network, _SFT_ROLES[prefix])


def _floating_dtype(module: nn.Module) -> Optional[torch.dtype]:
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def _device(module: nn.Module) -> Optional[torch.device]:
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    return None


def check_batch_size(losses: Mapping[str, Any], batch_size: int, what: str = "batch size") -> None:
    """Raise unless every loss in ``losses`` (names) is defined on batches of ``batch_size``
    (SP and CC relate the samples of a batch to each other and need at least 2), so a run does
    not train for its whole length with a KD term that no step can compute.

    Raises:
        ValueError: naming the losses, what they need and ``what`` was given.
    """
    needs = {name: loss_class(name).min_batch_size for name in losses}
    too_small = sorted(name for name, n in needs.items() if n > batch_size)
    if too_small:
        raise ValueError(
            f"KD loss(es) {', '.join(too_small)} relate the samples of a batch to each other and "
            f"need batches of at least {max(needs[n] for n in too_small)}; {what} is "
            f"{batch_size} (use a larger batch size or other methods)"
        )


def _loader_batch_size(loader: Any) -> Optional[int]:
    """The configured batch size of a DataLoader (also behind a batch sampler), else None."""
    if not isinstance(loader, DataLoader):
        return None
    if loader.batch_size is not None:
        return int(loader.batch_size)
    size = getattr(loader.batch_sampler, "batch_size", None)
    return int(size) if isinstance(size, int) else None


def _batch_size(output: Any) -> Optional[int]:
    # Given explicitly: Lightning cannot always infer it from a fastMRI batch (a namedtuple).
    return int(output.shape[0]) if isinstance(output, Tensor) and output.dim() > 0 else None
