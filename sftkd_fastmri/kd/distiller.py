"""One distillation step from captured features (plain torch, no Lightning).

:class:`Distiller` ties together the pieces of the KD stage of SFT-KD-Recon (Matcha et al.,
MIDL 2023, Algorithm 1: the student minimises its reconstruction loss plus a weighted
distillation loss from a frozen teacher): forward hooks on the student and the teacher
(:class:`~sftkd_fastmri.kd.hooks.FeatureCapture`), the layer pairings
(:mod:`~sftkd_fastmri.kd.pairings`) and the losses (:func:`~sftkd_fastmri.kd.create_loss`).

The student's forward runs exactly as in any training loop; the hooks record its features and
its forward arguments, and the teacher is then called with those same arguments under
``torch.no_grad()``, so a step costs one student forward + backward and one teacher forward.
The :class:`~sftkd_fastmri.callbacks.DistillationCallback` uses it inside Lightning; in a plain
loop::

    distiller = Distiller(student, teacher, {"at": 1.0, "imitation": 0.5})
    optimizer = torch.optim.Adam([*student.parameters(), *distiller.parameters()])
    with distiller:                            # registers the hooks; removed on exit
        for kspace, mask, target in loader:
            with distiller.step():             # records the student's features in here
                output = student(kspace, mask)
                kd = distiller()               # teacher forward + weighted KD terms
            loss = (output - target).abs().mean() + kd.total
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

Learned KD parameters (FitNet's 1x1 regressors) are parameters of the Distiller (under
``losses.fitnet.``); the student and the teacher are referenced, not registered, so
``distiller.parameters()`` / ``state_dict()`` hold the KD parameters only.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, nn

from ..models.checkpoint import compiled_inner
from ..models.registry import OptionError
from ..models.varnet import batch_low_frequencies
from .base import KDLoss, TeacherSummary
from .hooks import FeatureCapture, find_module
from .pairings import Pairing, layer_channels, resolve_pairings
from .registry import available_losses, create_loss

__all__ = ["Distiller", "KDOutput", "check_loss_weights"]

# torch.OutOfMemoryError from torch 2.5 on; torch.cuda's before (its subclass since).
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def check_loss_weights(losses: Mapping[str, Any]) -> Dict[str, float]:
    """Validate ``{loss name: weight}`` and return it with float weights.

    Raises:
        TypeError: If ``losses`` is not a mapping or a weight is not a real number.
        ValueError: If it is empty, names an unknown loss (the message lists the available
            ones), or a weight is negative or not finite.
    """
    if not isinstance(losses, Mapping):
        raise OptionError(
            f"losses must be a mapping {{loss name: weight}}, e.g. {{'at': 1.0}}, got "
            f"{type(losses).__name__}"
        )
    if not losses:
        raise ValueError(f"losses is empty; give at least one of {available_losses()}")
    unknown = sorted(set(losses) - set(available_losses()))
    if unknown:
        raise ValueError(
            f"unknown KD loss(es) {unknown}; available: {', '.join(available_losses())}"
        )
    weights: Dict[str, float] = {}
    for name, weight in losses.items():
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise OptionError(f"weight of KD loss {name!r} must be a number, got {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of KD loss {name!r} must be finite and >= 0, got {weight}")
        weights[name] = float(weight)
    return weights


@dataclass
class KDOutput:
    """Result of one distillation step.

    Attributes:
        total: ``sum(weight * term)``, a scalar with gradients into the student (and the KD
            parameters).
        terms: Unweighted scalar term of each loss, by name.
        teacher_output: The teacher's output for the step (no gradients).
        skipped: Losses left out of this step because its batch is smaller than they are
            defined on (``skip_small_batches=True``; SP and CC on a batch of one sample).
    """

    total: Tensor
    terms: Dict[str, Tensor]
    teacher_output: Any = None
    skipped: Tuple[str, ...] = ()


class Distiller(nn.Module):
    """Weighted KD terms between a student and a frozen teacher, from forward hooks.

    The teacher is frozen here (``requires_grad_(False)``, ``eval()``) and kept in eval mode
    (a teacher found in training mode before its forward is put back in eval mode, with a
    warning). It is not registered as a submodule, nor is the student.

    Args:
        student: Student network; its forward is called by the training code.
        teacher: Teacher network; called by :meth:`forward` with the student's arguments.
        losses: ``{loss name: weight}``, weights >= 0 (see
            :func:`~sftkd_fastmri.kd.available_losses`).
        layers: Optional ``{loss name: [(student_layer, teacher_layer), ...]}`` replacing the
            default pairings of :func:`~sftkd_fastmri.kd.pairings.default_pairings`.
        loss_options: Optional ``{loss name: {option: value}}`` passed to
            :func:`~sftkd_fastmri.kd.create_loss`. FitNet's ``student_channels`` /
            ``teacher_channels`` are inferred from the paired layers when not given
            (:func:`~sftkd_fastmri.kd.pairings.layer_channels`).
        summarize_teacher: Reduce the teacher features of losses that need only a reduction
            of them (AT's attention maps, FSP's Gram matrices, SP's and CC's batch matrices;
            :attr:`~sftkd_fastmri.kd.KDLoss.teacher_group`) inside the teacher's forward hooks
            and drop the full maps at once, so the teacher's memory during KD no longer holds
            every paired activation. The loss values are the same; ``False`` keeps the maps.
        defer_gradients: Add the gradients of AT (``p = 2``) and FSP on the student's
            activations where the backward pass reaches each activation, fused with the
            gradient arriving there (:mod:`~sftkd_fastmri.kd.deferred`), instead of holding a
            full-size gradient per paired activation from the start of the backward pass. The
            gradients are the same; ``False`` uses the plain autograd path.

    Raises:
        KeyError: A layer name does not exist (similar names are listed).
        ValueError / TypeError: Bad loss names, weights, options or pairings; FSP pairings of
            odd length or with mismatching student / teacher channels.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        losses: Mapping[str, float],
        layers: Optional[Mapping[str, Sequence[Sequence[str]]]] = None,
        loss_options: Optional[Mapping[str, Mapping[str, Any]]] = None,
        summarize_teacher: bool = True,
        defer_gradients: bool = True,
    ) -> None:
        super().__init__()
        if student is teacher:
            raise ValueError("student and teacher must be different modules")
        self.weights = check_loss_weights(losses)
        options = {k: dict(v) for k, v in dict(loss_options or {}).items()}
        stray = sorted(set(options) - set(self.weights))
        if stray:
            raise ValueError(f"loss_options given for {stray}, not among the losses {list(losses)}")
        # Referenced, not registered: neither network belongs to the Distiller's parameters or
        # state_dict, so attaching the Distiller to a LightningModule adds the KD parameters only.
        object.__setattr__(self, "_student", student)
        object.__setattr__(self, "_teacher", teacher)
        teacher.requires_grad_(False).eval()
        self.pairings: Dict[str, Pairing] = resolve_pairings(self.weights, student, teacher, layers)
        self.losses = nn.ModuleDict(
            {name: self._build_loss(name, options.get(name, {})) for name in self.weights}
        )
        self._student_capture: Optional[FeatureCapture] = None
        self._teacher_capture: Optional[FeatureCapture] = None
        self._warned_train_mode = False
        self._teacher_ran = False  # a first failing call gets an explanation
        self.summarize_teacher = bool(summarize_teacher)
        self.defer_gradients = bool(defer_gradients)
        # teacher layer -> [(loss, group index, slot in group)] for summarised losses
        self._summary_slots: Dict[str, List[Tuple[str, int, int]]] = {}
        self._summarized: Set[str] = set()
        raw: List[str] = []
        for name, pairs in self.pairings.items():
            group = self.losses[name].teacher_group if self.summarize_teacher else 0
            if group and len(pairs) % group == 0:
                self._summarized.add(name)
                for pos, (_, t) in enumerate(pairs):
                    self._summary_slots.setdefault(t, []).append((name, pos // group, pos % group))
            else:
                raw.extend(t for _, t in pairs)
        self._raw_teacher_layers = list(dict.fromkeys(raw))
        self._teacher_hits: Counter = Counter()
        self._pending: Dict[Tuple[str, int], Dict[int, Any]] = {}
        self._summaries: Dict[Tuple[str, int], Tuple[Any, List[Any]]] = {}

    # -- construction -----------------------------------------------------------------------
    def _build_loss(self, name: str, options: Dict[str, Any]) -> KDLoss:
        pairs = self.pairings[name]
        if name == "fitnet" and "student_channels" not in options:
            channels = self._channels(pairs)
            if channels is not None:
                options["student_channels"], options["teacher_channels"] = channels
        if name == "fsp":
            self._check_fsp(pairs)
        return create_loss(name, **options)

    def _channels(self, pairs: Pairing) -> Optional[tuple]:
        # Without static channel counts FitNet builds no regressor and raises at the first step
        # if the channels differ, naming the fix (explicit channels in loss_options).
        try:
            return (
                [layer_channels(self.student, s) for s, _ in pairs],
                [layer_channels(self.teacher, t) for _, t in pairs],
            )
        except ValueError:
            return None

    def _check_fsp(self, pairs: Pairing) -> None:
        if len(pairs) % 2:
            raise ValueError(
                "FSP consumes layers in consecutive pairs (first, second), so its pairing needs "
                f"an even number of entries, got {len(pairs)}: {pairs}"
            )
        channels = self._channels(pairs)
        if channels is None:
            return
        (cs, ct) = channels
        for k in range(0, len(pairs), 2):
            if (cs[k], cs[k + 1]) != (ct[k], ct[k + 1]):
                raise ValueError(
                    f"FSP matrices differ in shape for layers {pairs[k]} and {pairs[k + 1]}: "
                    f"student {cs[k]}x{cs[k + 1]}, teacher {ct[k]}x{ct[k + 1]}; pair layers "
                    "with equal channel counts"
                )

    # -- networks ---------------------------------------------------------------------------
    @property
    def student(self) -> nn.Module:
        """The student network (not a registered submodule)."""
        return self._student

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher network (not a registered submodule)."""
        return self._teacher

    def set_teacher(self, teacher: nn.Module) -> None:
        """Replace the teacher by an equivalent module (e.g. a copy cast to another dtype).

        The layer names of the pairings must exist in it; hooks must not be attached.
        """
        if self.attached:
            raise RuntimeError("remove the hooks (remove_hooks()) before replacing the teacher")
        for pairs in self.pairings.values():
            for _, name in pairs:
                find_module(teacher, name, "teacher")
        teacher.requires_grad_(False).eval()
        object.__setattr__(self, "_teacher", teacher)

    @property
    def student_layers(self) -> List[str]:
        """Every student layer used by some loss, without duplicates, in first-use order."""
        return list(dict.fromkeys(s for pairs in self.pairings.values() for s, _ in pairs))

    @property
    def teacher_layers(self) -> List[str]:
        """Every teacher layer used by some loss, without duplicates, in first-use order."""
        return list(dict.fromkeys(t for pairs in self.pairings.values() for _, t in pairs))

    # -- hooks ------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        """Whether the forward hooks are registered."""
        return self._student_capture is not None

    def attach(self) -> Distiller:
        """Register the forward hooks on student and teacher (idempotent); returns ``self``."""
        if not self.attached:
            self._student_capture = FeatureCapture(
                self.student, self.student_layers, record_calls=True, enabled=False,
                role="student", tap=self._tapped_layers(),
            )  # fmt: skip
            self._teacher_capture = FeatureCapture(
                self.teacher, self.teacher_layers, detach=True, enabled=False, role="teacher",
                store=self._raw_teacher_layers, listener=self._on_teacher_output,
            )  # fmt: skip
        return self

    def _tapped_layers(self) -> List[str]:
        """Student layers of the losses that defer their gradients (AT with ``p = 2``, FSP;
        :attr:`~sftkd_fastmri.kd.KDLoss.defers_gradients`)."""
        if not self.defer_gradients:
            return []
        layers = [
            s
            for name, pairs in self.pairings.items()
            if self.losses[name].defers_gradients
            for s, _ in pairs
            if s
        ]
        return list(dict.fromkeys(layers))

    def remove_hooks(self) -> None:
        """Unregister the hooks and drop recorded tensors (idempotent)."""
        for capture in (self._student_capture, self._teacher_capture):
            if capture is not None:
                capture.remove()
        self._student_capture = self._teacher_capture = None
        self._clear_summaries()

    def __enter__(self) -> Distiller:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.remove_hooks()

    # -- one step ---------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Clear the previous step's tensors and start recording the student."""
        self._require_attached()
        self._teacher_capture.clear()
        self._teacher_capture.enabled = False
        self._clear_summaries()
        self._student_capture.clear()
        self._student_capture.enabled = True

    def end_step(self) -> None:
        """Stop recording and drop the step's recorded tensors (the loss keeps what it needs)."""
        for capture in (self._student_capture, self._teacher_capture):
            if capture is not None:
                capture.enabled = False
                capture.clear()
        self._clear_summaries()

    @contextmanager
    def step(self) -> Iterator[Distiller]:
        """``begin_step()`` on entry, ``end_step()`` on exit."""
        self.begin_step()
        try:
            yield self
        finally:
            self.end_step()

    def _require_attached(self) -> None:
        if not self.attached:
            raise RuntimeError(
                "Distiller hooks are not attached: call attach() or use 'with distiller:'"
            )

    def run_teacher(self) -> Any:
        """Run the teacher on the student's recorded forward arguments, without gradients.

        Returns:
            The teacher's output.

        Raises:
            RuntimeError: If the student's forward ran zero or several times in this step.
            TypeError / ValueError: The teacher's first call failed on the student's inputs
                (the two take different arguments), with that explained.
        """
        self._require_attached()
        # Stop recording the student: its features are complete, and later calls (e.g. the
        # recomputation of gradient checkpointing) must not be taken for this step's.
        self._student_capture.enabled = False
        calls = self._student_capture.calls
        if len(calls) != 1:
            raise RuntimeError(
                f"the student ({type(self.student).__name__}) ran {len(calls)} times in this "
                "step; distillation needs exactly one student forward between begin_step() and "
                "the KD loss (calls through student(...), not its submodules)"
            )
        if self.teacher.training:
            if not self._warned_train_mode:
                warnings.warn(
                    "the teacher was in training mode; putting it back in eval mode",
                    stacklevel=2,
                )
                self._warned_train_mode = True
            self.teacher.eval()
        call = calls[0]
        self._clear_summaries()
        with torch.no_grad(), self._teacher_capture.recording():
            try:
                args, kwargs = _teacher_call(self.teacher, call.args, call.kwargs)
                output = self.teacher(*args, **kwargs)
            except (ValueError, TypeError, AttributeError, IndexError, RuntimeError) as err:
                if self._teacher_ran or isinstance(err, _OUT_OF_MEMORY):
                    raise
                # The first call: most likely teacher and student take different inputs (a
                # DC-CNN given a VarNet's integer num_low_frequencies fails with an
                # AttributeError deep inside, a shape mismatch with a RuntimeError).
                shown = ", ".join(_describe_arg(a) for a in call.args)
                raise (TypeError if isinstance(err, (TypeError, AttributeError)) else ValueError)(
                    f"the teacher ({type(self.teacher).__name__}) failed on the student's "
                    f"inputs ({shown}): {err}. The teacher runs on exactly the arguments of "
                    "the student's forward, so both must take the same inputs (a DC-CNN takes "
                    "(masked_kspace, mask, sens_maps), fastMRI's VarNet (masked_kspace, mask, "
                    "num_low_frequencies))"
                ) from err
        self._teacher_ran = True
        return output

    # -- teacher summaries --------------------------------------------------------------------
    def _clear_summaries(self) -> None:
        self._teacher_hits.clear()
        self._pending.clear()
        self._summaries.clear()

    def _on_teacher_output(self, layer: str, output: Any) -> None:
        """Teacher hook listener: reduce every completed group of a summarised loss at once."""
        self._teacher_hits[layer] += 1
        if self._teacher_hits[layer] > 1:
            return  # an error at compute time (the layer must run exactly once)
        for name, group, slot in self._summary_slots.get(layer, ()):
            loss = self.losses[name]
            key = (name, group)
            pending = self._pending.setdefault(key, {})
            pending[slot] = output
            if len(pending) < loss.teacher_group:
                continue
            feats = [pending[i] for i in range(loss.teacher_group)]
            del self._pending[key]
            if all(isinstance(f, Tensor) and (f.dim() == 4 or not loss.requires_4d) for f in feats):
                value = loss.summarize_teacher(feats)
            else:
                value = None  # the loss reports the bad feature from its shape below
            shapes = [tuple(f.shape) if isinstance(f, Tensor) else f for f in feats]
            self._summaries[key] = (value, shapes)

    def _teacher_summaries(self, name: str, pairs: Pairing) -> List[Any]:
        loss = self.losses[name]
        out: List[Any] = []
        for pos, (_, layer) in enumerate(pairs):
            hits = self._teacher_hits[layer]
            if hits != 1:
                raise RuntimeError(
                    f"teacher layer {layer!r} ran {hits} times in this step; expected exactly "
                    "once (was the teacher's forward run, and only once, with capture enabled?)"
                )
            value, shapes = self._summaries[(name, pos // loss.teacher_group)]
            shape = shapes[pos % loss.teacher_group]
            if not isinstance(shape, tuple):  # not a tensor: let the loss name the problem
                out.append(shape)
            else:
                out.append(TeacherSummary(value if pos % loss.teacher_group == 0 else None, shape))
        return out

    def compute_terms(self, skip_small_batches: bool = False) -> Dict[str, Tensor]:
        """Unweighted KD term of every loss from the features recorded in this step.

        Args:
            skip_small_batches: Leave out a loss whose batch is smaller than its
                :attr:`~sftkd_fastmri.kd.KDLoss.min_batch_size` (SP and CC on one sample)
                instead of raising its error.
        """
        self._require_attached()
        terms = {}
        for name, pairs in self.pairings.items():
            student_feats = [self._student_capture[s] for s, _ in pairs]
            if skip_small_batches and _batch_of(student_feats) < self.losses[name].min_batch_size:
                continue
            if name in self._summarized:
                teacher_feats = self._teacher_summaries(name, pairs)
            else:
                teacher_feats = [self._teacher_capture[t] for _, t in pairs]
            terms[name] = self.losses[name](student_feats, teacher_feats)
        return terms

    def weighted_total(self, terms: Mapping[str, Tensor]) -> Tensor:
        """``sum(weight * term)`` over ``terms``."""
        return sum(self.weights[name] * term for name, term in terms.items())

    def forward(self, skip_small_batches: bool = False) -> KDOutput:
        """Teacher forward on the student's arguments, then the weighted KD loss.

        Call after the student's forward, inside :meth:`step` (or after :meth:`begin_step`).

        Args:
            skip_small_batches: Leave out losses not defined on this step's batch size (SP and
                CC on one sample; listed in :attr:`KDOutput.skipped`) instead of raising. If
                every loss is left out, the total is a zero without gradient.

        Returns:
            :class:`KDOutput` with the weighted total, the unweighted terms and the teacher's
            output.
        """
        teacher_output = self.run_teacher()
        terms = self.compute_terms(skip_small_batches)
        skipped = tuple(name for name in self.pairings if name not in terms)
        if terms:
            total = self.weighted_total(terms)
        else:
            total = _zero_like(teacher_output)
        return KDOutput(total, terms, teacher_output, skipped)

    def extra_repr(self) -> str:
        return f"weights={self.weights}, pairings={ {k: len(v) for k, v in self.pairings.items()} }"


def _batch_of(feats: Sequence[Any]) -> int:
    """Batch size of the first tensor feature (a large number when there is none, so that
    nothing is skipped and the loss reports the problem itself)."""
    for feat in feats:
        if isinstance(feat, Tensor) and feat.dim() > 0:
            return int(feat.shape[0])
    return 1 << 30


def _zero_like(output: Any) -> Tensor:
    """A scalar zero on the device of the teacher's output."""
    if isinstance(output, Tensor):
        return output.new_zeros((), dtype=torch.float32)
    return torch.zeros(())


def _describe_arg(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor {tuple(value.shape)}"
    return repr(value) if value is None or isinstance(value, (int, float)) else type(value).__name__


def _teacher_call(
    teacher: nn.Module, args: Sequence[Any], kwargs: Dict[str, Any]
) -> Tuple[Sequence[Any], Dict[str, Any]]:
    """The student's recorded call, fitted to the teacher's forward where it does not bind
    as it is: a VarNet student gets the batch's count of centre columns as the keyword
    ``num_low_frequencies``, which a DC-CNN teacher has no parameter for (left out), and
    fastMRI's own ``VarNet`` takes as its third positional argument (put there, in place of
    the student's ``sens_maps``, which that VarNet estimates itself)."""
    if "num_low_frequencies" not in kwargs:
        return args, kwargs
    try:
        signature = inspect.signature(compiled_inner(teacher).forward)
    except (TypeError, ValueError):  # no signature to read (e.g. TorchScript): as recorded
        return args, kwargs
    try:
        signature.bind(*args, **kwargs)
        return args, kwargs
    except TypeError:
        pass
    rest = {k: v for k, v in kwargs.items() if k != "num_low_frequencies"}
    names = list(signature.parameters)
    if "num_low_frequencies" in names[: len(args)]:
        placed = list(args)
        # fastMRI's VarNet takes one number per batch, not a (B,) tensor
        placed[names.index("num_low_frequencies")] = batch_low_frequencies(
            kwargs["num_low_frequencies"]
        )
        try:
            signature.bind(*placed, **rest)
            return placed, rest
        except TypeError:
            pass
    return args, rest
