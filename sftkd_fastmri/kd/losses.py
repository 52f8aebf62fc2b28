"""Knowledge-distillation losses with one signature (plain torch, no Lightning).

Every loss is a :class:`KDLoss` and is called as ``loss(student_feats, teacher_feats)``, where
the two arguments are sequences of the same length and element ``k`` of one is paired with
element ``k`` of the other. Feature maps are ``(B, C, H, W)`` tensors; ``C`` and ``(H, W)`` may
change from pair to pair, ``H != W`` is fine, and student and teacher channel counts may differ
(each loss states which sizes must agree). :class:`OutputImitation` compares network outputs and
accepts any shape. The result is a scalar tensor.

The teacher is frozen during distillation: teacher features are detached inside every loss, so
a KD loss never sends gradients into the teacher even if its features were computed with
autograd on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import KDLoss, TeacherSummary, _stacked
from .deferred import deferred_slot
from .grams import (
    _ChannelEnergy,
    _DeferredPositionGram,
    _flatten_samples,
    _full_precision,
    _position_gram,
    _positions_by_channels,
    _sample_gram,
)
from .registry import register_loss

__all__ = [
    "AttentionTransfer",
    "CorrelationCongruence",
    "FSP",
    "FitNet",
    "KDLoss",
    "OutputImitation",
    "SimilarityPreserving",
    "TeacherSummary",
]


@register_loss("at")
class AttentionTransfer(KDLoss):
    """Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention",
    ICLR 2017).

    Spatial attention map of a feature ``f`` of shape ``(B, C, H, W)``:
    ``a(f) = sum_c |f_c|^p``, flattened to ``(B, H*W)`` and L2-normalised per sample. For each
    pair the default loss is the batch mean of the per-sample Euclidean distance
    ``||a_T - a_S||_2`` (the paper's ``p = 2`` norm of the difference of normalised maps); the
    result is the mean over pairs. The paper sums over pairs and weights by ``beta / 2``; this
    loss averages over pairs and leaves the weight to the caller.

    ``squared=True`` uses ``mean((a_T - a_S)^2)`` over ``(B, H*W)`` instead, as the authors'
    reference implementation does.

    ``normalize="batch"`` reproduces the bug of the KD-MRI code (Murugesan et al., 2020), which
    normalised the ``(B, H*W)`` block along ``dim=0``: each spatial position is normalised over
    the batch, so a sample's loss depends on the other samples. It exists for comparison with
    that code only.

    Channel counts may differ between student and teacher; spatial sizes must match.

    Args:
        p: Exponent applied to the channel magnitudes before summing (paper: 2; >= 1).
        normalize: ``"sample"`` (paper) or ``"batch"`` (KD-MRI bug, comparison only).
        squared: Use the mean squared difference instead of the mean per-sample distance.
    """

    def __init__(self, p: float = 2.0, normalize: str = "sample", squared: bool = False) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 1 <= p < math.inf:
            # below 1, |f|^p has an infinite slope at 0 (ReLU outputs are often exactly 0):
            # NaN gradients
            raise ValueError(f"AttentionTransfer: p must be a finite number >= 1, got {p!r}")
        if normalize not in ("sample", "batch"):
            raise ValueError(
                f"AttentionTransfer: normalize must be 'sample' or 'batch', got {normalize!r}"
            )
        self.p = float(p)
        self.normalize = normalize
        self.squared = bool(squared)

    teacher_group = 1

    @property
    def defers_gradients(self) -> bool:
        return self.p == 2.0  # the fused channel energy has the deferred backward

    def summarize_teacher(self, teacher_feats: Sequence[Tensor]) -> Tensor:
        """The teacher's attention map ``(B, H*W)`` before normalisation (normalised in
        :meth:`forward`, for all pairs at once)."""
        return self._energy(teacher_feats[0])

    def attention(self, feat: Tensor) -> Tensor:
        """Normalised spatial attention map.

        Args:
            feat: Feature map ``(B, C, H, W)``.

        Returns:
            Attention ``(B, H*W)``, unit L2 norm per row (``"sample"``) or per column
            (``"batch"``).
        """
        return self._normalized(self._energy(feat))

    def _normalized(self, energy: Tensor) -> Tensor:
        """Attention maps ``(..., B, H*W)`` normalised per sample or per position."""
        return F.normalize(energy, p=2.0, dim=-1 if self.normalize == "sample" else -2)

    def _energy(self, feat: Tensor) -> Tensor:
        """``sum_c |f_c|^p`` flattened to ``(B, H*W)``, before normalisation."""
        if self.p == 2.0:
            att = _ChannelEnergy.apply(feat, deferred_slot(feat))
        elif self.p.is_integer() and int(self.p) % 2 == 0:
            att = _full_precision(feat).pow(int(self.p)).sum(dim=1)
        else:
            att = _full_precision(feat).abs().pow(self.p).sum(dim=1)
        return att.flatten(1)

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        """Attention-transfer loss.

        Args:
            student_feats: Student features, each ``(B, C_s, H_k, W_k)``.
            teacher_feats: Teacher features, each ``(B, C_t, H_k, W_k)``.

        Returns:
            Scalar loss, the mean over pairs.
        """
        student, teacher = self._reduced_pairs(
            student_feats, teacher_feats, self._check_spatial, self._energy
        )
        stacked_s, stacked_t = _stacked(student), _stacked(teacher)
        if stacked_s is not None and stacked_t is not None:
            # All pairs at once: (P, B, H*W); the mean over pairs of per-pair means of equal
            # size is the mean over everything.
            diff = self._normalized(stacked_t) - self._normalized(stacked_s)
            if self.squared:
                return diff.pow(2).mean()
            return torch.linalg.vector_norm(diff, ord=2, dim=2).mean()
        losses = []
        for energy, value in zip(student, teacher):
            diff = self._normalized(value) - self._normalized(energy)
            if self.squared:
                losses.append(diff.pow(2).mean())
            else:
                losses.append(torch.linalg.vector_norm(diff, ord=2, dim=1).mean())
        return torch.stack(losses).mean()


@register_loss("fitnet")
class FitNet(KDLoss):
    """FitNets hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

    Loss per pair: mean squared error between ``r_k(student_k)`` and ``teacher_k``, where
    ``r_k`` is a learned 1x1 convolution ``C_s -> C_t`` when the channel counts differ and the
    identity otherwise; the result is the mean over pairs. The paper's regressor is a
    convolution chosen to match spatial sizes as well and its loss is ``1/2`` the squared L2
    norm; here spatial sizes must match, the regressor only adapts channels, and the squared
    error is averaged over elements (a constant rescaling).

    The regressors are parameters of this module: the training loop must optimise them
    together with the student (include ``loss.parameters()`` in the optimiser) and the module
    must be moved to the student's device and dtype (``loss.to(...)``).

    Args:
        student_channels: Channel count of each student feature, one per pair.
        teacher_channels: Channel count of each teacher feature, one per pair. Give both or
            neither; without them, every pair must have equal channel counts.
    """

    def __init__(
        self,
        student_channels: Optional[Sequence[int]] = None,
        teacher_channels: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        if (student_channels is None) != (teacher_channels is None):
            raise ValueError(
                "FitNet: give both student_channels and teacher_channels or neither, got "
                f"student_channels={student_channels} and teacher_channels={teacher_channels}"
            )
        self.student_channels = None if student_channels is None else list(student_channels)
        self.teacher_channels = None if teacher_channels is None else list(teacher_channels)
        self.regressors = nn.ModuleList()
        if self.student_channels is not None and self.teacher_channels is not None:
            if len(self.student_channels) != len(self.teacher_channels):
                raise ValueError(
                    "FitNet: student_channels and teacher_channels need one entry per pair, got "
                    f"{len(self.student_channels)} and {len(self.teacher_channels)} entries"
                )
            for cs, ct in zip(self.student_channels, self.teacher_channels):
                self.regressors.append(nn.Identity() if cs == ct else nn.Conv2d(cs, ct, 1))

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        """FitNets hint loss.

        Args:
            student_feats: Student features, each ``(B, C_s, H_k, W_k)``.
            teacher_feats: Teacher features, each ``(B, C_t, H_k, W_k)``.

        Returns:
            Scalar loss, the mean over pairs.
        """
        pairs = self._pairs(student_feats, teacher_feats)
        if self.student_channels is not None and len(pairs) != len(self.student_channels):
            raise self._error(
                None,
                f"expected {len(self.student_channels)} pairs (from student_channels), "
                f"got {len(pairs)}",
            )
        losses = []
        for k, (s, t) in enumerate(pairs):
            self._check_spatial(k, s, t)
            if self.student_channels is not None and self.teacher_channels is not None:
                expected = (self.student_channels[k], self.teacher_channels[k])
                if (s.shape[1], t.shape[1]) != expected:
                    raise self._error(
                        k,
                        f"expected (student, teacher) channels {expected} as configured, got "
                        f"student {tuple(s.shape)} and teacher {tuple(t.shape)}",
                    )
                s = self.regressors[k](s)
            elif s.shape[1] != t.shape[1]:
                raise self._error(
                    k,
                    f"student has {s.shape[1]} channels and teacher {t.shape[1]} "
                    f"(student {tuple(s.shape)}, teacher {tuple(t.shape)}); pass "
                    "student_channels and teacher_channels so that a 1x1 regressor is created",
                )
            losses.append(F.mse_loss(s, t))
        return torch.stack(losses).mean()


@register_loss("fsp")
class FSP(KDLoss):
    """Flow-of-solution-procedure loss (Yim et al., "A Gift from Knowledge Distillation: Fast
    Optimization, Network Minimization and Transfer Learning", CVPR 2017).

    The features are consumed in consecutive layer pairs ``(f_0, f_1), (f_2, f_3), ...`` for the
    student and the teacher alike. For a layer pair with maps ``(B, C1, H, W)`` and
    ``(B, C2, H, W)`` the FSP matrix is ``G = F1^T F2 / (H W)`` of shape ``(B, C1, C2)``. Loss:
    mean over layer pairs of ``mean((G_S - G_T)^2)`` over ``(B, C1, C2)``. The paper sums the
    squared differences and weights layer pairs by ``lambda_i``; the element mean is a constant
    rescaling and the weights are all one here.

    If the two maps of a layer pair differ in spatial size, both are adaptive-average-pooled to
    the smaller height and the smaller width (the paper's layer pairs have equal sizes).
    Student and teacher FSP matrices must have the same shape, i.e. the same channel counts.

    FSP is degenerate on 1-channel maps (the matrix is a single number, the mean product of two
    images); use it on the hidden multi-channel features.
    """

    teacher_group = 2
    defers_gradients = True

    def summarize_teacher(self, teacher_feats: Sequence[Tensor]) -> Tensor:
        """The teacher's FSP matrix ``(B, C1, C2)`` of a layer pair."""
        return self._gram(teacher_feats[0], teacher_feats[1])

    @staticmethod
    def _gram(first: Tensor, second: Tensor) -> Tensor:
        """FSP matrix ``(B, C1, C2)`` of maps ``(B, C1, H1, W1)`` and ``(B, C2, H2, W2)``."""
        if first.shape[-2:] == second.shape[-2:] and first.dtype == second.dtype:
            slot1, slot2 = deferred_slot(first), deferred_slot(second)
            if slot1 is not None and slot2 is not None:
                return _DeferredPositionGram.apply(first, second, slot1, slot2)
        size = (min(first.shape[-2], second.shape[-2]), min(first.shape[-1], second.shape[-1]))
        # Adaptive pooling only ever shrinks here, so no values are invented.
        if first.shape[-2:] != size:
            first = F.adaptive_avg_pool2d(first, size)
        if second.shape[-2:] != size:
            second = F.adaptive_avg_pool2d(second, size)
        gram = _position_gram(_positions_by_channels(first), _positions_by_channels(second))
        return gram / (size[0] * size[1])

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        """FSP loss.

        Args:
            student_feats: Student features ``[f_0, f_1, f_2, f_3, ...]``, even length, each
                ``(B, C_k, H_k, W_k)``.
            teacher_feats: Teacher features in the same layout.

        Returns:
            Scalar loss, the mean over layer pairs.
        """
        pairs = self._pairs(student_feats, teacher_feats)
        if len(pairs) % 2:
            raise self._error(
                None,
                "consumes features in consecutive layer pairs (f_0, f_1), (f_2, f_3), ...; "
                f"expected an even number of features, got {len(pairs)}",
            )
        student, teacher = [], []
        for k in range(0, len(pairs), 2):
            (s1, t1), (s2, t2) = pairs[k], pairs[k + 1]
            g_s, g_t = self._gram(s1, s2), self._teacher_value([t1, t2])
            if g_s.shape != g_t.shape:
                raise self._error(
                    k,
                    f"(layer pair {k}, {k + 1}) expected equal student and teacher FSP matrix "
                    f"shapes, got student {tuple(g_s.shape)} from {tuple(s1.shape)} and "
                    f"{tuple(s2.shape)}, teacher {tuple(g_t.shape)} from {tuple(t1.shape)} and "
                    f"{tuple(t2.shape)}",
                )
            student.append(g_s)
            teacher.append(g_t)
        stacked_s, stacked_t = _stacked(student), _stacked(teacher)
        if stacked_s is not None and stacked_t is not None:  # all layer pairs at once
            return (stacked_s - stacked_t).pow(2).mean()
        return torch.stack([(a - b).pow(2).mean() for a, b in zip(student, teacher)]).mean()


class _SampleRelationLoss(KDLoss):
    """Shared part of SP and CC: a ``(B, B)`` relation matrix of the samples of a batch,
    computed from their Gram matrix ``Q Q^T`` (``Q`` = each feature flattened per sample), and
    the loss ``||R_T - R_S||_F^2 / B^2`` averaged over pairs. The teacher's summary is its Gram
    matrix; subclasses define :meth:`_gram` and :meth:`_relation` (on ``(..., B, B)``).
    """

    teacher_group = 1
    min_batch_size = 2

    def summarize_teacher(self, teacher_feats: Sequence[Tensor]) -> Tensor:
        """The teacher's ``(B, B)`` sample Gram matrix (turned into the relation matrix in
        :meth:`forward`, for all pairs at once)."""
        return self._gram(teacher_feats[0])

    def _gram(self, feat: Tensor) -> Tensor:
        """``(B, B)`` inner products of the flattened samples."""
        return _sample_gram(_flatten_samples(feat))

    def _relation(self, gram: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        """Relation loss.

        Args:
            student_feats: Student features, each ``(B, C_s, H_s, W_s)``.
            teacher_feats: Teacher features, each ``(B, C_t, H_t, W_t)``.

        Returns:
            Scalar loss, the mean over pairs.
        """
        student, teacher = self._reduced_pairs(
            student_feats, teacher_feats, lambda k, s, t: self._check_batch_of_two(k, s), self._gram
        )
        stacked_s, stacked_t = _stacked(student), _stacked(teacher)
        if stacked_s is not None and stacked_t is not None:  # all pairs at once: (P, B, B)
            diff = self._relation(stacked_t) - self._relation(stacked_s)
            return diff.pow(2).sum(dim=(1, 2)).mean() / stacked_s.shape[1] ** 2
        losses = []
        for gram, value in zip(student, teacher):
            diff = self._relation(value) - self._relation(gram)
            losses.append(diff.pow(2).sum() / gram.shape[0] ** 2)
        return torch.stack(losses).mean()


@register_loss("sp")
class SimilarityPreserving(_SampleRelationLoss):
    """Similarity-preserving loss (Tung & Mori, "Similarity-Preserving Knowledge
    Distillation", ICCV 2019).

    Per pair: ``Q = f.reshape(B, -1)``, ``G = Q Q^T`` (``B x B``), rows L2-normalised;
    loss ``||G_T - G_S||_F^2 / B^2``. The result is the mean over pairs (the paper sums over
    pairs and leaves the weight to ``gamma``). Only the batch size must agree between student
    and teacher. Invariant to scaling a feature map by a positive constant. Needs a batch of at
    least two samples.
    """

    @staticmethod
    def similarity(feat: Tensor) -> Tensor:
        """Row-normalised sample similarity matrix.

        Args:
            feat: Feature ``(B, ...)``.

        Returns:
            ``(B, B)`` matrix with unit L2-norm rows.
        """
        return F.normalize(_sample_gram(_flatten_samples(feat)), p=2.0, dim=-1)

    def _relation(self, gram: Tensor) -> Tensor:
        return F.normalize(gram, p=2.0, dim=-1)


@register_loss("cc")
class CorrelationCongruence(_SampleRelationLoss):
    """Correlation congruence (Peng et al., "Correlation Congruence for Knowledge
    Distillation", ICCV 2019).

    Per pair, each sample becomes an embedding ``e`` (the feature flattened, or first
    global-average-pooled to ``(B, C)`` with ``pool=True``), L2-normalised per sample. The
    sample-to-sample correlation is the Gaussian RBF kernel
    ``k(x, y) = exp(-gamma ||x - y||^2)`` approximated, as in the paper, by its order-``P``
    Taylor expansion
    ``exp(-gamma ||x||^2) exp(-gamma ||y||^2) sum_{p=0}^{P} (2 gamma)^p / p! (x . y)^p``.
    With ``C_S`` and ``C_T`` the ``(B, B)`` correlation matrices, the loss is
    ``||C_T - C_S||_F^2 / B^2``, averaged over pairs.

    The unit-norm embeddings keep ``x . y`` in ``[-1, 1]``, where a low-order expansion is
    accurate, and make the kernel independent of the feature scale. The defaults
    ``gamma = 0.4``, ``order = 2`` follow common reimplementations of the paper (the paper
    treats both as hyperparameters). ``pool`` defaults to ``False`` because reconstruction
    features carry their information spatially: pooling a map to one number per channel makes
    different slices look alike. Only the batch size must agree between student and teacher.
    Needs a batch of at least two samples.

    This is the paper's kernel correlation, not RepDistiller's ``CC``, which is a simplified
    product of each embedding with its batch neighbour.

    Args:
        gamma: RBF kernel width parameter, positive.
        order: Order ``P`` of the Taylor expansion, a non-negative integer.
        pool: Global-average-pool each map to ``(B, C)`` before flattening.
    """

    def __init__(self, gamma: float = 0.4, order: int = 2, pool: bool = False) -> None:
        super().__init__()
        if (
            isinstance(gamma, bool)
            or not isinstance(gamma, (int, float))
            or not 0 < gamma < math.inf
        ):
            raise ValueError(
                f"CorrelationCongruence: gamma must be a positive finite number, got {gamma!r}"
            )
        if isinstance(order, bool) or not isinstance(order, int) or order < 0:
            raise ValueError(
                f"CorrelationCongruence: order must be a non-negative integer, got {order!r}"
            )
        self.gamma = float(gamma)
        self.order = order
        self.pool = bool(pool)

    def correlation(self, feat: Tensor) -> Tensor:
        """Taylor-approximated RBF correlation matrix of the batch.

        Args:
            feat: Feature ``(B, C, H, W)``.

        Returns:
            ``(B, B)`` correlation matrix.
        """
        return self._relation(self._gram(feat))

    def _gram(self, feat: Tensor) -> Tensor:
        """``(B, B)`` inner products of the (pooled) samples, before normalisation."""
        if self.pool:
            feat = F.adaptive_avg_pool2d(feat, 1)
        return _sample_gram(_flatten_samples(feat))

    def _relation(self, gram: Tensor) -> Tensor:
        """Correlation matrices ``(..., B, B)`` from sample Gram matrices ``(..., B, B)``.

        The unit-norm embeddings ``e_i = q_i / max(||q_i||, eps)`` (as ``F.normalize``) enter
        only through ``e_i . e_j = G_ij / (n_i n_j)`` and ``||e_i||^2 = G_ii / n_i^2`` with
        ``n_i = max(sqrt(G_ii), eps)``, so the embeddings are never materialised.
        """
        squares = torch.diagonal(gram, dim1=-2, dim2=-1)
        inverse = squares.clamp_min(1e-24).rsqrt()  # 1 / max(||q||, 1e-12), F.normalize's eps
        dot = gram * inverse.unsqueeze(-1) * inverse.unsqueeze(-2)
        # sum_p (2 gamma)^p / p! dot^p by Horner's rule: two operations per order.
        coefficients = [(2 * self.gamma) ** p / math.factorial(p) for p in range(self.order + 1)]
        series = torch.full_like(dot, coefficients[-1])
        for c in reversed(coefficients[:-1]):
            series = series * dot + c
        scale = torch.exp(-self.gamma * squares * inverse.square())
        return scale.unsqueeze(-1) * scale.unsqueeze(-2) * series


@register_loss("imitation")
class OutputImitation(KDLoss):
    """Output imitation, the KD-MRI baseline (Murugesan et al., "KD-MRI: A knowledge
    distillation framework for image reconstruction and image restoration in MRI workflow",
    MIDL 2020).

    Loss: mean absolute error between student and teacher outputs, averaged over pairs. Any
    tensor shape with a leading batch axis is accepted (e.g. ``(B, H, W)`` magnitude images or
    ``(B, C, H, W)``) as long as student and teacher shapes match within a pair.
    """

    requires_4d = False

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        """Output-imitation loss.

        Args:
            student_feats: Student outputs, each ``(B, ...)``.
            teacher_feats: Teacher outputs with the same shapes.

        Returns:
            Scalar loss, the mean over pairs.
        """
        losses = []
        for k, (s, t) in enumerate(self._pairs(student_feats, teacher_feats)):
            if s.shape != t.shape:
                raise self._error(
                    k,
                    f"expected equal student and teacher shapes, got student {tuple(s.shape)} "
                    f"and teacher {tuple(t.shape)}",
                )
            losses.append(F.l1_loss(s, t))
        return torch.stack(losses).mean()
