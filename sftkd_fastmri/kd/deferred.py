"""Deferred gradients of student features: a KD loss's gradient on a full-size activation is
added where the ordinary backward pass reaches that activation, in one fused operation.

Without this, a loss on an activation ``f`` (attention transfer's ``sum_c f_c^2``, FSP's Gram
matrices) returns a full-size gradient early in the backward pass - the loss sits at the end of
the graph - and autograd keeps it until the backward pass reaches ``f``, then adds it to the
gradient arriving from the layers after ``f``. For every paired activation that costs a
full-size tensor held through most of the backward pass and two extra passes over memory (write
the loss gradient, then read both and write their sum).

Here the student's captured activations pass through :class:`_Tap`, an identity in the forward
pass. The loss's own backward only records a small term (AT: the ``(B, H, W)`` gradient of the
attention map; FSP: the ``(B, C1, C2)`` gradient of the Gram matrix) in the feature's
:class:`DeferredGradient`. Autograd runs the tap's backward after every consumer of the
activation has delivered its gradient (the loss included: it consumes the tap's output), and
the tap then adds the full-size terms to the arriving gradient with fused operations
(``addcmul`` for AT, ``baddbmm`` for FSP). Values and gradients are those of the plain
computation (up to floating-point summation order).

Used by :class:`~sftkd_fastmri.kd.distiller.Distiller` (``defer_gradients=True``) for the
student layers of AT (``p = 2``) and FSP; the losses fall back to the plain computation for
untapped tensors, other dtypes than float32/float64, or FSP pairs of different spatial sizes.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
from torch import Tensor

__all__ = ["DeferredGradient", "deferred_slot", "tap_feature"]

_ATTRIBUTE = "_sftkd_deferred_gradient"
_DTYPES = (torch.float32, torch.float64)


class DeferredGradient:
    """Gradient terms waiting for the backward pass to reach one tapped activation.

    Attributes:
        terms: Callables ``grad -> grad + term``, applied in order by the tap's backward.
    """

    __slots__ = ("terms",)

    def __init__(self) -> None:
        self.terms: List[Callable[[Tensor], Tensor]] = []


class _Tap(torch.autograd.Function):
    """Identity whose backward adds the deferred terms to the arriving gradient."""

    @staticmethod
    def forward(ctx: Any, feat: Tensor, slot: DeferredGradient) -> Tensor:
        ctx.slot = slot
        return feat.view_as(feat)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        # Without a gradient from the layers after the activation (a KD-only step), autograd
        # passes zeros here, so the terms alone make the gradient.
        terms, ctx.slot.terms = ctx.slot.terms, []
        for term in terms:
            grad = term(grad)
        return grad, None


def tap_feature(feat: Any) -> Any:
    """``feat`` routed through a tap that collects deferred gradient terms.

    Returns ``feat`` itself where there is nothing to defer: not a floating tensor of float32
    or float64, no gradient required, or gradients disabled.
    """
    if (
        not isinstance(feat, Tensor)
        or feat.dtype not in _DTYPES
        or not feat.requires_grad
        or not torch.is_grad_enabled()
    ):
        return feat
    slot = DeferredGradient()
    out = _Tap.apply(feat, slot)
    setattr(out, _ATTRIBUTE, slot)
    return out


def deferred_slot(feat: Tensor) -> Optional[DeferredGradient]:
    """The :class:`DeferredGradient` of a tapped tensor whose gradient is wanted, else ``None``."""
    if not (feat.requires_grad and torch.is_grad_enabled()):
        return None
    return getattr(feat, _ATTRIBUTE, None)
