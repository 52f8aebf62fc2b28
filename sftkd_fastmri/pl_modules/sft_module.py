"""Lightning module for the student-friendly teacher (SFT) stage of SFT-KD-Recon.

Matcha, Ramanarayanan, Al Fahim, Rahul, Ram, Sivaprakasam, "SFT-KD-Recon: Learning a
Student-friendly Teacher for Knowledge Distillation in Magnetic Resonance Image
Reconstruction", MIDL 2023 (arXiv 2304.05057), Algorithm 1 (SFT stage), after Park et al.,
"Learning Student-Friendly Teacher Networks for Knowledge Distillation", NeurIPS 2021.

The module trains :class:`~sftkd_fastmri.sft.StudentFriendlyTeacher` with
:class:`~sftkd_fastmri.sft.SFTLoss`; the teacher is the module's reconstruction for
validation, testing and prediction, so ``validation_loss`` and ``val_metrics/*`` (the fastMRI
contract of :class:`~sftkd_fastmri.pl_modules.ReconModule`) describe the teacher and the
checkpoint monitor ``validation_loss`` picks the best teacher.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple, Union

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from .._ddp import allow_unused_parameters
from ..models import build_model, create_model, init_from_checkpoint
from ..models.varnet import batch_low_frequencies
from ..sft import SFTLoss, SFTLossTerms, SFTOutput, StudentFriendlyTeacher
from ..sft.wrapper import low_frequency_kwargs
from .recon_module import ReconModule, crop_to_target, kspace_batch, model_inputs

__all__ = ["SFTModule", "SFT_LOSSES"]

PathLike = Union[str, os.PathLike]
# The distances SFTLoss implements; ReconModule's loss of the same name gives validation_loss.
SFT_LOSSES = ("l1", "l2")
_DISTANCE_ALIASES = {"mse": "l2"}  # create_loss's other name for the L2 loss


class SFTModule(ReconModule):
    """Train a student-friendly teacher: the teacher with unfolded, shared student branches.

    Matcha et al., "SFT-KD-Recon", MIDL 2023 (arXiv 2304.05057), Algorithm 1::

        L_SFT = w_T d(T(x_0), y) + w_S mean_i d(b_i, y) + w_I mean_i d(b_i, T(x_0))

    with ``b_i`` the output of branch ``i`` (teacher cascades ``1..i``, then student cascades
    ``i+1..N``; see :class:`~sftkd_fastmri.sft.StudentFriendlyTeacher`) and ``d`` the L1
    distance (``loss="l2"``: mean squared error). Defaults are the paper's: Adam, lr 1e-3,
    StepLR(40, 0.1), no weight decay, L1, all weights 1. The imitation term is a plain mean,
    not the authors' code's double normalisation (see :class:`~sftkd_fastmri.sft.SFTLoss`);
    ``imitation_weight=0`` reproduces their effective behaviour.

    Logged values:

    * training (every step): ``train_loss`` (the total, as for every
      :class:`ReconModule`), ``train/loss``, ``train/teacher_rec``, ``train/branch_rec``,
      ``train/imitation`` and per branch ``train/branch{i}_rec``, ``train/branch{i}_imitation``;
    * validation (per epoch): ``validation_loss`` = ``d(T(x_0), y)`` (the teacher's
      reconstruction loss, the checkpoint monitor), ``val_metrics/{nmse,ssim,psnr}`` of the
      teacher, and unless ``val_branch_metrics=False`` the same terms as in training under
      ``val/...`` and ``val_metrics/branch{i}/{nmse,ssim,psnr}`` per branch. The ``val/...``
      terms are means over slices, each slice counted once, as ``validation_loss`` (so
      ``val/teacher_rec`` is ``validation_loss``, on any number of devices: a slice that a
      DDP sampler repeats to pad a rank counts once);
    * testing: the teacher's reconstructions in ``reconstructions/<fname>.h5`` (and
      ``test_metrics/*`` where the files carry targets), as :class:`ReconModule`.

    Branch labels ``i`` are the wrapper's :attr:`~StudentFriendlyTeacher.branch_starts`: the
    number of teacher cascades before the branch (``1 .. N-1``; ``0`` is the student alone,
    present with ``train_first_student_cascade=True``).

    Checkpoint contract (read by :func:`sftkd_fastmri.sft.export_sft`,
    :func:`sftkd_fastmri.sft.load_sft_models` and
    :func:`sftkd_fastmri.export.load_reconstruction_model`): the weights are under
    ``sft.teacher.*`` and ``sft.student.*``, and the hyperparameters hold ``teacher_preset``,
    ``teacher_config``, ``student_preset``, ``student_config`` (the models' full constructor
    dicts, overrides included) and ``train_first_student_cascade``.
    ``SFTModule.load_from_checkpoint`` rebuilds the module from the stored configs.

    Unused parameters: without branch 0 no branch reaches the student's first cascade ``S_1``
    (as in the paper, it keeps its initialisation: random, or ``init_student``'s weights), so
    its parameters are frozen while fitting (``requires_grad=False`` from ``setup("fit")``,
    before DDP wraps the module; see :meth:`unused_parameters` for the other cases); DDP would
    otherwise fail on parameters that never get a gradient. ``teardown`` (or, when the fit
    fails, a callback the module adds) makes them trainable again, so networks passed as
    instances come back as they were given. The KD stage trains the student, ``S_1`` included.

    Args:
        teacher_preset: teacher preset name (see :func:`sftkd_fastmri.models.list_models`).
        student_preset: student preset name; same number of cascades as the teacher.
        teacher_overrides: constructor arguments replacing the teacher preset's
            (e.g. ``{"chans": 8}``).
        student_overrides: likewise for the student.
        train_first_student_cascade: add branch 0 (the student alone) so that ``S_1`` is
            trained too. Default ``False`` (paper).
        teacher_weight: weight ``w_T`` of the teacher reconstruction term.
        branch_weight: weight ``w_S`` of the branch reconstruction term.
        imitation_weight: weight ``w_I`` of the branch-to-teacher imitation term.
        lr: Adam learning rate.
        lr_step_size: StepLR period in epochs.
        lr_gamma: StepLR decay factor.
        weight_decay: Adam weight decay.
        loss: the distance ``d``: ``"l1"`` (paper) or ``"l2"`` (alias ``"mse"``).
        branch_reduction: ``"mean"`` or ``"sum"`` over branches (see
            :class:`~sftkd_fastmri.sft.SFTLoss`).
        detach_teacher_in_imitation: use ``T(x_0).detach()`` as the imitation target.
        batch_branches: run the active branches of each student cascade as one batch
            (faster on a GPU, same arithmetic); ``None``: on CUDA only (see
            :class:`~sftkd_fastmri.sft.StudentFriendlyTeacher`).
        val_branch_metrics: also run the branches in validation and log their metrics and
            loss terms (about 1.7 times the teacher's validation cost for D5C5/D3C5).
        teacher_config: the teacher's full constructor dict; when given (as when reloading a
            checkpoint) it is used as is and preset and overrides are only recorded.
        student_config: likewise for the student.
        num_log_images: validation slices logged as images (TensorBoard only; teacher).
        output_dir: folder for test reconstructions (default: the trainer's
            ``default_root_dir``).
        teacher: a model instance implementing the cascade protocol (e.g.
            :class:`~sftkd_fastmri.models.CascadedVarNet` around fastMRI's VarNet) to use
            instead of a preset; its preset is then recorded as its ``preset`` attribute
            (which :func:`~sftkd_fastmri.models.create_model` sets; ``None`` without one, as
            for a ``CascadedVarNet``) and its config as its ``config`` attribute (a
            ``CascadedVarNet`` records fastMRI VarNet's constructor arguments), from which
            ``SFTModule.load_from_checkpoint(path, weights_only=True)``,
            :func:`~sftkd_fastmri.sft.export_sft` and :func:`~sftkd_fastmri.models.load_model`
            rebuild it. A network without a config records ``None``: its checkpoint is
            reloaded with ``SFTModule.load_from_checkpoint(path, weights_only=True,
            teacher=..., student=...)`` and cannot be exported.
        student: likewise for the student.
        init_teacher: start the teacher from the weights of a checkpoint (e.g. a teacher
            trained with ``train``, or the teacher of an SFT checkpoint) instead of a random
            initialisation; its preset and configuration must match (loaded strictly). The
            paper trains the SFT teacher from scratch. Not recorded in the hyperparameters: a
            checkpoint of this module holds the weights itself.
        init_student: likewise for the student (from an SFT checkpoint: its student).

    Raises:
        CheckpointError: ``init_teacher`` or ``init_student`` is unreadable, holds another
            preset or configuration, or its weights do not fit.
        ValueError: ``loss`` is not ``"l1"``, ``"l2"`` or ``"mse"`` (any case), invalid loss
            weights, or models that cannot be paired (see
            :class:`~sftkd_fastmri.sft.StudentFriendlyTeacher`).
    """

    def __init__(
        self,
        teacher_preset: Optional[str] = "dccnn_d5c5",
        student_preset: Optional[str] = "dccnn_d3c5",
        teacher_overrides: Optional[Dict[str, Any]] = None,
        student_overrides: Optional[Dict[str, Any]] = None,
        train_first_student_cascade: bool = False,
        teacher_weight: float = 1.0,
        branch_weight: float = 1.0,
        imitation_weight: float = 1.0,
        lr: float = 1e-3,
        lr_step_size: int = 40,
        lr_gamma: float = 0.1,
        weight_decay: float = 0.0,
        loss: str = "l1",
        branch_reduction: str = "mean",
        detach_teacher_in_imitation: bool = False,
        batch_branches: Optional[bool] = None,
        val_branch_metrics: bool = True,
        teacher_config: Optional[Dict[str, Any]] = None,
        student_config: Optional[Dict[str, Any]] = None,
        num_log_images: int = 4,
        output_dir: Optional[PathLike] = None,
        teacher: Optional[nn.Module] = None,
        student: Optional[nn.Module] = None,
        init_teacher: Optional[PathLike] = None,
        init_student: Optional[PathLike] = None,
    ):
        name = loss.lower() if isinstance(loss, str) else loss  # as create_loss reads names
        distance = _DISTANCE_ALIASES.get(name, name)
        if distance not in SFT_LOSSES:
            # SSIM-type losses have no per-branch form in SFTLoss; failing here beats a
            # validation_loss measured with another distance than the one trained.
            raise ValueError(
                f"SFTModule supports loss in {list(SFT_LOSSES)} (the SFTLoss distances; "
                f"'mse' = 'l2'), got {loss!r}"
            )
        super().__init__(
            loss=loss,
            lr=lr,
            lr_step_size=lr_step_size,
            lr_gamma=lr_gamma,
            weight_decay=weight_decay,
            num_log_images=num_log_images,
            output_dir=output_dir,
        )
        if teacher is None:
            teacher = _build_model("teacher", teacher_preset, teacher_overrides, teacher_config)
        else:  # what the instance says it is (create_model sets .preset)
            teacher_preset, teacher_overrides = getattr(teacher, "preset", None), None
        if student is None:
            student = _build_model("student", student_preset, student_overrides, student_config)
        else:  # what the instance says it is (create_model sets .preset)
            student_preset, student_overrides = getattr(student, "preset", None), None
        # Weights first, then the wrapper: it checks the pair as it will train.
        if init_teacher is not None:
            init_from_checkpoint(
                teacher, init_teacher, role="teacher", overrides_option="--teacher-overrides"
            )
        if init_student is not None:
            init_from_checkpoint(
                student, init_student, role="student", overrides_option="--student-overrides"
            )
        self.sft = StudentFriendlyTeacher(
            teacher,
            student,
            train_first_student_cascade=train_first_student_cascade,
            batch_branches=batch_branches,
        )
        self.sft_loss = SFTLoss(
            distance,
            teacher_weight=teacher_weight,
            branch_weight=branch_weight,
            imitation_weight=imitation_weight,
            branch_reduction=branch_reduction,
            detach_teacher_in_imitation=detach_teacher_in_imitation,
        )
        self.val_branch_metrics = bool(val_branch_metrics)
        self._frozen_for_fit: Optional[List[nn.Parameter]] = None
        self.save_hyperparameters(
            ignore=[
                "output_dir",
                "teacher_config",
                "student_config",
                "teacher",
                "student",
                "init_teacher",
                "init_student",
            ]
        )
        # The full configs, not just preset + overrides: export and reloading rebuild the
        # networks from them even if a preset's definition changes later. Model instances
        # record what they are (their preset and config where they have them).
        for role, model, preset in (
            ("teacher", teacher, teacher_preset),
            ("student", student, student_preset),
        ):
            config = getattr(model, "config", None)
            self.hparams[f"{role}_preset"] = preset
            self.hparams[f"{role}_config"] = dict(config) if config is not None else None

    # -- fitting ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Freeze :meth:`unused_parameters` for ``fit`` (before DDP wraps the module)."""
        super().setup(stage)
        if stage == "fit" and self._frozen_for_fit is None:
            self._frozen_for_fit = [p for p in self.unused_parameters() if p.requires_grad]
            for param in self._frozen_for_fit:
                param.requires_grad_(False)
        given_maps = [
            role
            for role, net in (("teacher", self.teacher), ("student", self.student))
            if getattr(net, "use_given_sens_maps", False)
        ]
        trainer = self._trainer
        if stage == "fit" and given_maps and trainer is not None and trainer.world_size > 1:
            # Whether the sensitivity networks get a gradient depends on the data: none where
            # the batches carry sens_maps. Known only per batch, so DDP must look each step.
            allow_unused_parameters(
                trainer,
                f"SFTModule under DDP with use_given_sens_maps=True ({', '.join(given_maps)}): "
                "the sensitivity networks get no gradient where the batches carry sens_maps",
            )

    def teardown(self, stage: str) -> None:
        """Give the networks back trainable as they came (they may be the caller's own
        instances, e.g. a student to distil next, whose first cascade must then train)."""
        if stage == "fit":
            self._unfreeze()
        super().teardown(stage)

    def _unfreeze(self) -> None:
        if self._frozen_for_fit is not None:
            for param in self._frozen_for_fit:
                param.requires_grad_(True)
            self._frozen_for_fit = None

    def configure_callbacks(self) -> List[pl.Callback]:
        """Lightning calls no module ``teardown`` when a fit fails (an exception, Ctrl-C in a
        notebook): a callback unfreezes the networks then."""
        return [*_as_list(super().configure_callbacks()), _UnfreezeOnException()]

    # -- models -----------------------------------------------------------------------------
    @property
    def teacher(self) -> nn.Module:
        """The teacher network (the module's reconstruction)."""
        return self.sft.teacher

    @property
    def student(self) -> nn.Module:
        """The student network whose cascades form the branches."""
        return self.sft.student

    @property
    def branch_ids(self) -> List[int]:
        """Labels of the branches in logged names (the wrapper's ``branch_starts``)."""
        return self.sft.branch_starts

    def unused_parameters(self) -> List[nn.Parameter]:
        """Parameters that no weighted SFT term reaches (frozen while fitting).

        Without branch 0 (the paper's setting) every student parameter outside the cascades
        ``S_2 .. S_N`` that the branches run: the first cascade, and whatever the student's
        ``initial_state`` uses (a VarNet's sensitivity network); the whole student when both
        branch weights are 0; the last teacher cascade when only the branch reconstruction
        term is on (with a detached or unweighted imitation target).
        """
        sft, loss = self.sft, self.sft_loss
        unused: List[nn.Parameter] = []
        if loss.branch_weight == 0 and loss.imitation_weight == 0:
            unused += list(sft.student.parameters())
        elif not sft.train_first_student_cascade:
            run = {id(p) for k in sft.branch_starts for p in sft.student.cascades[k].parameters()}
            unused += [p for p in sft.student.parameters() if id(p) not in run]
        imitation_reaches_teacher = (
            loss.imitation_weight > 0 and not loss.detach_teacher_in_imitation
        )
        if loss.teacher_weight == 0 and not imitation_reaches_teacher:
            unused += list(sft.teacher.cascades[sft.num_cascades - 1].parameters())
        return unused

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self,
        masked_kspace: Tensor,
        mask: Tensor,
        sens_maps: Optional[Tensor] = None,
        num_low_frequencies: Optional[Union[Tensor, int]] = None,
    ) -> Union[SFTOutput, Tensor]:
        """The wrapper's forward (uncropped).

        Args:
            masked_kspace: ``(B, coils, H, W, 2)`` normalised acquired k-space.
            mask: ``(B, 1, 1, W, 1)`` sampling mask.
            sens_maps: ``(B, coils, H, W, 2)``, or ``None`` for single-coil data.
            num_low_frequencies: the batch's centre columns, for VarNet networks (their
                sensitivity networks take it, as in fastMRI's ``VarNetModule``).

        Returns:
            Training mode: :class:`~sftkd_fastmri.sft.SFTOutput` (teacher and branches, each
            ``(B, H, W)``). Eval mode: the teacher's ``(B, H, W)`` magnitude image.
        """
        return self.sft(masked_kspace, mask, sens_maps, num_low_frequencies)

    def _inputs(self, batch: Any) -> Tuple[Any, ...]:
        """The wrapper's inputs from a batch: :func:`model_inputs` and, where a network takes
        it (a VarNet), the batch's ``num_low_frequencies`` as one number.

        Raises:
            TypeError: ``batch`` is not a batch of :class:`~sftkd_fastmri.data.DCCNNSample`
                (e.g. fastMRI's ``VarNetSample``), see :func:`kspace_batch`.
        """
        inputs = model_inputs(kspace_batch(batch, self))
        takes = any(
            getattr(m, "takes_num_low_frequencies", False)
            for m in (self.sft.teacher, self.sft.student)
        )
        low = getattr(batch, "num_low_frequencies", None) if takes else None
        return (*inputs, batch_low_frequencies(low) if low is not None else None)

    def reconstruct(self, batch: Any) -> Tensor:
        """The teacher's ``(B, h, w)`` normalised magnitude, cropped to the target size.

        Calls the teacher itself (not the wrapper), so it is the teacher in either mode.
        """
        *inputs, low = self._inputs(batch)
        teacher = self.sft.teacher
        return crop_to_target(teacher(*inputs, **low_frequency_kwargs(teacher, low)), batch)

    def sft_output(self, batch: Any) -> SFTOutput:
        """Teacher and branch outputs, each ``(B, h, w)`` cropped to the target size.

        Runs the branches in any mode (through :meth:`StudentFriendlyTeacher.forward_states`),
        so validation sees the branches exactly as training computes them.
        """
        states = self.sft.forward_states(*self._inputs(batch))
        teacher = self.sft.teacher.final_image(states.teacher[-1])
        branches = [self.sft.student.final_image(s) for s in states.branches]
        return SFTOutput(
            teacher=crop_to_target(teacher, batch),
            branches=[crop_to_target(b, batch) for b in branches],
        )

    def sft_terms(self, output: SFTOutput, batch: Any) -> SFTLossTerms:
        """:class:`~sftkd_fastmri.sft.SFTLossTerms` of cropped outputs against the target."""
        return self.sft_loss(output, batch.target)

    def per_slice_sft_terms(
        self, output: SFTOutput, batch: Any, prefix: str = "val/"
    ) -> Dict[str, Tensor]:
        """``{prefix + term: (B,)}``: the logged SFT terms of each slice alone (detached).

        Their mean is the batch's term (every term is a mean over its elements, a weighted sum
        or a mean or sum over branches of such means, and a batch's slices share one shape),
        and :meth:`accumulate_slice_values` counts each slice once.
        """
        rows = []
        for i in range(output.teacher.shape[0]):
            one = SFTOutput(
                teacher=output.teacher[i : i + 1],
                branches=[branch[i : i + 1] for branch in output.branches],
            )
            terms = self.sft_loss(one, batch.target[i : i + 1])
            rows.append(terms.as_dict(prefix, self.branch_ids))
        return {name: torch.stack([row[name].detach() for row in rows]) for name in rows[0]}

    # -- steps ------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        teacher, branches = self(*self._inputs(batch))
        output = SFTOutput(
            teacher=crop_to_target(teacher, batch),
            branches=[crop_to_target(b, batch) for b in branches],
        )
        terms = self.sft_terms(output, batch)
        batch_size = output.teacher.shape[0]
        self.log("train_loss", terms.total.detach(), prog_bar=True, batch_size=batch_size)
        # Per step only (Lightning's default here), so the names stay unsuffixed.
        self.log_dict(_detached(terms.as_dict("train/", self.branch_ids)), batch_size=batch_size)
        return terms.total

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.val_branch_metrics:
            output = self.sft_output(batch)
            teacher = output.teacher
        else:
            output, teacher = None, self.reconstruct(batch)
        batch_size = teacher.shape[0]
        # validation_loss is the teacher's own reconstruction loss: the value the checkpoint
        # monitor compares, so "best" means the best teacher, as for a plain DCCNNModule.
        losses = self.per_slice_loss(teacher, batch.target, self.data_range(batch))
        self.accumulate_loss(losses, batch_size, batch.fname, batch.slice_num)
        loss = losses.mean()
        self.update_metrics("", teacher, batch)
        self.log_val_images(
            batch_idx, self.unnormalise(teacher, batch), self.unnormalise(batch.target, batch)
        )
        if output is not None:
            for i, branch in zip(self.branch_ids, output.branches):
                self.update_metrics(f"branch{i}", branch, batch)
            # Per slice, as validation_loss: logged at the epoch's end, each slice once (a
            # log_dict of batch means counted the slices DDP samplers repeat to pad a rank).
            self.accumulate_slice_values(
                self.per_slice_sft_terms(output, batch), batch.fname, batch.slice_num
            )
        return loss


def _as_list(callbacks: Any) -> List[pl.Callback]:
    if callbacks is None:
        return []
    return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]


class _UnfreezeOnException(pl.Callback):
    """Gives an :class:`SFTModule`'s networks back trainable when its fit fails."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception):
        if isinstance(pl_module, SFTModule):
            pl_module._unfreeze()


def _build_model(
    role: str,
    preset: Optional[str],
    overrides: Optional[Dict[str, Any]],
    config: Optional[Dict[str, Any]],
) -> nn.Module:
    """A network from its full config (reloading; DC-CNN or CascadedVarNet) or a DC-CNN from
    preset + overrides."""
    if config is not None:
        model = build_model(config)
        model.preset = preset
        return model
    if preset is None:
        raise ValueError(
            f"the {role} needs a preset name or a {role}_config; a module built from model "
            f"instances without a config is reloaded with the same instances: "
            f"SFTModule.load_from_checkpoint(path, weights_only=True, teacher=..., student=...)"
        )
    return create_model(preset, **dict(overrides or {}))


def _detached(values: Dict[str, Tensor]) -> Dict[str, Tensor]:
    # Logged values need no graph; detaching keeps Lightning from holding on to it.
    return {k: v.detach() for k, v in values.items()}
