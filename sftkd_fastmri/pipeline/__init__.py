"""The end-to-end SFT-KD study: train, distil, evaluate, report."""

from .study import STUDY_DEFAULTS, StudyResult, run_study, study_summary

__all__ = ["STUDY_DEFAULTS", "StudyResult", "run_study", "study_summary"]
