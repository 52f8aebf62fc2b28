"""Stage runners: train, SFT, distill, evaluate - each one function of a flat config dict.

Every stage writes into its own ``out_dir``: Lightning checkpoints (``checkpoints/best.ckpt``
chosen on the validation split, ``checkpoints/last.ckpt`` for resuming), plain model exports
(``model.pt``; for SFT ``sft_teacher.ckpt`` and ``sft_student_init.ckpt``) and, last,
``done.json``. A stage whose ``done.json`` exists is complete; an interrupted one resumes
from ``last.ckpt``. ``run_config.json`` records the settings a run started with: resuming
with other settings (another model, loss, KD method, learning rate, mask ...) is refused
with the differences listed, rather than failing deep in Lightning or silently mixing two
runs; the options in :data:`~.run_record.RUN_IDENTITY_KEYS` are compared, the others
(epochs, devices, workers, data and output paths, logging) may change between sessions. The
files a run starts from (initial weights, teacher, mask) are compared by content (SHA-256): a
moved or copied file resumes, a file replaced at the same path does not
(:mod:`.run_record`).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import json
import os
import pickle
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
from torch import nn

from .._io import atomic_write_text
from ..data.datasets import TARGET_KEYS, check_split_entries
from ..export.loading import load_reconstruction_model
from ..models import CheckpointError, read_checkpoint, save_model_checkpoint
from .builders import CKPT_DIR, build_datamodule, build_trainer
from .run_record import (
    RUN_CONFIG_FILE,
    RUN_IDENTITY_KEYS,
    RUN_INPUT_FILES,
    check_run_settings,
    recorded_weights_changed,
    run_differences,
    run_record,
)

__all__ = [
    "DONE_FILE",
    "RUN_IDENTITY_KEYS",
    "RUN_CONFIG_FILE",
    "RUN_INPUT_FILES",
    "StageResult",
    "check_kd_schedule",
    "check_out_of_splits",
    "check_run_settings",
    "evaluation_device",
    "last_checkpoint",
    "resume_checkpoint",
    "recorded_weights_changed",
    "run_differences",
    "run_distill",
    "run_evaluate",
    "run_sft",
    "run_train",
]

DONE_FILE = "done.json"


@dataclass
class StageResult:
    """Where a finished stage left its outputs, and what it trained.

    ``done.json`` records the checkpoint and export paths relative to the stage folder
    (``out_dir`` is ``"."`` there), so a study folder that was moved or copied reads its own
    files, not the original's; :meth:`load` returns them as paths under the folder given.
    ``epochs``: the epochs its training finished; ``limit_train_batches``: the batches per
    epoch it was asked for (``None`` in records of earlier versions)."""

    name: str
    out_dir: str
    best_checkpoint: str
    exports: Dict[str, str] = field(default_factory=dict)
    epochs: Optional[int] = None
    limit_train_batches: Any = None

    @classmethod
    def load(cls, out_dir: os.PathLike) -> Optional[StageResult]:
        path = Path(out_dir) / DONE_FILE
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            result = cls(**record)
            if not isinstance(result.exports, dict):
                raise TypeError("exports is not a mapping")
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{path}: not a stage record this package wrote ({err}); remove it (and the "
                "stage folder, to train the stage again)"
            ) from None
        here = Path(out_dir)

        def locate(recorded: str) -> str:
            p = Path(recorded)
            if result.out_dir == ".":  # this version's record: relative to the stage folder
                return str(p if p.is_absolute() else here / p)
            # an earlier version's record: the path as written then, under its out_dir
            for base in {str(result.out_dir), os.path.abspath(result.out_dir)}:
                if recorded.startswith(base.rstrip(os.sep) + os.sep):
                    return str(here / recorded[len(base.rstrip(os.sep)) + 1 :])
            return recorded

        result.best_checkpoint = locate(result.best_checkpoint)
        result.exports = {k: locate(v) for k, v in result.exports.items()}
        result.out_dir = str(here)
        return result

    def save(self) -> None:
        here = Path(self.out_dir)

        def relative(path: str) -> str:
            # real paths: Lightning writes its checkpoints under the resolved folder
            try:
                inside = _inside(path, here)
                rel = os.path.relpath(os.path.realpath(path), os.path.realpath(here))
                return Path(rel).as_posix() if inside else path
            except ValueError:  # another drive
                return path

        record = asdict(self)
        record["out_dir"] = "."  # the paths below are relative to the folder of done.json
        record["best_checkpoint"] = relative(self.best_checkpoint)
        record["exports"] = {k: relative(v) for k, v in self.exports.items()}
        atomic_write_text(here / DONE_FILE, json.dumps(record, indent=2))


def _inside(path: os.PathLike, folder: os.PathLike) -> bool:
    """``path`` lies inside ``folder`` (links resolved: a folder reached through a link)."""
    return Path(os.path.realpath(folder)) in Path(os.path.realpath(path)).parents


def _out_dir(cfg: Dict[str, Any], default: str) -> Path:
    # "~" expanded here, once: Lightning expands it for its checkpoints and logs, so a literal
    # "~" folder would have split the run in two (and never resumed)
    path = Path(os.path.expanduser(str(cfg.get("out_dir") or default)))
    if path.exists() and not path.is_dir():
        raise ValueError(f"out_dir {path} is a file; expected a folder (new or of this run)")
    return path


def check_out_of_splits(out_dir: os.PathLike, data_path: os.PathLike, option: str) -> None:
    """``out_dir`` must not be a split folder of ``data_path`` (``{challenge}_{split}``, of
    either challenge, followed through links) nor lie inside one: fastMRI's reader takes
    every entry of a split folder as a volume, so a run's folder there would break every
    later run that reads the split. ``option`` names the setting in the error. Raised before
    anything is written."""
    root = Path(data_path)
    if not root.is_dir():
        return  # no data folder: reported where the data are read
    target = Path(os.path.realpath(os.path.expanduser(str(out_dir))))
    for entry in sorted(root.iterdir()):
        if entry.name.split("_")[0] not in TARGET_KEYS or not entry.is_dir():
            continue
        folder = Path(os.path.realpath(entry))
        if target == folder or folder in target.parents:
            raise ValueError(
                f"{option} {out_dir} is inside the split folder {entry}, where fastMRI's "
                "reader takes every entry as a volume (a run's folder there would break every "
                "later run on that split): choose a folder outside the split folders"
            )


#: How :func:`check_kd_schedule` names the options: the training commands' flags.
KD_SCHEDULE_FLAGS = {
    "kd_schedule": "--kd-schedule",
    "kd_epochs": "--kd-epochs",
    "max_epochs": "--max-epochs",
}


def check_kd_schedule(
    schedule: Any, kd_epochs: Any, max_epochs: int, names: Optional[Mapping[str, str]] = None
) -> None:
    """:func:`~sftkd_fastmri.callbacks.distillation.check_schedule` with the stage's
    ``max_epochs``, before anything loads or is written; ``names``: how the errors name
    ``kd_schedule``, ``kd_epochs`` and ``max_epochs`` (default: :data:`KD_SCHEDULE_FLAGS`)."""
    from ..callbacks.distillation import check_schedule

    check_schedule(schedule, kd_epochs, max_epochs, {**KD_SCHEDULE_FLAGS, **dict(names or {})})


def evaluation_device(cfg: Mapping[str, Any]) -> str:
    """The one device ``evaluate`` runs on (``"cpu"`` or ``"cuda"``), from the runtime options,
    read as training reads them: ``accelerator`` ``cpu``, ``gpu`` (or ``cuda``: refused, as
    Lightning refuses it in training, where this machine has no CUDA device) or ``auto`` (a
    CUDA GPU where there is one). ``devices`` must be 1: evaluation runs on one device. Raises
    ValueError for any other setting, rather than run somewhere the options did not say."""
    devices = cfg.get("devices", 1)
    if devices is not None and str(devices).strip() != "1":  # True is no device count
        raise ValueError(
            f"--devices {devices}: evaluate runs on one device (it has no multi-device "
            "evaluation); pass --devices 1"
        )
    accelerator = str(cfg.get("accelerator") or "auto").lower()
    if accelerator == "cpu":
        return "cpu"
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"--accelerator {cfg.get('accelerator')}: no CUDA GPU on this machine; pass "
                "--accelerator cpu (or auto: a GPU where there is one)"
            )
        return "cuda"
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    raise ValueError(
        f"--accelerator {cfg.get('accelerator')}: evaluate runs on cpu or gpu (a CUDA GPU), "
        "or auto (a CUDA GPU where there is one)"
    )


def _seed(cfg: Dict[str, Any]) -> None:
    """Seed Python, NumPy and torch (and dataloader workers) with the stage's ``seed``."""
    pl.seed_everything(cfg["seed"], workers=True, verbose=False)


def _fit(
    cfg: Dict[str, Any], module: pl.LightningModule, out_dir: Path, stage: str, callbacks=()
) -> str:
    """Fit with resume from ``last.ckpt``; return the best checkpoint's path.

    Seeds again before building the data, so the masks and batch order of a stage depend on
    its seed alone (not on how many random numbers building its networks took)."""
    _seed(cfg)
    last = resume_checkpoint(out_dir)
    resume = str(last) if cfg.get("resume", True) and last.is_file() else None
    trains_on = False
    if resume:
        check_run_settings(cfg, out_dir, stage=stage)
        trains_on = not _say_if_finished(last, int(cfg["max_epochs"]))
    # built before anything in out_dir changes: a typo in a path or setting found here must
    # cost nothing of the earlier run
    datamodule = build_datamodule(cfg)
    # nothing of the run may land in a split folder (its logs and run_config.json would)
    check_out_of_splits(out_dir, datamodule.data_path, "--out-dir")
    trainer = build_trainer(cfg, out_dir, callbacks=list(callbacks))
    if trains_on:
        _unfinish(out_dir)  # it trains on: no longer finished, its deployments stale
    if not resume:
        # what can be checked cheaply before an earlier run is removed: a stray file in a
        # split folder must not cost the user the run that --resume false would replace
        for stage_name in ("train", "val"):
            check_split_entries(datamodule.split_folder(stage_name))
        _check_clearable(cfg, out_dir)
        record = {**run_record(cfg), "stage": stage}  # input digests, before any removal
        _clear_earlier_run(out_dir)
        atomic_write_text(out_dir / RUN_CONFIG_FILE, json.dumps(record, indent=2))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, **_safe_resume(trainer))
    except RuntimeError as err:
        if resume and "Error(s) in loading state_dict" in str(err):
            # a run from before run_config.json existed, of another network
            first = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), "")
            raise ValueError(
                f"{last} holds a run of another network ({first} ...); use another "
                "--out-dir for a new run, or --resume false to start over there"
            ) from None
        _forget_unstarted_run(resume, out_dir, trainer)
        raise
    except BaseException:
        _forget_unstarted_run(resume, out_dir, trainer)
        raise
    best = trainer.checkpoint_callback.best_model_path
    if not best or not Path(best).is_file():
        best = str(last)
    if not Path(best).is_file():
        raise ValueError(
            f"training in {out_dir} produced no checkpoint: no training step ran "
            "(limit_train_batches 0, or an empty training split?)"
        )
    return best


def _input_challenge(cfg: Dict[str, Any]) -> str:
    """The k-space a stage's network was trained on (its export signature): single-coil when
    it is simulated from the targets (``kspace_from_target``), else the challenge's."""
    return "singlecoil" if cfg.get("kspace_from_target") else cfg["challenge"]


def _warn_if_other_challenge(
    checkpoint: os.PathLike, challenge: str, use: str = "evaluating it"
) -> None:
    """A network trained on single-coil data scored on multi-coil data (or the reverse) runs,
    but is not what anyone means to measure: say so. ``use`` says what is done with it."""
    from ..export.deploy import _recorded_challenge

    try:
        recorded = _recorded_challenge(read_checkpoint(checkpoint))
    except CheckpointError:
        return
    if recorded is not None and recorded != challenge:
        warnings.warn(
            f"{checkpoint} was trained on {recorded} k-space; {use} on {challenge} "
            "data (--challenge, --kspace-from-target)",
            stacklevel=2,
        )


def _warn_inputs_of_other_challenge(cfg: Dict[str, Any], uses: Mapping[str, str]) -> None:
    """:func:`_warn_if_other_challenge` for each checkpoint option of ``uses`` that is set
    (option -> what the run does with that network)."""
    for key, use in uses.items():
        if cfg.get(key):
            _warn_if_other_challenge(cfg[key], _input_challenge(cfg), use)


def last_checkpoint(out_dir: os.PathLike) -> Path:
    """Where a run in ``out_dir`` keeps the checkpoint it resumes from."""
    return Path(out_dir) / CKPT_DIR / "last.ckpt"


def resume_checkpoint(out_dir: os.PathLike) -> Path:
    """The checkpoint a run in ``out_dir`` resumes from: ``last.ckpt``; without it, in a run
    folder (``run_config.json``) that has not finished (no ``done.json``), ``best.ckpt``:
    Lightning writes it first, so a stop between the two writes of the first epoch leaves it
    alone, and it holds that epoch. A finished run whose ``last.ckpt`` is gone starts over."""
    last = last_checkpoint(out_dir)
    best = last.with_name("best.ckpt")
    folder = Path(out_dir)
    if (
        not last.is_file()
        and best.is_file()
        and (folder / RUN_CONFIG_FILE).is_file()
        and not (folder / DONE_FILE).is_file()
    ):
        return best
    return last


#: What a stage writes besides its checkpoints (the exports of train/distill and of sft).
STAGE_EXPORTS = ("model.pt", "sft_teacher.ckpt", "sft_student_init.ckpt")


def _default_export_names(stem: str) -> list:
    """The names :func:`~sftkd_fastmri.export.deploy.default_export_path` gives the exports
    of a checkpoint named ``<stem>.*``: ``<stem><suffix>`` (a plain model) and
    ``<stem>.<role><suffix>``."""
    from ..export.deploy import SUFFIXES

    names = [f"{stem}{suffix}" for fmt, suffix in SUFFIXES.items() if fmt != "state_dict"]
    names += [
        f"{stem}.{role}{suffix}"
        for role in ("model", "teacher", "student")
        for suffix in SUFFIXES.values()
    ]
    return names


def _earlier_run_files(out_dir: Path) -> List[Path]:
    """What :func:`_clear_earlier_run` removes, of what exists."""
    old = [out_dir / DONE_FILE, *sorted((out_dir / CKPT_DIR).glob("*.ckpt"))]
    old += [out_dir / name for name in STAGE_EXPORTS]
    return [p for p in old + _deployment_exports(out_dir) if p.is_file()]


def _check_clearable(cfg: Dict[str, Any], out_dir: Path) -> None:
    """Before a new run removes an earlier run's files: only a run folder of this package
    (``run_config.json`` or ``done.json``) is cleared, never a folder of the user's that holds a
    ``model.pt`` or checkpoints; and never a file the new run starts from."""
    doomed = _earlier_run_files(out_dir)
    if not doomed:
        return
    names = ", ".join(str(p.relative_to(out_dir)) for p in doomed[:5])
    if not any((out_dir / name).is_file() for name in (RUN_CONFIG_FILE, DONE_FILE)):
        raise ValueError(
            f"{out_dir} holds {names}{' ...' if len(doomed) > 5 else ''} but no "
            f"{RUN_CONFIG_FILE}: not a run folder of sftkd-fastmri, and a new run there would "
            "replace them; choose another --out-dir, or move them away first"
        )
    doomed_real = {os.path.realpath(p) for p in doomed}
    for key in RUN_INPUT_FILES:
        value = cfg.get(key)
        if value and os.path.realpath(os.path.expanduser(str(value))) in doomed_real:
            raise ValueError(
                f"{key} {value} is a file of the earlier run in {out_dir}, which a new run "
                "there removes before it starts; copy it elsewhere and pass the copy, or "
                "choose another --out-dir"
            )


def _clear_earlier_run(out_dir: Path) -> None:
    """Before a new run starts in ``out_dir`` (``--resume false``, or no ``last.ckpt``),
    remove what an earlier run left there: ``done.json`` first (a stage must never look
    finished with another run's outputs), then its checkpoints and exports, and the
    deployment exports ``export`` wrote next to them by default. Otherwise a kill
    before the new run's first checkpoint would leave the old ``last.ckpt`` to be resumed
    under the new record, and the old ``done.json`` would make a study reuse the old run.
    Logs stay (each run writes its own version folder). Rank zero only."""
    if rank_zero_only.rank != 0:
        return
    removed = _remove(_earlier_run_files(out_dir))
    if removed:
        print(
            f"{out_dir}: starting a new run; removed the earlier run's {', '.join(removed)}",
            flush=True,
        )


def _unfinish(out_dir: Path) -> None:
    """Before a run trains on (more epochs): its ``done.json`` goes first (a stop meanwhile
    must not leave it finished beside newer weights or a half-rewritten pair of exports),
    and the deployment exports ``export`` wrote of its old weights (they would go stale under
    the names that say they are this run's). Rank zero only."""
    if rank_zero_only.rank != 0:
        return
    removed = _remove([out_dir / DONE_FILE, *_deployment_exports(out_dir)])
    stale = [name for name in removed if name != DONE_FILE]
    if stale:
        print(
            f"{out_dir}: training on; removed the exports of its earlier weights "
            f"{', '.join(stale)} (export again when it has finished)",
            flush=True,
        )


def _deployment_exports(out_dir: Path) -> List[Path]:
    """The deployment exports ``export`` writes beside a run's checkpoints under its default
    names (model.ts.pt, checkpoints/best.student.onnx): exactly those names, never other
    files of the user's."""
    beside = [(out_dir, Path(name).stem) for name in STAGE_EXPORTS]
    beside += [(out_dir / CKPT_DIR, stem) for stem in ("best", "last")]
    return [folder / name for folder, stem in beside for name in _default_export_names(stem)]


def _remove(paths: Sequence[Path]) -> List[str]:
    """Remove the files among ``paths``; their names."""
    removed = []
    for path in paths:
        if path.is_file():
            path.unlink()
            removed.append(path.name)
    return removed


def _forget_unstarted_run(resume: Optional[str], out_dir: Path, trainer: pl.Trainer) -> None:
    """A new run that failed before writing any checkpoint (bad data found at the first
    batch, say) leaves nothing behind: the empty folders of its logs and checkpoints and, when
    no log with content stays either, its ``run_config.json``. Anything of a resumed run stays.
    Rank zero only, with no collective call (the other ranks may not have failed); a failing
    cleanup never hides the error that stopped the run."""
    if resume or not trainer.is_global_zero:
        return
    try:
        if any((out_dir / CKPT_DIR).glob("*.ckpt")):
            return
        # the logger's own attribute: Trainer.log_dir would broadcast among the ranks
        log_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger else None
        candidates = [Path(log_dir)] if log_dir else []
        candidates += [out_dir / "logs", out_dir / CKPT_DIR]
        for folder in candidates:
            if folder.is_dir() and out_dir in folder.parents:
                files = [p for p in folder.rglob("*") if p.is_file()]
                if all(p.name == "hparams.yaml" and p.parent == folder for p in files):
                    shutil.rmtree(folder, ignore_errors=True)
        logs = out_dir / "logs"
        if not (logs.is_dir() and any(p.is_file() for p in logs.rglob("*"))):
            (out_dir / RUN_CONFIG_FILE).unlink(missing_ok=True)  # no log it would describe
    except OSError:
        pass


def _safe_resume(trainer: pl.Trainer) -> Dict[str, Any]:
    """``weights_only=True`` for Lightning's own load of the checkpoint resumed from, where
    its ``fit`` takes the argument (Lightning >= 2.5); the file has passed a
    ``weights_only`` load in :func:`_trained_epochs` before in any case."""
    takes = "weights_only" in inspect.signature(trainer.fit).parameters
    return {"weights_only": True} if takes else {}


def _trained_epochs(last: Path) -> Optional[int]:
    """The epochs whose training finished in checkpoint ``last`` (``None``: it does not
    say). Read with ``weights_only=True``, as every checkpoint is before it is resumed from:
    a file that holds more than tensors and plain values, or a damaged one, raises
    ValueError."""
    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # readable only by running its pickled code
        raise ValueError(
            f"{last}: holds objects other than tensors and plain values ({err}), which this "
            "package does not unpickle (torch.load(weights_only=True)); a checkpoint of "
            "another program? Pass --resume false to start over, or use another --out-dir"
        ) from None
    except Exception as err:  # a cut-short or damaged file
        raise ValueError(
            f"{last}: cannot resume from it ({type(err).__name__}: {err}); the run was "
            "probably stopped while writing it. Pass --resume false to start over, or replace "
            "it with another checkpoint of the run (e.g. checkpoints/best.ckpt)"
        ) from None
    try:  # epochs whose training Lightning finished (saved at epoch end: epoch + 1)
        return int(ckpt["loops"]["fit_loop"]["epoch_progress"]["total"]["processed"])
    except (KeyError, TypeError, ValueError):
        epoch = ckpt.get("epoch") if isinstance(ckpt, dict) else None
        return int(epoch) + 1 if isinstance(epoch, int) else None


_IN_STUDY: contextvars.ContextVar[bool] = contextvars.ContextVar("in_study", default=False)


@contextlib.contextmanager
def in_study() -> Iterator[None]:
    """Stages run by a study: messages name the study's settings, not the command's flags."""
    token = _IN_STUDY.set(True)
    try:
        yield
    finally:
        _IN_STUDY.reset(token)


def _say_if_finished(last: Path, max_epochs: int) -> bool:
    """Say so when the run to resume has already trained ``max_epochs`` epochs (True)."""
    trained = _trained_epochs(last)
    if trained is not None and trained >= max_epochs:
        hint = (
            "; its last checkpoints are exported"
            if _IN_STUDY.get()
            else " (raise --max-epochs to train on, or --resume false to start over)"
        )
        if rank_zero_only.rank == 0:  # under DDP every rank reaches here; one says it
            print(
                f"{last.parent.parent}: this run has already trained {trained} epochs "
                f"(max_epochs={max_epochs}); nothing to train{hint}",
                flush=True,
            )
        return True
    return False


def _finished(
    name: str, cfg: Dict[str, Any], out_dir: Path, best: str, exports: Dict[str, str]
) -> StageResult:
    """Record the finished stage (``done.json``, written last) and return it.

    Under DDP every rank writes the exports and ``done.json`` (the same bytes, each write
    atomic under a name of its own process): each rank then reads them in the next stage of
    a study without waiting in a barrier on rank zero, which would hang every other rank if
    rank zero's write failed."""
    last = last_checkpoint(out_dir)
    result = StageResult(
        name,
        str(out_dir),
        best,
        exports,
        epochs=_trained_epochs(last) if last.is_file() else None,
        limit_train_batches=cfg.get("limit_train_batches"),
    )
    result.save()
    return result


def _optim(cfg: Dict[str, Any]) -> Dict[str, Any]:
    keys = ("lr", "lr_step_size", "lr_gamma", "weight_decay", "loss")
    return {k: cfg[k] for k in keys}


def compile_network(network: nn.Module, setting: Any, announce: bool = True) -> bool:
    """``torch.compile`` ``network`` in place (:meth:`torch.nn.Module.compile`) as the option
    ``compile`` says: ``False``/``None`` leaves it eager, ``True`` uses PyTorch's default
    backend, a string names the backend. In place, the network keeps its class, attributes
    and state-dict names (checkpoints stay plain), and hooks that distillation registers on
    its layers still run. ``announce``: say (rank zero) that the first steps compile it.
    Returns whether it compiled."""
    if setting is None or setting is False:
        return False
    network.compile(**({} if setting is True else {"backend": str(setting)}))
    if not announce:
        return True
    backend = "the default backend" if setting is True else f"backend {setting}"
    rank_zero_info(
        f"torch.compile ({backend}): the first training and validation steps compile the "
        f"{type(network).__name__}, which can take minutes"
    )
    return True


def _train_single_network(
    cfg: Dict[str, Any], name: str, role: str, callbacks: Sequence = ()
) -> StageResult:
    """Fit a :class:`DCCNNModule` (with optional callbacks), export ``model.pt``."""
    from ..pl_modules import DCCNNModule

    out_dir = _out_dir(cfg, f"runs/{name}")
    _warn_inputs_of_other_challenge(cfg, {"init_checkpoint": "training from it"})
    _seed(cfg)  # the initial weights follow the stage's seed, whatever ran before
    module = DCCNNModule(
        model_preset=cfg["model"],
        model_overrides=dict(cfg.get("model_overrides") or {}),
        init_checkpoint=cfg.get("init_checkpoint"),
        **_optim(cfg),
    )
    compile_network(module.model, cfg.get("compile"))
    best = _fit(cfg, module, out_dir, name, callbacks)
    model = load_reconstruction_model(best)
    model_path = save_model_checkpoint(
        model, out_dir / "model.pt", role=role, extra={"challenge": _input_challenge(cfg)}
    )
    return _finished(name, cfg, out_dir, best, {"model": str(model_path)})


def run_train(cfg: Dict[str, Any]) -> StageResult:
    """Train a DC-CNN preset (``cfg["model"]``) with its reconstruction loss."""
    return _train_single_network(cfg, "train", role="model")


def _check_preset_option(cfg: Dict[str, Any], role: str) -> None:
    """``sft --teacher``/``--student`` name presets; a checkpoint given there gets a pointer
    to ``--init-teacher``/``--init-student`` (``distill --teacher`` takes a checkpoint)."""
    from ..models import list_models

    value = cfg.get(role)
    if value in list_models() or not isinstance(value, str):
        return
    if Path(value).is_file() or Path(value).suffix in (".pt", ".ckpt", ".pth"):
        raise ValueError(
            f"--{role} {value}: sft's --{role} names a preset ({', '.join(list_models())}); "
            f"to start the {role} from a checkpoint, pass --init-{role} {value} (with "
            f"--{role} the preset it holds)"
        )


def run_sft(cfg: Dict[str, Any]) -> StageResult:
    """Student-friendly teacher training; exports the teacher and the student initialisation."""
    from ..pl_modules import SFTModule
    from ..sft import export_sft

    for role in ("teacher", "student"):
        _check_preset_option(cfg, role)
    out_dir = _out_dir(cfg, "runs/sft")
    _warn_inputs_of_other_challenge(
        cfg, {"init_teacher": "training from it", "init_student": "training from it"}
    )
    _seed(cfg)  # the initial weights follow the stage's seed, whatever ran before
    module = SFTModule(
        teacher_preset=cfg["teacher"],
        student_preset=cfg["student"],
        teacher_overrides=dict(cfg.get("teacher_overrides") or {}),
        student_overrides=dict(cfg.get("student_overrides") or {}),
        train_first_student_cascade=cfg["train_first_student_cascade"],
        teacher_weight=cfg["teacher_weight"],
        branch_weight=cfg["branch_weight"],
        imitation_weight=cfg["imitation_weight"],
        init_teacher=cfg.get("init_teacher"),
        init_student=cfg.get("init_student"),
        **_optim(cfg),
    )
    compile_network(module.sft, cfg.get("compile"))  # its training forward: teacher and branches
    best = _fit(cfg, module, out_dir, "sft")
    teacher_path, student_path = export_sft(
        best, out_dir, extra={"challenge": _input_challenge(cfg)}
    )
    exports = {"teacher": str(teacher_path), "student_init": str(student_path)}
    return _finished("sft", cfg, out_dir, best, exports)


def run_distill(cfg: Dict[str, Any]) -> StageResult:
    """Distil ``cfg["teacher_checkpoint"]`` into a ``cfg["model"]`` student (optionally
    initialised from ``cfg["init_checkpoint"]``, e.g. an SFT student export)."""
    from ..callbacks import DistillationCallback
    from ..callbacks.networks import check_batch_size
    from ..kd import check_distillation
    from ..kd.pairings import dccnn_structure, varnet_structure
    from ..models import create_model

    if not cfg.get("teacher_checkpoint"):
        raise ValueError("distill needs --teacher-checkpoint (a DC-CNN or SFT teacher export)")
    check_kd_schedule(cfg["kd_schedule"], cfg.get("kd_epochs"), int(cfg["max_epochs"]))
    check_batch_size(cfg["methods"], cfg["batch_size"], "--batch-size")
    teacher = load_reconstruction_model(cfg["teacher_checkpoint"], role="teacher")
    _warn_inputs_of_other_challenge(cfg, {"teacher_checkpoint": "distilling it"})
    # before the data: a pairing that cannot work, for the networks with default pairings
    if dccnn_structure(teacher) or varnet_structure(teacher):
        student = create_model(cfg["model"], **dict(cfg.get("model_overrides") or {}))
        check_distillation(
            student, teacher, dict(cfg["methods"]), cfg.get("layers"), cfg.get("loss_options")
        )
    callback = DistillationCallback(
        teacher,
        losses=dict(cfg["methods"]),
        layers=cfg.get("layers"),
        loss_options=cfg.get("loss_options"),
        schedule=cfg["kd_schedule"],
        kd_epochs=cfg.get("kd_epochs"),
    )
    return _train_single_network(cfg, "distill", role="student", callbacks=[callback])


def run_evaluate(
    cfg: Dict[str, Any],
    checkpoint: Optional[os.PathLike],
    *,
    split: Optional[str] = None,
    role: str = "auto",
    out_dir: Optional[os.PathLike] = None,
):
    """Evaluate a checkpoint (or the zero-filled baseline when ``checkpoint`` is None) on a
    split: scored where its volumes have targets; without targets only reconstructed (written
    to ``out_dir``), on the one device :func:`evaluation_device` reads from the runtime
    options. Returns an :class:`~sftkd_fastmri.evaluation.EvaluationResult`."""
    from ..evaluation import evaluate_model

    device = evaluation_device(cfg)  # before anything loads: options it would not follow
    split = split or cfg["test_split"]
    datamodule = build_datamodule(cfg, test_split=split)
    loader = datamodule.test_dataloader()
    model = None
    if checkpoint is not None:
        model = load_reconstruction_model(checkpoint, role=role)
        _warn_if_other_challenge(checkpoint, _input_challenge(cfg))
    return evaluate_model(
        model,
        loader,
        device=device,
        out_dir=out_dir,
        progress=cfg.get("progress", True),
        precision=cfg.get("precision", "32-true"),
    )
