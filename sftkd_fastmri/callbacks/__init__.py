"""Lightning callbacks: drop-in knowledge distillation for reconstruction modules."""

from .distillation import DistillationCallback, find_network
from .finite import FiniteLossCheck, NonFiniteLossError
from .random_state import RandomStateCheckpoint

__all__ = [
    "DistillationCallback",
    "FiniteLossCheck",
    "NonFiniteLossError",
    "RandomStateCheckpoint",
    "find_network",
]
