"""Experiment runners: build data, module, callbacks and trainer from one flat config dict.

The CLI, the example scripts and the end-to-end pipeline all call these functions; none of
them holds training logic of its own.
"""

from .builders import build_datamodule, build_trainer, check_scored_split, resolve_data_path
from .runs import (
    StageResult,
    check_run_settings,
    run_distill,
    run_evaluate,
    run_sft,
    run_train,
)

__all__ = [
    "check_run_settings",
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
