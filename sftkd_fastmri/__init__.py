"""sftkd_fastmri: SFT-KD-Recon (Matcha et al., MIDL 2023) for the fastMRI ecosystem.

Student-friendly teacher training and knowledge distillation for cascaded MRI reconstruction
networks, as drop-in components for fastMRI + PyTorch Lightning pipelines.
"""

from .allocator import retain_freed_memory
from .models import DCCNN, create_model, list_models, load_model, save_model_checkpoint

__version__ = "0.1.0"

__all__ = [
    "DCCNN",
    "__version__",
    "create_model",
    "list_models",
    "load_model",
    "retain_freed_memory",
    "save_model_checkpoint",
]
