"""Export one network (teacher or student) of any checkpoint for deployment.

Four formats (:data:`EXPORT_FORMATS`):

* ``"state_dict"`` - a model checkpoint (:func:`~sftkd_fastmri.models.save_model_checkpoint`)
  holding the network alone; :func:`~sftkd_fastmri.models.load_model` rebuilds it strictly.
  Needs this package (and fastMRI) at inference time.
* ``"torchscript"`` - a self-contained TorchScript module (``torch.jit.load`` it, no Python
  source needed). ``torch.jit.script`` is tried first; the DC-CNN does not script (its blocks
  look submodules up by computed names), so it is traced. The trace records the shape
  arithmetic of fastMRI's ``fftshift`` rolls rather than constants, so it runs at any batch,
  size and coil count; every export is checked at a second batch, size parity and coil
  count, and its metadata (``load_torchscript_export``) says whether that held. The forward
  signature is fixed by the number of coils the export was made for: ``(masked_kspace,
  mask)`` for single-coil data, ``(masked_kspace, mask, sens_maps)`` for multi-coil data.
  (``torch.jit`` is deprecated in recent torch releases in favour of ``torch.export``: see
  ``"pt2"``.)
* ``"pt2"`` - a ``torch.export`` program (``torch.export.load(path).module()``, torch alone
  needed), the successor of TorchScript. Batch, size and (multi-coil) coil count are
  symbolic; the program's own shape guards refuse inputs outside them (e.g. multi-coil
  k-space given to a single-coil export), and :func:`load_pt2_export` adds the readable checks
  of the TorchScript exports. Same signatures as TorchScript; checked at a second batch, size
  parity and coil count.
* ``"onnx"`` - ONNX has no complex dtype. With ``onnx`` and ``onnxscript`` installed, torch's
  dynamo-based exporter maps the data-consistency layers' complex FFTs onto ONNX's ``DFT``
  operator (batch, size and coils dynamic; 10-30 s even for a small network) and the file is
  checked with ONNX Runtime when ``onnxruntime`` is installed. Without them only the legacy
  TorchScript-based exporter is available, which cannot translate the FFTs: the export then
  raises :class:`ExportError` naming the unsupported operator and the packages to install.

Every file is written to a temporary name in the output folder, checked against the eager
model, then renamed into place, so a failed export leaves no (half-written) file behind.

The ONNX path lives in :mod:`.onnx_export`; the example inputs, the checks against the eager
model and the atomic write that all formats share in :mod:`.checks`; the fixed input signature
and its guards in :mod:`.signature`.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..models import load_model, read_checkpoint
from ..models.checkpoint import FORMAT_KEY, compiled_inner, save_model_checkpoint
from .checks import (
    METADATA_NAME,
    TORCHSCRIPT_ATOL,
    ExportError,
    _atomic_output,
    _check_close,
    _check_other_mask,
    _example_inputs,
    _first_line,
    _forward,
    _other_inputs,
    _quiet,
)
from .loading import ROLES, checkpoint_kind, load_reconstruction_model
from .onnx_export import _export_onnx
from .signature import (
    _dim,
    _dynamic_shapes,
    _guarded,
    _input_names,
    _MultiCoilGuard,
    _signature,
    _SingleCoilGuard,
    _wrap,
)

__all__ = [
    "DEFAULT_EXAMPLE_SHAPE",
    "EXPORT_FORMATS",
    "ExportError",
    "default_export_path",
    "export_model",
    "load_pt2_export",
    "load_torchscript_export",
    "recorded_challenge",
    "resolve_role",
]

PathLike = Union[str, os.PathLike]

EXPORT_FORMATS: Tuple[str, ...] = ("state_dict", "torchscript", "pt2", "onnx")
#: File suffix per format (``<stem>.<role><suffix>`` next to the checkpoint by default).
SUFFIXES: Dict[str, str] = {
    "state_dict": ".pt",
    "torchscript": ".ts.pt",
    "pt2": ".pt2",
    "onnx": ".onnx",
}
#: Coils of the example k-space a multi-coil export is traced and checked with.
MULTICOIL_EXAMPLE_COILS = 4
#: Example (H, W) for tracing when neither the caller nor the checkpoint gives one.
DEFAULT_EXAMPLE_SHAPE: Tuple[int, int] = (320, 320)


# -- roles and paths ----------------------------------------------------------------------
def resolve_role(checkpoint: Union[PathLike, nn.Module], role: str = "auto") -> str:
    """The name of the network that ``role`` selects in ``checkpoint``.

    SFT checkpoints hold ``"teacher"`` (the default) and ``"student"``; a model checkpoint
    answers with the role recorded in it; other single-network checkpoints with ``role``
    itself when it is ``"teacher"`` or ``"student"`` and ``"model"`` otherwise.
    """
    _check_role(role)
    if isinstance(checkpoint, nn.Module):
        return role if role in ("teacher", "student") else "model"
    return _role_of(read_checkpoint(checkpoint), role)


def _role_of(ckpt: Dict[str, Any], role: str) -> str:
    kind = checkpoint_kind(ckpt)
    if kind == "sft":
        return "student" if role == "student" else "teacher"
    if role in ("teacher", "student"):
        return role
    if kind == "model":
        return str(ckpt[FORMAT_KEY].get("role") or "model")
    return "model"


def default_export_path(checkpoint: PathLike, format: str, role: str = "auto") -> Path:
    """``<folder>/<stem>.<role><suffix>`` next to ``checkpoint`` (suffix ``.pt``, ``.ts.pt``,
    ``.pt2`` or ``.onnx``), ``role`` the SFT network chosen or the role a model export records
    (``teacher``/``student``); ``<stem><suffix>`` for a network recorded as a plain model
    (``<stem>.model.pt`` for a state dict)."""
    _check_format(format)
    path = Path(checkpoint)
    name = resolve_role(path, role)
    if name == "model" and format != "state_dict":  # model.pt -> model.ts.pt, not model.model.
        return path.with_name(f"{path.stem}{SUFFIXES[format]}")
    return path.with_name(f"{path.stem}.{name}{SUFFIXES[format]}")


# -- public entry point -------------------------------------------------------------------
def export_model(
    checkpoint: Union[PathLike, nn.Module],
    out_path: PathLike,
    format: str = "state_dict",
    role: str = "auto",
    example_shape: Optional[Sequence[int]] = None,
    coils: Optional[int] = None,
    opset: Optional[int] = None,
) -> Path:
    """Write the teacher or the student of ``checkpoint`` alone, for deployment.

    Args:
        checkpoint: any checkpoint of this package (model export; Lightning checkpoint of a
            training, distillation or SFT run, or of fastMRI's ``VarNetModule`` /
            ``VarNetModule2``; see :func:`~sftkd_fastmri.export.load_reconstruction_model`),
            or a network.
        out_path: output file (its folder is created; an existing file is replaced only
            once the new one has been written and checked).
        format: ``"state_dict"``, ``"torchscript"``, ``"pt2"`` (``torch.export``) or
            ``"onnx"``.
        role: ``"auto"``, ``"teacher"`` or ``"student"``: which network of an SFT checkpoint
            (``"auto"``: the teacher); only a label for single-network checkpoints. A
            module given instead of a checkpoint is exported from a CPU copy.
        example_shape: ``(H, W)`` of the example k-space used to trace and check the export;
            default: the checkpoint's recorded ``example_shape``, else
            :data:`DEFAULT_EXAMPLE_SHAPE`. TorchScript and ONNX exports are checked at a
            second size too; the metadata says whether other sizes are accepted.
        coils: coils of the k-space the export will see; 1 gives the single-coil signature
            ``(masked_kspace, mask)``, more the SENSE one ``(masked_kspace, mask,
            sens_maps)`` (TorchScript, pt2 and ONNX exports then accept any coil count).
            Default: from the ``challenge`` the checkpoint records (the commands record it:
            ``multicoil`` -> :data:`MULTICOIL_EXAMPLE_COILS`), else 1. TorchScript and pt2
            exports check their inputs and refuse k-space of another kind.
        opset: ONNX opset (default: the exporter's).

    Returns:
        The written path.

    Raises:
        ValueError: bad arguments, or ``out_path`` is the checkpoint itself.
        CheckpointError: unreadable checkpoint or no network for ``role``.
        ExportError: (a ``RuntimeError``) the export failed, e.g. ONNX lacking the complex
            FFT operators, or does not reproduce the eager model. Nothing is written then.
    """
    _check_format(format)
    _check_role(role)
    if coils is not None and coils < 1:
        raise ValueError(f"coils must be >= 1, got {coils}")
    out = Path(out_path)
    if out.is_dir():
        raise ValueError(f"export output {out} is a folder; give a file name (e.g. {out}/model.pt)")
    if not isinstance(checkpoint, nn.Module) and _same_file(out, Path(checkpoint)):
        raise ValueError(f"refusing to overwrite the source checkpoint {checkpoint}")

    model, meta, recorded_shape = _load(checkpoint, role)
    recorded_multicoil = {"multicoil": True, "singlecoil": False}.get(meta.get("challenge", ""))
    if coils is not None and recorded_multicoil is not None and (coils > 1) != recorded_multicoil:
        warnings.warn(
            f"{meta['source']} was trained on {meta['challenge']} data, but the export is "
            f"made for {coils} coil(s): its signature follows coils, not the training data",
            stacklevel=2,
        )
    if coils is None:
        coils = MULTICOIL_EXAMPLE_COILS if meta.get("challenge") == "multicoil" else 1
        if "challenge" not in meta and format != "state_dict":
            warnings.warn(
                f"{meta['source']} does not record whether its data were single- or "
                "multi-coil; exporting the single-coil signature (masked_kspace, mask). Pass "
                "coils=N for multi-coil data",
                stacklevel=2,
            )
    if example_shape is None:
        shape = recorded_shape or DEFAULT_EXAMPLE_SHAPE
    else:
        shape = _check_shape(example_shape)
    dtypes = {t.dtype for t in model.state_dict().values() if t.is_floating_point()}
    if format != "state_dict" and dtypes - {torch.float32}:
        # the traced signature takes float32 k-space (what the data path delivers)
        warnings.warn(
            f"{meta['source']} is a {'/'.join(sorted(str(d) for d in dtypes))} network; the "
            f"{format} export takes float32 inputs, so a float32 copy of it is exported",
            stacklevel=2,
        )
        model = copy.deepcopy(model).float()
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "state_dict":
        _export_state_dict(model, out, meta, example_shape)
    elif format == "torchscript":
        _export_torchscript(model, out, meta, shape, coils)
    elif format == "pt2":
        _export_program(model, out, meta, shape, coils)
    else:
        _export_onnx(model, out, meta, shape, coils, opset)
    return out


def load_torchscript_export(
    path: PathLike, map_location: Any = "cpu"
) -> Tuple[torch.jit.ScriptModule, Dict[str, Any]]:
    """Load a TorchScript export and its metadata (role, preset, signature, shapes)."""
    extra = {METADATA_NAME: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        module = torch.jit.load(str(path), map_location=map_location, _extra_files=extra)
    return module, json.loads(extra[METADATA_NAME] or "{}")


def load_pt2_export(path: PathLike) -> Tuple[nn.Module, Dict[str, Any]]:
    """Load a ``pt2`` export (:func:`torch.export.load`) and its metadata.

    The module is the program's ``module()`` behind the readable input checks of the
    TorchScript exports (coil count, mask width, ``sens_maps`` shape); the program alone
    refuses such inputs too, with ``torch.export``'s guard messages. Like a TorchScript
    export, it takes its inputs by position or by the names in ``meta["inputs"]``
    (``masked_kspace``, ``mask``, and ``sens_maps`` for a multi-coil export)."""
    extra = {METADATA_NAME: ""}
    with warnings.catch_warnings(), open(path, "rb") as f:  # a file object: any file name
        warnings.simplefilter("ignore")
        program = torch.export.load(f, extra_files=extra)
    meta = json.loads(extra[METADATA_NAME] or "{}")
    inner = program.module()
    coils = int(meta.get("coils", 1))
    guard = _SingleCoilGuard(inner) if coils == 1 else _MultiCoilGuard(inner)
    names = meta.get("inputs") or _input_names(coils)  # recorded by every pt2 export
    return _Program(guard, names), meta


class _Program(nn.Module):
    """A loaded pt2 export behind its input checks, called with its inputs by position or by
    name (``input_names``). ``eval()``/``train()`` only set the flag: an exported program is
    fixed in the mode it was exported in (eval), and refuses the call."""

    def __init__(self, guard: nn.Module, input_names: Sequence[str]):
        super().__init__()
        self.guard = guard
        self.input_names = [str(name) for name in input_names]
        self.training = False

    def forward(self, *inputs: Optional[Tensor], **named: Optional[Tensor]) -> Tensor:
        if named:
            inputs = self._arrange(inputs, named)
        return self.guard(*inputs)

    def _arrange(
        self, inputs: Tuple[Optional[Tensor], ...], named: Dict[str, Optional[Tensor]]
    ) -> Tuple[Optional[Tensor], ...]:
        """``inputs`` and ``named`` as one tuple in the order of :attr:`input_names`."""
        names = self.input_names
        signature = f"({', '.join(names)})"
        unknown = sorted(set(named) - set(names))
        if unknown:
            raise TypeError(
                f"this pt2 export takes the inputs {signature}; unknown input name(s): "
                f"{', '.join(unknown)}"
            )
        if len(inputs) > len(names):
            raise TypeError(
                f"this pt2 export takes {len(names)} inputs {signature}, got {len(inputs)} "
                "by position"
            )
        twice = [name for name in names[: len(inputs)] if name in named]
        if twice:
            raise TypeError(
                f"this pt2 export got {', '.join(twice)} both by position and by name "
                f"(inputs {signature})"
            )
        given = dict(zip(names, inputs), **named)
        missing = [name for name in names if name not in given]
        if missing:
            raise TypeError(
                f"this pt2 export takes the inputs {signature}; missing: {', '.join(missing)}"
            )
        return tuple(given[name] for name in names)

    def train(self, mode: bool = True) -> _Program:
        self.training = bool(mode)
        return self


# -- loading ------------------------------------------------------------------------------
def _load(
    checkpoint: Union[PathLike, nn.Module], role: str
) -> Tuple[nn.Module, Dict[str, Any], Optional[Tuple[int, int]]]:
    """The network, its metadata, and the example shape the checkpoint records (if any)."""
    if isinstance(checkpoint, nn.Module):
        # A CPU copy: the caller's module keeps its device and training mode.
        checkpoint = compiled_inner(checkpoint)  # the network, not torch.compile's wrapper
        model = copy.deepcopy(checkpoint).cpu()
        source, recorded, challenge = type(checkpoint).__name__, None, None
        role_name = resolve_role(checkpoint, role)
    else:
        # The loader reads the file again: checkpoints of a DC-CNN are small.
        model = load_reconstruction_model(checkpoint, role=role)  # checks the file first
        ckpt = read_checkpoint(checkpoint)
        recorded, role_name = _recorded_shape(ckpt), _role_of(ckpt, role)
        source = str(checkpoint)
        challenge = _recorded_challenge(ckpt)
    meta = {
        "role": role_name,
        "preset": getattr(model, "preset", None),
        "config": dict(getattr(model, "config", {})),
        "source": source,
        "torch_version": torch.__version__,
    }
    if challenge is not None:
        meta["challenge"] = challenge
    return model, meta, recorded


def recorded_challenge(checkpoint: PathLike) -> Optional[str]:
    """``"singlecoil"`` / ``"multicoil"`` as ``checkpoint`` records the data it was trained
    on (``None`` when it does not: :func:`export_model` then assumes single-coil inputs unless
    given ``coils``)."""
    return _recorded_challenge(read_checkpoint(checkpoint))


def _recorded_challenge(ckpt: Dict[str, Any]) -> Optional[str]:
    """``singlecoil`` / ``multicoil`` as the commands record it beside the weights."""
    places = (
        (ckpt.get(FORMAT_KEY) or {}).get("extra") or {},
        ckpt.get("hyper_parameters") or {},
        ckpt.get("datamodule_hyper_parameters") or {},
    )
    for place in places:
        value = place.get("challenge") if isinstance(place, dict) else None
        if value in ("singlecoil", "multicoil"):
            return value
    return None


def _recorded_shape(ckpt: Dict[str, Any]) -> Optional[Tuple[int, int]]:
    """``example_shape`` recorded by an earlier export or in the hyper-parameters."""
    places = (
        (ckpt.get(FORMAT_KEY) or {}).get("extra") or {},
        ckpt.get("hyper_parameters") or {},
    )
    for place in places:
        value = place.get("example_shape") if isinstance(place, dict) else None
        if value is not None:
            try:
                return _check_shape(value)
            except (TypeError, ValueError):
                continue  # a malformed record is no reason to refuse the export
    return None


# -- state dict ---------------------------------------------------------------------------
def _export_state_dict(
    model: nn.Module, out: Path, meta: Dict[str, Any], example_shape: Optional[Sequence[int]]
) -> None:
    extra = {"exported_from": meta["source"]}
    if "challenge" in meta:
        extra["challenge"] = meta["challenge"]
    if example_shape is not None:
        extra["example_shape"] = list(_check_shape(example_shape))
    with _atomic_output(out) as tmp:
        save_model_checkpoint(model, tmp, preset=meta["preset"], role=meta["role"], extra=extra)
        # Rebuild it the way deployment will, strictly, and compare every tensor.
        rebuilt = load_model(tmp).state_dict()
        own = model.state_dict()
        if set(rebuilt) != set(own) or any(not torch.equal(rebuilt[k], own[k]) for k in own):
            raise ExportError(f"{out}: the written checkpoint does not rebuild the same weights")


# -- TorchScript --------------------------------------------------------------------------
def _script_or_trace(
    wrapper: nn.Module, inputs: Tuple[Tensor, ...]
) -> Tuple[torch.jit.ScriptModule, str, Optional[str]]:
    """Script ``wrapper`` if TorchScript compiles it (shape-generic), else trace it.

    Returns:
        ``(module, "script" | "trace", why scripting failed)``.
    """
    key = _architecture_key(getattr(wrapper, "model", wrapper))
    script_error = _SCRIPT_FAILURES.get(key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
        if script_error is None:
            try:
                return torch.jit.script(wrapper), "script", None
            except Exception as err:  # TorchScript's frontend raises several error types
                # A failed compilation leaves half-registered classes behind, so a retry
                # fails with a misleading "can't redefine method": remember the first error.
                script_error = _SCRIPT_FAILURES[key] = _first_line(err)
        try:
            with torch.no_grad():
                # check_trace=False: the export is compared with the eager model afterwards,
                # at the example size and at a second one, which is the stronger check.
                traced = torch.jit.trace(wrapper, inputs, check_trace=False)
        except Exception as err:
            raise ExportError(
                f"TorchScript export failed: scripting failed ({script_error}) and tracing "
                f"failed ({_first_line(err)})"
            ) from err
    return traced, "trace", script_error


_SCRIPT_FAILURES: Dict[Tuple[str, ...], str] = {}


def _architecture_key(module: nn.Module) -> Tuple[str, ...]:
    """The module classes involved: what decides whether TorchScript compiles a module."""
    return tuple(sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in module.modules()}))


def _export_torchscript(
    model: nn.Module, out: Path, meta: Dict[str, Any], shape: Tuple[int, int], coils: int
) -> None:
    wrapper = _wrap(model, coils)
    inputs = _example_inputs(shape, coils)
    inner, method, script_error = _script_or_trace(wrapper, inputs)
    module = _guarded(inner, coils)
    expected = _forward(wrapper, inputs)
    _check_close(_forward(module, inputs), expected, TORCHSCRIPT_ATOL, f"TorchScript ({method})")
    _check_other_mask(module, wrapper, shape, coils, f"TorchScript ({method})")

    other = _other_inputs(shape, coils)
    try:
        got = _forward(module, other)
        _check_close(got, _forward(wrapper, other), TORCHSCRIPT_ATOL, "at a second size")
        dynamic = True
    except Exception:  # ExportError on a difference, shape errors from baked-in sizes
        dynamic = False
        warnings.warn(
            f"the traced TorchScript module reproduces the model only at the traced size "
            f"{shape[0]} x {shape[1]} (batch 1, {coils} coil(s)); its metadata records this. "
            "Export again with example_shape set to the size you deploy at.",
            stacklevel=3,
        )
        # ... and refuses other sizes when run, rather than return a wrong image
        module = _guarded(inner, coils, fixed=list(inputs[0].shape[:4]))
        _check_close(_forward(module, inputs), expected, TORCHSCRIPT_ATOL, "TorchScript")
    meta = {
        **meta,
        "format": "torchscript",
        "method": method,
        "script_error": script_error,
        **_signature(coils),
        "example_shape": list(shape),
        "dynamic_shapes": dynamic,
    }
    with _atomic_output(out) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            torch.jit.save(module, str(tmp), _extra_files={METADATA_NAME: json.dumps(meta)})
        loaded, _ = load_torchscript_export(tmp)
        _check_close(_forward(loaded, inputs), expected, TORCHSCRIPT_ATOL, "saved TorchScript")


# -- torch.export -------------------------------------------------------------------------
def _export_program(
    model: nn.Module, out: Path, meta: Dict[str, Any], shape: Tuple[int, int], coils: int
) -> None:
    dim = getattr(getattr(torch, "export", None), "Dim", None)
    if getattr(dim, "AUTO", None) is None:
        raise ExportError(
            f"pt2 exports need torch.export with Dim.AUTO (torch >= 2.6); this is torch "
            f"{torch.__version__}. Use format='torchscript' or 'state_dict'"
        )
    wrapper = _wrap(model, coils)
    names = _input_names(coils)
    # Batch 2: torch.export specialises every dimension whose example size is 1.
    inputs = _example_inputs(shape, coils, batch=2)
    try:
        with _quiet():
            program = torch.export.export(wrapper, inputs, dynamic_shapes=_dynamic_shapes(names))
    except Exception as err:
        raise ExportError(
            f"torch.export failed: {_first_line(err)}. Try format='torchscript' (checked "
            "against the model the same way; refused too where the network reads its mask "
            "data-dependently, as fastMRI's VarNet does) or format='state_dict'"
        ) from err
    kspace = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == names[0])
    sizes = kspace.meta["val"].shape
    meta = {
        **meta,
        "format": "pt2",
        **_signature(coils),
        "example_shape": list(shape),
        "input_shapes": [[_dim(d) for d in sizes]],
        "dynamic_shapes": not all(isinstance(d, int) for d in sizes[2:4]),
    }
    expected = _forward(wrapper, inputs)
    checks = [(inputs, expected)]
    if meta["dynamic_shapes"]:
        other = _other_inputs(shape, coils)
        checks.append((other, _forward(wrapper, other)))
    program.example_inputs = None  # else saved in the file (megabytes of random k-space)
    with _atomic_output(out) as tmp:
        with _quiet(), open(tmp, "wb") as f:  # a file object: the temporary name is no .pt2
            torch.export.save(program, f, extra_files={METADATA_NAME: json.dumps(meta)})
        loaded, _ = load_pt2_export(tmp)
        for args, want in checks:
            _check_close(_forward(loaded, args), want, TORCHSCRIPT_ATOL, "torch.export program")
        _check_other_mask(loaded, wrapper, shape, coils, "torch.export program")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_format(format: str) -> None:
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def _check_shape(shape: Sequence[int]) -> Tuple[int, int]:
    values = tuple(int(v) for v in shape)
    if len(values) != 2 or min(values) < 2:
        raise ValueError(f"example_shape must be (H, W) with H, W >= 2, got {tuple(shape)}")
    return values[0], values[1]
