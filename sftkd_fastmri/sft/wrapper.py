"""The student-friendly teacher (SFT): a teacher trained together with unfolded student branches.

References:
    Matcha, Ramanarayanan, Al Fahim, Rahul, Ram, Sivaprakasam, "SFT-KD-Recon: Learning a
    Student-friendly Teacher for Knowledge Distillation in Magnetic Resonance Image
    Reconstruction", MIDL 2023 (arXiv 2304.05057).

    Park, Cho, Yoo, Kim, Cha, Lim, Han, "Learning Student-Friendly Teacher Networks for
    Knowledge Distillation", NeurIPS 2021 (SFTN, the classification method it adapts).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from ..models.dccnn import check_inputs
from ..models.varnet import low_frequency_kwargs
from .protocol import check_cascade_model

__all__ = ["SFTOutput", "SFTStates", "StudentFriendlyTeacher"]


class SFTOutput(NamedTuple):
    """Training-mode output of :class:`StudentFriendlyTeacher`.

    Attributes:
        teacher: teacher reconstruction ``T(x_0)``, ``(B, H, W)``.
        branches: student-branch reconstructions ``b_i``, each ``(B, H, W)``, in the order of
            :attr:`StudentFriendlyTeacher.branch_starts`.
    """

    teacher: Tensor
    branches: List[Tensor]


class SFTStates(NamedTuple):
    """Intermediate states of an SFT forward pass (:meth:`StudentFriendlyTeacher.forward_states`).

    Attributes:
        teacher: teacher states ``x_0 .. x_N`` (``N + 1`` tensors; ``x_0`` = zero-filled).
        branches: final state of each student branch, in the order of
            :attr:`StudentFriendlyTeacher.branch_starts`.
    """

    teacher: List[Tensor]
    branches: List[Tensor]


class StudentFriendlyTeacher(nn.Module):
    """Teacher with unfolded student branches, as in SFT-KD-Recon (Matcha et al., MIDL 2023).

    Matcha et al., "SFT-KD-Recon: Learning a Student-friendly Teacher for Knowledge
    Distillation in Magnetic Resonance Image Reconstruction", MIDL 2023 (arXiv 2304.05057),
    adapting Park et al., "Learning Student-Friendly Teacher Networks for Knowledge
    Distillation", NeurIPS 2021 (SFTN) to cascaded reconstruction networks.

    Teacher ``T`` and student ``S`` have the same number ``N`` of cascades. With ``x_0`` the
    zero-filled image, the teacher path is ``x_i = T_i(x_{i-1})`` (block + DC, 1-based
    ``i``); branch ``i`` (``1 <= i <= N-1``) starts from the teacher state ``x_i`` and runs the
    student cascades ``S_{i+1} .. S_N``, each with its DC, to the branch output ``b_i``. The
    student cascades are shared by all branches (``S_N`` serves ``N - 1`` of them) and nothing
    is detached, so the branch losses train the teacher cascades ``T_1 .. T_{N-1}`` - that is
    what makes the teacher student-aware. ``T_N`` is reached only by the teacher's own terms.

    **The student's first cascade.** In the paper no branch uses ``S_1`` (the earliest branch
    starts after ``T_1``), so ``S_1`` keeps its random initialisation. The default
    ``train_first_student_cascade=False`` keeps that paper-faithful behaviour: the KD stage
    that follows trains the whole student, ``S_1`` included, so nothing is lost there, and the
    SFT-stage cost and loss balance stay those of the paper. With ``True`` an extra *branch 0*
    runs the student alone (its own zero-filled state through ``S_1 .. S_N``, i.e. exactly the
    student's forward); then every student cascade is trained and the exported student
    initialisation is a complete network, which matters when it is used or fine-tuned without
    KD (e.g. the "SFT initialisation, no KD" control of a fair comparison). Branch 0 comes
    first in :attr:`SFTOutput.branches`, which then has ``N`` entries instead of ``N - 1``.

    **Modes.** In training mode (``self.training``) :meth:`forward` returns an
    :class:`SFTOutput`; in eval mode it returns the teacher's own forward ``(B, H, W)``, so
    validation, metrics and export see exactly the teacher.

    **Sharing work.** The teacher runs once per forward; every branch starts from a stored
    teacher state. With ``batch_branches=True`` the branches that are active at student
    cascade ``k`` are concatenated along the batch axis and run through ``S_k`` in one call
    (fewer, larger kernel launches; the same arithmetic, up to floating-point reassociation in
    the convolutions, at the price of repeating the k-space, mask and sensitivity maps per
    active branch). Measured with ``benchmarks/bench_sft.py`` (D5C5 / D3C5, 320 x 320, batch
    4; every run in ``docs/benchmarks.md``), the SFT step costs 2.01-2.03 teacher steps
    batched against 2.25 unbatched on an H200 GPU. On a 2-core CPU, with freed memory kept in
    the process (:func:`sftkd_fastmri.retain_freed_memory`, the CLI's default without a GPU),
    the two are within the run-to-run noise (batched 1.69-2.13, unbatched 1.74-2.00 over nine
    days). The default ``batch_branches=None`` therefore batches on CUDA inputs only, and
    never for a student with batch normalisation (it would mix the branches' statistics);
    ``True`` or ``False`` forces the choice.

    Args:
        teacher: a model implementing :class:`~sftkd_fastmri.sft.CascadeModel`, e.g.
            ``create_model("dccnn_d5c5")``.
        student: likewise, with the same number of cascades and state layout, e.g.
            ``create_model("dccnn_d3c5")``.
        train_first_student_cascade: add branch 0 (the student alone), so ``S_1`` is trained
            too. Default ``False`` (paper).
        batch_branches: run the active branches of each student cascade as one batch;
            ``None`` (default): on CUDA inputs, unless the student has batch normalisation.

    Raises:
        TypeError: a model does not implement the cascade protocol.
        ValueError: different cascade counts, different ``in_chans``, the same module passed
            twice, or no branch at all (``N == 1`` without branch 0).
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        train_first_student_cascade: bool = False,
        batch_branches: Optional[bool] = None,
    ):
        super().__init__()
        n_teacher = check_cascade_model(teacher, "teacher")
        n_student = check_cascade_model(student, "student")
        if teacher is student:
            raise ValueError("teacher and student must be two different modules")
        if n_teacher != n_student:
            raise ValueError(
                f"teacher has {n_teacher} cascades but student has {n_student}: SFT pairs "
                "teacher cascade i with student cascade i, so both need the same number"
            )
        t_chans, s_chans = getattr(teacher, "in_chans", None), getattr(student, "in_chans", None)
        if t_chans is not None and s_chans is not None and t_chans != s_chans:
            raise ValueError(
                f"teacher has in_chans={t_chans} but student has in_chans={s_chans}: a student "
                "branch starts from a teacher state, so both need the same image channels"
            )
        t_layout = getattr(teacher, "state_layout", None)
        s_layout = getattr(student, "state_layout", None)
        if t_layout is not None and s_layout is not None and t_layout != s_layout:
            raise ValueError(
                f"teacher ({type(teacher).__name__}) states are {t_layout} but student "
                f"({type(student).__name__}) states are {s_layout}: a student branch starts "
                "from a teacher state, so both need the same state layout"
            )
        self.teacher = teacher
        self.student = student
        self.num_cascades = n_teacher
        self.train_first_student_cascade = bool(train_first_student_cascade)
        self.batch_branches = None if batch_branches is None else bool(batch_branches)
        self._student_mixes_samples = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules()
        )
        if not self.branch_starts:
            raise ValueError(
                "with a single cascade there is no student branch; use "
                "train_first_student_cascade=True or models with >= 2 cascades"
            )

    @property
    def branch_starts(self) -> List[int]:
        """For each branch, the number of teacher cascades before it (= branch index ``i``).

        Branch ``i`` starts from ``x_i`` and runs student cascades ``i .. N-1`` (0-based),
        i.e. ``S_{i+1} .. S_N``. ``[1, .., N-1]``, or ``[0, .., N-1]`` with branch 0.
        """
        first = 0 if self.train_first_student_cascade else 1
        return list(range(first, self.num_cascades))

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self,
        masked_kspace: Tensor,
        mask: Tensor,
        sens_maps: Optional[Tensor] = None,
        num_low_frequencies: Optional[Union[Tensor, int]] = None,
    ) -> Union[SFTOutput, Tensor]:
        """Args:
            masked_kspace: ``(B, coils, H, W, 2)`` acquired k-space (coils = 1: single-coil).
            mask: broadcastable to the k-space, e.g. ``(B, 1, 1, W, 1)`` (a VarNet through
                :class:`~sftkd_fastmri.models.CascadedVarNet` needs exactly ``(B, 1, 1, W, 1)``).
            sens_maps: ``(B, coils, H, W, 2)``; required when coils > 1.
            num_low_frequencies: the batch's fully sampled centre columns, for models that
                take it (``takes_num_low_frequencies``: a VarNet's sensitivity network, as
                fastMRI's ``VarNetModule`` passes it); ignored by the others.

        Returns:
            Training mode: :class:`SFTOutput` (teacher ``(B, H, W)`` and the branch outputs).
            Eval mode: the teacher's output ``(B, H, W)``.
        """
        if not self.training:
            # The teacher's own forward, not a re-implementation: eval/export see exactly it.
            return self.teacher(
                masked_kspace,
                mask,
                sens_maps,
                **low_frequency_kwargs(self.teacher, num_low_frequencies),
            )
        states = self.forward_states(masked_kspace, mask, sens_maps, num_low_frequencies)
        return SFTOutput(
            teacher=self.teacher.final_image(states.teacher[-1]),
            branches=[self.student.final_image(s) for s in states.branches],
        )

    def forward_states(
        self,
        masked_kspace: Tensor,
        mask: Tensor,
        sens_maps: Optional[Tensor] = None,
        num_low_frequencies: Optional[Union[Tensor, int]] = None,
    ) -> SFTStates:
        """Teacher states ``x_0 .. x_N`` and the final state of every branch (any mode).

        Useful for logging or for inspecting where the branches diverge from the teacher.
        Arguments as in :meth:`forward`.
        """
        # The training path drives the cascades directly and so bypasses the model's own input
        # checks; these catch layout errors that would otherwise surface deep inside an FFT.
        self._check_inputs(masked_kspace, mask, sens_maps)
        teacher_states = [
            self.teacher.initial_state(
                masked_kspace,
                mask,
                sens_maps,
                **low_frequency_kwargs(self.teacher, num_low_frequencies),
            )
        ]
        for i in range(self.num_cascades):
            teacher_states.append(
                self.teacher.cascade_step(i, teacher_states[-1], masked_kspace, mask, sens_maps)
            )
        branches = self._run_branches(
            teacher_states, masked_kspace, mask, sens_maps, num_low_frequencies
        )
        return SFTStates(teacher=teacher_states, branches=branches)

    def _check_inputs(self, masked_kspace: Tensor, mask: Tensor, sens_maps: Optional[Tensor]):
        """Each model's own ``check_inputs`` where it has one, else the DC-CNN checks."""
        checks = [getattr(m, "check_inputs", None) for m in (self.teacher, self.student)]
        checks = [c for c in checks if callable(c)] or [check_inputs]
        for check in checks:
            check(masked_kspace, mask, sens_maps)

    def _run_branches(
        self,
        teacher_states: List[Tensor],
        masked_kspace: Tensor,
        mask: Tensor,
        sens_maps: Optional[Tensor],
        num_low_frequencies: Optional[Union[Tensor, int]] = None,
    ) -> List[Tensor]:
        starts = self.branch_starts
        batched = self.batch_branches
        if batched is None:
            batched = masked_kspace.is_cuda and not self._student_mixes_samples
        states: List[Optional[Tensor]] = [None] * len(starts)
        for k in range(starts[0], self.num_cascades):
            for b, start in enumerate(starts):
                if start == k:
                    # Branch 0 is the student's own forward, so it starts from the student's
                    # initial state (identical to the teacher's x_0 for two DC-CNNs).
                    states[b] = (
                        self.student.initial_state(
                            masked_kspace,
                            mask,
                            sens_maps,
                            **low_frequency_kwargs(self.student, num_low_frequencies),
                        )
                        if start == 0
                        else teacher_states[start]
                    )
            active = [b for b, start in enumerate(starts) if start <= k]
            if batched and len(active) > 1:
                batch = masked_kspace.shape[0]
                reps = len(active)
                out = self.student.cascade_step(
                    k,
                    torch.cat([states[b] for b in active], dim=0),
                    _tile(masked_kspace, reps, batch),
                    _tile(mask, reps, batch),
                    _tile(sens_maps, reps, batch),
                )
                for b, chunk in zip(active, torch.split(out, batch, dim=0)):
                    states[b] = chunk
            else:
                for b in active:
                    states[b] = self.student.cascade_step(
                        k, states[b], masked_kspace, mask, sens_maps
                    )
        return [s for s in states if s is not None]

    def extra_repr(self) -> str:
        return (
            f"num_cascades={self.num_cascades}, branch_starts={self.branch_starts}, "
            f"train_first_student_cascade={self.train_first_student_cascade}, "
            f"batch_branches={self.batch_branches}"
        )


def _tile(tensor: Optional[Tensor], reps: int, batch: int) -> Optional[Tensor]:
    """Repeat a per-sample input ``reps`` times along the batch axis (broadcast ones stay)."""
    if tensor is None or tensor.ndim != 5 or tensor.shape[0] != batch:
        return tensor
    return tensor.repeat(reps, *([1] * (tensor.ndim - 1)))
