"""Experiment runners: build data, module, callbacks and trainer from one flat config dict.

The CLI, the example scripts and the end-to-end pipeline all call these functions; none of
them holds training logic of its own.
"""

from .builders import build_datamodule, build_trainer, check_scored_split, resolve_data_path
from .runs import (
    StageResult,
    check_kd_schedule,
    check_out_of_splits,
    check_run_settings,
    evaluation_device,
    run_distill,
    run_evaluate,
    run_sft,
    run_train,
)

__all__ = [
    "check_kd_schedule",
    "check_out_of_splits",
    "check_run_settings",
    "evaluation_device",
    "check_scored_split",
    "StageResult",
    "build_datamodule",
    "build_trainer",
    "resolve_data_path",
    "run_distill",
    "run_evaluate",
    "run_sft",
    "run_train",
]
