"""The products the KD losses are made of (plain torch): channel Grams over positions, sample
Grams, channel energies, and the autograd functions that defer their activation gradients into
the backward pass (:mod:`.deferred`). Long reductions are summed over chunks on CUDA
(split-K) and computed in float32 or wider under autocast."""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import Tensor

from .deferred import DeferredGradient


def _positions_by_channels(feat: Tensor) -> Tensor:
    """``(B, C, H, W)`` as ``(B, H*W, C)``, without a copy for channels-last tensors.

    DCCNN activations are channels-last (the complex image enters the first convolution as a
    permuted view), where ``feat.flatten(2)`` would copy the whole map; this view does not.
    """
    return feat.permute(0, 2, 3, 1).reshape(feat.shape[0], -1, feat.shape[1])


# Reductions over a long axis into a small matrix (FSP's C x C over H*W positions, SP's and
# CC's B x B over C*H*W entries) give a matrix product too few output tiles to fill a GPU;
# on CUDA the long axis is cut into chunks of about this length, one batched product per
# chunk, and the partial products are summed (split-K). On CPU the single product is faster.
_SPLIT_K_CHUNK = 2048


def _split_k_chunks(length: int, tensor: Tensor) -> int:
    """How many equal chunks of about ``_SPLIT_K_CHUNK`` the reduced axis is cut into."""
    if not tensor.is_cuda:
        return 1
    for chunks in range(length // _SPLIT_K_CHUNK, 1, -1):
        if length % chunks == 0:
            return chunks
    return 1


def _full_precision(tensor: Tensor) -> Tensor:
    """Half and bfloat16 features as float32 (float32 and float64 stay as they are)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _no_autocast(tensor: Tensor):
    """A context in which matrix products keep their input precision.

    Under 16-bit mixed precision, autocast would run the Gram products below in float16, whose
    sums over ``H*W`` or ``C*H*W`` products overflow its range (65504) on ordinary features.
    """
    if tensor.device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=tensor.device.type, enabled=False)
    return contextlib.nullcontext()


def _position_gram(first: Tensor, second: Tensor) -> Tensor:
    """``first^T second`` per sample: ``(B, K, M)`` and ``(B, K, N)`` -> ``(B, M, N)``, in at
    least float32 (split-K over ``K`` on CUDA)."""
    with _no_autocast(first):
        first, second = _full_precision(first), _full_precision(second)
        batch, length, rows = first.shape
        chunks = _split_k_chunks(length, first)
        if chunks == 1:
            return torch.bmm(first.transpose(1, 2), second)
        part = length // chunks
        gram = torch.bmm(
            first.reshape(batch * chunks, part, rows).transpose(1, 2),
            second.reshape(batch * chunks, part, second.shape[2]),
        )
        return gram.view(batch, chunks, rows, -1).sum(dim=1)


def _sample_gram(q: Tensor) -> Tensor:
    """``q q^T`` of samples ``q`` ``(B, D)`` -> ``(B, B)``: the position Gram of one "sample"
    whose ``D`` positions carry ``B`` channels."""
    columns = q.t().unsqueeze(0)
    return _position_gram(columns, columns)[0]


class _ChannelEnergy(torch.autograd.Function):
    """``sum_c f_c^2`` over dim 1, with a fused forward and a one-pass backward ``2 f g``.

    The same value and gradient as ``feat.square().sum(dim=1)``, without the full-size
    ``f^2`` temporary in the forward and the extra passes of its backward; attention transfer
    applies it to every paired activation at every step. Given the
    :class:`~sftkd_fastmri.kd.deferred.DeferredGradient` of a tapped activation, the backward
    records ``f * 2 g`` there instead of returning it (:mod:`~sftkd_fastmri.kd.deferred`).
    """

    @staticmethod
    def forward(ctx: Any, feat: Tensor, slot: Optional[DeferredGradient]) -> Tensor:
        ctx.save_for_backward(feat)
        ctx.slot = slot
        # Half-precision features are summed in float32: the energies and the norm the
        # attention map is divided by overflow float16 on ordinary activations.
        dtype = torch.float32 if feat.dtype in (torch.float16, torch.bfloat16) else None
        return torch.linalg.vector_norm(feat, ord=2, dim=1, dtype=dtype).square_()

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        (feat,) = ctx.saved_tensors
        factor = (2 * grad).unsqueeze(1).to(feat.dtype)
        if ctx.slot is None:
            return feat * factor, None
        ctx.slot.terms.append(
            lambda incoming, in_place: (
                incoming.addcmul_(feat, factor)
                if in_place
                else torch.addcmul(incoming, feat, factor)
            )
        )
        return None, None


def _flatten_samples(feat: Tensor) -> Tensor:
    """``(B, ...)`` as ``(B, N)`` in the tensor's own memory order (no copy when dense).

    Only for quantities that do not depend on the order of the ``N`` entries (inner products of
    a sample with another sample of the same tensor).
    """
    if feat.dim() == 4 and feat.is_contiguous(memory_format=torch.channels_last):
        feat = feat.permute(0, 2, 3, 1)
    return feat.reshape(feat.shape[0], -1)


def _add_position_product(
    grad: Tensor, feat: Tensor, matrix: Tensor, in_place: bool = False
) -> Tensor:
    """``grad + positions(feat) @ matrix`` in the layout of ``grad`` ``(B, C, H, W)``, where
    ``positions`` is the ``(B, H*W, C_f)`` view and ``matrix`` is ``(B, C_f, C)``; with
    ``in_place`` (and a channels-last ``grad``, whose positions view is dense) into ``grad``."""
    batch, chans, height, width = grad.shape
    positions = _positions_by_channels(grad)
    if in_place and positions.is_contiguous():
        positions.baddbmm_(_positions_by_channels(feat), matrix.to(grad.dtype))
        return grad
    out = torch.baddbmm(positions, _positions_by_channels(feat), matrix.to(grad.dtype))
    return out.view(batch, height, width, chans).permute(0, 3, 1, 2)


class _DeferredPositionGram(torch.autograd.Function):
    """FSP matrix ``F1^T F2 / (H W)`` of two tapped activations of equal spatial size: the
    backward records ``F2 dG^T / (H W)`` and ``F1 dG / (H W)`` as deferred terms."""

    @staticmethod
    def forward(
        ctx: Any, first: Tensor, second: Tensor, slot1: DeferredGradient, slot2: DeferredGradient
    ) -> Tensor:
        ctx.save_for_backward(first, second)
        ctx.slots = (slot1, slot2)
        positions = first.shape[-2] * first.shape[-1]
        gram = _position_gram(_positions_by_channels(first), _positions_by_channels(second))
        return gram / positions

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        first, second = ctx.saved_tensors
        slot1, slot2 = ctx.slots
        scaled = grad / (first.shape[-2] * first.shape[-1])
        slot1.terms.append(
            lambda g, in_place: _add_position_product(g, second, scaled.transpose(1, 2), in_place)
        )
        slot2.terms.append(lambda g, in_place: _add_position_product(g, first, scaled, in_place))
        return None, None, None, None
