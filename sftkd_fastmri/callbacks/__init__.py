"""Lightning callbacks: drop-in knowledge distillation for reconstruction modules."""

from .distillation import DistillationCallback, load_module_weights
from .finite import FiniteLossCheck, NonFiniteLossError
from .networks import check_batch_size, find_network
from .random_state import RandomStateCheckpoint

__all__ = [
    "DistillationCallback",
    "FiniteLossCheck",
    "NonFiniteLossError",
    "RandomStateCheckpoint",
    "check_batch_size",
    "find_network",
    "load_module_weights",
]
