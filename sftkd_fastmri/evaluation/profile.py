"""Compression profile of a reconstruction network: parameters, FLOPs, latency, peak memory.

Conventions (stated once, used by :mod:`sftkd_fastmri.evaluation.report`):

* **FLOPs** are counted for one inference forward pass and divided by the batch size, so every
  number is *per slice*. Convolutions and matrix products come from
  :class:`torch.utils.flop_counter.FlopCounterMode`, which counts a multiply-add as 2 FLOPs
  (a ``Cin -> Cout`` 3 x 3 convolution on an ``H x W`` output costs ``2 * Cin * Cout * 9 * H * W``;
  the bias add is not counted). torch's counter has no formula for FFTs, which a
  data-consistency layer runs twice per coil and cascade, so they are added here with the
  usual radix-2 estimate of ``5 N log2 N`` real FLOPs per complex transform of ``N`` points
  (Cooley-Tukey; the convention of FFTW's benchmarks, https://www.fftw.org/speed/method.html).
  A 2-D FFT over ``H x W`` counts ``5 * H*W * log2(H*W)``, which equals the sum of its row and
  column 1-D transforms. Real-input/real-output transforms (``rfft``/``irfft``) count half,
  ``2.5 N log2 N``. The estimate is applied to any ``N``, not only powers of two, so it is a
  convention, not the operation count of the FFT library's mixed-radix kernels.
* **Element-wise operations are not counted** (neither by torch nor here): ReLU, bias, the
  residual add, the DC mask selection, the coil-sensitivity products of SENSE, the complex
  magnitude. For DC-CNNs they are a few percent of the total.
* **Latency** is wall-clock time per slice of an inference forward (``torch.inference_mode``,
  median over repeats after warm-up, CUDA synchronised before reading the clock).
* **Peak memory** is the peak of tensor memory allocated during one inference forward, above
  what was allocated before it (weights and inputs excluded, the output included). On CUDA it
  is ``torch.cuda.max_memory_allocated`` minus the allocation at the start; on CPU a
  :class:`~torch.utils._python_dispatch.TorchDispatchMode` adds up the storages created by
  every ATen operator and subtracts them when they are freed. Neither is the process RSS;
  workspaces that kernels allocate internally (e.g. oneDNN convolution scratch, FFT plans)
  are invisible to the CPU method.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "FFT_FLOPS_CONVENTION",
    "count_flops",
    "count_parameters",
    "fft_flops",
    "measure_latency",
    "measure_peak_memory",
    "profile_model",
]

FFT_FLOPS_CONVENTION = "5 N log2 N real FLOPs per complex FFT of N points (2.5 N log2 N real-input)"

ExampleInputs = Union[Tensor, Sequence[Optional[Tensor]], Mapping[str, Any]]

_aten = torch.ops.aten
_MIB = 2.0**20


# -- FLOPs ---------------------------------------------------------------------------------
def fft_flops(num_points: int, num_transforms: int = 1, real: bool = False) -> float:
    """FLOPs of ``num_transforms`` FFTs of ``num_points`` points each.

    Args:
        num_points: ``N``, the number of points of one (possibly multi-dimensional) transform.
        num_transforms: how many independent transforms (batch x coils x ...).
        real: real-input or real-output transform (half the work of a complex one).

    Returns:
        ``num_transforms * 5 N log2 N`` (halved for ``real``); 0 for ``N <= 1``.
    """
    if num_points <= 1:
        return 0.0
    per = 5.0 * num_points * math.log2(num_points)
    return num_transforms * (per / 2 if real else per)


def _fft_geometry(shape: Sequence[int], dims: Sequence[int]) -> Tuple[int, int]:
    """``(N, transforms)`` of an FFT over ``dims`` of a tensor of ``shape``."""
    ndim = len(shape)
    points = math.prod(int(shape[d % ndim]) for d in dims)
    total = math.prod(int(s) for s in shape)
    return points, (total // points if points else 0)


# FlopCounterMode passes tensor arguments as shapes (see torch.utils.flop_counter.shape_wrapper).
def _fft_c2c_flop(self_shape, dim, normalization, forward, out_shape=None, **kwargs) -> float:
    return fft_flops(*_fft_geometry(self_shape, dim))


def _fft_r2c_flop(self_shape, dim, normalization, onesided, out_shape=None, **kwargs) -> float:
    # The real input defines N; a one-sided output has fewer points but the same transform.
    return fft_flops(*_fft_geometry(self_shape, dim), real=True)


def _fft_c2r_flop(self_shape, dim, normalization, last_dim_size, out_shape=None, **kw) -> float:
    # The real output defines N (the complex input is one-sided).
    return fft_flops(*_fft_geometry(out_shape, dim), real=True)


_FFT_FORMULAS: Dict[Any, Callable[..., float]] = {
    _aten._fft_c2c: _fft_c2c_flop,
    _aten._fft_r2c: _fft_r2c_flop,
    _aten._fft_c2r: _fft_c2r_flop,
}


def count_flops(model: nn.Module, example_inputs: ExampleInputs) -> Dict[str, float]:
    """FLOPs per slice of one inference forward of ``model`` on ``example_inputs``.

    Convolutions and matrix products are counted by :class:`FlopCounterMode` (multiply-add =
    2 FLOPs); FFTs (``aten._fft_c2c`` / ``_fft_r2c`` / ``_fft_c2r``, which every
    ``torch.fft`` function, and so :func:`fastmri.fft2c`, lowers to) with
    :data:`FFT_FLOPS_CONVENTION`. Element-wise operations are not counted. The model runs on
    the device it is on; inputs are moved there.

    Args:
        model: the network.
        example_inputs: positional inputs (a tensor or a sequence, ``None`` allowed, e.g.
            ``(masked_kspace, mask, sens_maps)``) or keyword inputs (a mapping). The first
            dimension of the first tensor is the batch size.

    Returns:
        ``{"total", "conv_matmul", "fft", "batch_size", "by_op"}``; the first three are per
        slice, ``by_op`` maps ATen operator names to FLOPs per slice.
    """
    device = _model_device(model)
    args, kwargs = _prepared(example_inputs, device)
    batch = _batch_size(example_inputs)
    counter = FlopCounterMode(display=False, custom_mapping=dict(_FFT_FORMULAS))
    with _eval_mode(model), torch.inference_mode(), counter:
        model(*args, **kwargs)
    by_op = {str(op): float(v) / batch for op, v in counter.get_flop_counts()["Global"].items()}
    fft = sum(v for op, v in by_op.items() if "_fft_" in op)
    total = sum(by_op.values())
    return {
        "total": total,
        "conv_matmul": total - fft,
        "fft": fft,
        "batch_size": batch,
        "by_op": by_op,
    }


# -- latency -------------------------------------------------------------------------------
def measure_latency(
    model: nn.Module,
    example_inputs: ExampleInputs,
    device: Union[str, torch.device] = "cpu",
    warmup: int = 3,
    repeats: int = 10,
    warmup_s: float = 0.25,
) -> Dict[str, Any]:
    """Wall-clock seconds per slice of an inference forward on ``device``.

    The model is moved to ``device`` for the measurement and back afterwards. Each repeat times
    one forward of the whole batch (CUDA is synchronised before and after) and divides by the
    batch size.

    Args:
        model: the network.
        example_inputs: as for :func:`count_flops`.
        device: where to run.
        warmup: the fewest untimed forwards first (allocator, oneDNN/cuDNN algorithm
            selection, thread pools); more follow until they have taken ``warmup_s``
            seconds, so the first network a process times is not charged for what the
            process sets up once. 0: none.
        warmup_s: the least time the untimed forwards take together (with ``warmup`` > 0).
        repeats: timed forwards.

    Returns:
        ``{"median_s", "mean_s", "std_s", "min_s", "max_s"}`` per slice, plus
        ``batch_size``, ``repeats``, ``warmup`` (the untimed forwards run), ``device``, ``device_name`` and
        ``num_threads``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats=}, {warmup=}")
    device = torch.device(device)
    batch = _batch_size(example_inputs)
    args, kwargs = _prepared(example_inputs, device)

    def timed() -> float:
        _sync(device)
        start = time.perf_counter()
        model(*args, **kwargs)
        _sync(device)
        return (time.perf_counter() - start) / batch

    warmed = 0
    with _on_device(model, device), _eval_mode(model), torch.inference_mode():
        start = time.perf_counter()
        while warmed < warmup or (warmup and time.perf_counter() - start < warmup_s):
            timed()
            warmed += 1
        times = [timed() for _ in range(repeats)]
    return {
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "std_s": statistics.pstdev(times),
        "min_s": min(times),
        "max_s": max(times),
        "batch_size": batch,
        "repeats": repeats,
        "warmup": warmed,
        "device": str(device),
        "device_name": _device_name(device),
        "num_threads": torch.get_num_threads(),
    }


# -- peak memory ---------------------------------------------------------------------------
class _StorageTracker(TorchDispatchMode):
    """Running and peak bytes of the storages created by ATen operators in this mode.

    A storage counts when an operator returns it and none of the operator's inputs shares it
    (so views and in-place results of existing tensors are not new memory); it is uncounted
    when Python frees it (a weakref finaliser on the storage, whose Python object torch keeps
    alive exactly as long as the storage). Composite operators are decomposed, as
    FlopCounterMode does, so their temporaries are seen too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: Dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.ops.prim.device.default:
            # Re-enter the mode so the operators of the decomposition are tracked too.
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        inputs = {_storage_ptr(t) for t in tree_flatten((args, kwargs))[0] if _is_dense(t)}
        for t in tree_flatten(out)[0]:
            if not _is_dense(t):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in inputs or ptr in self._live:
                continue
            self._live[ptr] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, ptr)
        return out

    def _release(self, ptr: int) -> None:
        self.current -= self._live.pop(ptr, 0)


def _is_dense(t: Any) -> bool:
    return isinstance(t, Tensor) and t.layout == torch.strided and not t.is_meta


def _storage_ptr(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def measure_peak_memory(
    model: nn.Module, example_inputs: ExampleInputs, device: Union[str, torch.device] = "cpu"
) -> float:
    """Peak tensor memory (MiB) of one inference forward, above what was allocated before it.

    On CUDA: ``torch.cuda.max_memory_allocated`` after a peak reset, minus the allocation at
    the start. On CPU (which has no allocator statistics): the peak of the live storages that
    ATen operators create during the forward, tracked by a dispatch mode (see the module
    docstring for what that does not see). Not the process RSS.

    Args:
        model: the network (moved to ``device`` and back).
        example_inputs: as for :func:`count_flops`.
        device: where to run.

    Returns:
        Peak MiB for the whole batch (divide by the batch size for a per-slice figure; memory
        does not scale linearly with it).
    """
    device = torch.device(device)
    args, kwargs = _prepared(example_inputs, device)
    with _on_device(model, device), _eval_mode(model), torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            out = model(*args, **kwargs)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
            del out
            return peak / _MIB
        tracker = _StorageTracker()
        with tracker:
            out = model(*args, **kwargs)
        del out
        return tracker.peak / _MIB


# -- parameters and the whole profile ------------------------------------------------------
def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def profile_model(
    model: nn.Module,
    example_inputs: ExampleInputs,
    device: Union[str, torch.device] = "cpu",
    warmup: int = 3,
    repeats: int = 10,
) -> Dict[str, Any]:
    """Parameters, FLOPs, latency and peak memory of ``model`` on ``example_inputs``.

    Works for single-coil (``sens_maps=None``, coils = 1) and multi-coil inputs alike: FLOPs
    follow the shapes. The model is left on the device and in the mode it had.

    Args:
        model: the network.
        example_inputs: as for :func:`count_flops`, e.g. ``(masked_kspace, mask, sens_maps)``.
        device: where latency and memory are measured (FLOPs do not depend on it).
        warmup: the fewest untimed forwards before timing (more until 0.25 s have passed;
            see :func:`measure_latency`).
        repeats: timed forwards.

    Returns:
        ``{"params", "trainable_params", "flops" (count_flops), "latency" (measure_latency),
        "peak_memory_mib", "peak_memory_method", "batch_size", "input_shapes", "device",
        "conventions"}``.
    """
    device = torch.device(device)
    with _on_device(model, device):
        flops = count_flops(model, example_inputs)
    return {
        "params": count_parameters(model),
        "trainable_params": count_parameters(model, trainable_only=True),
        "flops": flops,
        "latency": measure_latency(model, example_inputs, device, warmup, repeats),
        "peak_memory_mib": measure_peak_memory(model, example_inputs, device),
        "peak_memory_method": (
            "torch.cuda.max_memory_allocated delta"
            if device.type == "cuda"
            else "live ATen storages (TorchDispatchMode)"
        ),
        "batch_size": _batch_size(example_inputs),
        "input_shapes": _input_shapes(example_inputs),
        "device": str(device),
        "conventions": {
            "flops": "per slice; multiply-add = 2 FLOPs; element-wise ops not counted",
            "fft": FFT_FLOPS_CONVENTION,
            "latency": "seconds per slice, median of repeats, torch.inference_mode",
            "peak_memory": "MiB per batch above the pre-forward allocation; not RSS",
        },
    }


# -- helpers -------------------------------------------------------------------------------
def _split_inputs(inputs: ExampleInputs) -> Tuple[tuple, dict]:
    if isinstance(inputs, Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, Sequence) and not isinstance(inputs, str):
        return tuple(inputs), {}
    raise TypeError(
        "example_inputs must be a tensor, a sequence of positional inputs or a mapping of "
        f"keyword inputs, got {type(inputs).__name__}"
    )


def _prepared(inputs: ExampleInputs, device: torch.device) -> Tuple[tuple, dict]:
    """``(args, kwargs)`` of ``inputs`` with every tensor moved to ``device``."""
    args, kwargs = _split_inputs(inputs)

    def move(x):
        return x.to(device) if isinstance(x, Tensor) else x

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def _batch_size(inputs: ExampleInputs) -> int:
    args, kwargs = _split_inputs(inputs)
    for t in tree_flatten((args, kwargs))[0]:
        if isinstance(t, Tensor) and t.ndim > 0:
            return int(t.shape[0])
    raise ValueError("example_inputs hold no tensor with a batch dimension")


def _input_shapes(inputs: ExampleInputs) -> Dict[str, Optional[List[int]]]:
    """Shapes of the tensor inputs by position (``"0"``, ``"1"``, ...) or keyword."""
    args, kwargs = _split_inputs(inputs)
    named = {**{str(i): a for i, a in enumerate(args)}, **kwargs}
    return {k: list(v.shape) if isinstance(v, Tensor) else None for k, v in named.items()}


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


class _eval_mode:
    """Put a model in eval mode for the block and restore its previous mode."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> nn.Module:
        # every module's own flag: a part kept in eval mode (a frozen one) stays in it
        self.modes = [(module, module.training) for module in self.model.modules()]
        return self.model.eval()

    def __exit__(self, *exc) -> None:
        for module, training in self.modes:
            module.training = training


class _on_device:
    """Move a model to ``device`` for the block and back to where it was."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model = model
        self.device = device

    def __enter__(self) -> nn.Module:
        self.previous = _model_device(self.model)
        return self.model.to(self.device)

    def __exit__(self, *exc) -> None:
        self.model.to(self.previous)
