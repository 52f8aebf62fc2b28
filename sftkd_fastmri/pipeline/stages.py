"""One stage of a study: run it, skip it when finished, train it on, resume it or start it
over, as its folder's records (``done.json``, ``run_config.json``, ``last.ckpt``) and the
study's settings say (see :mod:`sftkd_fastmri.pipeline.study`)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from pytorch_lightning.utilities import rank_zero_only

from ..experiment import StageResult, check_run_settings, run_distill, run_sft, run_train
from ..experiment.builders import batch_limit
from ..experiment.run_record import RUN_CONFIG_FILE, recorded_weights_changed, run_differences
from ..experiment.runs import (
    _inside,
    _trained_epochs,
    in_study,
    last_checkpoint,
    resume_checkpoint,
)


def _stage(
    name: str, cfg: Dict[str, Any], root: Path, runner, log: List[str], **overrides: Any
) -> StageResult:
    out_dir = root / name
    stage_cfg = copy.deepcopy(cfg)
    stage_cfg.update(overrides)
    stage_cfg["out_dir"] = str(out_dir)
    done = StageResult.load(out_dir)
    kind = _KIND[runner]
    stale = _stale_inputs(stage_cfg, out_dir, kind, root)
    if stage_cfg.get("resume", True) is False:
        # the study asked to start over: no stage is reused or trained on
        log.append(f"[new ] {name} -> {out_dir} (resume false: training it from the start)")
    elif stale:
        # its teacher or initialisation came from a stage that has trained on since: this
        # stage's run is of the old one, and starts over (resuming it would mix the two)
        log.append(f"[redo] {name}: {stale}; training it again")
        stage_cfg["resume"] = False
    elif done is not None:
        check_run_settings(stage_cfg, out_dir, finished=True, stage=done.name)
        more = _reuse_or_train_on(done, stage_cfg)
        if not more:
            log.append(f"[skip] {name}: finished earlier ({out_dir})")
            _say(log[-1])
            return done
        # not finished until it has trained on: the runner removes done.json (and the old
        # weights' deployment exports) before it trains, as for any run that trains on
        log.append(f"[more] {name}: {more}")
    else:
        trained = _unfinished_epochs(out_dir, stage_cfg, kind)
        resuming = f" (resuming after epoch {trained})" if trained else ""
        log.append(f"[run ] {name} -> {out_dir}{resuming}")
    _say(log[-1])
    with in_study():
        result = runner(stage_cfg)
    log.append(f"[done] {name}")
    return result


def _unfinished_epochs(out_dir: Path, cfg: Dict[str, Any], kind: str) -> Optional[int]:
    """The epochs an interrupted stage (no ``done.json``) of kind ``kind`` has trained, from
    its ``last.ckpt`` (``None``: none to resume). A run of other settings is refused as
    such first; more epochs than the study now asks for are refused too: resuming would
    train nothing and export a network of more epochs than the report would state."""
    last = resume_checkpoint(out_dir)
    if cfg.get("resume", True) is False or not last.is_file():
        return None
    check_run_settings(cfg, out_dir, stage=kind)
    # not an identity key of a run (a train command may change it on resume), but one stage
    # of a study trains at one setting: the report states it
    recorded, limit = _recorded(out_dir, "limit_train_batches"), cfg.get("limit_train_batches")
    if recorded is not None and limit is not None and _batches(recorded) != _batches(limit):
        raise ValueError(
            f"{out_dir} holds an unfinished stage trained with limit_train_batches="
            f"{recorded}; this study asks for {limit}, and resuming would mix the two in one "
            "stage. Ask for the same, use another out_dir, or remove that folder to train the "
            "stage again"
        )
    trained = _trained_epochs(last)
    if trained is not None and trained > int(cfg["max_epochs"]):
        raise ValueError(
            f"{out_dir} holds an unfinished stage that has trained {trained} epochs; this "
            f"study asks for {cfg['max_epochs']} (epochs). Ask for at least {trained}, use "
            "another out_dir, or remove that folder to train the stage again"
        )
    return trained


def _recorded(out_dir: Path, key: str) -> Any:
    """Option ``key`` as the run in ``out_dir`` recorded it (``None``: no record or key)."""
    try:
        record = json.loads((out_dir / RUN_CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record.get(key) if isinstance(record, dict) else None


#: The kind of run each stage runner records (``run_config.json``).
_KIND = {run_train: "train", run_sft: "sft", run_distill: "distill"}
#: What a stage takes from the stages before it.
_UPSTREAM_FILES = {"init_checkpoint": "student initialisation", "teacher_checkpoint": "teacher"}


def _stale_inputs(cfg: Dict[str, Any], out_dir: Path, kind: str, root: Path) -> Optional[str]:
    """Why the run in ``out_dir`` is stale, when the only settings it differs in are files
    this study's own stages wrote whose weights have changed since (a teacher export that
    trained on); else ``None``. Other differences, and records that cannot tell changed
    weights from a change of digest or place (earlier versions), are refused where the run
    is resumed or reused rather than trained again."""
    if not (out_dir / RUN_CONFIG_FILE).is_file():
        return None
    changed = run_differences(cfg, out_dir, kind)
    if not changed or not set(changed) <= set(_UPSTREAM_FILES):
        return None
    for key in changed:
        path = cfg.get(key)
        if not (path and _inside(path, root)):
            return None
        if not recorded_weights_changed(cfg, out_dir, key):
            return None
    what = " and ".join(_UPSTREAM_FILES[key] for key in changed)
    return f"its {what} changed since it ran (the stage it comes from trained on)"


def _batches(limit: Any) -> Tuple[bool, float]:
    # Lightning's reading: an int counts batches, a float is a fraction (1 != 1.0)
    value = batch_limit(limit)
    return isinstance(value, int), float(value)


def _reuse_or_train_on(done: StageResult, cfg: Dict[str, Any]) -> Optional[str]:
    """``None`` when the finished stage ``done`` trained what ``cfg`` asks for; a reason to
    train it on when it trained fewer epochs (it resumes from its ``last.ckpt``). A stage
    that trained more epochs, or other batches per epoch, than asked is refused: the report
    would state epochs its models did not train."""
    wanted, trained = int(cfg["max_epochs"]), done.epochs
    last = last_checkpoint(done.out_dir)
    if trained is None:
        trained = _trained_epochs(last) if last.is_file() else None
    limit, recorded = cfg.get("limit_train_batches"), done.limit_train_batches
    if recorded is not None and limit is not None and _batches(recorded) != _batches(limit):
        raise ValueError(
            f"{done.out_dir} holds a finished stage trained with limit_train_batches="
            f"{recorded}; this study asks for {limit}. Use another out_dir for the new "
            "setting, or remove that folder to train the stage again"
        )
    if trained is None or trained == wanted:
        return None
    if trained > wanted:
        raise ValueError(
            f"{done.out_dir} holds a finished stage of {trained} epochs; this study asks for "
            f"{wanted} (epochs). Ask for {trained}, use another out_dir, or remove that "
            "folder to train the stage again"
        )
    if not last.is_file():
        return (
            f"trained {trained} of the {wanted} epochs now asked for, and its last.ckpt is "
            "gone; training it again"
        )
    return f"trained {trained} of the {wanted} epochs now asked for; training on"


def _is_rank_zero() -> bool:
    """Whether this process is rank zero of a multi-device run (or the only process)."""
    return rank_zero_only.rank == 0


def _say(line: str) -> None:
    """Print a stage line once, from rank zero (every rank of a DDP study runs the stages)."""
    if _is_rank_zero():
        print(line, flush=True)
