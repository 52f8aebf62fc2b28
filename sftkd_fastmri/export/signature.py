"""The fixed input signature of an exported network: ``(masked_kspace, mask)`` single-coil or
``(masked_kspace, mask, sens_maps)`` multi-coil (tracing and ONNX take no optional
arguments), the scripted guards that check an export's inputs before the network runs, and the
input layout recorded in every export's metadata (:mod:`.deploy`)."""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor, nn


class _SingleCoil(nn.Module):
    """Fixed ``(masked_kspace, mask)`` signature: tracing cannot take ``sens_maps=None``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, masked_kspace: Tensor, mask: Tensor) -> Tensor:
        return self.model(masked_kspace, mask, None)


class _MultiCoil(nn.Module):
    """Fixed ``(masked_kspace, mask, sens_maps)`` signature for SENSE data consistency."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, masked_kspace: Tensor, mask: Tensor, sens_maps: Tensor) -> Tensor:
        return self.model(masked_kspace, mask, sens_maps)


def _check_layout(masked_kspace: Tensor, mask: Tensor) -> None:
    """The k-space and mask layout every export takes (compiled into the guards below)."""
    if masked_kspace.dim() != 5 or masked_kspace.size(-1) != 2:
        raise ValueError(
            f"masked_kspace must be (B, coils, H, W, 2), got shape {masked_kspace.shape}"
        )
    if mask.dim() != 5 or mask.size(3) != masked_kspace.size(3):
        raise ValueError(
            f"mask must be (B, 1, 1, W, 1) with the k-space's W = {masked_kspace.size(3)}, "
            f"got shape {mask.shape}"
        )
    if mask.size(0) != masked_kspace.size(0) and mask.size(0) != 1:
        raise ValueError(
            f"mask has a batch of {mask.size(0)} for k-space of batch {masked_kspace.size(0)}: "
            "one mask per slice, or one (batch 1) for all"
        )


def _check_fixed(masked_kspace: Tensor, fixed: List[int]) -> None:
    """An export that reproduces the network at its traced sizes only (``fixed``: batch,
    coils, H, W; empty: any) refuses others rather than return a wrong image."""
    if len(fixed) == 0:
        return
    got = [masked_kspace.size(0), masked_kspace.size(1), masked_kspace.size(2)]
    got.append(masked_kspace.size(3))
    if got != fixed:
        raise ValueError(
            "this export reproduces the network only for masked_kspace of (B, coils, H, W) = "
            f"{fixed} (a trace froze sizes the network computes from its input), got {got}: export "
            "again with --shape H W and --coils N for the inputs you deploy"
        )


def _batch_mask(masked_kspace: Tensor, mask: Tensor) -> Tensor:
    """A boolean mask per slice: one mask for the whole batch (batch 1) repeated, as the eager
    network broadcasts it (a torch.export program's batch dimension takes no broadcast)."""
    return mask.to(torch.bool).expand([masked_kspace.size(0), -1, -1, -1, -1])


class _SingleCoilGuard(nn.Module):
    """Checks a single-coil export's inputs before the (possibly traced) network runs: a
    trace keeps no Python checks, and would otherwise reconstruct multi-coil k-space from
    its first coil without a word."""

    # a real type, not this module's postponed annotation string, for TorchScript
    __annotations__ = {"fixed": List[int]}

    def __init__(self, inner: nn.Module, fixed: Optional[List[int]] = None):
        super().__init__()
        self.inner = inner
        self.fixed = list(fixed or [])

    def forward(self, masked_kspace: Tensor, mask: Tensor) -> Tensor:
        _check_layout(masked_kspace, mask)
        _check_fixed(masked_kspace, self.fixed)
        if masked_kspace.size(1) != 1:
            raise ValueError(
                "this export is single-coil (inputs masked_kspace, mask) but masked_kspace "
                f"has {masked_kspace.size(1)} coils; multi-coil data need an export with "
                "sens_maps (export --coils N)"
            )
        # fastMRI's masks are float
        return self.inner(masked_kspace, _batch_mask(masked_kspace, mask))


class _MultiCoilGuard(nn.Module):
    """Checks a multi-coil export's inputs (see :class:`_SingleCoilGuard`)."""

    # a real type, not this module's postponed annotation string, for TorchScript
    __annotations__ = {"fixed": List[int]}

    def __init__(self, inner: nn.Module, fixed: Optional[List[int]] = None):
        super().__init__()
        self.inner = inner
        self.fixed = list(fixed or [])

    def forward(
        self, masked_kspace: Tensor, mask: Tensor, sens_maps: Optional[Tensor] = None
    ) -> Tensor:
        _check_layout(masked_kspace, mask)
        _check_fixed(masked_kspace, self.fixed)
        if sens_maps is None:
            raise ValueError(
                "this export is multi-coil (inputs masked_kspace, mask, sens_maps): pass the "
                "coil sensitivities as sens_maps, (B, coils, H, W, 2)"
            )
        if sens_maps.shape != masked_kspace.shape:
            raise ValueError(
                f"sens_maps must have the k-space's shape {masked_kspace.shape}, "
                f"got {sens_maps.shape}"
            )
        return self.inner(masked_kspace, _batch_mask(masked_kspace, mask), sens_maps)


def _guarded(
    module: nn.Module, coils: int, fixed: Optional[List[int]] = None
) -> torch.jit.ScriptModule:
    """``module`` (scripted or traced) behind a scripted check of its inputs (with ``fixed``,
    ``[B, coils, H, W]``, of exactly those sizes)."""
    guard = _SingleCoilGuard(module, fixed) if coils == 1 else _MultiCoilGuard(module, fixed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
        return torch.jit.script(guard)


def _wrap(model: nn.Module, coils: int) -> nn.Module:
    return (_SingleCoil(model) if coils == 1 else _MultiCoil(model)).eval()


def _input_names(coils: int) -> List[str]:
    return ["masked_kspace", "mask"] + (["sens_maps"] if coils > 1 else [])


#: What each input of an export expects (recorded in its metadata for deployers).
INPUT_LAYOUT = {
    "masked_kspace": "float32 (B, coils, H, W, 2): acquired k-space, zero where unsampled",
    "mask": "bool (B, 1, 1, W, 1): sampled k-space columns",
    "sens_maps": "float32 (B, coils, H, W, 2): coil sensitivities",
    "output": "float32 (B, H, W): magnitude image",
}


def _signature(coils: int) -> Dict[str, Any]:
    names = _input_names(coils)
    layout = {name: INPUT_LAYOUT[name] for name in names + ["output"]}
    return {"inputs": names, "layout": layout, "coils": coils}


def _dynamic_shapes(names: List[str]) -> Dict[str, Dict[int, Any]]:
    """``torch.export`` dims of the inputs: batch, H, W and (multi-coil) coils symbolic."""
    from torch.export import Dim

    auto = Dim.AUTO  # dynamic where the model allows it, static where it does not
    kspace = {0: auto, 2: auto, 3: auto}
    if "sens_maps" in names:
        kspace[1] = auto  # any number of coils; single-coil exports keep exactly one
    dims = {"masked_kspace": kspace, "mask": {0: auto, 3: auto}, "sens_maps": kspace}
    return {name: dims[name] for name in names}


def _dim(d: Any) -> Union[int, str]:
    return d if isinstance(d, int) else str(d)
