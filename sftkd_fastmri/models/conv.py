"""The 3x3 convolution of the DC-CNN blocks, with a faster weight gradient on the CPU.

On the CPU, PyTorch's oneDNN kernels compute the weight gradient of a 3x3 convolution on
channels-last activations (the layout DC-CNN activations have: the complex image enters the
first convolution as a permuted view, a real one-channel image is made channels-last by
``complex_to_channels``, and the layout propagates) about three times slower
than its input gradient, and asking for the bias gradient alone runs the same slow kernel. On
a 2-core CPU, at batch 4 and 320 x 320 with 32 channels, the weight gradient took 250-280 ms
against 76-83 ms for the input gradient and 78 ms for the forward; three such convolutions per
D5 cascade made it about half of a D5C5 training step.

:class:`BlockConv2d` keeps the forward and the input gradient of those kernels and computes
the other two gradients itself:

* bias: the sum of the output gradient over batch and positions;
* weight, for ``C_in, C_out >= 16`` (the 32 -> 32 convolutions,
  :func:`shifted_weight_gradient`): for each of the nine kernel offsets ``(dy, dx)``,
  ``dW[:, :, dy, dx] = sum_b G_b^T X_b(shifted)``, where ``G_b`` is the ``(H W, C_out)``
  output gradient and ``X_b`` the ``(H W, C_in)`` input of sample ``b``, both views of the
  channels-last tensors (no copy, no im2col buffer). Shifting a flattened image by
  ``dy W + dx`` pairs every position with its neighbour except at the left and right borders,
  where it wraps to the neighbouring row; those ``H`` wrapped pairs per offset are subtracted
  again with one small product. The positions are taken in cache-sized blocks of rows;
* weight, for ``C_in >= 16`` and ``C_out <= 4`` (a block's last convolution, 32 -> 2,
  :func:`thin_output_weight_gradient`): one matrix product of the thin output gradient's
  3x3 neighbourhoods (``9 C_out`` rows of shifted planes, a small copy) with the input, read
  once;
* weight and bias, for ``C_in <= 4`` and ``C_out >= 16`` (a block's first convolution,
  2 -> 32, :func:`thin_input_gradients`): one matrix product of the thin input's 3x3
  neighbourhoods and a row of ones with the output gradient, read once.

All three are the weight gradient's definition (Dumoulin & Visin, "A guide to convolution
arithmetic for deep learning", 2016: the weight gradient of a stride-1 convolution is the
correlation of its input with its output gradient) written as matrix products; the result
equals oneDNN's to float32 rounding (the sums run in another order: a relative difference of
about 3e-5 at 320 x 320). Measured on that CPU (``python -m benchmarks.bench_conv``): a
32 -> 32 convolution's forward and backward 1.75-2.0x faster, a 2 -> 32 one 1.3x, a 32 -> 2
one 2.0x, a D5C5 training step 1.7-1.9x (6.4 s -> 3.5-3.8 s), a D3C5 step 1.7-1.9x.

The path is taken only where it helps and is exact: CPU float32 tensors in a channels-last
layout, 3x3 kernel, stride 1, padding 1 (zeros), no dilation or groups, channel counts as
above, at least :data:`MIN_POSITIONS` positions (batch x height x width: 128 x 128, or
64 x 64 at batch 4; smaller images are faster with oneDNN; :data:`MIN_POSITIONS_THIN_INPUT`
for the 2 -> 32 convolution), gradients enabled, and not while
tracing (TorchScript or FX), scripting, exporting, compiling, under ``torch.func``
transforms or forward-mode AD, or under CPU autocast. Everywhere else, and on
CUDA, :class:`BlockConv2d` is :class:`torch.nn.Conv2d`. ``SFTKD_FASTMRI_CONV=native`` (read at
each call) or :func:`use_native_weight_gradient` turns the path off.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BlockConv2d",
    "MAX_THIN_CHANNELS",
    "MIN_CHANNELS",
    "MIN_POSITIONS",
    "MIN_POSITIONS_THIN_INPUT",
    "neighbourhood_rows",
    "shifted_weight_gradient",
    "thin_input_gradients",
    "thin_input_weight_gradient",
    "thin_output_weight_gradient",
    "use_native_weight_gradient",
]

#: Smallest channel count of the wide side(s) of a convolution whose weight gradient
#: :class:`BlockConv2d` computes itself (both sides, or one side with a thin other side).
MIN_CHANNELS = 16

#: Channel count up to which one side of a convolution whose other side has at least
#: :data:`MIN_CHANNELS` is thin: its weight gradient is one product over the thin side's 3x3
#: neighbourhoods (a block's last, 32 -> 2, :func:`thin_output_weight_gradient`; its first,
#: 2 -> 32, :func:`thin_input_gradients`).
MAX_THIN_CHANNELS = 4

#: Fewest positions (batch x height x width) for which :class:`BlockConv2d` computes the
#: weight gradient itself: below, the products are too small to beat oneDNN's kernel (on the
#: 2-core CPU measured, the crossover lay between 9 000 and 16 000).
MIN_POSITIONS = 16384

#: :data:`MIN_POSITIONS` for a thin input (a block's first convolution, 2 -> 32), whose
#: native backward is cheaper (crossover measured between 26 000 and 37 000 positions).
MIN_POSITIONS_THIN_INPUT = 32768

#: Bytes of input and output gradient per block of rows in :func:`shifted_weight_gradient`
#: (a few MiB: the block stays in the cache while its nine products read it).
BLOCK_BYTES = 4 << 20

_native = False


def use_native_weight_gradient(native: bool = True) -> None:
    """Let every :class:`BlockConv2d` use PyTorch's own convolution backward (``True``) or
    its CPU weight gradient where it applies (``False``, the default)."""
    global _native
    _native = bool(native)


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def shifted_weight_gradient(inputs: Tensor, grad_output: Tensor) -> Tensor:
    """Weight gradient ``(C_out, C_in, 3, 3)`` of a 3x3, stride-1, padding-1 convolution.

    Args:
        inputs: ``(B, C_in, H, W)`` convolution input, channels-last.
        grad_output: ``(B, C_out, H, W)`` gradient of its output, channels-last.

    Returns:
        ``dW[o, i, ky, kx] = sum_{b, h, w} g[b, o, h, w] x[b, i, h + ky - 1, w + kx - 1]``
        (zero outside the image), as matrix products over views of the two tensors. The
        positions are taken in blocks of rows of about :data:`BLOCK_BYTES` of both tensors, all
        nine offsets per block, so each block is read from the cache eight of nine times.
    """
    batch, c_in, height, width = inputs.shape
    c_out = grad_output.shape[1]
    positions = height * width
    # (B, H W, C) views of channels-last tensors: rows are positions, columns channels.
    x = inputs.permute(0, 2, 3, 1).reshape(batch, positions, c_in)
    g = grad_output.permute(0, 2, 3, 1).reshape(batch, positions, c_out)
    per_row = batch * width * (c_in + c_out) * inputs.element_size()
    block = max(1, BLOCK_BYTES // per_row) * width
    shifts = [(ky - 1) * width + (kx - 1) for ky in range(3) for kx in range(3)]
    # Per offset and sample; summed over the samples at the end.
    parts = inputs.new_zeros(9, batch, c_out, c_in)
    for start in range(0, positions, block):
        end = min(positions, start + block)
        for k, shift in enumerate(shifts):
            # Output positions p whose flattened neighbour p + shift lies in the image.
            first, stop = max(start, -shift), min(end, positions - shift)
            if first < stop:
                parts[k].baddbmm_(
                    g[:, first:stop].transpose(1, 2), x[:, first + shift : stop + shift]
                )
    for k, shift in enumerate(shifts):
        if k % 3 == 1:
            continue
        # Left (kx = 0) or right (kx = 2) border column: its flattened neighbour is the other
        # border of the previous or next row, not a zero-padding pixel; take those pairs out.
        first, stop = max(0, -shift), min(positions, positions - shift)
        column = 0 if k % 3 == 0 else width - 1
        low = max(0, _ceil_div(first - column, width))
        high = min(height, _ceil_div(stop - column, width))
        if low < high:
            rows = slice(low * width + column, (high - 1) * width + column + 1, width)
            wrapped = slice(rows.start + shift, rows.stop + shift, width)
            parts[k].baddbmm_(g[:, rows].transpose(1, 2), x[:, wrapped], alpha=-1)
    return parts.sum(dim=1).permute(1, 2, 0).reshape(c_out, c_in, 3, 3)


def neighbourhood_rows(tensor: Tensor, mirrored: bool = False, ones: bool = False) -> Tensor:
    """The 3x3 neighbourhoods of a channels-last ``(B, C, H, W)`` tensor ``t``, one row per
    channel and offset: ``(9 C, B H W)``, row ``9 c + 3 ky + kx`` holding at each position
    ``q`` the value ``t[c, q + (ky - 1, kx - 1)]`` (``mirrored=False``) or
    ``t[c, q - (ky - 1, kx - 1)]`` (``mirrored=True``), zero outside the image. With
    ``ones=True`` a last row of ones is appended (a bias gradient in the same product).

    The rows are whole shifted planes of one padded copy of the thin tensor, written
    contiguously; the product with a ``(B H W, C')`` view then reads the wide tensor once."""
    batch, chans, height, width = tensor.shape
    padded = F.pad(tensor.permute(1, 0, 2, 3), (1, 1, 1, 1))  # (C, B, H+2, W+2), a copy
    rows = tensor.new_empty(chans * 9 + int(ones), batch * height * width)
    planes = rows[: chans * 9].view(chans, 3, 3, batch, height, width)
    for ky in range(3):
        for kx in range(3):
            top, left = (2 - ky, 2 - kx) if mirrored else (ky, kx)
            planes[:, ky, kx] = padded[:, :, top : top + height, left : left + width]
    if ones:
        rows[-1] = 1.0
    return rows


def _positions(tensor: Tensor) -> Tensor:
    """``(B H W, C)`` view of a channels-last ``(B, C, H, W)`` tensor."""
    return tensor.permute(0, 2, 3, 1).reshape(-1, tensor.shape[1])


def thin_output_weight_gradient(inputs: Tensor, grad_output: Tensor) -> Tensor:
    """The weight gradient of :func:`shifted_weight_gradient` for a convolution with few output
    channels (a block's last, 32 -> 2): one matrix product of the output gradient's mirrored
    3x3 neighbourhoods (:func:`neighbourhood_rows`, ``9 C_out`` rows) with the input,
    ``dW[o, i, ky, kx] = sum_q g[q - (ky - 1, kx - 1), o] x[q, i]``, reading the wide input
    once instead of nine times."""
    c_in, c_out = inputs.shape[1], grad_output.shape[1]
    product = neighbourhood_rows(grad_output, mirrored=True) @ _positions(inputs)
    return product.view(c_out, 3, 3, c_in).permute(0, 3, 1, 2).contiguous()


def thin_input_gradients(
    inputs: Tensor, grad_output: Tensor, bias: bool = True
) -> Tuple[Tensor, Optional[Tensor]]:
    """Weight (and bias) gradient of a 3x3, stride-1, padding-1 convolution with few input
    channels (a block's first, 2 -> 32): one matrix product of the input's 3x3 neighbourhoods
    (:func:`neighbourhood_rows`, ``9 C_in`` rows, plus a row of ones for the bias) with the
    output gradient, ``dW[o, i, ky, kx] = sum_q g[q, o] x[q + (ky - 1, kx - 1), i]`` and
    ``db[o] = sum_q g[q, o]``, reading the wide output gradient once.

    Returns:
        ``(dW, db)``; ``db`` is None when ``bias`` is False.
    """
    c_in, c_out = inputs.shape[1], grad_output.shape[1]
    product = neighbourhood_rows(inputs, ones=bias) @ _positions(grad_output)
    weight = product[: c_in * 9].view(c_in, 3, 3, c_out).permute(3, 0, 1, 2).contiguous()
    return weight, (product[-1].clone() if bias else None)


def thin_input_weight_gradient(inputs: Tensor, grad_output: Tensor) -> Tensor:
    """The weight gradient alone of :func:`thin_input_gradients`."""
    return thin_input_gradients(inputs, grad_output, bias=False)[0]


class _ShiftedWeightGradConv(torch.autograd.Function):
    """3x3 convolution whose backward takes the input gradient from PyTorch's kernel and
    computes the weight gradient with :func:`shifted_weight_gradient` or, for at most
    :data:`MAX_THIN_CHANNELS` outputs, :func:`thin_output_weight_gradient`, and the bias
    gradient as a sum; for at most :data:`MAX_THIN_CHANNELS` inputs, both with
    :func:`thin_input_gradients`."""

    @staticmethod
    def forward(ctx: Any, inputs: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(inputs, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(inputs, weight, bias, padding=1)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):
        inputs, weight = ctx.saved_tensors
        grad_output = grad_output.contiguous(memory_format=torch.channels_last)
        need_input, need_weight, need_bias = ctx.needs_input_grad
        grad_input = grad_weight = grad_bias = None
        if need_input:
            grad_input = torch.ops.aten.convolution_backward(
                grad_output,
                inputs,
                weight,
                None,
                [1, 1],  # stride
                [1, 1],  # padding
                [1, 1],  # dilation
                False,
                [0, 0],
                1,
                [True, False, False],  # input gradient only: the others run the slow kernel
            )[0]
        need_bias = ctx.has_bias and need_bias
        if need_weight and weight.shape[1] <= MAX_THIN_CHANNELS:
            # The bias gradient comes from the same product (a row of ones).
            grad_weight, grad_bias = thin_input_gradients(inputs, grad_output, need_bias)
            need_bias = False
        elif need_weight and weight.shape[0] <= MAX_THIN_CHANNELS:
            grad_weight = thin_output_weight_gradient(inputs, grad_output)
        elif need_weight:
            grad_weight = shifted_weight_gradient(inputs, grad_output)
        if need_bias:
            grad_bias = grad_output.sum(dim=(0, 2, 3))
        return grad_input, grad_weight, grad_bias


def _supported_channels(c_in: int, c_out: int) -> bool:
    """Wide to wide (shifted products), wide to thin or thin to wide (one product over the
    thin side's neighbourhoods)."""
    wide_in, wide_out = c_in >= MIN_CHANNELS, c_out >= MIN_CHANNELS
    thin_in, thin_out = c_in <= MAX_THIN_CHANNELS, c_out <= MAX_THIN_CHANNELS
    return (wide_in and (wide_out or thin_out)) or (thin_in and wide_out)


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")  # torch >= 2.4
    except TypeError:
        return torch.is_autocast_cpu_enabled()


def _tracing_or_compiling() -> bool:
    """Tracing, scripting, compiling, exporting, FX symbolic tracing, or a ``torch.func``
    transform or forward-mode AD level: :class:`BlockConv2d` is then ``nn.Conv2d`` (its
    autograd function has no vmap rule or jvp)."""
    compiler = getattr(torch, "compiler", None)
    for name in ("is_compiling", "is_exporting"):
        check = getattr(compiler, name, None)
        if check is not None and check():
            return True
    fx = getattr(getattr(torch, "fx", None), "_symbolic_trace", None)
    for name in ("is_fx_symbolic_tracing", "is_fx_tracing_symbolic_tracing"):
        fx_check = getattr(fx, name, None)
        if fx_check is not None and fx_check():
            return True
    functorch = getattr(torch._C, "_are_functorch_transforms_active", None)
    if functorch is not None and functorch():
        return True
    forward_ad = getattr(torch.autograd, "forward_ad", None)
    if getattr(forward_ad, "_current_level", -1) >= 0:
        return True
    return torch.jit.is_tracing() or torch.jit.is_scripting()


class BlockConv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` (same parameters, state-dict keys and hooks) whose weight and
    bias gradients are computed by :func:`shifted_weight_gradient` (or, for a thin output,
    :func:`thin_output_weight_gradient`; for a thin input, :func:`thin_input_gradients`) where
    that is faster: see the module docstring for when. Its forward output may be overwritten
    in place (the blocks' ReLUs do): the backward needs only the input and the weight."""

    def _shifted_path(self, inputs: Tensor) -> bool:
        weight = self.weight
        return (
            not _native
            and not _tracing_or_compiling()  # first: nothing below is traced or compiled
            and inputs.device.type == "cpu"
            and inputs.dtype == torch.float32
            and weight.dtype == torch.float32
            and inputs.dim() == 4
            and inputs.shape[0] * inputs.shape[2] * inputs.shape[3]
            >= (
                MIN_POSITIONS_THIN_INPUT if self.in_channels <= MAX_THIN_CHANNELS else MIN_POSITIONS
            )
            and self.kernel_size == (3, 3)
            and self.stride == (1, 1)
            and self.padding == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and _supported_channels(self.in_channels, self.out_channels)
            and torch.is_grad_enabled()
            and (weight.requires_grad or inputs.requires_grad)
            and inputs.is_contiguous(memory_format=torch.channels_last)
            and not _cpu_autocast()
            and os.environ.get("SFTKD_FASTMRI_CONV", "").lower() != "native"
        )

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        if self._shifted_path(input):
            return _ShiftedWeightGradConv.apply(input, self.weight, self.bias)
        return super().forward(input)
