"""Safe checkpoint reading and strict, name-based state-dict loading.

Every user-supplied checkpoint is read with ``torch.load(..., weights_only=True)`` (no pickled
code runs) and matched to a module by parameter name, strictly: missing keys, unexpected keys
and shape mismatches are all reported together, with the file they came from.

Four checkpoint kinds are understood by :func:`load_model`:

* model checkpoints written by :func:`save_model_checkpoint` (``{"sftkd_fastmri": meta,
  "state_dict": ...}``; the meta names the preset and its constructor config);
* Lightning checkpoints of :class:`~sftkd_fastmri.pl_modules.DCCNNModule` (``state_dict``
  keys prefixed ``model.``; ``hyper_parameters`` record the preset and its config);
* Lightning checkpoints of the SFT module (``sft.teacher.`` / ``sft.student.``);
* Lightning checkpoints of fastMRI's ``VarNetModule`` (this package's ``VarNetModule2``):
  weights under ``varnet.``, rebuilt as a
  :class:`~sftkd_fastmri.models.CascadedVarNet` (no preset) from the VarNet sizes in their
  ``hyper_parameters``. Other fastMRI modules (``UnetModule2``) record no network this
  package rebuilds: load those with their class's ``load_from_checkpoint``.

Plain state dicts carry no architecture: load them with :func:`load_state_dict_strict` into a
model built with :func:`~sftkd_fastmri.models.create_model`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .._io import make_temp_file

__all__ = [
    "CheckpointError",
    "init_from_checkpoint",
    "load_model",
    "load_state_dict_strict",
    "match_compiled_names",
    "read_checkpoint",
    "save_model_checkpoint",
    "strip_prefix",
    "uncompiled_names",
]

PathLike = Union[str, os.PathLike]
FORMAT_KEY = "sftkd_fastmri"
# Settings that do not change what the weights mean (soft-DC lambda is itself a weight).
CONFIG_KEYS_IGNORED_ON_INIT = ("init_lambda",)
#: ``hyper_parameters`` of fastMRI's ``VarNetModule`` that size its ``VarNet`` (it builds
#: ``VarNet(num_cascades, sens_chans, sens_pools, chans, pools)``, ``mask_center`` default).
VARNET_MODULE_KEYS = ("num_cascades", "sens_chans", "sens_pools", "chans", "pools")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the module it is loaded into."""


def read_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``) and return its top-level dict."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a folder; give a checkpoint file in it, e.g. "
            f"{path / 'model.pt'} or {path / 'checkpoints' / 'best.ckpt'}"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix.lower() == ".onnx":
        raise CheckpointError(
            f"{path} is an ONNX export (a deployment file, not a checkpoint): run it with "
            "onnxruntime, or give the checkpoint it was exported from"
        )
    if _is_torchscript(path):
        raise CheckpointError(
            f"{path} is a TorchScript export (a deployment file, not a checkpoint): load it "
            "with torch.jit.load or sftkd_fastmri.export.load_torchscript_export (which "
            "returns its metadata too)"
        )
    if _is_program(path):
        raise CheckpointError(
            f"{path} is a torch.export (pt2) export (a deployment file, not a checkpoint): "
            "load it with torch.export.load or sftkd_fastmri.export.load_pt2_export"
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for foreign or corrupt files
        # the first line only: torch appends advice to load with weights_only=False, which
        # this package never does with a user's file
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint with weights_only=True (expected a "
            f"file written by torch.save or Lightning holding tensors, numbers, strings and "
            f"containers only; {type(err).__name__}: {first})"
        ) from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold their Python code under ``<name>/code/``."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _is_program(path: Path) -> bool:
    """torch.export archives hold a serialized program under ``<name>/models/``."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/models/" in n for n in names) and any("/data/weights/" in n for n in names)


def compiled_inner(model: nn.Module) -> nn.Module:
    """The network a ``torch.compile`` wrapper holds (``_orig_mod``), else ``model`` itself:
    layer names and default pairings refer to it, so ``cascades.0.cnn.relu1`` names the same
    layer of a compiled network as of the plain one."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


#: The name segment ``torch.compile``'s wrapper adds to every weight of the network it holds.
COMPILED_SEGMENT = "_orig_mod."


def uncompiled_name(name: str) -> str:
    """``name`` as the plain network calls it (``model._orig_mod.cascades.0...`` ->
    ``model.cascades.0...``)."""
    return name.replace(COMPILED_SEGMENT, "")


def uncompiled_names(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """``state_dict`` under the plain networks' names (a module whose network was
    ``torch.compile``d holds ``model._orig_mod.*``)."""
    return {uncompiled_name(k): v for k, v in state_dict.items()}


def match_compiled_names(state_dict: Mapping[str, Tensor], names: Any) -> Dict[str, Tensor]:
    """``state_dict`` with each key renamed to the one of ``names`` it equals up to
    ``torch.compile``'s ``_orig_mod.`` segments (a checkpoint of a compiled network loaded
    into a plain one, or the reverse); other keys unchanged."""
    own = {uncompiled_name(k): k for k in names}
    if len(own) != len(set(names)):  # ambiguous: leave the names to the strict comparison
        return dict(state_dict)
    return {own.get(uncompiled_name(k), k): v for k, v in state_dict.items()}


def strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> Dict[str, Tensor]:
    """The entries of ``state_dict`` under ``prefix`` (e.g. ``"model."``), prefix removed."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_state_dict_strict(
    module: nn.Module, state_dict: Mapping[str, Tensor], source: str = "state dict"
) -> None:
    """Load ``state_dict`` into ``module`` by name, failing on any mismatch.

    Raises:
        CheckpointError: naming ``source`` and listing missing keys, unexpected keys and
            shape mismatches (expected vs found).
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source}: expected a state dict, got {type(state_dict).__name__}")
    not_names = sorted(repr(k) for k in state_dict if not isinstance(k, str))
    if not_names:
        raise CheckpointError(
            f"{source}: state-dict keys must be parameter names (str); not names: "
            f"{_short(not_names)}"
        )
    not_tensors = sorted(str(k) for k, v in state_dict.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise CheckpointError(
            f"{source}: state-dict entries must be tensors; not tensors: {_short(not_tensors)}"
        )
    own = module.state_dict()
    state_dict = match_compiled_names(state_dict, own)
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: expected {tuple(own[k].shape)}, found {tuple(state_dict[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match {type(module).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {_short(shapes)}")
        raise CheckpointError("\n".join(lines))
    broken = sorted(
        k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()
    )
    if broken:
        raise CheckpointError(
            f"{source}: weights hold NaN or Inf in {len(broken)} tensor(s): {_short(broken)} "
            "(a run that diverged?); refusing to load them"
        )
    module.load_state_dict(state_dict, strict=True)


def _short(items: list, limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    Saved through a file object, so the archive does not record the temporary file's random
    name: the same object gives the same bytes every time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_file(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_model_checkpoint(
    model: nn.Module,
    path: PathLike,
    *,
    preset: Optional[str] = None,
    role: str = "model",
    extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``model`` alone as a model checkpoint that :func:`load_model` rebuilds.

    Args:
        model: a :class:`~sftkd_fastmri.models.DCCNN` or a
            :class:`~sftkd_fastmri.models.CascadedVarNet` (anything whose ``config`` dict
            :func:`~sftkd_fastmri.models.build_model` rebuilds).
        path: output file (written atomically).
        preset: preset name (defaults to ``model.preset`` when set).
        role: free-form tag, e.g. ``"teacher"`` or ``"student"``.
        extra: additional JSON-like metadata.

    Raises:
        TypeError: ``model`` records no ``config`` (e.g. a bare fastMRI ``VarNet``: wrap it
            in ``CascadedVarNet``): :func:`load_model` could not rebuild it.
    """
    model = compiled_inner(model)  # a torch.compile wrapper keys every weight "_orig_mod."
    if not isinstance(getattr(model, "config", None), Mapping):
        problem = getattr(model, "config_problem", None)
        reason = problem() if callable(problem) else None
        if reason:
            raise TypeError(
                f"{type(model).__name__} cannot be written as a model checkpoint: {reason}; "
                "save its state_dict() with torch.save"
            )
        raise TypeError(
            f"save_model_checkpoint writes networks that load_model rebuilds from their "
            f"'config' (DC-CNNs, CascadedVarNet); {type(model).__name__} has none: wrap a "
            "fastMRI VarNet in sftkd_fastmri.models.CascadedVarNet, or save its state_dict() "
            "with torch.save"
        )
    meta = {
        "kind": "model",
        "role": role,
        "preset": preset or getattr(model, "preset", None),
        "config": dict(getattr(model, "config", {})),
        "extra": dict(extra or {}),
    }
    atomic_torch_save({FORMAT_KEY: meta, "state_dict": model.state_dict()}, path)
    return Path(path)


ROLES = ("auto", "model", "teacher", "student")


def checkpoint_kind(ckpt: Union[Mapping[str, Any], PathLike]) -> str:
    """``"model"`` (model export), ``"lightning"`` (one network under ``model.``), ``"sft"``
    (teacher and student under ``sft.teacher.`` / ``sft.student.``), ``"varnet_module"``
    (fastMRI's ``VarNetModule`` or ``VarNetModule2``: a VarNet under ``varnet.``) or
    ``"unknown"``, of a checkpoint dict or file."""
    if not isinstance(ckpt, Mapping):
        ckpt = read_checkpoint(ckpt)
    if FORMAT_KEY in ckpt:
        return "model"
    hp = ckpt.get("hyper_parameters")
    if "state_dict" in ckpt and isinstance(hp, Mapping):
        if "teacher_preset" in hp and "student_preset" in hp:
            return "sft"
        if "model_preset" in hp or "preset" in hp:
            return "lightning"
        if all(k in hp for k in VARNET_MODULE_KEYS):
            return "varnet_module"
    return "unknown"


def _check_sft_export_role(path: PathLike, meta: Mapping[str, Any], role: str) -> None:
    """An SFT export holds one of the two networks: asking it for the other one (e.g. a
    student initialisation given where the teacher is expected) is refused, rather than
    answered with the network it holds."""
    extra = meta.get("extra")
    held = meta.get("role")
    if (
        isinstance(extra, Mapping)
        and extra.get("stage") == "sft"
        and role in ("teacher", "student")
        and held in ("teacher", "student")
        and held != role
    ):
        export = "sft_teacher.ckpt" if role == "teacher" else "sft_student_init.ckpt"
        raise CheckpointError(
            f"{path} is the SFT stage's {held} export; asked for the {role}: take the "
            f"{role} export beside it ({export} by default), or the sft run's checkpoint with "
            f"role={role!r}"
        )


def load_model(
    path: PathLike,
    *,
    role: str = "auto",
    expected_preset: Optional[str] = None,
    map_location: Any = "cpu",
) -> nn.Module:
    """Rebuild the network stored in any checkpoint of this package: a DC-CNN, or a
    :class:`~sftkd_fastmri.models.CascadedVarNet` (fastMRI's VarNet) whose ``config`` was
    recorded (see :func:`~sftkd_fastmri.models.build_model`).

    Args:
        path: a model export (:func:`save_model_checkpoint`, SFT exports included), or a
            Lightning checkpoint of ``DCCNNModule`` (training and distillation runs; weights
            under ``model.``, distillation's own parameters under ``distillation.`` are
            ignored), of ``SFTModule`` (weights under ``sft.teacher.`` / ``sft.student.``) or
            of fastMRI's ``VarNetModule`` / ``VarNetModule2`` (weights under ``varnet.``,
            rebuilt as a ``CascadedVarNet`` without a preset).
        role: for SFT checkpoints, ``"teacher"`` (also the choice of ``"auto"``) or
            ``"student"`` (the student initialisation); ignored for single-network files,
            except that an SFT export of the other network is refused (the student
            initialisation asked for the teacher, or the reverse).
        expected_preset: when given, the checkpoint must hold this preset.
        map_location: passed to ``torch.load``.

    Returns:
        The network with the checkpoint's weights, in training mode as built (call
        ``.eval()`` for inference), with ``preset`` set.

    Raises:
        CheckpointError: unreadable file, unknown layout, another preset, missing config, or
            mismatching keys.
    """
    return _load_model(path, role, expected_preset, map_location, preset_required=True)


def _load_model(
    path: PathLike,
    role: str,
    expected_preset: Optional[str],
    map_location: Any,
    preset_required: bool,
) -> nn.Module:
    """:func:`load_model`; with ``preset_required=False`` a checkpoint that records no preset
    passes the ``expected_preset`` check (:func:`init_from_checkpoint` compares the configs)."""
    from .registry import build_model  # local: registry imports this module's siblings

    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    ckpt = read_checkpoint(path, map_location)
    kind = checkpoint_kind(ckpt)
    if kind == "model":
        meta = ckpt[FORMAT_KEY]
        if not isinstance(meta, Mapping):
            raise CheckpointError(f"{path}: '{FORMAT_KEY}' entry is not a mapping: {meta!r}")
        if "state_dict" not in ckpt:
            raise CheckpointError(
                f"{path}: a model export (its '{FORMAT_KEY}' entry) without the 'state_dict' "
                "entry that holds its weights"
            )
        preset, config, state = meta.get("preset"), meta.get("config"), _weights(path, ckpt)
        _check_sft_export_role(path, meta, role)
    elif kind == "lightning":
        hp = ckpt["hyper_parameters"]
        preset = hp.get("model_preset", hp.get("preset"))
        config = hp.get("model_config")
        state = strip_prefix(uncompiled_names(_weights(path, ckpt)), "model.")
    elif kind == "sft":
        which = "student" if role == "student" else "teacher"
        hp = ckpt["hyper_parameters"]
        preset, config = hp.get(f"{which}_preset"), hp.get(f"{which}_config")
        state = strip_prefix(uncompiled_names(_weights(path, ckpt)), f"sft.{which}.")
    elif kind == "varnet_module":
        preset, config = None, _varnet_module_config(ckpt["hyper_parameters"])
        # CascadedVarNet holds the VarNet as ``varnet`` too: the names stay (``loss.w``,
        # the SSIM loss's window, and a distillation's ``distillation.*`` are left out)
        weights = uncompiled_names(_weights(path, ckpt))
        state = {k: v for k, v in weights.items() if k.startswith("varnet.")}
    else:
        hint = ""
        if ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
            hint = (
                "; it looks like a plain state dict: build the network with "
                "create_model(preset, ...), load it with load_state_dict_strict, and write it "
                "with save_model_checkpoint"
            )
        elif "state_dict" in ckpt and isinstance(ckpt.get("hyper_parameters"), Mapping):
            hint = (
                "; it is a Lightning checkpoint of another module (e.g. fastMRI's UnetModule, "
                "UnetModule2): load it with that class's load_from_checkpoint"
            )
        raise CheckpointError(
            f"{path}: not a sftkd_fastmri checkpoint (expected a model export with a "
            f"'{FORMAT_KEY}' entry, or a Lightning checkpoint of DCCNNModule, SFTModule or "
            f"fastMRI's VarNetModule / VarNetModule2){hint}"
        )
    mismatch = expected_preset is not None and preset != expected_preset
    if mismatch and (preset is not None or preset_required):
        hint = ""
        if kind == "sft" and role != "student":
            hint = (
                " (this SFT checkpoint's teacher; its student initialisation is the "
                "sft_student_init.ckpt export beside it, or role='student')"
            )
        held = f"preset {preset!r}"
        if preset is None:  # e.g. a CascadedVarNet: say what it is instead
            kind_of = (config or {}).get("architecture") if isinstance(config, Mapping) else None
            held = f"a {kind_of or 'network'} without a preset"
        raise CheckpointError(f"{path} holds {held}, expected {expected_preset!r}{hint}")
    if not config:
        raise CheckpointError(f"{path}: checkpoint records no model config (role {role!r})")
    if not state:
        raise CheckpointError(f"{path}: checkpoint holds no weights for role {role!r}")
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{path}: the recorded model config is not a mapping: {config!r}")
    try:
        model = build_model(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: the recorded model config {dict(config)} does not build a network ({err})"
        ) from None
    model.preset = preset
    keep_float64(model, state)
    load_state_dict_strict(model, state, source=str(path))
    return model


def _weights(path: PathLike, ckpt: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``state_dict`` entry of ``ckpt``, refused unless a mapping keyed by names (what
    the prefixes are stripped from and the strict loading compares)."""
    state = ckpt["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{path}: its 'state_dict' entry is a {type(state).__name__}; expected a mapping "
            "of parameter names to tensors (a damaged checkpoint?)"
        )
    not_names = sorted(repr(k) for k in state if not isinstance(k, str))
    if not_names:
        raise CheckpointError(
            f"{path}: its 'state_dict' keys must be parameter names (str); not names: "
            f"{_short(not_names)}"
        )
    return state


def _varnet_module_config(hp: Mapping[str, Any]) -> Dict[str, Any]:
    """The :class:`~sftkd_fastmri.models.CascadedVarNet` config of the ``VarNet`` that
    fastMRI's ``VarNetModule`` builds from its ``hyper_parameters`` (``mask_center`` is
    VarNet's default there; ``num_low_frequencies`` comes with each batch)."""
    from .varnet import VARNET_ARCHITECTURE  # local: varnet imports fastMRI

    config = {"architecture": VARNET_ARCHITECTURE}
    config.update({k: hp[k] for k in VARNET_MODULE_KEYS})
    config["mask_center"] = True
    return config


def keep_float64(model: nn.Module, state: Mapping[str, Any]) -> nn.Module:
    """Turn ``model`` to float64 when every floating tensor of ``state`` is float64, so a
    network trained with ``Trainer(precision="64-true")`` reloads (and exports) as one instead
    of being rounded to float32 by ``load_state_dict``'s copy."""
    floating = {v.dtype for v in state.values() if isinstance(v, Tensor) and v.is_floating_point()}
    if floating == {torch.float64}:
        model.double()
    return model


def init_from_checkpoint(
    model: nn.Module,
    path: PathLike,
    *,
    role: str = "auto",
    overrides_option: str = "--model-overrides",
) -> nn.Module:
    """Copy the weights of the network stored in ``path`` into ``model`` (in place), strictly:
    same preset (where both ``model`` and the checkpoint have one: a network written from an
    instance, e.g. ``CascadedVarNet(VarNet(...))``, records none), same configuration, same
    parameter names and shapes.

    This is how a training run starts from earlier weights (``train --init-checkpoint``,
    ``distill --init-student``, ``sft --init-teacher/--init-student``).

    Args:
        model: a network built with the configuration the checkpoint should hold (its
            ``preset`` and ``config`` attributes are compared where it has them).
        path: any checkpoint :func:`load_model` reads.
        role: for SFT checkpoints, the network to take (``"teacher"``, the choice of
            ``"auto"``, or ``"student"``); ignored for single-network files, except that an SFT
            export of the other network is refused (as in :func:`load_model`).
        overrides_option: the option named in the hint of a configuration mismatch (the
            command-line option that builds ``model`` like the checkpoint's network).

    Returns:
        ``model``.

    Raises:
        CheckpointError: unreadable file, another preset or configuration (the differing
            settings listed, with the overrides that match the checkpoint), or weights that do
            not fit (missing and unexpected keys listed).
    """
    # another recorded preset is refused (naming an SFT checkpoint's student export); a
    # checkpoint without one is judged by its config and its weights' names and shapes
    preset = getattr(model, "preset", None)
    source = _load_model(path, role, preset, "cpu", preset_required=False)
    ours = getattr(model, "config", None)
    theirs = getattr(source, "config", None)
    if ours is not None and theirs is not None:
        kinds = [c.get("architecture") or "DC-CNN" for c in (ours, theirs)]
        if kinds[0] != kinds[1]:  # no override turns one kind of network into the other
            raise CheckpointError(
                f"{path}: holds a {kinds[1]} network; the network to initialise is a "
                f"{kinds[0]} (build a {kinds[1]} to start from this checkpoint)"
            )
        keys = [
            k
            for k in sorted(set(ours) | set(theirs))
            if k not in CONFIG_KEYS_IGNORED_ON_INIT and ours.get(k) != theirs.get(k)
        ]
        if keys:
            differing = "; ".join(
                f"{k}: expected {ours.get(k)!r}, found {theirs.get(k)!r}" for k in keys
            )
            overrides = overrides_text({k: theirs[k] for k in keys if k in theirs})
            what = f"preset {preset!r}" if preset is not None else "the network"
            raise CheckpointError(
                f"{path}: {what} with another configuration: {differing} (build the network "
                f"like it: {overrides_option} {overrides}, or the same overrides in Python)"
            )
    load_state_dict_strict(compiled_inner(model), source.state_dict(), source=str(path))
    return model


def overrides_text(overrides: Mapping[str, Any]) -> str:
    """``overrides`` as a shell word the command line's ``--model-overrides`` reads back to
    the same values: ``key=value,...`` with each value written as YAML reads it (``None`` ->
    ``null``, ``True`` -> ``true``, a string that YAML would read as something else quoted),
    else (a value with a comma, or one YAML does not write on one line) the JSON form."""
    import json
    import shlex

    import yaml

    items = []
    for key, value in overrides.items():
        try:
            text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
        except yaml.YAMLError:
            text = None
        if text is not None:
            text = text.strip()
            text = text[: -len("...")].strip() if text.endswith("\n...") else text
        if (
            text is None
            or "," in text  # the items' separator
            or "\n" in text
            or yaml.safe_load(text) != value
        ):
            try:
                return shlex.quote(json.dumps(dict(overrides)))
            except (TypeError, ValueError):  # not JSON either: Python's own notation
                return shlex.quote(",".join(f"{k}={v!r}" for k, v in overrides.items()))
        items.append(f"{key}={text}")
    return shlex.quote(",".join(items))
