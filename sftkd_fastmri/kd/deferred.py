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
(``addcmul`` for AT, ``baddbmm`` for FSP). Where the tapped module promises that the arriving
gradient is a fresh tensor nobody else reads (``fresh_output_gradient``, e.g. a DC-CNN block's
ReLU, whose output only the next convolution consumes), the terms are added into it in place
(``addcmul_`` / ``baddbmm_``), saving a full-size copy per term; otherwise out of place, since
autograd may hand one gradient tensor to several inputs (an addition does). Values and
gradients are those of the plain computation (up to floating-point summation order), for a
backward pass that runs through the tap, as every training step does. Not for analysis that
differentiates with respect to a tapped feature itself (``torch.autograd.grad(loss,
[tapped])`` sees no loss gradient there, and the recorded term then stays for a later backward
of the same graph): capture features without ``defer_gradients`` for that.

Used by :class:`~sftkd_fastmri.kd.distiller.Distiller` (``defer_gradients=True``) for the
student layers of AT (``p = 2``) and FSP whose modules promise that nothing after them
modifies their output in place (:data:`KEEPS_OUTPUT`: a DC-CNN block's ReLUs and
convolutions); the losses fall back to the plain computation for untapped tensors, other dtypes
than float32/float64, or FSP pairs of different spatial sizes.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
from torch import Tensor

from ..models.dccnn import KEEPS_OUTPUT

__all__ = ["KEEPS_OUTPUT", "DeferredGradient", "deferred_slot", "tap_feature"]

_ATTRIBUTE = "_sftkd_deferred_gradient"
# Only modules marked KEEPS_OUTPUT are tapped: a tap's output is a view made inside a custom
# autograd function, which PyTorch refuses to let a consumer overwrite (e.g. the
# LeakyReLU(inplace=True) after every normalisation of fastMRI's U-Net); the outputs of other
# modules take the plain loss computation.
_DTYPES = (torch.float32, torch.float64)


class DeferredGradient:
    """Gradient terms waiting for the backward pass to reach one tapped activation.

    Attributes:
        terms: Callables ``(grad, in_place) -> grad + term``, applied in order by the tap's
            backward; with ``in_place`` they may add into ``grad``'s memory.
        owned: Whether the gradient arriving at the tap is a fresh tensor nobody else reads
            (see :func:`tap_feature`), so the terms may be added in place.
    """

    __slots__ = ("terms", "owned")

    def __init__(self, owned: bool = False) -> None:
        self.terms: List[Callable[[Tensor, bool], Tensor]] = []
        self.owned = owned


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
        in_place = ctx.slot.owned and _writable(grad)
        for term in terms:
            result = term(grad, in_place)
            if result is not grad:  # a fresh result of the term is ours to add into
                in_place = _writable(result)
            grad = result
        return grad, None


def _writable(grad: Tensor) -> bool:
    """A dense, non-view tensor (a view or an expanded zero could share memory)."""
    return grad._base is None and (
        grad.is_contiguous() or grad.is_contiguous(memory_format=torch.channels_last)
    )


def tap_feature(feat: Any, owned_gradient: bool = False) -> Any:
    """``feat`` routed through a tap that collects deferred gradient terms.

    Args:
        feat: The activation.
        owned_gradient: The gradient that reaches ``feat`` from the layers after it is a fresh
            tensor that nothing else reads (e.g. the input gradient of the one convolution
            that consumes it), so the deferred terms may be added into it in place.

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
    slot = DeferredGradient(owned=owned_gradient)
    out = _Tap.apply(feat, slot)
    setattr(out, _ATTRIBUTE, slot)
    return out


def deferred_slot(feat: Tensor) -> Optional[DeferredGradient]:
    """The :class:`DeferredGradient` of a tapped tensor whose gradient is wanted, else ``None``."""
    if not (feat.requires_grad and torch.is_grad_enabled()):
        return None
    return getattr(feat, _ATTRIBUTE, None)
