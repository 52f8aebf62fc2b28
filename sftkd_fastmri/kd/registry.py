"""Registry of the distillation losses: ``create_loss(name, **options)`` in the manner of timm.

=============  ============================================  ===============================
name           class                                         options (defaults)
=============  ============================================  ===============================
``at``         :class:`~.losses.AttentionTransfer`           ``p=2``, ``normalize="sample"``,
                                                             ``squared=False``
``fitnet``     :class:`~.losses.FitNet`                      ``student_channels=None``,
                                                             ``teacher_channels=None``
``fsp``        :class:`~.losses.FSP`                         none
``sp``         :class:`~.losses.SimilarityPreserving`        none
``cc``         :class:`~.losses.CorrelationCongruence`       ``gamma=0.4``, ``order=2``,
                                                             ``pool=False``
``imitation``  :class:`~.losses.OutputImitation`             none
=============  ============================================  ===============================
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Type, TypeVar

from ..models.registry import OptionError

if TYPE_CHECKING:
    from .base import KDLoss

__all__ = ["available_losses", "create_loss", "loss_class", "register_loss"]

_LOSSES: Dict[str, type] = {}

L = TypeVar("L", bound=type)


def register_loss(name: str) -> Callable[[L], L]:
    """Class decorator registering a :class:`~.losses.KDLoss` subclass under ``name``.

    The decorator also sets the class attribute ``name``.

    Args:
        name: Registry name, e.g. ``"at"``.

    Returns:
        The decorator, which returns the class unchanged apart from ``name``.

    Raises:
        ValueError: If ``name`` is already registered.
    """

    def decorator(cls: L) -> L:
        if name in _LOSSES:
            raise ValueError(
                f"KD loss {name!r} is already registered (by {_LOSSES[name].__name__}); "
                f"cannot register {cls.__name__} under the same name"
            )
        cls.name = name
        _LOSSES[name] = cls
        return cls

    return decorator


def available_losses() -> List[str]:
    """Sorted names of the registered distillation losses."""
    return sorted(_LOSSES)


def loss_class(name: str) -> Type[KDLoss]:
    """The class registered under ``name``.

    Raises:
        KeyError: If ``name`` is not registered; the message lists the available names.
    """
    if name not in _LOSSES:
        raise KeyError(
            f"unknown KD loss {name!r}; available: {', '.join(available_losses()) or 'none'}"
        )
    return _LOSSES[name]


def create_loss(name: str, **options: Any) -> KDLoss:
    """Build the distillation loss registered as ``name``, e.g. ``create_loss("at", p=2)``.

    Args:
        name: One of :func:`available_losses`.
        **options: Constructor arguments of that loss.

    Returns:
        The loss module.

    Raises:
        KeyError: If ``name`` is not registered.
        TypeError: If an option is not a constructor argument of that loss; the message names
            the bad option(s) and the accepted ones.
    """
    cls = loss_class(name)
    # Losses without options inherit nn.Module.__init__(*args, **kwargs): count only named
    # parameters so that any option given to them is reported.
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(cls.__init__).parameters.values()
    accepted = [p.name for p in params if p.kind in named and p.name != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise OptionError(
            f"unknown option(s) for KD loss {name!r} ({cls.__name__}): {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )
    return cls(**options)
