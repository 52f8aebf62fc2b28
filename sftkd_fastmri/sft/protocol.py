"""The narrow cascade protocol through which the SFT wrapper drives a reconstruction network.

A cascaded reconstruction network is seen as a sequence of state updates::

    state_0 = model.initial_state(masked_kspace, mask, sens_maps)
    state_i = model.cascade_step(i - 1, state_{i-1}, masked_kspace, mask, sens_maps)
    image   = model.final_image(state_N)                      # (B, H, W)

:class:`~sftkd_fastmri.models.DCCNN` implements it directly (its state is the image
``(B, C, H, W)``). :class:`~sftkd_fastmri.models.CascadedVarNet` serves fastMRI's
:class:`fastmri.models.VarNet` through a thin adapter (its state is the k-space estimate and
the coil maps its sensitivity network computes in ``initial_state``); another cascaded model
needs the same four members. A model that sets ``takes_num_low_frequencies = True`` (the
VarNet adapter) also gets the batch's ``num_low_frequencies`` as a keyword of
``initial_state`` and of its forward, as fastMRI's ``VarNetModule`` gives it to its VarNet.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["CascadeModel", "check_cascade_model"]


@runtime_checkable
class CascadeModel(Protocol):
    """What :class:`~sftkd_fastmri.sft.StudentFriendlyTeacher` needs from a cascaded model.

    Inputs are fastMRI-layout tensors: ``masked_kspace`` ``(B, coils, H, W, 2)`` (``coils == 1``
    for single-coil data), ``mask`` broadcastable to it (e.g. ``(B, 1, 1, W, 1)``, non-zero
    where sampled), ``sens_maps`` ``(B, coils, H, W, 2)`` or ``None``.

    The state is a tensor with the batch on dimension 0 (the wrapper may concatenate states
    of several branches along it); its other dimensions are the model's business, but a
    teacher and a student paired by the wrapper must use the same state layout, since a
    student branch starts from a teacher state.

    Attributes:
        cascades: the cascades in order (an :class:`torch.nn.ModuleList`); ``len(cascades)``
            is the number ``N`` of cascades, and calling ``cascade_step(i, ...)`` must run
            ``cascades[i]`` (so forward hooks on a cascade see every use of it).

    Optional: a method ``check_inputs(masked_kspace, mask, sens_maps)`` raising ``ValueError``
    on inputs the model cannot take; the wrapper calls it before driving the cascades
    (models without it get the DC-CNN checks, which require ``sens_maps`` for multi-coil
    k-space); an attribute ``state_layout`` (a string saying what a state is): the wrapper
    refuses a teacher and a student whose layouts differ.

    Note:
        ``isinstance(model, CascadeModel)`` works on Python 3.11, but from Python 3.12 on the
        runtime check looks attributes up statically and misses submodules an
        :class:`torch.nn.Module` keeps in ``_modules`` (such as ``cascades``). Use
        :func:`check_cascade_model`, which also reports what is missing.
    """

    cascades: nn.ModuleList

    def initial_state(
        self, masked_kspace: Tensor, mask: Tensor, sens_maps: Optional[Tensor] = None
    ) -> Tensor:
        """State before the first cascade (for DC-CNN the zero-filled image ``(B, C, H, W)``)."""
        ...

    def cascade_step(
        self,
        index: int,
        state: Tensor,
        masked_kspace: Tensor,
        mask: Tensor,
        sens_maps: Optional[Tensor] = None,
    ) -> Tensor:
        """Advance ``state`` through cascade ``index`` (0-based), data consistency included."""
        ...

    def final_image(self, state: Tensor) -> Tensor:
        """Output image ``(B, H, W)`` of a state (a magnitude image for fastMRI metrics)."""
        ...

    def __call__(
        self, masked_kspace: Tensor, mask: Tensor, sens_maps: Optional[Tensor] = None
    ) -> Tensor:
        """The model's own forward: ``final_image`` of the state after all cascades."""
        ...


_METHODS = ("initial_state", "cascade_step", "final_image")


def check_cascade_model(model: object, name: str = "model") -> int:
    """Check that ``model`` implements :class:`CascadeModel` and return its number of cascades.

    Attributes are looked up dynamically (``getattr``), so submodules of an
    :class:`torch.nn.Module` are found on every Python version.

    Args:
        model: the object to check.
        name: how error messages refer to it (e.g. ``"teacher"``).

    Returns:
        ``N = len(model.cascades)``.

    Raises:
        TypeError: naming every missing or non-callable member, or a ``cascades`` attribute
            without a length.
    """
    problems = []
    for method in _METHODS:
        if not callable(getattr(model, method, None)):
            problems.append(f"method {method}()")
    if not callable(model):
        problems.append("__call__ (the model's own forward)")
    cascades = getattr(model, "cascades", None)
    if cascades is None:
        problems.append("attribute 'cascades'")
    elif not hasattr(cascades, "__len__") or not hasattr(cascades, "__getitem__"):
        problems.append(f"'cascades' as a sequence (got {type(cascades).__name__})")
    if problems:
        raise TypeError(
            f"{name} ({type(model).__name__}) does not implement the cascade protocol "
            f"(sftkd_fastmri.sft.CascadeModel); missing: {', '.join(problems)}. Wrap other "
            "cascaded models in an adapter providing initial_state, cascades, cascade_step "
            "and final_image."
        )
    return len(cascades)
