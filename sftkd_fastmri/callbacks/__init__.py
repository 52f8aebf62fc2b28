"""Lightning callbacks: drop-in knowledge distillation for reconstruction modules."""

from .distillation import DistillationCallback, find_network
from .finite import FiniteLossCheck, NonFiniteLossError

__all__ = ["DistillationCallback", "FiniteLossCheck", "NonFiniteLossError", "find_network"]
