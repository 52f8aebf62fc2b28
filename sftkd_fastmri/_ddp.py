"""DDP settings a module or callback needs before the strategy wraps the module."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

__all__ = ["allow_unused_parameters"]


def allow_unused_parameters(trainer: Any, why: str) -> None:
    """Turn on DDP's search for parameters without a gradient (``find_unused_parameters``),
    which DDP otherwise answers with an error on the second step. Call it from ``setup``,
    which runs before the strategy wraps the module; ``why`` names the parameters (logged).
    A strategy without DDP keyword arguments gets a warning naming the strategy to use."""
    ddp_kwargs = getattr(trainer.strategy, "_ddp_kwargs", None)
    if isinstance(ddp_kwargs, dict):
        if not ddp_kwargs.get("find_unused_parameters", False):
            ddp_kwargs["find_unused_parameters"] = True
            rank_zero_info(f"{why}; enabled DDP's find_unused_parameters")
    else:
        rank_zero_warn(f"{why}; use strategy='ddp_find_unused_parameters_true'")
