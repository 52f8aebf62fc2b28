"""The SFT-stage loss of SFT-KD-Recon (Matcha et al., MIDL 2023, Algorithm 1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .wrapper import SFTOutput

__all__ = ["SFTLoss", "SFTLossTerms"]

_DISTANCES = {"l1": F.l1_loss, "l2": F.mse_loss}
_REDUCTIONS = ("mean", "sum")


@dataclass
class SFTLossTerms:
    """The SFT loss and its unweighted terms (so each can be logged on its own scale).

    Attributes:
        total: weighted sum of the terms with a non-zero weight (the value to back-propagate).
        teacher_rec: ``d(T(x_0), y)``.
        branch_rec: ``d(b_i, y)`` reduced over branches.
        imitation: ``d(b_i, T(x_0))`` reduced over branches.
        branch_rec_each: ``d(b_i, y)`` per branch, in the order of the wrapper's branches.
        imitation_each: ``d(b_i, T(x_0))`` per branch.
    """

    total: Tensor
    teacher_rec: Tensor
    branch_rec: Tensor
    imitation: Tensor
    branch_rec_each: List[Tensor] = field(default_factory=list)
    imitation_each: List[Tensor] = field(default_factory=list)

    def as_dict(
        self, prefix: str = "", branch_ids: Optional[Sequence[int]] = None
    ) -> Dict[str, Tensor]:
        """Flat ``{name: scalar}`` for a logger, per-branch terms included.

        Args:
            prefix: prepended to every name, e.g. ``"train/"``.
            branch_ids: labels of the branches (e.g. the wrapper's ``branch_starts``);
                default: their positions ``0, 1, ...``.
        """
        ids = list(branch_ids) if branch_ids is not None else list(range(len(self.branch_rec_each)))
        if len(ids) != len(self.branch_rec_each):
            raise ValueError(
                f"{len(ids)} branch ids for {len(self.branch_rec_each)} branches: {ids}"
            )
        out = {
            f"{prefix}loss": self.total,
            f"{prefix}teacher_rec": self.teacher_rec,
            f"{prefix}branch_rec": self.branch_rec,
            f"{prefix}imitation": self.imitation,
        }
        for i, rec, imit in zip(ids, self.branch_rec_each, self.imitation_each):
            out[f"{prefix}branch{i}_rec"] = rec
            out[f"{prefix}branch{i}_imitation"] = imit
        return out


class SFTLoss(nn.Module):
    """SFT-stage loss: teacher reconstruction + branch reconstruction + branch imitation.

    Matcha et al., "SFT-KD-Recon: Learning a Student-friendly Teacher for Knowledge
    Distillation in Magnetic Resonance Image Reconstruction", MIDL 2023 (arXiv 2304.05057),
    Algorithm 1, after Park et al., "Learning Student-Friendly Teacher Networks for Knowledge
    Distillation", NeurIPS 2021::

        L_SFT = w_T * d(T(x_0), y)  +  w_S * R_i d(b_i, y)  +  w_I * R_i d(b_i, T(x_0))

    with ``d`` the mean-reduced L1 distance (``"l2"``: mean squared error), ``b_i`` the
    student-branch outputs of :class:`~sftkd_fastmri.sft.StudentFriendlyTeacher` and ``R_i``
    the reduction over branches.

    Defaults and why:

    * ``branch_reduction="mean"``: Algorithm 1 writes the branch losses over the branches
      without fixing a normalisation; the authors' code averaged over their 4 branches. The
      mean keeps each term on the scale of one reconstruction error whatever ``N`` (and
      whether branch 0 is on), so the 1:1:1 weights balance the teacher's own term against
      the branches instead of letting ``N - 1`` branch terms outweigh it.
    * all weights 1: Algorithm 1 adds the three terms unweighted.
    * ``detach_teacher_in_imitation=False``: the paper detaches nothing; the imitation term
      also pulls the teacher output towards what the student branches can produce. With
      ``True``, ``T(x_0)`` is a fixed target in that term (the branch inputs ``x_i`` are still
      not detached, so the term keeps training ``T_1 .. T_{N-1}`` through the branches).

    Deviation from the authors' code: their imitation term was divided by the element count a
    second time, which scaled it to ~1e-5 of its nominal size, so in effect it was not
    trained. Here every term is a plain mean; ``imitation_weight=0`` reproduces the authors'
    behaviour. A term with weight 0 is still computed (without gradient) for logging, but it
    does not enter ``total``.

    The caller crops: ``output.teacher``, every branch and ``target`` must already have the
    same shape ``(B, H, W)`` (e.g. after fastMRI's centre crop to the target size); a
    mismatch raises instead of being broadcast.

    Args:
        distance: ``"l1"`` (paper) or ``"l2"`` (mean squared error).
        teacher_weight: weight ``w_T`` of the teacher reconstruction term.
        branch_weight: weight ``w_S`` of the student-branch reconstruction term.
        imitation_weight: weight ``w_I`` of the imitation term.
        branch_reduction: ``"mean"`` or ``"sum"`` over branches.
        detach_teacher_in_imitation: use ``T(x_0).detach()`` as the imitation target.
    """

    def __init__(
        self,
        distance: str = "l1",
        *,
        teacher_weight: float = 1.0,
        branch_weight: float = 1.0,
        imitation_weight: float = 1.0,
        branch_reduction: str = "mean",
        detach_teacher_in_imitation: bool = False,
    ):
        super().__init__()
        if distance not in _DISTANCES:
            raise ValueError(f"distance must be one of {sorted(_DISTANCES)}, got {distance!r}")
        if branch_reduction not in _REDUCTIONS:
            raise ValueError(
                f"branch_reduction must be one of {list(_REDUCTIONS)}, got {branch_reduction!r}"
            )
        weights = dict(
            teacher_weight=teacher_weight,
            branch_weight=branch_weight,
            imitation_weight=imitation_weight,
        )
        for name, value in weights.items():
            if not (value >= 0.0 and value != float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not any(weights.values()):
            raise ValueError("at least one of the loss weights must be > 0")
        self.distance = distance
        self.teacher_weight = float(teacher_weight)
        self.branch_weight = float(branch_weight)
        self.imitation_weight = float(imitation_weight)
        self.branch_reduction = branch_reduction
        self.detach_teacher_in_imitation = bool(detach_teacher_in_imitation)

    def forward(
        self, output: Union[SFTOutput, Tuple[Tensor, Sequence[Tensor]]], target: Tensor
    ) -> SFTLossTerms:
        """Args:
            output: training-mode output of the wrapper: teacher ``(B, H, W)`` and branches.
            target: ground truth ``(B, H, W)``, same shape as every output.

        Returns:
            :class:`SFTLossTerms`; back-propagate ``.total``.
        """
        if isinstance(output, Tensor) or not (
            isinstance(output, (tuple, list)) and len(output) == 2
        ):
            got = f"a tensor {tuple(output.shape)}" if isinstance(output, Tensor) else type(output)
            raise TypeError(
                "SFTLoss takes the training-mode output of StudentFriendlyTeacher (the teacher "
                f"output and the branch outputs), got {got}: in eval mode the wrapper returns "
                "the teacher's image alone; call it after .train()"
            )
        teacher, branches = output
        branches = list(branches)
        if not branches:
            raise ValueError("the SFT output has no student branch")
        for name, image in [("teacher", teacher)] + [
            (f"branch {k}", b) for k, b in enumerate(branches)
        ]:
            if image.shape != target.shape:
                raise ValueError(
                    f"{name} output {tuple(image.shape)} and target {tuple(target.shape)} "
                    "differ; crop the outputs to the target size before the loss"
                )
        dist = _DISTANCES[self.distance]
        imitation_target = teacher.detach() if self.detach_teacher_in_imitation else teacher

        with torch.set_grad_enabled(torch.is_grad_enabled() and self.teacher_weight > 0):
            teacher_rec = dist(teacher, target)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.branch_weight > 0):
            branch_each = [dist(b, target) for b in branches]
            branch_rec = self._reduce(branch_each)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.imitation_weight > 0):
            imitation_each = [dist(b, imitation_target) for b in branches]
            imitation = self._reduce(imitation_each)

        weighted = [
            (self.teacher_weight, teacher_rec),
            (self.branch_weight, branch_rec),
            (self.imitation_weight, imitation),
        ]
        # Terms with weight 0 are left out rather than multiplied by 0, so they add no graph.
        total = sum(w * term for w, term in weighted if w > 0)
        return SFTLossTerms(
            total=total,
            teacher_rec=teacher_rec,
            branch_rec=branch_rec,
            imitation=imitation,
            branch_rec_each=branch_each,
            imitation_each=imitation_each,
        )

    def _reduce(self, terms: List[Tensor]) -> Tensor:
        stacked = torch.stack(terms)
        return stacked.mean() if self.branch_reduction == "mean" else stacked.sum()

    def extra_repr(self) -> str:
        return (
            f"distance={self.distance!r}, teacher_weight={self.teacher_weight}, "
            f"branch_weight={self.branch_weight}, imitation_weight={self.imitation_weight}, "
            f"branch_reduction={self.branch_reduction!r}, "
            f"detach_teacher_in_imitation={self.detach_teacher_in_imitation}"
        )
