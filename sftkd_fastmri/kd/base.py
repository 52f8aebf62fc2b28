"""The base of the distillation losses (plain torch): :class:`KDLoss`, which checks and pairs
the inputs every method shares, and :class:`TeacherSummary`, the reduced teacher feature a loss
may take in place of the feature itself. The methods are in :mod:`.losses`; a new method
subclasses :class:`KDLoss` and registers itself with :func:`~sftkd_fastmri.kd.register_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, ClassVar, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["Feature", "KDLoss", "Pair", "TeacherSummary"]

Pair = Tuple[Tensor, Tensor]


def _stacked(tensors: Sequence[Tensor]) -> Optional[Tensor]:
    """The per-pair tensors as one ``(P, ...)`` tensor when they share a shape, else ``None``.

    The losses do their per-pair arithmetic on the stack: a handful of operations for all
    pairs instead of a handful per pair, which matters where kernel launches, not memory
    traffic, bound a training step (small batches on a GPU).
    """
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(list(tensors))
    return None


class TeacherSummary:
    """What a loss keeps of a teacher feature: a reduced value and the feature's shape.

    A loss with :attr:`KDLoss.teacher_group` > 0 only needs a reduction of the teacher's
    features (an attention map, a Gram or similarity matrix), so the
    :class:`~sftkd_fastmri.kd.Distiller` reduces each group of teacher features as soon as the
    teacher's forward hook produces it and drops the full maps: the teacher's memory during KD
    holds the reductions instead of every paired activation. A summary stands in for the
    feature in ``loss(student_feats, teacher_feats)``: it exposes the feature's ``shape`` (and
    ``dim()``) for the loss's checks, and the first summary of a group carries ``value``, the
    loss's :meth:`KDLoss.summarize_teacher` of the whole group (the others carry ``None``).

    Args:
        value: The reduction of the group (on the first position of the group), else ``None``.
        shape: Shape of the teacher feature at this position.
    """

    __slots__ = ("value", "shape")

    def __init__(self, value: Optional[Tensor], shape: Sequence[int]) -> None:
        self.value = value
        self.shape = torch.Size(shape)

    def dim(self) -> int:
        """Number of dimensions of the summarised feature."""
        return len(self.shape)

    def detach(self) -> TeacherSummary:
        return TeacherSummary(None if self.value is None else self.value.detach(), self.shape)

    def __repr__(self) -> str:
        value = None if self.value is None else tuple(self.value.shape)
        return f"TeacherSummary(shape={tuple(self.shape)}, value={value})"


Feature = Union[Tensor, TeacherSummary]


class KDLoss(nn.Module):
    """Base class of the distillation losses: input validation shared by all methods.

    Subclasses implement :meth:`forward` and start it with :meth:`_pairs`, which checks the
    inputs and returns ``(student, teacher)`` pairs with the teacher detached.

    A loss that needs only a reduction of the teacher features sets :attr:`teacher_group` to
    the number of consecutive teacher features one reduction consumes and implements
    :meth:`summarize_teacher`; its :meth:`forward` then accepts :class:`TeacherSummary` objects
    in place of teacher tensors (and gives the same value either way).

    Attributes:
        name: Registry name of the loss (set by :func:`~sftkd_fastmri.kd.register_loss`).
        requires_4d: Whether every feature must be a ``(B, C, H, W)`` tensor.
        teacher_group: 0 (the loss needs the teacher features themselves), or how many
            consecutive teacher features :meth:`summarize_teacher` reduces at once.
        min_batch_size: The smallest batch the loss is defined on (2 for losses that relate
            the samples of a batch to each other).
    """

    name: ClassVar[str] = ""
    requires_4d: ClassVar[bool] = True
    teacher_group: ClassVar[int] = 0
    min_batch_size: ClassVar[int] = 1

    @property
    def defers_gradients(self) -> bool:
        """Whether the loss records its gradient on tapped student features as a deferred
        term (:mod:`~sftkd_fastmri.kd.deferred`), so tapping them pays off."""
        return False

    def summarize_teacher(self, teacher_feats: Sequence[Tensor]) -> Tensor:
        """Reduce ``teacher_group`` consecutive teacher features to what :meth:`forward` needs.

        Only for losses with ``teacher_group > 0``; called without gradients.
        """
        raise NotImplementedError(f"{self._label()} does not summarise teacher features")

    def _teacher_value(self, feats: Sequence[Feature]) -> Tensor:
        """The reduction of a group of teacher features, computed or taken from a summary."""
        first = feats[0]
        if isinstance(first, TeacherSummary):
            if first.value is None:
                raise self._error(
                    None,
                    "got a TeacherSummary without a value at the start of a group of "
                    f"{self.teacher_group} teacher feature(s)",
                )
            return first.value
        if any(isinstance(f, TeacherSummary) for f in feats):
            raise self._error(None, "a group of teacher features mixes tensors and summaries")
        return self.summarize_teacher(feats)

    def _reduced_pairs(
        self,
        student_feats: Sequence[Tensor],
        teacher_feats: Sequence[Feature],
        check: Callable[[int, Tensor, Feature], None],
        reduce: Callable[[Tensor], Tensor],
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """For losses with ``teacher_group == 1``: each checked pair as ``(reduce(student),
        teacher reduction)``, returned as two lists."""
        student, teacher = [], []
        for k, (s, t) in enumerate(self._pairs(student_feats, teacher_feats)):
            check(k, s, t)
            student.append(reduce(s))
            teacher.append(self._teacher_value([t]))
        return student, teacher

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        """Distillation loss between paired student and teacher features.

        Args:
            student_feats: Student features, each ``(B, C_k, H_k, W_k)``.
            teacher_feats: Teacher features paired with ``student_feats``, same length.

        Returns:
            Scalar loss tensor.
        """
        raise NotImplementedError

    def _label(self) -> str:
        return f"{type(self).__name__} ({self.name!r})" if self.name else type(self).__name__

    def _error(self, index: Optional[int], message: str) -> ValueError:
        where = "" if index is None else f", pair {index}"
        return ValueError(f"{self._label()}{where}: {message}")

    def _pairs(
        self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]
    ) -> List[Pair]:
        """Validate the inputs and pair them up, teacher detached.

        Raises:
            TypeError: If either argument is a bare tensor instead of a sequence of tensors.
            ValueError: On empty or unequal-length sequences, non-tensor elements, a non-4-D
                feature (where :attr:`requires_4d`), or unequal batch sizes within a pair.
        """
        for role, feats in (("student_feats", student_feats), ("teacher_feats", teacher_feats)):
            # A bare tensor is a Sequence of its rows; iterating it would silently pair batch
            # elements instead of layers.
            if isinstance(feats, Tensor) or not isinstance(feats, Sequence):
                raise TypeError(
                    f"{self._label()}: {role} must be a list or tuple of tensors, "
                    f"got {type(feats).__name__}"
                )
        if len(student_feats) != len(teacher_feats):
            raise self._error(
                None,
                f"expected as many student as teacher features, got {len(student_feats)} "
                f"student and {len(teacher_feats)} teacher features",
            )
        if len(student_feats) == 0:
            raise self._error(None, "expected at least one (student, teacher) pair, got none")
        pairs = []
        for k, (s, t) in enumerate(zip(student_feats, teacher_feats)):
            if not isinstance(s, Tensor) or not isinstance(t, (Tensor, TeacherSummary)):
                raise self._error(
                    k, f"expected tensors, got {type(s).__name__} and {type(t).__name__}"
                )
            if isinstance(t, TeacherSummary) and not self.teacher_group:
                raise self._error(k, "needs teacher tensors, got a TeacherSummary")
            if self.requires_4d and (s.dim() != 4 or t.dim() != 4):
                raise self._error(
                    k,
                    "expected 4-D (B, C, H, W) student and teacher features, got student "
                    f"{tuple(s.shape)} and teacher {tuple(t.shape)}",
                )
            if s.dim() == 0 or t.dim() == 0:
                raise self._error(
                    k,
                    "expected features with a batch axis, got student "
                    f"{tuple(s.shape)} and teacher {tuple(t.shape)} (0-d tensors)",
                )
            if s.shape[0] != t.shape[0]:
                raise self._error(
                    k,
                    "expected the same batch size for student and teacher, got student "
                    f"{tuple(s.shape)} and teacher {tuple(t.shape)}",
                )
            pairs.append((s, t.detach()))
        return pairs

    def _check_spatial(self, k: int, s: Tensor, t: Tensor) -> None:
        if s.shape[-2:] != t.shape[-2:]:
            raise self._error(
                k,
                f"expected equal spatial sizes, got student {tuple(s.shape)} (H, W = "
                f"{tuple(s.shape[-2:])}) and teacher {tuple(t.shape)} (H, W = "
                f"{tuple(t.shape[-2:])})",
            )

    def _check_batch_of_two(self, k: int, s: Tensor) -> None:
        if s.shape[0] < 2:
            raise self._error(
                k,
                "relates samples of a batch to each other and needs at least 2 samples, "
                f"got batch size {s.shape[0]} (shape {tuple(s.shape)})",
            )
