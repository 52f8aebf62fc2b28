"""Knowledge distillation (plain torch, no Lightning): losses, their registry, feature hooks,
layer pairings and the :class:`Distiller` that ties them into one training step.

Every loss is called as ``loss(student_feats, teacher_feats)`` with paired sequences of
feature maps and returns a scalar; build one by name with :func:`create_loss`. For a Lightning
training loop use :class:`sftkd_fastmri.callbacks.DistillationCallback`, which wraps a
:class:`Distiller`.
"""

from .checks import check_distillation
from .distiller import Distiller, KDOutput, check_loss_weights
from .hooks import FeatureCapture, ForwardCall, find_module
from .losses import (
    FSP,
    AttentionTransfer,
    CorrelationCongruence,
    FitNet,
    KDLoss,
    OutputImitation,
    SimilarityPreserving,
    TeacherSummary,
)
from .pairings import OUTPUT, Pairing, default_pairings, layer_channels, resolve_pairings
from .registry import available_losses, create_loss, loss_class, register_loss

__all__ = [
    "FSP",
    "OUTPUT",
    "AttentionTransfer",
    "CorrelationCongruence",
    "Distiller",
    "FeatureCapture",
    "FitNet",
    "ForwardCall",
    "KDLoss",
    "KDOutput",
    "OutputImitation",
    "Pairing",
    "SimilarityPreserving",
    "TeacherSummary",
    "available_losses",
    "check_distillation",
    "check_loss_weights",
    "create_loss",
    "default_pairings",
    "find_module",
    "layer_channels",
    "loss_class",
    "register_loss",
    "resolve_pairings",
]
