"""Student-friendly teacher (SFT) stage of SFT-KD-Recon (Matcha et al., MIDL 2023), plain torch.

* :class:`StudentFriendlyTeacher` - teacher with unfolded, shared student branches;
* :class:`SFTLoss` - teacher reconstruction + branch reconstruction + imitation;
* :func:`export_sft` - the teacher and the student initialisation as model checkpoints;
* :class:`CascadeModel` - the narrow protocol a cascaded model implements to be wrapped.
"""

from .export import export_sft, load_sft_models
from .loss import SFTLoss, SFTLossTerms
from .protocol import CascadeModel, check_cascade_model
from .wrapper import SFTOutput, SFTStates, StudentFriendlyTeacher

__all__ = [
    "CascadeModel",
    "SFTLoss",
    "SFTLossTerms",
    "SFTOutput",
    "SFTStates",
    "StudentFriendlyTeacher",
    "check_cascade_model",
    "export_sft",
    "load_sft_models",
]
