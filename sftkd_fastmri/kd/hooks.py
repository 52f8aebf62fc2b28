"""Feature capture with forward hooks on named submodules (plain torch, no Lightning).

Knowledge distillation needs intermediate tensors of the student and the teacher. Instead of a
second "features" copy of each network, forward hooks are registered on the named submodules
(``dict(model.named_modules())`` names, e.g. ``"cascades.2.cnn.relu1"``) and record their
outputs while the ordinary forward pass runs - the approach of torchdistill (Matsubara,
"torchdistill: A Modular, Configuration-Driven Framework for Knowledge Distillation",
RRPR 2021), written here from scratch.

The empty name ``""`` denotes the model itself, as in :meth:`torch.nn.Module.named_modules`:
hooking it records the network's final output (what output imitation compares).

With ``record_calls=True`` the model's own forward inputs (positional and keyword arguments)
and output are recorded too, so that a teacher can be called with exactly the arguments the
student received (:attr:`FeatureCapture.calls`).
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from torch import nn
from torch.utils.hooks import RemovableHandle

from ..models.checkpoint import compiled_inner
from ..models.dccnn import output_only_hook
from .deferred import KEEPS_OUTPUT, tap_feature

__all__ = ["FeatureCapture", "ForwardCall", "find_module"]


@dataclass
class ForwardCall:
    """One call of the captured model's ``forward``.

    Attributes:
        args: Positional arguments as received (after any other pre-hooks).
        kwargs: Keyword arguments as received.
        output: What ``forward`` returned (``None`` until it has returned).
    """

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    output: Any = None
    finished: bool = field(default=False, repr=False)


def find_module(model: nn.Module, name: str, role: str = "model") -> nn.Module:
    """The submodule of ``model`` called ``name`` (``""`` is ``model`` itself).

    Args:
        model: Network to search.
        name: Dotted submodule name as listed by ``model.named_modules()`` (of a
            ``torch.compile``'d network: its own names, or those of the network it compiles).
        role: How to call ``model`` in the error message (e.g. ``"student"``).

    Raises:
        KeyError: If there is no such submodule; the message lists the closest names.
    """
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    inner = compiled_inner(model)
    if inner is not model:  # the layers of a torch.compile'd network, by their plain names
        return find_module(inner, name, role)
    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=6, cutoff=0.6)
    # Names sharing the parent path are often what was meant (e.g. relu3 in a depth-3 block).
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    siblings = [n for n in names if parent and n.startswith(parent + ".") and n not in close]
    hint = close + siblings[: max(0, 8 - len(close))]
    raise KeyError(
        f"{role} {type(model).__name__} has no submodule {name!r}; "
        + (f"similar names: {', '.join(hint)}" if hint else f"e.g. {', '.join(names[:8])}")
        + " (see model.named_modules(); '' is the model itself)"
    )


class FeatureCapture:
    """Record the outputs of named submodules of ``model`` during its normal forward pass.

    The hooks only record while :attr:`enabled` is true; recorded tensors are kept (with their
    autograd history, unless ``detach=True``) until :meth:`clear`. A training loop clears once
    per step, so memory holds one step's features at most, and these are mostly tensors that
    autograd keeps for the backward pass anyway.

    Example:
        >>> with FeatureCapture(model, ["cascades.0.cnn.relu1", ""], record_calls=True) as cap:
        ...     out = model(kspace, mask)
        ...     feats = cap.features()  # [relu1 output (B, 32, H, W), out (B, H, W)]
        ...     args, kwargs = cap.single_call().args, cap.single_call().kwargs

    Args:
        model: Network whose submodules are hooked (not copied or modified otherwise).
        layers: Submodule names, ``""`` for the model's output. Duplicates are ignored.
        record_calls: Also record ``model``'s forward arguments and outputs (:attr:`calls`).
        detach: Store detached outputs (for a frozen teacher; saves nothing under
            ``torch.no_grad()``, where outputs carry no history anyway).
        enabled: Initial value of :attr:`enabled`.
        role: Name used in error messages (``"student"``, ``"teacher"``).
        store: Layers whose outputs are kept (default: all); the others are only passed to
            ``listener``, so they are freed as soon as the model no longer needs them.
        listener: Called as ``listener(name, output)`` for every recorded output, e.g. to
            reduce it on the spot.
        tap: Layers whose outputs are replaced by :func:`~sftkd_fastmri.kd.deferred.tap_feature`
            of them (the same values; the model's later layers receive the tapped tensor), so
            that losses can defer their gradients on them (see :mod:`sftkd_fastmri.kd.deferred`).
            Only modules marked :data:`~sftkd_fastmri.kd.deferred.KEEPS_OUTPUT` are tapped;
            the others' outputs are passed on as they are.

    Raises:
        KeyError: If a layer name does not exist in ``model`` (listing similar names).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        *,
        record_calls: bool = False,
        detach: bool = False,
        enabled: bool = True,
        role: str = "model",
        store: Optional[Sequence[str]] = None,
        listener: Optional[Callable[[str, Any], None]] = None,
        tap: Sequence[str] = (),
    ) -> None:
        if isinstance(layers, str):
            raise TypeError(f"layers must be a sequence of names, got the string {layers!r}")
        self.model = model
        self.role = role
        self.detach = detach
        self.enabled = enabled
        self.record_calls = record_calls
        self._layers: List[str] = list(dict.fromkeys(layers))
        self._store = set(self._layers if store is None else store)
        unknown = sorted(self._store - set(self._layers))
        if unknown:
            raise ValueError(f"store names layers that are not captured: {unknown}")
        self.listener = listener
        self._tap = set(tap)
        untapped = sorted(self._tap - set(self._layers))
        if untapped:
            raise ValueError(f"tap names layers that are not captured: {untapped}")
        modules = {name: find_module(model, name, role) for name in self._layers}
        self._outputs: Dict[str, List[Any]] = {name: [] for name in self._layers}
        self._order: List[Tuple[str, Any]] = []
        self._calls: List[ForwardCall] = []
        self._handles: List[RemovableHandle] = []
        for name, module in modules.items():
            # The hook reads only the output, so a DC-CNN block's ReLU may still run in place.
            hook = output_only_hook(self._output_hook(name, module))
            self._handles.append(module.register_forward_hook(hook))
        if record_calls:
            self._handles.append(model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._call_hook))

    # -- hooks ------------------------------------------------------------------------------
    def _output_hook(self, name: str, module: nn.Module):
        # A module whose later layers may overwrite its output in place is not tapped.
        tapped = name in self._tap and getattr(module, KEEPS_OUTPUT, False)

        def hook(module: nn.Module, args: Tuple[Any, ...], output: Any) -> Any:
            if self.enabled:
                if self.detach and hasattr(output, "detach"):
                    output = output.detach()
                replaced = (
                    tap_feature(output, getattr(module, "fresh_output_gradient", False))
                    if tapped
                    else output
                )
                if self.listener is not None:
                    self.listener(name, replaced)
                if name in self._store:
                    self._outputs[name].append(replaced)
                    self._order.append((name, replaced))
                if replaced is not output:
                    return replaced
            return None

        return hook

    def _pre_hook(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        if self.enabled:
            self._calls.append(ForwardCall(tuple(args), dict(kwargs)))

    def _call_hook(self, module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
        # Calls nest only through recursion into the same module, which DC-CNN and VarNet never
        # do; the innermost unfinished call is the one returning.
        if self.enabled:
            for call in reversed(self._calls):
                if not call.finished:
                    call.output, call.finished = output, True
                    break

    # -- access -----------------------------------------------------------------------------
    @property
    def layers(self) -> List[str]:
        """The hooked layer names, in the order given."""
        return list(self._layers)

    @property
    def calls(self) -> List[ForwardCall]:
        """Recorded forward calls of the model since the last :meth:`clear`."""
        return list(self._calls)

    def single_call(self) -> ForwardCall:
        """The one forward call of the model since the last :meth:`clear`.

        Raises:
            RuntimeError: If ``record_calls`` is off, or the model ran zero or several times.
        """
        if not self.record_calls:
            raise RuntimeError("FeatureCapture was created with record_calls=False")
        if len(self._calls) != 1:
            raise RuntimeError(
                f"expected exactly one forward call of the {self.role} "
                f"({type(self.model).__name__}) since the last clear(), got {len(self._calls)}"
            )
        return self._calls[0]

    def outputs(self, name: str) -> List[Any]:
        """Every output recorded for ``name`` since the last :meth:`clear`, in call order."""
        if name not in self._outputs:
            raise KeyError(f"layer {name!r} is not captured; captured: {self._layers}")
        if name not in self._store:
            raise KeyError(
                f"layer {name!r} is hooked but its outputs are not stored (only passed to the "
                f"listener); stored: {sorted(self._store)}"
            )
        return list(self._outputs[name])

    def __getitem__(self, name: str) -> Any:
        """The output of layer ``name`` in this step.

        Raises:
            KeyError: If ``name`` is not captured.
            RuntimeError: If the layer ran zero or several times since the last clear (a
                feature must come from one well-defined forward pass).
        """
        outs = self.outputs(name)
        if len(outs) != 1:
            raise RuntimeError(
                f"{self.role} layer {name!r} ran {len(outs)} times since the last clear(); "
                "expected exactly once (was the forward pass run, and only once, with capture "
                "enabled?)"
            )
        return outs[0]

    def features(self, names: Optional[Sequence[str]] = None) -> List[Any]:
        """The outputs of ``names`` (default: all hooked layers), one each, in that order."""
        return [self[name] for name in (self._layers if names is None else names)]

    @property
    def records(self) -> List[Tuple[str, Any]]:
        """``(layer name, output)`` in the order the hooks fired since the last clear."""
        return list(self._order)

    # -- lifecycle --------------------------------------------------------------------------
    def clear(self) -> None:
        """Drop every recorded output and call (frees the tensors)."""
        for outs in self._outputs.values():
            outs.clear()
        self._order.clear()
        self._calls.clear()

    @contextmanager
    def recording(self, clear: bool = True) -> Iterator[FeatureCapture]:
        """Enable recording inside the block (clearing first), restoring the previous state."""
        if clear:
            self.clear()
        previous, self.enabled = self.enabled, True
        try:
            yield self
        finally:
            self.enabled = previous

    @property
    def active(self) -> bool:
        """Whether the hooks are still registered."""
        return bool(self._handles)

    def remove(self) -> None:
        """Unregister every hook and drop the recorded tensors (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> FeatureCapture:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"FeatureCapture({self.role}={type(self.model).__name__}, layers={self._layers}, "
            f"record_calls={self.record_calls}, enabled={self.enabled}, active={self.active})"
        )
