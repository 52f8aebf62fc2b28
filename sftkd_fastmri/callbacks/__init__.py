"""Lightning callbacks: drop-in knowledge distillation for reconstruction modules."""

from .distillation import DistillationCallback, find_network

__all__ = ["DistillationCallback", "find_network"]
