"""Export the SFT teacher and the SFT student initialisation as plain model checkpoints
(DC-CNNs, or fastMRI VarNets through :class:`~sftkd_fastmri.models.CascadedVarNet`).

After the SFT stage (Matcha et al., MIDL 2023) two networks are needed on their own: the
student-friendly teacher (for evaluation and as the frozen teacher of the KD stage) and the
student weights trained in the branches (the initialisation of the KD-stage student). Both are
written with :func:`sftkd_fastmri.models.save_model_checkpoint` and read back with
:func:`sftkd_fastmri.models.load_model` (strict, name-based loading).

Lightning checkpoint contract (what :func:`export_sft` reads from a file):

* ``state_dict`` holds the wrapper's weights under ``{prefix}teacher.*`` and
  ``{prefix}student.*``; with a module storing ``self.sft = StudentFriendlyTeacher(...)`` the
  prefix is ``"sft."`` (the default);
* ``hyper_parameters`` holds ``teacher_config`` and ``student_config`` (the models'
  ``config`` dicts: the :class:`DCCNN` constructor arguments, overrides included, or a
  ``CascadedVarNet``'s config; or pass them to :func:`export_sft`), optionally
  ``teacher_preset`` and ``student_preset`` (preset names; ``None`` or absent for a model
  built from its config alone) and ``train_first_student_cascade`` (recorded in the
  student's metadata).

The file is read with ``weights_only=True`` (no pickled code runs). Anything missing or
mismatching raises :class:`~sftkd_fastmri.models.CheckpointError` naming the file and the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from torch import Tensor, nn

from ..models import (
    CheckpointError,
    build_model,
    load_state_dict_strict,
    model_config,
    read_checkpoint,
    save_model_checkpoint,
)
from ..models.checkpoint import (
    checkpoint_kind,
    keep_float64,
    strip_prefix,
    uncompiled_names,
)
from .wrapper import StudentFriendlyTeacher

__all__ = ["export_sft", "load_sft_models"]

PathLike = Union[str, os.PathLike]
SFTSource = Union[StudentFriendlyTeacher, PathLike, Mapping[str, Tensor]]
_ROLES = ("teacher", "student")


def load_sft_models(
    source: SFTSource,
    *,
    prefix: str = "sft.",
    teacher_preset: Optional[str] = None,
    teacher_config: Optional[Dict[str, Any]] = None,
    student_preset: Optional[str] = None,
    student_config: Optional[Dict[str, Any]] = None,
) -> Tuple[nn.Module, nn.Module, Dict[str, Any]]:
    """The teacher and the student of an SFT state as two standalone networks (DC-CNNs, or
    :class:`~sftkd_fastmri.models.CascadedVarNet` where their configs say so).

    Args:
        source: a :class:`StudentFriendlyTeacher` (its models are returned as they are), a
            Lightning checkpoint file (see the module docstring for the contract), or a state
            dict with keys ``{prefix}teacher.*`` and ``{prefix}student.*`` (e.g.
            ``sft.state_dict()`` with ``prefix=""``).
        prefix: prefix of the wrapper's keys in a checkpoint or state dict; ignored for a
            wrapper instance.
        teacher_preset, teacher_config, student_preset, student_config: the models'
            preset names and configs (ignored for a wrapper). Required for a bare state dict
            (a preset alone means its unmodified config); for a checkpoint they fill in
            missing hyperparameters (a config alone is enough: the preset is then recorded as
            ``None``, as for a network built from its config) and must agree with those
            present.

    Returns:
        ``(teacher, student, info)``; models rebuilt from a file or state dict are new
        networks in eval mode with ``preset`` set (a wrapper's own models are
        returned unchanged); ``info`` holds provenance for the checkpoint metadata.

    Raises:
        TypeError: a wrapper whose models have no config (neither a DCCNN nor a
            CascadedVarNet).
        CheckpointError: unreadable file, missing hyperparameters or configs, conflicting
            presets/configs, no weights under the prefix, or keys/shapes that do not match.
    """
    given = {
        "teacher_preset": teacher_preset,
        "teacher_config": teacher_config,
        "student_preset": student_preset,
        "student_config": student_config,
    }
    if isinstance(source, StudentFriendlyTeacher):
        for role in _ROLES:
            model = getattr(source, role)
            if getattr(model, "config", None) is None:
                raise TypeError(
                    f"the SFT {role} is a {type(model).__name__} without a config; only "
                    "networks that build_model rebuilds (DCCNN, CascadedVarNet) can be "
                    "exported as model checkpoints"
                )
        info = {
            "source": "StudentFriendlyTeacher",
            "train_first_student_cascade": source.train_first_student_cascade,
        }
        return source.teacher, source.student, info

    kind = None
    if isinstance(source, Mapping):
        where, state, hparams = "state dict", source, None
        info = {"source": "state dict", "train_first_student_cascade": None}
    else:
        path = Path(source)
        ckpt = read_checkpoint(path)
        where = str(path)
        if "state_dict" not in ckpt:
            raise CheckpointError(f"{where}: no 'state_dict' entry (not a Lightning checkpoint)")
        state = ckpt["state_dict"]
        hparams = ckpt.get("hyper_parameters") or {}
        if not isinstance(hparams, Mapping):
            raise CheckpointError(f"{where}: 'hyper_parameters' is not a dict")
        kind = checkpoint_kind(ckpt)
        info = {
            "source": where,
            "train_first_student_cascade": hparams.get("train_first_student_cascade"),
            # recorded by the module's setup from its datamodule: the exports' signature
            "challenge": hparams.get("challenge"),
        }
    info["prefix"] = prefix
    # a module whose networks were torch.compile'd saved "sft._orig_mod.teacher..." or
    # "sft.teacher._orig_mod...": the plain networks' names
    state = uncompiled_names(state)

    _check_prefixed_keys(state, prefix, where, kind)
    models = []
    for role in _ROLES:
        preset, config = _resolve_config(role, hparams, given, where)
        model = _build(role, preset, config, where)
        weights = strip_prefix(state, f"{prefix}{role}.")
        keep_float64(model, weights)  # an SFT run in float64 exports float64 networks
        load_state_dict_strict(
            model, weights, source=f"{where} (the {role}: keys '{prefix}{role}.*')"
        )
        models.append(model.eval())
    return models[0], models[1], info


def export_sft(
    source: SFTSource,
    out_dir: PathLike,
    *,
    prefix: str = "sft.",
    teacher_filename: str = "sft_teacher.ckpt",
    student_filename: str = "sft_student_init.ckpt",
    teacher_preset: Optional[str] = None,
    teacher_config: Optional[Dict[str, Any]] = None,
    student_preset: Optional[str] = None,
    student_config: Optional[Dict[str, Any]] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Tuple[Path, Path]:
    """Write the SFT teacher and student initialisation as two model checkpoints.

    Both files are :func:`~sftkd_fastmri.models.save_model_checkpoint` checkpoints with
    ``role="teacher"`` / ``role="student"`` and the preset and config recorded, so
    ``load_model(path)`` rebuilds each network on its own. The student's metadata notes
    whether its first cascade was trained (``train_first_student_cascade``; ``None`` when the
    source does not say): in the paper's SFT stage it was not.

    Args:
        source: a :class:`StudentFriendlyTeacher`, a Lightning checkpoint file or a state
            dict (see :func:`load_sft_models`).
        out_dir: output folder (created if needed).
        prefix: prefix of the wrapper's keys in a checkpoint or state dict (``"sft."`` for a
            Lightning module holding ``self.sft``).
        teacher_filename, student_filename: names of the two files in ``out_dir``.
        teacher_preset, teacher_config, student_preset, student_config: see
            :func:`load_sft_models`.
        extra: more metadata for both files (the commands record the data's ``challenge``,
            from which the deployment export picks its input signature).

    Returns:
        ``(teacher_path, student_path)``.

    Raises:
        CheckpointError: see :func:`load_sft_models`.
    """
    teacher, student, info = load_sft_models(
        source,
        prefix=prefix,
        teacher_preset=teacher_preset,
        teacher_config=teacher_config,
        student_preset=student_preset,
        student_config=student_config,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = {**(extra or {}), "stage": "sft", "sft_source": info["source"]}
    if "challenge" not in extra and info.get("challenge") in ("singlecoil", "multicoil"):
        extra["challenge"] = info["challenge"]
    teacher_path = save_model_checkpoint(
        teacher, out_dir / teacher_filename, role="teacher", extra=extra
    )
    student_path = save_model_checkpoint(
        student,
        out_dir / student_filename,
        role="student",
        extra={**extra, "train_first_student_cascade": info["train_first_student_cascade"]},
    )
    return teacher_path, student_path


#: What a checkpoint of one network is, by :func:`checkpoint_kind`.
_SINGLE_NETWORK = {
    "model": "model checkpoint of one network (written by train, distill, export or the SFT "
    "stage's exports)",
    "lightning": "Lightning checkpoint of one network (a train or distill run)",
}


def _check_prefixed_keys(
    state: Mapping[str, Tensor], prefix: str, where: str, kind: Optional[str] = None
) -> None:
    """Every key under ``prefix`` must belong to the teacher or the student."""
    own = [k for k in state if k.startswith(prefix)]
    roles = tuple(f"{prefix}{role}." for role in _ROLES)
    if not own and kind in _SINGLE_NETWORK:
        raise CheckpointError(
            f"{where}: a {_SINGLE_NETWORK[kind]}, not an SFT checkpoint: export_sft takes a "
            "checkpoint of the SFT stage (SFTModule's last.ckpt or best.ckpt), which holds "
            "both the teacher and the student; a single network needs no export (load it "
            "with sftkd_fastmri.models.load_model)"
        )
    if not own:
        sample = ", ".join(list(state)[:5]) or "(none)"
        raise CheckpointError(
            f"{where}: no weights under the prefix {prefix!r} (expected keys "
            f"'{prefix}teacher.*' and '{prefix}student.*'; first keys found: {sample}); "
            "pass the prefix under which the module holds the StudentFriendlyTeacher"
        )
    stray = sorted(k for k in own if not k.startswith(roles))
    if stray:
        raise CheckpointError(
            f"{where}: keys under {prefix!r} that belong to neither the teacher nor the "
            f"student: {', '.join(stray[:8])}"
        )


def _resolve_config(
    role: str,
    hparams: Optional[Mapping[str, Any]],
    given: Mapping[str, Any],
    where: str,
) -> Tuple[Optional[str], Dict[str, Any]]:
    """The ``(preset, config)`` of ``role``.

    ``hparams`` is ``None`` for a bare state dict (the arguments are then the only source and
    a preset alone stands for its unmodified config) and the checkpoint's hyperparameters
    otherwise (the config required, from there or the arguments; the preset optional, ``None``
    when absent; arguments and hyperparameters must agree where both are given).
    """
    resolved: Dict[str, Any] = {}
    for field in ("preset", "config"):
        key = f"{role}_{field}"
        arg = given.get(key)
        if hparams is None:
            resolved[field] = arg
            continue
        stored = hparams.get(key)
        if arg is not None and stored is not None and arg != stored:
            raise CheckpointError(
                f"{where}: hyperparameter {key}={stored!r} conflicts with the argument {arg!r}"
            )
        resolved[field] = arg if arg is not None else stored
    preset, config = resolved["preset"], resolved["config"]
    if config is None:
        if hparams is not None or preset is None:
            # A preset name alone would lose overrides such as chans=16 for a trained model.
            what = "" if hparams is None else f" (its hyperparameters have no '{role}_config')"
            raise CheckpointError(
                f"{where}: no config for the {role}{what}; pass {role}_config to export_sft "
                f"(the {role} model's config dict; with a bare state dict, {role}_preset "
                "alone stands for an unmodified preset). A checkpoint of an SFTModule given a "
                "model instance without a config cannot be exported: its "
                f"{role}'s weights are the 'sft.{role}.' entries of its state_dict"
            )
        try:
            config = model_config(preset)
        except KeyError as err:
            raise CheckpointError(f"{where}: unknown {role} preset {preset!r}") from err
    if not isinstance(config, Mapping) or not config:
        raise CheckpointError(
            f"{where}: '{role}_config' must be a non-empty dict (a network's config), got "
            f"{config!r}"
        )
    return preset, dict(config)


def _build(role: str, preset: Optional[str], config: Dict[str, Any], where: str) -> nn.Module:
    try:
        model = build_model(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: invalid '{role}_config' {config!r}: {err}") from err
    model.preset = preset
    return model
