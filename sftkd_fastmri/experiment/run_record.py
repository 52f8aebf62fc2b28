"""The record of a run's settings, ``run_config.json``, and its comparison with a new config.

A run records the config it started with and the SHA-256 of the files it starts from
(:data:`RUN_INPUT_FILES`: initial weights, teacher, mask; of a checkpoint, the digest of its
weights). Resuming or reusing it with other settings of :data:`RUN_IDENTITY_KEYS` is refused
with the differences listed (:func:`check_run_settings`); a moved or copied input file
resumes, a file replaced at the same path does not. The stage runners are in :mod:`.runs`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..models import CheckpointError, read_checkpoint

__all__ = [
    "RUN_CONFIG_FILE",
    "RUN_IDENTITY_KEYS",
    "RUN_INPUT_FILES",
    "check_run_settings",
    "recorded_weights_changed",
    "run_differences",
    "run_record",
]

RUN_CONFIG_FILE = "run_config.json"
#: The network of train and distill runs (an SFT run has two presets instead).
_SINGLE_NETWORK_KEYS = ("model", "model_overrides", "init_checkpoint")
#: Compared only for SFT runs: the two presets, their starts and the SFT loss.
_SFT_KEYS = (
    "teacher",
    "student",
    "teacher_overrides",
    "student_overrides",
    "init_teacher",
    "init_student",
    "train_first_student_cascade",
    "teacher_weight",
    "branch_weight",
    "imitation_weight",
)
#: Compared only for distillation runs (a study hands its KD options to every stage).
_KD_KEYS = ("teacher_checkpoint", "methods", "kd_schedule", "kd_epochs", "layers", "loss_options")
#: Options that define what a run trains: resuming from ``last.ckpt`` with any of them changed
#: is refused. The rest (epochs, batch limits, devices, workers, paths, logging) may change.
#: Of the network and loss options, those of the run's kind count (:func:`_identity_keys`).
RUN_IDENTITY_KEYS = (
    "challenge",
    "train_split",
    "val_split",
    "mask_type",
    "center_fractions",
    "accelerations",
    "fixed_mask",
    "mask_path",
    "kspace_from_target",
    "sample_rate",
    "volume_sample_rate",
    "batch_size",
    "seed",
    "lr",
    "lr_step_size",
    "lr_gamma",
    "weight_decay",
    "loss",
    "accumulate_grad_batches",
    *_SINGLE_NETWORK_KEYS,
    *_SFT_KEYS,
    *_KD_KEYS,
)
#: Identity options naming a file: compared by the file's SHA-256 where the run recorded it
#: (``file_digests`` in ``run_config.json``), so that a moved study folder still resumes.
RUN_INPUT_FILES = (
    "init_checkpoint",
    "init_teacher",
    "init_student",
    "teacher_checkpoint",
    "mask_path",
)
_DIGESTS = "file_digests"


def _identity_keys(stage: Optional[str], cfg: Dict[str, Any]) -> list:
    """The :data:`RUN_IDENTITY_KEYS` that define a run of ``stage`` (train, sft, distill):
    a study hands every option to every stage, and an SFT loss weight changed for the next
    study must not make its standard teacher look like another run."""
    if stage == "train":
        skip = _SFT_KEYS + _KD_KEYS
    elif stage == "distill":
        skip = _SFT_KEYS
    elif stage == "sft":
        skip = _SINGLE_NETWORK_KEYS + _KD_KEYS
    else:  # a record of an earlier version without its stage
        skip = () if cfg.get("teacher_checkpoint") else _KD_KEYS
    return [k for k in RUN_IDENTITY_KEYS if k not in skip]


def _jsonable(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps(cfg, default=str, sort_keys=True))


#: Digests by (path, device, inode, size, modification time): a study compares a stage's
#: input files with its record more than once (:func:`run_differences`, then
#: :func:`recorded_weights_changed`, then the run's own record), and a VarNet checkpoint takes
#: seconds to read and hash.
_DIGESTS_SEEN: OrderedDict[Tuple[str, int, int, int, int], str] = OrderedDict()
_DIGESTS_KEPT = 64
#: Files modified less than this long ago are hashed every time: a rewrite within the file
#: system's timestamp resolution could keep size and time (git's "racy" files).
_RACY_SECONDS = 2.0


def _sha256(path: os.PathLike) -> str:
    """SHA-256 of a checkpoint's weights (names, dtypes, shapes, values: the same network
    saved again digests the same), or of the file's bytes for anything else (a mask).

    Remembered for the file as it is (same inode, size and modification time), unless it
    was modified in the last :data:`_RACY_SECONDS`."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _DIGESTS_SEEN:
        _DIGESTS_SEEN.move_to_end(key)
        return _DIGESTS_SEEN[key]
    value = _hash_file(path)
    if time.time() - st.st_mtime > _RACY_SECONDS:
        _DIGESTS_SEEN[key] = value
        while len(_DIGESTS_SEEN) > _DIGESTS_KEPT:
            _DIGESTS_SEEN.popitem(last=False)
    return value


def _hash_file(path: os.PathLike) -> str:
    digest = hashlib.sha256()
    try:
        state = read_checkpoint(path).get("state_dict")
    except CheckpointError:  # not a torch checkpoint (a .npy mask)
        state = None
    if (
        isinstance(state, dict)
        and state
        and all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        for name in sorted(state):
            tensor = state[name].detach().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return "weights:" + digest.hexdigest()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_digests(cfg: Dict[str, Any]) -> Dict[str, str]:
    """SHA-256 of each :data:`RUN_INPUT_FILES` option that names an existing file."""
    return {
        key: _sha256(cfg[key])
        for key in RUN_INPUT_FILES
        if cfg.get(key) and Path(cfg[key]).is_file()
    }


def run_record(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """What ``run_config.json`` holds: the config plus the digests of the run's input files."""
    record = _jsonable(cfg)
    record[_DIGESTS] = _file_digests(cfg)
    return record


def _differs(
    key: str, before: Dict[str, Any], now: Dict[str, Any], digests: Dict[str, str]
) -> Optional[str]:
    """``None`` when option ``key`` matches the record, else how it differs (for the message).

    Files recorded with a digest match by content; records without one (older runs, or a
    file that did not exist) by path, as do files missing now (the stage reports those)."""
    then = before.get(key)
    recorded_digests = before.get(_DIGESTS)
    recorded = recorded_digests.get(key) if isinstance(recorded_digests, dict) else None
    if key in RUN_INPUT_FILES and recorded and then and key in digests:
        if digests.get(key) == recorded:
            return None  # the same content, wherever it lies now
        if then == now.get(key):
            return f"{key}: {then!r} holds other content than when the run started"
    if then == now.get(key):
        return None
    return f"{key}: {then!r} then, {now.get(key)!r} now"


def run_differences(
    cfg: Dict[str, Any], out_dir: os.PathLike, stage: Optional[str] = None
) -> Dict[str, str]:
    """The options that define a run (:data:`RUN_IDENTITY_KEYS` of its kind) in which
    ``cfg`` differs from the run recorded in ``out_dir/run_config.json``: option -> how it
    differs. Empty when they match or nothing is recorded. A damaged record, or a run of
    another kind than ``stage``, raises ValueError."""
    out_dir = Path(out_dir)
    path = out_dir / RUN_CONFIG_FILE
    if not path.is_file():
        return {}  # a run from before the record existed: nothing to compare
    try:
        before = json.loads(path.read_text())
        if not isinstance(before, dict):
            raise ValueError("not a mapping")
    except ValueError as err:
        raise ValueError(
            f"{path}: damaged run record ({err}), so this run's settings cannot be compared; "
            "use another out_dir, or remove that folder to train it again"
        ) from None
    recorded_stage = before.get("stage")
    if stage and recorded_stage and stage != recorded_stage:
        raise ValueError(
            f"{out_dir} holds a {recorded_stage} run, not a {stage} run; use another out_dir "
            "for this one"
        )
    now = _jsonable(cfg)
    digests = _file_digests(cfg)
    found = {
        k: _differs(k, before, now, digests) for k in _identity_keys(stage or recorded_stage, cfg)
    }
    return {k: v for k, v in found.items() if v is not None}


def recorded_weights_changed(cfg: Dict[str, Any], out_dir: os.PathLike, key: str) -> bool:
    """True when the file option ``key`` names a network other than the one the run in
    ``out_dir`` started from: the recorded and the present digest are both of weights and
    differ. False for anything less certain (no digest, a digest of an earlier version's
    kind, a file that is gone)."""
    try:
        before = json.loads((Path(out_dir) / RUN_CONFIG_FILE).read_text())
        recorded = before[_DIGESTS][key]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    path = cfg.get(key)
    if not path or not Path(path).is_file():
        return False
    now = _sha256(path)
    return (
        isinstance(recorded, str)
        and recorded.startswith("weights:")
        and now.startswith("weights:")
        and recorded != now
    )


def check_run_settings(
    cfg: Dict[str, Any],
    out_dir: os.PathLike,
    finished: bool = False,
    stage: Optional[str] = None,
) -> None:
    """Raise ValueError when ``out_dir`` holds a run started with other settings than
    ``cfg`` (the :data:`RUN_IDENTITY_KEYS` recorded in its ``run_config.json`` that define
    a run of its stage: ``stage``, else the one recorded; see :func:`run_differences`).

    ``finished``: the run is complete (a study about to reuse it) rather than about to resume.
    """
    changed = list(run_differences(cfg, out_dir, stage).values())
    if not changed:
        return
    shown = "; ".join(changed[:6])
    more = f" (+{len(changed) - 6} more)" if len(changed) > 6 else ""
    if finished:
        raise ValueError(
            f"{out_dir} holds a finished run with other settings ({shown}{more}), which this "
            "study would reuse as if it matched. Use another out_dir for the new settings, or "
            "remove that folder to train it again"
        )
    raise ValueError(
        f"{out_dir} holds a run started with other settings ({shown}{more}), and resuming "
        "it would continue that run. Use the same settings to resume it, another "
        "--out-dir for a new run, or --resume false to start over there (its checkpoints "
        "are replaced)"
    )
