"""Evaluation: fastMRI volume metrics, HFEN, evaluation loop."""

from .evaluate import EvaluationResult, evaluate_model, reconstruct_batch
from .metrics import VolumeMetrics, hfen, log_kernel, summarize, volume_metrics

__all__ = [
    "EvaluationResult",
    "VolumeMetrics",
    "evaluate_model",
    "hfen",
    "log_kernel",
    "reconstruct_batch",
    "summarize",
    "volume_metrics",
]
