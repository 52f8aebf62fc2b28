"""The end-to-end SFT-KD study: train, distil, evaluate, report."""

from .study import (
    CONTROLS,
    STUDY_DEFAULTS,
    StudyResult,
    parse_controls,
    run_study,
    study_summary,
)

__all__ = [
    "CONTROLS",
    "STUDY_DEFAULTS",
    "StudyResult",
    "parse_controls",
    "run_study",
    "study_summary",
]
