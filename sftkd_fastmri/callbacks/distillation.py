r"""Drop-in knowledge distillation for any reconstruction LightningModule.

The KD stage of SFT-KD-Recon (Matcha et al., "SFT-KD-Recon: Learning a Student-friendly
Teacher for Knowledge Distillation in Magnetic Resonance Image Reconstruction", MIDL 2023,
Algorithm 1): the student minimises its own reconstruction loss plus weighted distillation
losses from a frozen teacher. Added to ``Trainer(callbacks=[...])``, :class:`DistillationCallback`
does this for an unchanged module - :class:`~sftkd_fastmri.pl_modules.DCCNNModule`, fastMRI's
``VarNetModule`` through :class:`~sftkd_fastmri.pl_modules.VarNetModule2`, or a user's own::

    student = DCCNNModule("dccnn_d3c5", init_checkpoint="sft_student.pt")  # or from scratch
    kd = DistillationCallback("teacher.pt", losses={"at": 1.0, "imitation": 1.0})
    Trainer(callbacks=[kd], max_epochs=150).fit(student, datamodule=data)

How it works (one forward and one backward of the student per step):

* ``setup("fit")`` finds the student network inside the module (``student_attr``, else
  ``model`` / ``varnet`` / ``unet`` / the only child with parameters), builds a
  :class:`~sftkd_fastmri.kd.distiller.Distiller`, attaches it to the module as the submodule
  ``distillation`` and wraps the module *instance*'s ``training_step`` (the class is untouched;
  ``teardown`` restores the attribute and removes the submodule).
* The wrapper calls the module's own ``training_step``; the student forward inside it is
  recorded by forward hooks (features and forward arguments). The teacher is then run with the
  same arguments under ``torch.no_grad()``, the KD terms are computed and the returned loss
  becomes ``loss + sum(weight * term)`` (a tensor, or the ``"loss"`` entry of a dict).
  Lightning's precision context wraps ``training_step``, so under ``*-mixed`` precision the
  teacher runs under the same autocast; for ``*-true`` precisions a copy of the teacher is cast
  to the module's parameter dtype (the given teacher's weights are never changed).
* Lightning's tuners (``Tuner.lr_find`` / ``scale_batch_size``, the ``LearningRateFinder`` and
  ``BatchSizeFinder`` callbacks) run their trial steps with the KD terms, so the learning rate
  is found for the loss that is trained; the teacher is prepared by the first such step.
* Gradient accumulation needs nothing special: Lightning divides the returned loss by
  ``accumulate_grad_batches``, which scales the KD terms exactly like the reconstruction loss.

The teacher stays frozen and outside the module: it is not a submodule (so it is not in the
optimiser, the module's ``state_dict`` or its ``.train()`` / ``.eval()`` calls, and DDP does not
wrap it), ``requires_grad_(False)`` and in eval mode from ``setup("fit")``, put in eval mode again
at every training batch (validation loops cannot leave it in training mode), moved to the
module's device in ``on_fit_start``; it has no optimiser state. ``teardown`` gives it back as it
was given: device, ``requires_grad`` flags and training mode (so a callback built before the
teacher's own training does not freeze it there).

Learned KD parameters (FitNet's 1x1 regressors) live in the ``distillation`` submodule, attached
in ``setup`` - before ``configure_optimizers`` and before the DDP wrap - so an optimiser over
``self.parameters()`` trains them with the student and DDP synchronises their gradients. They
appear in the module's checkpoints as ``distillation.losses.fitnet.regressors.{k}.*`` (only when
student and teacher channels differ: the default FitNet pairing of two DC-CNNs compares
equal-channel cascade outputs and has none). To load such a checkpoint into the module without
the callback, use :func:`load_module_weights` (``weights_only`` reading, strict name-based
loading of everything but the ``distillation.*`` keys) or, for a
:class:`~sftkd_fastmri.pl_modules.DCCNNModule`, take the network alone with
:func:`sftkd_fastmri.models.load_model` (``model.*`` weights); resuming with ``ckpt_path`` and
the callback restores them, and ``trainer.validate/test/predict(ckpt_path=...)`` with the
callback in the trainer loads the module's weights without them.

Schedules:

* ``"joint"`` (the paper): reconstruction + weighted KD at every step (for the first
  ``kd_epochs`` epochs when given, then reconstruction only).
* ``"two_stage"`` (KD-MRI's scripts, Murugesan et al., MIDL 2020): for the first ``kd_epochs``
  epochs the KD loss alone is optimised - the module's reconstruction loss is still computed
  and logged (``kd/recon``) but not returned - then reconstruction fine-tuning, with no teacher
  forward at all.
* Under DDP, a schedule with ``kd_epochs`` leaves some parameters without gradients in one stage
  (student layers after the distilled features in two-stage stage 1; the KD parameters after
  ``kd_epochs``): use ``strategy="ddp_find_unused_parameters_true"`` (a warning says so).

Logged every training step (and as epoch means): ``kd/{name}`` (unweighted terms),
``kd/total`` (their weighted sum), ``kd/recon`` (the module's loss), ``kd/loss`` (what is
optimised) and ``kd/stage`` (1 = distillation, 2 = reconstruction only). Under DDP these are
each rank's own values (the logger shows rank zero's), not synchronised: SP and CC may leave a
step out on one rank only, and a synchronisation must be called by every rank alike.

SP and CC relate the samples of a batch to each other and are undefined on one sample (the last
batch of an epoch, or of a k-space shape, when the slice count leaves a remainder of 1): such a
step leaves them out (a warning, once per loss; their ``kd/{name}`` is not logged that step,
so the epoch mean leaves the step out, while a step-level CSV row repeats the previous value, as
Lightning does for any metric not logged) and trains with the other terms; a two-stage
KD-only step with no term left is skipped (under DDP it returns a zero loss, so every rank
still runs its backward).

Student initialisation (from the SFT stage's exported student, or from scratch) belongs to the
module: ``DCCNNModule(model_preset=..., init_checkpoint=path, init_checkpoint_prefix=...)``.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks.callback import Callback
from pytorch_lightning.utilities.memory import is_oom_error
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from .._ddp import allow_unused_parameters
from ..kd.distiller import Distiller, check_loss_weights
from ..kd.pairings import check_pairing
from ..models import CheckpointError, load_model, load_state_dict_strict, read_checkpoint
from ..models.checkpoint import match_compiled_names
from ..models.registry import OptionError
from .networks import (
    _batch_size,
    _device,
    _floating_dtype,
    _loader_batch_size,
    check_batch_size,
    find_network,
    sft_network,
)

__all__ = [
    "DistillationCallback",
    "check_batch_size",
    "check_schedule",
    "find_network",
    "load_module_weights",
]

PathLike = Union[str, os.PathLike]
SCHEDULES = ("joint", "two_stage")


def check_schedule(
    schedule: Any,
    kd_epochs: Any,
    max_epochs: Optional[int] = None,
    names: Optional[Mapping[str, str]] = None,
) -> None:
    """Refuse a KD schedule that cannot run as asked: an unknown schedule, ``kd_epochs``
    other than a whole number >= 1, ``two_stage`` without ``kd_epochs`` and, where
    ``max_epochs`` is given, ``two_stage`` whose ``kd_epochs`` are not fewer than it (its
    reconstruction fine-tuning starts after ``kd_epochs`` epochs, so the run would end with
    a student that was never fine-tuned). ``names``: how the errors name ``kd_schedule``,
    ``kd_epochs`` and ``max_epochs`` (default: this callback's arguments; the commands pass
    their flags)."""
    name = {"kd_schedule": "schedule", "kd_epochs": "kd_epochs", "max_epochs": "max_epochs"}
    name.update(names or {})
    if schedule not in SCHEDULES:
        raise ValueError(
            f"{name['kd_schedule']}: expected one of {', '.join(SCHEDULES)}, got {schedule!r}"
        )
    if kd_epochs is not None and (
        isinstance(kd_epochs, bool) or not isinstance(kd_epochs, int) or kd_epochs < 1
    ):
        raise ValueError(
            f"{name['kd_epochs']}: expected a whole number of epochs >= 1, got {kd_epochs!r}"
        )
    if schedule != "two_stage":
        return
    if kd_epochs is None:
        bound = "" if max_epochs is None else f" smaller than {name['max_epochs']} ({max_epochs})"
        raise ValueError(
            f"{name['kd_schedule']} two_stage needs {name['kd_epochs']}, the epochs of KD "
            f"alone before the reconstruction fine-tuning: a whole number{bound}"
        )
    if max_epochs is not None and kd_epochs >= max_epochs:
        raise ValueError(
            f"{name['kd_schedule']} two_stage: {name['kd_epochs']} ({kd_epochs}) must be "
            f"smaller than {name['max_epochs']} ({max_epochs}): the reconstruction fine-tuning "
            f"starts after the {kd_epochs} epochs of KD alone, so the run would end without "
            f"it. Lower {name['kd_epochs']} or raise {name['max_epochs']}"
        )


class DistillationCallback(Callback):
    """Train any ReconModule-style LightningModule with its own loss plus weighted KD losses.

    See the module docstring for the mechanism, the schedules, what is logged and how the
    teacher is kept frozen.

    One callback per trainer (Lightning refuses two stateful callbacks of one type); several
    KD losses from one teacher combine in ``losses``.

    Args:
        teacher: The teacher network, or a checkpoint path read with
            :func:`sftkd_fastmri.models.load_model` (model checkpoints, Lightning
            checkpoints of ``DCCNNModule`` and ``SFTModule``, SFT exports; strict,
            name-based; errors propagate). A LightningModule is accepted too (e.g. one
            loaded with ``VarNetModule2.load_from_checkpoint``): its network is taken as for
            the student. From an :class:`~sftkd_fastmri.pl_modules.SFTModule` (or a
            :class:`~sftkd_fastmri.sft.StudentFriendlyTeacher`) its teacher network is taken,
            as from an SFT checkpoint (``teacher_prefix="student"``: its student).
        losses: ``{loss name: weight}`` with names from
            :func:`sftkd_fastmri.kd.available_losses` (``at``, ``cc``, ``fitnet``, ``fsp``,
            ``imitation``, ``sp``) and weights >= 0.
        layers: ``{loss name: [(student_layer, teacher_layer), ...]}`` overriding the default
            pairings (:mod:`sftkd_fastmri.kd.pairings`; required for non-DC-CNN models except
            ``imitation``). Names are those of ``network.named_modules()``, ``""`` = output.
        loss_options: ``{loss name: {option: value}}`` for :func:`sftkd_fastmri.kd.create_loss`.
        student_attr: Attribute of the module holding the student network (default: found
            automatically, see :func:`find_network`).
        schedule: ``"joint"`` or ``"two_stage"``.
        kd_epochs: Epochs with distillation: required (>= 1) for ``"two_stage"``; optional for
            ``"joint"`` (default: every epoch).
        teacher_prefix: For an SFT checkpoint, ``SFTModule`` or ``StudentFriendlyTeacher``
            as teacher, the network to take (``"teacher"`` default, or ``"student"``); for a
            path passed to ``load_model`` as ``role``.
        attr_name: Name under which the KD parameters are attached to the module (and the
            prefix of their checkpoint keys).
        prog_bar: Show ``kd/total`` in the progress bar.

    Raises:
        ValueError / TypeError: Invalid losses, weights, layers, options, schedule or kd_epochs.
        sftkd_fastmri.models.CheckpointError: The teacher checkpoint cannot be loaded.
    """

    def __init__(
        self,
        teacher: Union[nn.Module, PathLike],
        losses: Mapping[str, float],
        layers: Optional[Mapping[str, Sequence[Sequence[str]]]] = None,
        loss_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
        student_attr: Optional[str] = None,
        schedule: str = "joint",
        kd_epochs: Optional[int] = None,
        teacher_prefix: Optional[str] = None,
        attr_name: str = "distillation",
        prog_bar: bool = False,
    ) -> None:
        super().__init__()
        self.losses = check_loss_weights(losses)
        for what, mapping in (("layers", layers), ("loss_options", loss_options)):
            if mapping is not None and not isinstance(mapping, Mapping):
                raise OptionError(f"{what} must be a mapping {{loss name: ...}}, got {mapping!r}")
            stray = sorted(set(mapping or {}) - set(self.losses))
            if stray:
                raise ValueError(
                    f"{what} given for {stray}, which are not among the losses "
                    f"{sorted(self.losses)}"
                )
        check_schedule(schedule, kd_epochs)
        if not attr_name.isidentifier():
            raise ValueError(f"attr_name must be a Python identifier, got {attr_name!r}")
        if isinstance(teacher, (str, os.PathLike)):
            # Read here, so no one else holds it: frozen for good.
            teacher = load_model(teacher, role=teacher_prefix or "auto")
            teacher.requires_grad_(False).eval()
        elif isinstance(teacher, pl.LightningModule):
            # an SFTModule's network is its StudentFriendlyTeacher: take the teacher inside
            teacher = sft_network(find_network(teacher, role="teacher"), teacher_prefix)
        elif isinstance(teacher, nn.Module):
            teacher = sft_network(teacher, teacher_prefix)
        else:
            raise TypeError(
                f"teacher must be an nn.Module or a checkpoint path, got {type(teacher).__name__}"
            )
        # Frozen from setup("fit") to teardown; the flags it had are restored afterwards, so a
        # network still to be trained (e.g. the SFT teacher, before its own fit) is left alone.
        self.teacher: nn.Module = teacher
        self.layers = {k: check_pairing(k, v) for k, v in dict(layers or {}).items()}
        self.loss_options = {k: dict(v) for k, v in dict(loss_options or {}).items()}
        self.student_attr = student_attr
        self.schedule = schedule
        self.kd_epochs = kd_epochs
        self.attr_name = attr_name
        self.prog_bar = prog_bar
        self.distiller: Optional[Distiller] = None
        self.stage = 1
        self._module: Optional[pl.LightningModule] = None
        self._saved_step: Any = None
        self._had_instance_step = False
        self._teacher_device: Optional[torch.device] = None
        self._prepared = False
        self._warned_train_mode = False
        self._warned_skipped: set = set()
        self._teacher_flags: Optional[tuple] = None
        self._saved_load_hook: Optional[tuple] = None
        self._log_filter: Optional[tuple] = None

    # -- schedule ---------------------------------------------------------------------------
    def stage_at(self, epoch: int) -> int:
        """1 while distilling (epoch < kd_epochs, or always for joint without kd_epochs), else 2."""
        return 1 if self.kd_epochs is None or epoch < self.kd_epochs else 2

    # -- Lightning hooks --------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            self._skip_kd_keys_on_load(pl_module)
            return
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                f"{type(pl_module).__name__} uses manual optimisation: DistillationCallback "
                "adds the KD terms to the loss returned by training_step, which Lightning only "
                "optimises under automatic optimisation. With manual optimisation, add them in "
                "the module's training_step with sftkd_fastmri.kd.Distiller (with "
                "distiller.step(): run the student, kd = distiller(); then backward "
                "loss + kd.total; see its docstring)"
            )
        if self._module is not None:
            raise RuntimeError("DistillationCallback is already set up for a running fit")
        existing = getattr(pl_module, self.attr_name, None)
        if existing is not None and existing is not self.distiller:
            raise RuntimeError(
                f"{type(pl_module).__name__} already has an attribute {self.attr_name!r}; "
                "pass another attr_name"
            )
        student = find_network(pl_module, self.student_attr, exclude=(self.attr_name,))
        teacher_params = {id(p) for p in self.teacher.parameters()}
        if student is self.teacher or any(id(p) in teacher_params for p in student.parameters()):
            raise ValueError("the teacher shares parameters with the student")
        self._teacher_flags = (
            [(p, p.requires_grad) for p in self.teacher.parameters()],
            [(m, m.training) for m in self.teacher.modules()],
        )
        self.teacher.requires_grad_(False).eval()
        if self.distiller is None or self.distiller.student is not student:
            try:
                self.distiller = Distiller(
                    student, self.teacher, self.losses, self.layers or None, self.loss_options
                )
            except BaseException:  # e.g. a layer name the student lacks
                self._give_teacher_back()
                raise
        if trainer.world_size > 1:  # per-rank logs on purpose (see the module docstring)
            self._ignore_sync_advice()
        # A submodule: moved, cast and DDP-wrapped with the module, optimised with its params.
        pl_module.add_module(self.attr_name, self.distiller)
        self._module = pl_module
        self._had_instance_step = "training_step" in pl_module.__dict__
        self._saved_step = pl_module.training_step
        pl_module.training_step = self._wrap(trainer, pl_module, self._saved_step)
        if self.kd_epochs is not None and trainer.world_size > 1:
            self._allow_unused_parameters(trainer)

    def _ignore_sync_advice(self) -> None:
        """Silence Lightning's advice to log ``kd/`` values with ``sync_dist=True`` until
        teardown; the filter is removed then, so the rest of the program still sees it."""
        before = list(warnings.filters)
        warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('kd/")
        entry = warnings.filters[0]
        self._log_filter = None if entry in before else entry  # a filter of the user's stays

    def _restore_warnings(self) -> None:
        if self._log_filter is None:
            return
        try:
            warnings.filters.remove(self._log_filter)
        except ValueError:  # removed by someone else (e.g. a catch_warnings block that ended)
            pass
        else:
            mutated = getattr(warnings, "_filters_mutated", None)
            if callable(mutated):  # invalidate the per-module "already ignored" caches
                mutated()
        self._log_filter = None

    def _allow_unused_parameters(self, trainer: pl.Trainer) -> None:
        """Two-stage KD leaves parameters without gradient in one stage (student layers after
        the distilled features while distilling; the KD parameters while fine-tuning), which
        DDP rejects unless it looks for unused parameters: turn that on before DDP wraps the
        module (``setup`` runs before the strategy does)."""
        allow_unused_parameters(
            trainer,
            f"DistillationCallback(schedule={self.schedule!r}, kd_epochs={self.kd_epochs}) "
            "under DDP: some parameters get no gradient in one of the stages (student layers "
            "after the distilled features in two-stage KD, the KD parameters after kd_epochs)",
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepare(pl_module)

    def _prepare(self, pl_module: pl.LightningModule) -> None:
        """Teacher on the module's device (a cast copy for ``*-true`` precisions) and the
        feature hooks attached; once per fit. Called by ``on_fit_start`` or, where a tuner ran
        training steps before it (Lightning's ``LearningRateFinder`` and ``BatchSizeFinder``
        run theirs in their own ``on_fit_start``, which Lightning calls first), by the first
        wrapped training step."""
        assert self.distiller is not None
        if self._prepared:
            return
        self._teacher_device = _device(self.teacher)
        self.teacher.to(pl_module.device)
        dtype = _floating_dtype(self.distiller.student)
        run_teacher = self.teacher
        if dtype is not None and _floating_dtype(self.teacher) not in (None, dtype):
            # "*-true" precision: run a cast copy, so the given teacher's weights stay exact.
            run_teacher = copy.deepcopy(self.teacher).to(dtype=dtype)
        self.distiller.remove_hooks()
        self.distiller.set_teacher(run_teacher)
        self.distiller.attach()
        self._prepared = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in on_fit_start: a resumed run's epoch counter is restored in between.
        self.stage = self.stage_at(trainer.current_epoch)
        size = _loader_batch_size(trainer.train_dataloader)
        if size is not None:
            check_batch_size(self.losses, size, "the training loader's batch size")
        # A configure_optimizers over e.g. self.model.parameters() would leave learned KD
        # parameters at their random initialisation: say so rather than train silently.
        optimised = {
            id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]
        }
        missing = [n for n, p in self.distiller.named_parameters() if id(p) not in optimised]
        if missing:
            rank_zero_warn(
                f"DistillationCallback: KD parameters {missing} are in no optimiser; build the "
                f"optimiser from self.parameters() in {type(pl_module).__name__}."
                "configure_optimizers so that they are trained with the student"
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = self.stage_at(trainer.current_epoch)
        if stage != self.stage:
            rank_zero_info(
                f"DistillationCallback: epoch {trainer.current_epoch}: stage {self.stage} -> "
                f"{stage} ({'reconstruction only, no teacher forward' if stage == 2 else 'KD'})"
            )
            self.stage = stage

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        teacher = self.distiller.teacher if self.distiller is not None else self.teacher
        if teacher.training:
            if not self._warned_train_mode:
                rank_zero_warn("the frozen teacher was in training mode; putting it in eval mode")
                self._warned_train_mode = True
            teacher.eval()

    def _skip_kd_keys_on_load(self, pl_module: pl.LightningModule) -> None:
        """For validate / test / predict with ``ckpt_path``: the module's checkpoint from a fit
        with this callback holds the KD parameters (``distillation.*``), which the module has
        only while fitting. Leave them out of what Lightning loads into it (the module's own
        ``on_load_checkpoint`` runs first, unchanged); ``teardown`` restores the hook."""
        if self._saved_load_hook is not None or hasattr(pl_module, self.attr_name):
            return  # already done, or the module has such an attribute of its own
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: Dict[str, Any]) -> None:
            original(checkpoint)
            state = checkpoint.get("state_dict")
            if isinstance(state, dict):
                checkpoint["state_dict"] = _without_kd_keys(state, self.attr_name)

        self._saved_load_hook = (pl_module, "on_load_checkpoint" in pl_module.__dict__, original)
        pl_module.on_load_checkpoint = on_load_checkpoint

    def _restore_load_hook(self) -> None:
        if self._saved_load_hook is None:
            return
        pl_module, had_instance_hook, original = self._saved_load_hook
        if had_instance_hook:
            pl_module.on_load_checkpoint = original
        else:
            pl_module.__dict__.pop("on_load_checkpoint", None)
        self._saved_load_hook = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore(pl_module)
        else:
            self._restore_load_hook()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning skips teardown when fit fails; leave the module as it was all the same.
        self._restore(pl_module)
        self._restore_load_hook()

    def _give_teacher_back(self) -> None:
        """The teacher's ``requires_grad`` flags and training mode as it was given."""
        if self._teacher_flags is not None:
            params, modules = self._teacher_flags
            for param, flag in params:
                param.requires_grad_(flag)
            for module, training in modules:
                module.training = training
            self._teacher_flags = None

    def _restore(self, pl_module: pl.LightningModule) -> None:
        """Undo ``setup`` / ``on_fit_start``: training_step, submodule, hooks, teacher."""
        self._restore_warnings()
        if self._module is not pl_module:
            self._give_teacher_back()  # a setup that failed before attaching
            return
        if self._had_instance_step:
            pl_module.training_step = self._saved_step
        else:
            del pl_module.training_step
        self._saved_step = None
        if self.distiller is not None:
            self.distiller.remove_hooks()
            self.distiller.set_teacher(self.teacher)  # drop a dtype-cast copy
            if getattr(pl_module, self.attr_name, None) is self.distiller:
                delattr(pl_module, self.attr_name)
        if self._teacher_device is not None:
            self.teacher.to(self._teacher_device)
            self._teacher_device = None
        self._give_teacher_back()
        self._module = None
        self._prepared = False

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "stage": self.stage,
            "schedule": self.schedule,
            "kd_epochs": self.kd_epochs,
            "losses": dict(self.losses),
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        for key in ("schedule", "kd_epochs", "losses"):
            if key in state_dict and state_dict[key] != getattr(self, key):
                rank_zero_warn(
                    f"DistillationCallback: the checkpoint was trained with {key}="
                    f"{state_dict[key]!r}; continuing with {key}={getattr(self, key)!r}"
                )
        self.stage = int(state_dict.get("stage", self.stage))

    # -- the wrapped training step ----------------------------------------------------------
    def _wrap(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: Any) -> Any:
        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._training_step(trainer, pl_module, step, *args, **kwargs)

        training_step.__wrapped__ = step  # type: ignore[attr-defined]
        return training_step

    def _training_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: Any, *args: Any, **kwargs
    ) -> Any:
        distiller = self.distiller
        assert distiller is not None
        if self not in trainer.callbacks:
            # A tuner's trial steps (LearningRateFinder, BatchSizeFinder): Lightning has swapped
            # the callback list, so neither on_fit_start nor on_exception reaches this callback.
            self._prepare(pl_module)
            try:
                return self._kd_step(trainer, pl_module, step, *args, **kwargs)
            except BaseException as err:
                # BatchSizeFinder catches an out-of-memory error and tries a smaller batch:
                # the fit goes on, with this callback set up. Anything else ends the fit, and
                # this callback would not hear of it: restore now.
                if not (isinstance(err, RuntimeError) and is_oom_error(err)):
                    self._restore(pl_module)
                raise
        return self._kd_step(trainer, pl_module, step, *args, **kwargs)

    def _kd_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: Any, *args: Any, **kwargs
    ) -> Any:
        distiller = self.distiller
        assert distiller is not None
        stage = self.stage_at(trainer.current_epoch)
        log = dict(on_step=True, on_epoch=True)
        if stage == 2:
            # Reconstruction fine-tuning: the module's own step, no teacher forward.
            output = step(*args, **kwargs)
            # A constant: any batch size gives the right epoch mean, and none is inferred.
            pl_module.log("kd/stage", 2.0, batch_size=1, **log)
            return output
        distiller.begin_step()
        try:
            output = step(*args, **kwargs)
            if output is None:  # the module skipped this batch
                return None
            recon = output["loss"] if isinstance(output, Mapping) else output
            if not isinstance(recon, Tensor):
                raise TypeError(
                    f"{type(pl_module).__name__}.training_step must return a loss tensor or a "
                    f"dict with 'loss' for DistillationCallback, got {type(output).__name__}"
                )
            kd = distiller(skip_small_batches=True)
            batch_size = _batch_size(kd.teacher_output)
        finally:
            distiller.end_step()
        two_stage_kd = self.schedule == "two_stage"
        if kd.skipped:
            self._warn_skipped(kd.skipped, batch_size)
            if two_stage_kd and not kd.terms and trainer.world_size == 1:
                return None  # a KD-only step with no KD term defined: skip the batch
            # (under DDP every rank must run its backward: the step's loss is a zero then)
        if two_stage_kd:
            loss = kd.total if kd.terms else recon * 0.0
        else:
            loss = recon + kd.total
        for name, term in kd.terms.items():
            pl_module.log(f"kd/{name}", term.detach(), batch_size=batch_size, **log)
        pl_module.log(
            "kd/total", kd.total.detach(), batch_size=batch_size, prog_bar=self.prog_bar, **log
        )
        pl_module.log("kd/recon", recon.detach(), batch_size=batch_size, **log)
        pl_module.log("kd/loss", loss.detach(), batch_size=batch_size, **log)
        pl_module.log("kd/stage", 1.0, batch_size=batch_size, **log)
        if isinstance(output, Mapping):
            output = dict(output)
            output["loss"] = loss
            return output
        return loss

    def _warn_skipped(self, names: Sequence[str], batch_size: Optional[int]) -> None:
        new = [name for name in names if name not in self._warned_skipped]
        if new:
            self._warned_skipped.update(new)
            rank_zero_warn(
                f"KD loss(es) {', '.join(new)} left out of a training step with a batch of "
                f"{batch_size} sample(s): they relate the samples of a batch to each other and "
                "need at least 2 (such a batch is the last of an epoch, or of a k-space shape, "
                "when the slice count leaves a remainder of 1); the step trains with the other "
                "terms. Warned once per loss."
            )


def load_module_weights(
    module: nn.Module, checkpoint: PathLike, attr_name: str = "distillation"
) -> Dict[str, Any]:
    """Load the weights of a Lightning checkpoint written by a fit with
    :class:`DistillationCallback` into ``module``, without the callback: the checkpoint is
    read with ``torch.load(weights_only=True)`` and every key except the KD parameters
    (``{attr_name}.*``, which the module has only while the callback fits it) is loaded
    strictly by name (weights of a ``torch.compile``d network under either name).

    Args:
        module: the module (or network) the checkpoint's ``state_dict`` was saved from.
        checkpoint: the Lightning checkpoint (``.ckpt``).
        attr_name: the callback's ``attr_name``.

    Returns:
        The checkpoint dict (epoch, hyper-parameters, ...), for the caller to read.

    Raises:
        CheckpointError: an unreadable file, no ``state_dict``, or keys that do not match
            (all missing, unexpected and mis-shaped keys listed, with the file's name).
    """
    ckpt = read_checkpoint(checkpoint)
    state = ckpt.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{checkpoint}: no 'state_dict' entry (not a Lightning checkpoint)")
    kept = match_compiled_names(_without_kd_keys(state, attr_name), module.state_dict().keys())
    load_state_dict_strict(module, kept, source=str(checkpoint))
    return ckpt


def _without_kd_keys(state: Mapping[str, Any], attr_name: str) -> Dict[str, Any]:
    """A module's state dict without the KD parameters (``{attr_name}.*``), which the module
    has only while :class:`DistillationCallback` fits it."""
    prefix = f"{attr_name}."
    return {k: v for k, v in state.items() if not (isinstance(k, str) and k.startswith(prefix))}
