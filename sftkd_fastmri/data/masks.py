"""Mask functions: fastMRI's, plus a fixed mask shared by every slice (the paper's protocol).

SFT-KD-Recon (Matcha et al., MIDL 2023) and KD-MRI undersample every slice with the same 1-D
Cartesian variable-density mask. :class:`FixedMaskFunc` provides that on top of fastMRI's
:class:`fastmri.data.subsample.MaskFunc` interface, so it plugs into
:func:`fastmri.data.transforms.apply_mask` and any fastMRI transform.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from fastmri.data.subsample import (
    EquispacedMaskFractionFunc,
    MagicMaskFractionFunc,
    MaskFunc,
    RandomMaskFunc,
    create_mask_for_mask_type,
)

__all__ = [
    "FixedMaskFunc",
    "create_mask_func",
    "mask_width_problem",
    "num_low_frequencies_of",
    "MASK_TYPES",
]

MASK_TYPES = ("random", "equispaced", "equispaced_fraction", "magic", "magic_fraction")

#: Mask types whose ``acceleration`` is the overall budget of W / acceleration columns, the
#: fully sampled centre included (fastMRI draws the outer columns to fill what the centre
#: leaves): they need ``center_fraction * acceleration < 1``. ``equispaced`` and ``magic``
#: space the outer columns ``acceleration`` apart whatever the centre takes.
BUDGET_MASK_TYPES = ("random", "equispaced_fraction", "magic_fraction")

_BUDGET_RULE = (
    "fastMRI samples round(W x center_fraction) centre columns (of W k-space columns) and "
    "draws the outer ones to reach W / acceleration columns in all (RandomMaskFunc: each with "
    "probability (W / acceleration - centre) / (W - centre)), so it needs "
    "center_fraction x acceleration < 1"
)


def num_low_frequencies_of(mask_1d: np.ndarray) -> int:
    """Length of the contiguous run of sampled columns through the centre column ``W // 2``."""
    mask_1d = np.asarray(mask_1d).astype(bool).reshape(-1)
    centre = mask_1d.shape[0] // 2
    if not mask_1d[centre]:
        return 0
    left = centre
    while left > 0 and mask_1d[left - 1]:
        left -= 1
    right = centre
    while right < mask_1d.shape[0] - 1 and mask_1d[right + 1]:
        right += 1
    return right - left + 1


def create_mask_func(
    mask_type: str,
    center_fractions: Sequence[float],
    accelerations: Sequence[int],
    *,
    fixed: bool = False,
    seed: int = 0,
    mask_path: Optional[Union[str, os.PathLike]] = None,
) -> MaskFunc:
    """Build a mask function by name.

    Args:
        mask_type: one of :data:`MASK_TYPES` (fastMRI's names).
        center_fractions, accelerations: as fastMRI's mask functions.
        fixed: one mask for every slice (drawn once from ``seed`` for each k-space width).
        seed: seed of the fixed mask.
        mask_path: a ``.npy`` file holding a fixed 1-D mask (overrides the other arguments).
    """
    if mask_path is not None:
        return FixedMaskFunc.from_file(mask_path)
    if mask_type not in MASK_TYPES:
        raise ValueError(f"unknown mask type {mask_type!r}; choose one of {', '.join(MASK_TYPES)}")
    if len(center_fractions) != len(accelerations) or not len(accelerations):
        raise ValueError(
            f"center_fractions {list(center_fractions)} and accelerations {list(accelerations)} "
            "must have the same length, at least 1"
        )
    for fraction in center_fractions:  # fastMRI's own failures are bare assertions or NaN
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
            raise ValueError(f"center_fractions: expected numbers, got {fraction!r}")
        if not 0 < fraction < 1:
            raise ValueError(f"center_fractions: each must lie in (0, 1), got {fraction!r}")
    for acceleration in accelerations:
        if isinstance(acceleration, bool) or not isinstance(acceleration, numbers.Real):
            raise ValueError(f"accelerations: expected numbers, got {acceleration!r}")
        if not 1 <= acceleration < math.inf:
            raise ValueError(
                f"accelerations: each must be a finite number >= 1, got {acceleration!r}"
            )
    if mask_type in BUDGET_MASK_TYPES:
        for fraction, acceleration in zip(center_fractions, accelerations):
            if fraction * acceleration >= 1:
                raise ValueError(
                    f"mask_type {mask_type!r}: center_fraction {fraction:g} x acceleration "
                    f"{acceleration:g} = {fraction * acceleration:g} leaves no columns to draw "
                    f"outside the centre ({_BUDGET_RULE}); take a center_fraction below "
                    f"{1 / acceleration:.4g} or an acceleration below {1 / fraction:.4g}"
                )
    base = create_mask_for_mask_type(mask_type, list(center_fractions), list(accelerations))
    return FixedMaskFunc(base_mask_func=base, seed=seed) if fixed else base


def mask_width_problem(mask_func: MaskFunc, num_cols: int) -> Optional[str]:
    """Why ``mask_func`` cannot draw a mask for ``num_cols`` k-space columns, or ``None``.

    ``center_fraction * acceleration < 1`` (checked by :func:`create_mask_func`) is the rule
    for every width; fastMRI rounds the centre to ``round(W * center_fraction)`` columns, so a
    narrow k-space can still leave no outer column to draw, where fastMRI's
    ``EquispacedMaskFractionFunc`` divides by zero or ``MagicMaskFractionFunc`` draws from an
    empty range (and ``RandomMaskFunc`` samples the centre alone). The conditions are
    fastMRI's own, per (centre fraction, acceleration) pair, as any pair may be drawn.
    """
    if isinstance(mask_func, FixedMaskFunc):
        if mask_func.base_mask_func is None or num_cols in mask_func._masks:
            return None  # a given mask (its width is checked where it is used) or drawn
        mask_func = mask_func.base_mask_func
    magic = isinstance(mask_func, MagicMaskFractionFunc)
    if not (magic or isinstance(mask_func, (RandomMaskFunc, EquispacedMaskFractionFunc))):
        return None
    for fraction, acceleration in zip(mask_func.center_fractions, mask_func.accelerations):
        centre = round(num_cols * fraction)
        if magic:
            # fastMRI bounds the centre to [1, round(W / acceleration)] and spaces the outer
            # columns to fill the rest of round(W / acceleration)
            fits = round(num_cols / acceleration) > max(centre, 1)
            rule = "max(round(W x center_fraction), 1) < round(W / acceleration)"
        else:
            fits = centre * acceleration < num_cols
            rule = "round(W x center_fraction) x acceleration < W"
        if not fits:
            return (
                f"{type(mask_func).__name__} with center_fraction {fraction:g} and acceleration "
                f"{acceleration:g} leaves no columns to draw outside the {centre} centre "
                f"columns of k-space {num_cols} columns wide (W): fastMRI needs {rule}; lower "
                "the centre fraction or the acceleration"
            )
    return None


class FixedMaskFunc(MaskFunc):
    """One 1-D Cartesian mask for every slice, as in SFT-KD-Recon and KD-MRI.

    The mask is either given (array or ``.npy`` file of shape ``(W,)``) or drawn once from a
    seed with a fastMRI mask function, separately for each k-space width met (fastMRI knee
    volumes vary in width), and then reused. The ``seed`` argument of :meth:`__call__` is
    ignored on purpose: the mask is the same whatever the slice.

    Args:
        mask: a 1-D mask ``(W,)`` (non-zero = sampled).
        base_mask_func: a fastMRI mask function to draw the mask from.
        seed: seed for drawing from ``base_mask_func``.
    """

    def __init__(
        self,
        mask: Optional[np.ndarray] = None,
        *,
        base_mask_func: Optional[MaskFunc] = None,
        seed: int = 0,
        source: str = "array",
    ):
        if (mask is None) == (base_mask_func is None):
            raise ValueError("give exactly one of mask= or base_mask_func=")
        self.base_mask_func = base_mask_func
        self.seed = seed
        self.source = source
        self._masks: Dict[int, Tuple[np.ndarray, int]] = {}
        accelerations, center_fractions = [1], [0.0]
        if mask is not None:
            mask = np.asarray(mask)
            if mask.dtype.kind not in "biuf":  # text, objects, records: no 0/1 columns
                raise ValueError(
                    f"{source}: a fixed mask holds numbers (0/1 or False/True per k-space "
                    f"column), got an array of dtype {mask.dtype}"
                )
            if mask.ndim != 1 or mask.size == 0:
                raise ValueError(f"{source}: a fixed mask must be 1-D (W,), got {mask.shape}")
            if not np.isfinite(mask.astype(np.float64)).all():
                raise ValueError(f"{source}: mask holds non-finite values")
            if not np.isin(mask, (0, 1)).all():
                raise ValueError(
                    f"{source}: a mask holds 0/1 (or False/True) per k-space column, got values "
                    f"{np.unique(mask)[:6].tolist()}"
                )
            mask = mask.astype(bool)
            if not mask.any():
                raise ValueError(f"{source}: mask samples no column")
            self._masks[mask.shape[0]] = (mask, num_low_frequencies_of(mask))
            accelerations = [round(mask.size / mask.sum())]
        else:
            accelerations = list(base_mask_func.accelerations)
            center_fractions = list(base_mask_func.center_fractions)
        super().__init__(center_fractions, accelerations, seed=seed)

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]) -> FixedMaskFunc:
        """Load a 1-D mask saved with ``numpy.save``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"mask file {path} does not exist")
        try:
            mask = np.load(path, allow_pickle=False)
        except Exception as err:
            raise ValueError(f"{path}: not a .npy array ({err})") from err
        if not isinstance(mask, np.ndarray):  # a .npz archive of several arrays
            names = list(getattr(mask, "files", []))
            close = getattr(mask, "close", None)
            if callable(close):
                close()
            raise ValueError(
                f"{path}: a .npz archive ({', '.join(names) or 'no arrays'}); save the 1-D mask "
                "alone with numpy.save"
            )
        return cls(mask, source=str(path))

    def mask_for_width(self, num_cols: int) -> Tuple[np.ndarray, int]:
        """The fixed ``(W,)`` boolean mask for width ``num_cols`` and its centre-run length."""
        if num_cols not in self._masks:
            if self.base_mask_func is None:
                widths = ", ".join(map(str, self._masks))
                raise ValueError(
                    f"{self.source}: fixed mask has width {widths}, k-space has {num_cols} columns"
                )
            mask, num_low = self.base_mask_func((1, num_cols, 1), seed=(self.seed, num_cols))
            self._masks[num_cols] = (mask.reshape(-1).numpy().astype(bool), int(num_low))
        return self._masks[num_cols]

    def __call__(self, shape, offset=None, seed=None) -> Tuple[torch.Tensor, int]:
        if len(shape) < 3:
            raise ValueError("Shape should have 3 or more dimensions")
        mask, num_low = self.mask_for_width(shape[-2])
        return self.reshape_mask(mask.astype(np.float32), shape), num_low

    def save(self, path: Union[str, os.PathLike], num_cols: int) -> None:
        """Save the mask for width ``num_cols`` as ``.npy`` (loadable by :meth:`from_file`;
        ``.npy`` is appended as :func:`numpy.save` does). Written to a temporary file and
        renamed, so an interrupted save leaves no half-written mask."""
        path = Path(path)
        if path.suffix != ".npy":
            path = path.with_name(path.name + ".npy")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.save(f, self.mask_for_width(num_cols)[0])
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
