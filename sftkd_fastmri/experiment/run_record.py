"""The record of a run's settings, ``run_config.json``, and its comparison with a new config.

A run records the config it started with, the SHA-256 of the files it starts from
(:data:`RUN_INPUT_FILES`: initial weights, teacher, mask; of a checkpoint, the digest of its
weights) and a digest of its training and validation splits (:func:`data_digest`). Resuming
or reusing it with other settings of :data:`RUN_IDENTITY_KEYS`, or with other data, is
refused with the differences listed (:func:`check_run_settings`); a moved or copied input
file or data folder resumes, one replaced at the same path does not. The stage runners are
in :mod:`.runs`.
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

from .._precision import canonical_precision, precision_that_runs
from ..models import CheckpointError, read_checkpoint

__all__ = [
    "RUN_CONFIG_FILE",
    "RUN_IDENTITY_KEYS",
    "RUN_INPUT_FILES",
    "check_run_settings",
    "data_digest",
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
#: is refused. The rest (epochs, batch limits, devices, workers, paths, logging) may change;
#: the data are compared by content (:func:`data_digest`), not by path.
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
    "val_sample_rate",
    "val_volume_sample_rate",
    "combine_train_val",
    "batch_size",
    "seed",
    "lr",
    "lr_step_size",
    "lr_gamma",
    "weight_decay",
    "loss",
    "accumulate_grad_batches",
    "precision",
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
_DATA_DIGEST = "data_digest"
#: Of each split, the files whose first and last :data:`_DATA_SAMPLE_BYTES` enter
#: :func:`data_digest` (evenly spread over the sorted names; every name and size enters).
_DATA_SAMPLED_FILES = 64
_DATA_SAMPLE_BYTES = 4096
#: Split digests by the split's listing (names, sizes, inodes, modification times).
_SPLITS_SEEN: OrderedDict[Tuple[str, str], str] = OrderedDict()


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
    return _remembered(_DIGESTS_SEEN, key, lambda: _hash_file(path), st.st_mtime)


def _remembered(cache: OrderedDict, key: Any, compute: Any, modified: float) -> str:
    """``compute()``, remembered in ``cache`` under ``key`` (the last :data:`_DIGESTS_KEPT`)
    unless what it reads was modified in the last :data:`_RACY_SECONDS` (``modified``: the
    newest modification time)."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = compute()
    if time.time() - modified > _RACY_SECONDS:
        cache[key] = value
        while len(cache) > _DIGESTS_KEPT:
            cache.popitem(last=False)
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


def _split_digest(folder: Path) -> str:
    """SHA-256 of a split folder: every entry's name and size, and the first and last bytes
    of up to :data:`_DATA_SAMPLED_FILES` of its files (HDF5 headers and attributes such as a
    volume's ``max``, and the end of its last dataset): the same files copied or moved
    elsewhere digest the same; other volumes, or the same names regenerated with other
    content, do not. Reads a few KiB per sampled file, not the data."""
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    stats = [(e, e.stat()) for e in entries]
    listing = "\n".join(f"{e.name}\t{st.st_size}\t{st.st_ino}\t{st.st_mtime_ns}" for e, st in stats)
    key = (str(folder.resolve()), hashlib.sha256(listing.encode()).hexdigest())
    newest = max((st.st_mtime for _, st in stats), default=0.0)
    return _remembered(_SPLITS_SEEN, key, lambda: _read_split(stats), newest)


def _read_split(stats: list) -> str:
    """The digest of :func:`_split_digest` from a split's ``(entry, stat)`` pairs."""
    digest = hashlib.sha256()
    files = [(e, st) for e, st in stats if e.is_file()]
    step = max(1.0, (len(files) - 1) / max(1, _DATA_SAMPLED_FILES - 1))
    sampled = {round(i * step) for i in range(min(len(files), _DATA_SAMPLED_FILES))}
    for index, (entry, st) in enumerate(files):
        digest.update(f"{entry.name}\t{st.st_size}\n".encode())
        if index in sampled:
            with open(entry.path, "rb") as f:
                digest.update(f.read(_DATA_SAMPLE_BYTES))
                if st.st_size > 2 * _DATA_SAMPLE_BYTES:
                    f.seek(-_DATA_SAMPLE_BYTES, os.SEEK_END)
                    digest.update(f.read(_DATA_SAMPLE_BYTES))
    return digest.hexdigest()


def data_digest(cfg: Dict[str, Any]) -> Optional[str]:
    """A digest of the splits a run trains and selects on (``{challenge}_{train_split}`` and
    ``{challenge}_{val_split}`` under the data folder, see :func:`_split_digest`), or
    ``None`` where the data folder or a split cannot be found (the run reports that itself).
    The same data moved or copied elsewhere digest the same."""
    import warnings

    from ..data.datasets import split_dir
    from .builders import resolve_data_path

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # resolve_data_path's "ignored" notes: said elsewhere
            root = resolve_data_path(cfg)
        folders = [
            split_dir(root, cfg["challenge"], cfg.get(f"{role}_split") or role)
            for role in ("train", "val")
        ]
        parts = [f"{folder.name}:{_split_digest(folder)}" for folder in folders]
    except (KeyError, ValueError, OSError):
        return None
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def run_record(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """What ``run_config.json`` holds: the config plus the digests of the run's input files
    and of its training and validation data."""
    record = _jsonable(cfg)
    record[_DIGESTS] = _file_digests(cfg)
    record[_DATA_DIGEST] = data_digest(cfg)
    return record


def _precision_ran(recorded: Any, accelerator: Any, out_dir: Optional[Path]) -> str:
    """What a run recorded with precision ``recorded`` ran: ``16-mixed`` ran as
    ``bf16-mixed`` on a CPU (``accelerator: cpu``; with ``auto``, where its last checkpoint
    holds no float16 gradient scaler, which Lightning saves for float16 runs only)."""
    precision = canonical_precision(recorded)
    if precision != "16-mixed":
        return precision
    if str(accelerator) == "cpu":
        return "bf16-mixed"
    last = None if out_dir is None else out_dir / "checkpoints" / "last.ckpt"
    if str(accelerator or "auto") != "auto" or last is None or not last.is_file():
        return precision
    try:
        checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    except Exception:  # unreadable: the resume reports it; here, no evidence of bf16
        return precision
    return precision if checkpoint.get("MixedPrecision") else "bf16-mixed"


def _differs(
    key: str,
    before: Dict[str, Any],
    now: Dict[str, Any],
    digests: Dict[str, str],
    out_dir: Optional[Path] = None,
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
    if _canonical(key, then) == _canonical(key, now.get(key)):
        return None
    if key == "precision" and then is not None and now.get(key) is not None:
        # a run recorded before the commands named what runs: 16-mixed on a CPU ran bf16
        ran = _precision_ran(then, before.get("accelerator"), out_dir)
        if ran == precision_that_runs(now[key], now.get("accelerator")):
            return None
    return f"{key}: {then!r} then, {now.get(key)!r} now"


#: Options whose default means "not given": a record without the option (written before it
#: existed) matches a run that leaves it at the default.
_NO_VALUE = {
    "val_sample_rate": 1.0,
    "val_volume_sample_rate": 1.0,
    "combine_train_val": False,
    "volume_sample_rate": 1.0,
}


def _canonical(key: str, value: Any) -> Any:
    """One spelling per setting: an empty mapping or list is no value (``layers: {}`` is
    ``layers: None``), and a precision is Lightning's name for it (``32`` is ``32-true``)."""
    if isinstance(value, (dict, list)) and not value:
        return None
    if key in _NO_VALUE and value == _NO_VALUE[key]:
        return None  # the default of an option that records before it existed lack
    if key == "precision" and value is not None:
        return canonical_precision(value)
    return value


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
        k: _differs(k, before, now, digests, out_dir)
        for k in _identity_keys(stage or recorded_stage, cfg)
    }
    recorded_data = before.get(_DATA_DIGEST)
    if isinstance(recorded_data, str):  # records of earlier versions have none
        present = data_digest(cfg)
        if present is not None and present != recorded_data:
            then, place = before.get("data_path"), now.get("data_path")
            where = (
                f"under {place!r}, as then"
                if then == place
                else f"under {place!r} now, {then!r} then"
            )
            found["data"] = (
                "data: the training and validation split folders hold other files than "
                f"when the run started (a volume added, removed or replaced; {where})"
            )
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
