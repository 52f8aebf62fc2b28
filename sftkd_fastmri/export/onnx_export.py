"""ONNX export of a network (``format="onnx"`` of :func:`~sftkd_fastmri.export.export_model`).

ONNX has no complex dtype. With ``onnx`` and ``onnxscript`` installed, torch's dynamo-based
exporter maps the data-consistency layers' complex FFTs onto ONNX's ``DFT`` operator (batch,
size and coils dynamic), and the file is checked with ONNX Runtime when ``onnxruntime`` is
installed. The legacy TorchScript-based exporter cannot translate the FFTs: its failure becomes
an :class:`~.checks.ExportError` naming the operator and the packages to install.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .checks import (
    METADATA_NAME,
    ExportError,
    _atomic_output,
    _check_close,
    _error_text,
    _example_inputs,
    _first_line,
    _forward,
    _other_inputs,
    _other_mask_inputs,
    _quiet,
    _unsupported_op,
)
from .signature import _dim, _dynamic_shapes, _input_names, _signature, _wrap

#: ONNX Runtime computes the FFTs with its own DFT kernels: allow float32 rounding, relative
#: to the output's magnitude.
ONNX_RTOL = 1e-4

_FFT_HINTS = ("fft", "dft", "complex")


def _have(*modules: str) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in modules)


def _export_onnx(
    model: nn.Module,
    out: Path,
    meta: Dict[str, Any],
    shape: Tuple[int, int],
    coils: int,
    opset: Optional[int],
) -> None:
    if opset is not None and opset < MIN_OPSET:
        raise ExportError(
            f"ONNX opset {opset}: the data-consistency layers' FFTs need ONNX's DFT operator, "
            f"which opset {MIN_OPSET} introduced; ask for opset >= {MIN_OPSET} (or none: the "
            "exporter's own)"
        )
    wrapper = _wrap(model, coils)
    names = _input_names(coils)
    # Batch 2: torch.export specialises every dimension whose example size is 1.
    inputs = _example_inputs(shape, coils, batch=2)
    meta = {**meta, "format": "onnx", **_signature(coils), "example_shape": list(shape)}
    dynamo = _have("onnx", "onnxscript")
    program = None
    if dynamo:  # the long part, before any file exists
        try:
            with _quiet():
                program = _onnx_dynamo(wrapper, inputs, names, opset)
        except Exception as err:
            raise _onnx_failure(err, dynamo, opset) from err
    with _atomic_output(out) as tmp:
        if not dynamo:  # the legacy exporter writes the file itself
            try:
                with _quiet():
                    _onnx_legacy(wrapper, inputs, names, opset, tmp)
            except Exception as err:
                raise _onnx_failure(err, dynamo, opset) from err
        if program is not None:
            written = _default_opset(program)
            if opset is not None and written is not None and written != opset:
                # torch's exporter moves a request below its own minimum up and keeps it
                # there when it cannot convert back: the file would not be what was asked
                raise ExportError(
                    f"ONNX opset {opset} was asked for, but torch's exporter produced opset "
                    f"{written} and could not convert it; ask for opset {written} (or none)"
                )
            graph_inputs = program.model.graph.inputs
            meta["input_shapes"] = [[_dim(d) for d in v.shape] for v in graph_inputs]
            meta["dynamic_shapes"] = not all(isinstance(d, int) for d in graph_inputs[0].shape[2:4])
            program.model.metadata_props[METADATA_NAME] = json.dumps(meta)
            with _quiet():
                program.save(str(tmp), external_data=False)  # one file: DC-CNNs are small
        _verify_onnx(tmp, wrapper, inputs, _other_inputs(shape, coils), shape, coils)


#: The first ONNX opset with the DFT operator that the data-consistency FFTs export to.
MIN_OPSET = 17


def _default_opset(program: Any) -> Optional[int]:
    """The default-domain ("" / "ai.onnx") opset of an exported ONNX program, if it says."""
    imports = getattr(getattr(program, "model", None), "opset_imports", None)
    if not isinstance(imports, dict):
        return None
    for domain in ("", "ai.onnx"):
        if domain in imports:
            return int(imports[domain])
    return None


def _onnx_dynamo(
    wrapper: nn.Module, inputs: Tuple[Tensor, ...], names: List[str], opset: Optional[int]
) -> Any:
    return torch.onnx.export(
        wrapper,
        inputs,
        dynamo=True,
        dynamic_shapes=_dynamic_shapes(names),
        input_names=names,
        output_names=["image"],
        opset_version=opset,
        verbose=False,
    )


def _onnx_legacy(
    wrapper: nn.Module,
    inputs: Tuple[Tensor, ...],
    names: List[str],
    opset: Optional[int],
    tmp: Path,
) -> None:
    axes = {"masked_kspace": {0: "batch", 2: "height", 3: "width"}}
    if "sens_maps" in names:
        axes["masked_kspace"][1] = "coils"
    axes["mask"] = {0: "batch", 3: "width"}
    axes["sens_maps"] = axes["masked_kspace"]
    torch.onnx.export(
        wrapper,
        inputs,
        str(tmp),
        dynamo=False,
        input_names=names,
        output_names=["image"],
        dynamic_axes={name: axes[name] for name in names},
        opset_version=opset or MIN_OPSET,  # DFT needs opset >= 17
    )


def _onnx_failure(err: BaseException, dynamo: bool, opset: Optional[int]) -> ExportError:
    """A clear error for a failed ONNX export, naming the operator when the error does."""
    text = _error_text(err)
    op = _unsupported_op(text)
    suggestion = (
        "Use format='torchscript' (sftkd-fastmri export CKPT --format torchscript) to deploy "
        "the network with its FFTs (refused too where the network reads its mask "
        "data-dependently, as fastMRI's VarNet does: then format='state_dict')."
    )
    if not dynamo:
        return ExportError(
            "ONNX export failed: ONNX has no complex tensors, and torch's TorchScript-based "
            "ONNX exporter cannot translate the complex FFT operators that the "
            f"data-consistency layers need (fastmri.fft2c / ifft2c; unsupported: {op or '?'}). "
            "The dynamo-based exporter maps them onto ONNX's DFT operator but needs packages "
            "that are not installed: pip install onnx onnxscript (and onnxruntime to check "
            f"the file). {suggestion}"
        )
    if any(hint in text.lower() for hint in _FFT_HINTS):
        low_opset = f" (opset {opset} < 17 has no DFT operator)" if opset and opset < 17 else ""
        return ExportError(
            "ONNX export failed: ONNX lacks support for the complex FFT operators that the "
            f"data-consistency layers need{low_opset}; unsupported: {op or _first_line(err)}. "
            + suggestion
        )
    return ExportError(f"ONNX export failed: {op or _first_line(err)}. {suggestion}")


def _verify_onnx(
    path: Path,
    wrapper: nn.Module,
    inputs: Tuple[Tensor, ...],
    other: Tuple[Tensor, ...],
    shape: Tuple[int, int],
    coils: int,
) -> None:
    """Compare ONNX Runtime with the eager model, at the example size (two sampling masks)
    and, where the graph's spatial dimensions are symbolic, at a second size."""
    if not _have("onnxruntime"):
        warnings.warn(
            "onnxruntime is not installed: the ONNX file was not checked against the eager "
            "model (pip install onnxruntime)",
            stacklevel=4,
        )
        return
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    graph_inputs = session.get_inputs()
    checks = [inputs, _other_mask_inputs(shape, coils)]
    if not all(isinstance(d, int) for d in graph_inputs[0].shape[2:4]):
        checks.append(other)
    for args in checks:
        feed = {meta.name: arg.numpy() for meta, arg in zip(graph_inputs, args)}
        try:
            got = torch.from_numpy(session.run(None, feed)[0])
        except Exception as err:
            raise ExportError(f"ONNX Runtime cannot run the export: {_first_line(err)}") from err
        expected = _forward(wrapper, args)
        atol = ONNX_RTOL * max(1.0, float(expected.abs().max()))
        _check_close(got, expected, atol, "ONNX (onnxruntime)")
