"""Knowledge-distillation losses (plain torch) and their registry.

Every loss is called as ``loss(student_feats, teacher_feats)`` with paired sequences of
feature maps and returns a scalar; build one by name with :func:`create_loss`.
"""

from .losses import (
    FSP,
    AttentionTransfer,
    CorrelationCongruence,
    FitNet,
    KDLoss,
    OutputImitation,
    SimilarityPreserving,
)
from .registry import available_losses, create_loss, loss_class, register_loss

__all__ = [
    "FSP",
    "AttentionTransfer",
    "CorrelationCongruence",
    "FitNet",
    "KDLoss",
    "OutputImitation",
    "SimilarityPreserving",
    "available_losses",
    "create_loss",
    "loss_class",
    "register_loss",
]
