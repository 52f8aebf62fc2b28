"""What every export format shares: the error type, the example inputs an export is traced
and checked with, the comparison with the eager model, the atomic write of the output file,
and the silencing of the exporters' own output (:mod:`.deploy`, :mod:`.onnx_export`)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from .._io import make_temp_file

#: Name of the JSON metadata stored in TorchScript ``_extra_files``, ``torch.export``'s
#: ``extra_files`` and ONNX metadata_props.
METADATA_NAME = "sftkd_fastmri.json"
#: TorchScript and torch.export programs run the eager model's kernels: any difference is a bug.
TORCHSCRIPT_ATOL = 1e-5


class ExportError(RuntimeError):
    """An export that could not be written or did not reproduce the eager model."""


# -- example inputs -----------------------------------------------------------------------
def _example_inputs(
    shape: Tuple[int, int], coils: int, batch: int = 1, seed: int = 0
) -> Tuple[Tensor, ...]:
    """Random under-sampled k-space, a column mask and normalised sensitivity maps."""
    gen = torch.Generator().manual_seed(seed)
    h, w = shape
    mask = torch.rand(batch, 1, 1, w, 1, generator=gen) < 0.5
    mask[..., w // 2, :] = True  # a sampled centre line, as in every fastMRI mask
    kspace = torch.randn(batch, coils, h, w, 2, generator=gen) * mask
    if coils == 1:
        return kspace, mask
    sens = torch.randn(batch, coils, h, w, 2, generator=gen)
    sens = sens / sens.pow(2).sum(dim=(1, 4), keepdim=True).sqrt()
    return kspace, mask, sens


def _other_inputs(shape: Tuple[int, int], coils: int) -> Tuple[Tensor, ...]:
    """Inputs differing in every dimension: batch, coils (multi-coil) and the parity of H, W
    (fftshift and ifftshift roll by different amounts on odd sizes)."""
    other_shape = (shape[0] + 1, shape[1] + 1)
    return _example_inputs(other_shape, coils + 1 if coils > 1 else 1, batch=2, seed=1)


def _other_mask_inputs(shape: Tuple[int, int], coils: int) -> Tuple[Tensor, ...]:
    """Inputs of the example's size with another sampling pattern: a wider fully sampled
    centre and other columns (a network that reads the mask data-dependently, as fastMRI's
    VarNet finds its sampled centre, differs here if an export froze those values)."""
    kspace, mask, *sens = _example_inputs(shape, coils, seed=2)
    width = shape[1]
    mask = mask.clone()
    mask[..., max(0, width // 2 - 3) : width // 2 + 3, :] = True
    return (kspace * mask, mask, *sens)


def _check_other_mask(
    module: Any, wrapper: nn.Module, shape: Tuple[int, int], coils: int, what: str
) -> None:
    """Refuse an export that reproduces the model only for the example's sampling mask."""
    args = _other_mask_inputs(shape, coils)
    try:
        _check_close(_forward(module, args), _forward(wrapper, args), TORCHSCRIPT_ATOL, what)
    except ExportError as err:
        raise ExportError(
            f"{err} for another sampling mask at the example size: the network reads the mask "
            "with data-dependent operations that the export freezes (fastMRI's VarNet finds "
            "its sampled centre this way). Export format='state_dict' instead"
        ) from None


# -- helpers ------------------------------------------------------------------------------
def _forward(module: Any, inputs: Tuple[Tensor, ...]) -> Tensor:
    with torch.no_grad():
        return module(*inputs)


def _check_close(got: Tensor, expected: Tensor, atol: float, what: str) -> None:
    if got.shape != expected.shape:
        raise ExportError(
            f"{what} output has shape {tuple(got.shape)}, eager {tuple(expected.shape)}"
        )
    diff = float((got - expected).abs().max()) if got.numel() else 0.0
    if not diff < atol:  # also catches NaN
        raise ExportError(
            f"{what} output differs from the eager model: max |diff| = {diff:.3g} >= {atol:g}"
        )


@contextlib.contextmanager
def _atomic_output(out: Path) -> Iterator[Path]:
    """A temporary path beside ``out``, renamed onto it only if the block succeeds."""
    # Readable as a plain open() would leave it, so a deployment service running as another
    # user can read it.
    tmp = make_temp_file(out)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress prints, logs and warnings, Python- and C++-side.

    The legacy ONNX exporter dumps the whole TorchScript graph to the process's standard
    output when it fails (whatever ``verbose`` says), which would bury the error message.
    Redirecting file descriptors is process-wide, so this only wraps the export calls.
    """
    buffer = io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        for fd in (1, 2):
            stack.enter_context(_redirect_fd(fd))
        stack.enter_context(contextlib.redirect_stdout(buffer))
        stack.enter_context(contextlib.redirect_stderr(buffer))
        yield


@contextlib.contextmanager
def _redirect_fd(fd: int) -> Iterator[None]:
    """Point file descriptor ``fd`` at a scratch file for the duration of the block."""
    try:
        saved = os.dup(fd)
    except OSError:  # no such descriptor (e.g. a detached process): nothing to silence
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def _error_text(err: BaseException) -> str:
    """The messages of ``err`` and of the exceptions it was raised from."""
    parts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        parts.append(f"{type(err).__name__}: {_plain(str(err))}")
        err = err.__cause__ or err.__context__
    return "\n".join(parts)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _plain(text: str) -> str:
    """``text`` without terminal colour codes (torch's exporters colour their messages)."""
    return _ANSI.sub("", text)


def _unsupported_op(text: str) -> Optional[str]:
    """The operator an exporter error names (``aten::view_as_complex``, ``aten._fft_c2c``)."""
    patterns = (
        r"operator '([\w.:]+)'",
        r"\b(aten::\w+)",
        r"\b(aten\.\w+(?:\.\w+)?)",
    )
    for pattern in patterns:
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in _plain(str(err)).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
