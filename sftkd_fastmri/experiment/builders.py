"""Builders from a flat config dict (the option names of :mod:`sftkd_fastmri.cli.options`)."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.trainer.states import TrainerFn

from ..callbacks.finite import FiniteLossCheck
from ..callbacks.random_state import RandomStateCheckpoint
from ..data.datasets import TARGET_KEYS, missing_split_hint
from ..models.checkpoint import atomic_torch_save
from ..pl_modules import FastMRIDataModule, fetch_dir, split_has_targets

__all__ = [
    "AtomicCheckpointIO",
    "NoTargetsError",
    "build_datamodule",
    "build_trainer",
    "check_scored_split",
    "resolve_data_path",
    "CKPT_DIR",
    "RunCheckpoint",
]

CKPT_DIR = "checkpoints"


def resolve_data_path(cfg: Dict[str, Any]) -> Path:
    """``data_path``, or ``{dataset}_path`` from fastMRI's ``fastmri_dirs.yaml`` convention.

    ``data_path`` wins where both are given (a warning names what is ignored).
    """
    if cfg.get("data_path"):
        ignored = [
            f"--{key.replace('_', '-')}" for key in ("data_config", "dataset") if cfg.get(key)
        ]
        if ignored:
            warnings.warn(
                f"--data-path {cfg['data_path']} given: {' and '.join(ignored)} ignored",
                stacklevel=2,
            )
        path = Path(cfg["data_path"])
    elif cfg.get("data_config") or cfg.get("dataset"):
        if not cfg.get("dataset"):
            raise ValueError("--data-config needs --dataset knee|brain to pick the folder")
        config_file = cfg.get("data_config") or "fastmri_dirs.yaml"
        path = fetch_dir(f"{cfg['dataset']}_path", config_file)
    else:
        raise ValueError("no data: pass --data-path (or --data-config with --dataset)")
    if not path.is_dir():
        raise FileNotFoundError(f"data folder {path} does not exist")
    return path


def build_datamodule(cfg: Dict[str, Any], **overrides: Any) -> FastMRIDataModule:
    """A :class:`FastMRIDataModule` from the data options of ``cfg``."""
    kwargs = dict(
        data_path=resolve_data_path(cfg),
        challenge=cfg["challenge"],
        mask_type=cfg["mask_type"],
        center_fractions=list(cfg["center_fractions"]),
        accelerations=list(cfg["accelerations"]),
        fixed_mask=cfg["fixed_mask"],
        mask_path=cfg.get("mask_path"),
        seed=cfg["seed"],
        batch_size=cfg["batch_size"],
        num_workers=cfg["num_workers"],
        persistent_workers=cfg.get("persistent_workers", False),
        sample_rate=cfg["sample_rate"],
        volume_sample_rate=cfg.get("volume_sample_rate"),
        val_sample_rate=cfg.get("val_sample_rate"),
        val_volume_sample_rate=cfg.get("val_volume_sample_rate"),
        combine_train_val=cfg.get("combine_train_val", False),
        kspace_from_target=cfg["kspace_from_target"],
        train_split=cfg["train_split"],
        val_split=cfg["val_split"],
        test_split=cfg["test_split"],
        dataset_cache=cfg.get("dataset_cache", True),
    )
    kwargs.update(overrides)
    return FastMRIDataModule(**kwargs)


class NoTargetsError(ValueError):
    """A split whose volumes carry no targets (fastMRI's public test files) asked to be
    scored."""


def check_scored_split(
    cfg: Dict[str, Any], split: str, purpose: str, option: str = "--split"
) -> Path:
    """The folder of ``split``, or a clear error when it is missing or has no targets to
    score against (fastMRI's public ``*_test`` files carry none; the hint names ``option``,
    the command's option choosing the split). Cheap: reads file headers only, so commands
    call it before loading or training anything."""
    challenge = cfg["challenge"]
    folder = resolve_data_path(cfg) / f"{challenge}_{split}"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{purpose}: split folder {folder} does not exist{missing_split_hint(folder)}"
        )
    if not any(folder.iterdir()):
        raise FileNotFoundError(f"{purpose}: split folder {folder} holds no volumes")
    if not split_has_targets(folder, challenge, cfg.get("dataset_cache", True)):
        raise NoTargetsError(
            f"{purpose}: {folder} has no target ('{TARGET_KEYS[challenge]}') in some or all of "
            "its volumes (fastMRI's public test files carry none), so there is nothing to score "
            f"against. Score a split with targets (e.g. {option} val), or hold one out of a "
            "split with targets: sftkd-fastmri holdout-split DATA_PATH --challenge "
            f"{challenge} (then {option} test_heldout)"
        )
    return folder


def batch_limit(value: Any):
    """Lightning's ``limit_*_batches`` from a flag or config value: a fraction written with a
    decimal point (``0.25``; ``1.0`` = every batch) or a whole number of batches (``1`` = one
    batch, as Lightning reads an int). Raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"expected a fraction or a number of batches, got {value}")
    if not isinstance(value, (int, float)):
        word = str(value).strip()
        try:
            value = int(word) if word.lstrip("+").isdigit() else float(word)
        except ValueError:
            raise ValueError(
                "expected a fraction (e.g. 0.5; 1.0 = all) or a number of batches (e.g. 10), "
                f"got {word!r}"
            ) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(
            f"expected a fraction in [0, 1] or a whole number of batches >= 0, got {value!r}"
        )
    if isinstance(value, float) and value > 1 and value == int(value):
        value = int(value)  # "5.0 batches"
    if value < 0 or (isinstance(value, float) and not value <= 1.0):  # also NaN
        raise ValueError(
            f"expected a fraction in [0, 1] or a whole number of batches >= 0, got {value!r}"
        )
    return value


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing a local checkpoint to a temporary file in its
    own folder and renaming it over the old one (:func:`~sftkd_fastmri.models.checkpoint.
    atomic_torch_save`).

    Lightning's own writer stages the file in ``$TMPDIR`` and moves it; where that lies on
    another file system (a tmpfs ``/tmp``) the move is a copy into the destination, so a stop
    during it left ``last.ckpt`` truncated and the run could not resume. Remote paths
    (``s3://`` ...) are left to Lightning."""

    def save_checkpoint(
        self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` for a run folder that may have moved between sessions.

    Lightning forgets the best score when a checkpoint's recorded ``dirpath`` differs from
    the callback's (a run folder moved or copied, then resumed), so the first validation after
    the resume would replace ``best.ckpt`` whatever its score. Here the recorded paths are
    moved along with the folder and the score is kept.

    Lightning 2 also writes ``last.ckpt`` only when the best checkpoint was replaced in the
    same step: an epoch that did not improve the monitored value left ``last.ckpt`` at an
    older epoch, so a killed run lost those epochs and a finished one looked unfinished.
    Here ``last.ckpt`` is written after every validation (and at the end of training)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_saved_step = -1  # the global step last.ckpt was last written at

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key: the last.ckpt of earlier runs (and of plain Lightning
        # trainers) holds this callback's state under it
        key = super().state_key
        return "ModelCheckpoint" + key[len(type(self).__qualname__) :]

    def _skips_saving(self, trainer: pl.Trainer) -> bool:
        # Lightning's reasons not to save, less "already saved at this step"
        return (
            not self.save_last
            or bool(trainer.fast_dev_run)
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        skip = self._skips_saving(trainer) or not self._should_save_on_train_epoch_end(trainer)
        super().on_train_epoch_end(trainer, pl_module)
        if not skip and self._last_saved_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        skip = self._skips_saving(trainer) or self._should_save_on_train_epoch_end(trainer)
        super().on_validation_end(trainer, pl_module)
        if not skip and self._last_saved_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # an epoch with no validation (check_val_every_n_epoch, limit_val_batches=0)
        if (
            self.save_last
            and not trainer.fast_dev_run
            and trainer.global_step > 0
            and self._last_saved_step != trainer.global_step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(
        self, trainer: pl.Trainer, monitor_candidates: Dict[str, Any]
    ) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_saved_step = trainer.global_step

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        before = state_dict.get("dirpath")
        now = self.dirpath
        if before and now and before != now:
            state_dict = dict(state_dict)

            def moved(path: Any) -> Any:
                if isinstance(path, str) and path.startswith(before + os.sep):
                    return now + path[len(before) :]
                return path

            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                if key in state_dict:
                    state_dict[key] = moved(state_dict[key])
            if isinstance(state_dict.get("best_k_models"), dict):
                state_dict["best_k_models"] = {
                    moved(k): v for k, v in state_dict["best_k_models"].items()
                }
            state_dict["dirpath"] = now
        super().load_state_dict(state_dict)


def build_trainer(
    cfg: Dict[str, Any],
    out_dir: os.PathLike,
    callbacks: Optional[List[Callback]] = None,
    monitor: str = "validation_loss",
) -> pl.Trainer:
    """A Lightning 2 trainer writing checkpoints (best by ``monitor``, and last) to
    ``out_dir/checkpoints`` and logs to ``out_dir``."""
    out_dir = Path(out_dir)
    checkpoint = RunCheckpoint(
        dirpath=out_dir / CKPT_DIR,
        filename="best",
        monitor=monitor,
        mode="min",
        save_last=True,
        save_top_k=1,
        enable_version_counter=False,
    )
    # logs/version_<n>: a resumed run gets a new version and keeps the earlier logs
    logger: Any = False
    if cfg.get("logger", "csv") == "csv":
        logger = pl.loggers.CSVLogger(out_dir, name="logs")
    elif cfg.get("logger") == "tensorboard":
        logger = pl.loggers.TensorBoardLogger(out_dir, name="logs")
    return pl.Trainer(
        default_root_dir=out_dir,
        max_epochs=cfg["max_epochs"],
        accelerator=cfg["accelerator"],
        devices=cfg["devices"],
        strategy=cfg.get("strategy") or "auto",
        num_nodes=cfg.get("num_nodes") or 1,
        precision=cfg["precision"],
        limit_train_batches=batch_limit(cfg["limit_train_batches"]),
        limit_val_batches=batch_limit(cfg["limit_val_batches"]),
        accumulate_grad_batches=cfg["accumulate_grad_batches"],
        callbacks=[checkpoint, FiniteLossCheck(), RandomStateCheckpoint(), *(callbacks or [])],
        plugins=[AtomicCheckpointIO()],
        logger=logger,
        enable_progress_bar=cfg["progress"],
        enable_model_summary=cfg["progress"],
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
