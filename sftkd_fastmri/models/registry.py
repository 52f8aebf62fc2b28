"""Model registry: ``create_model(name, **overrides)`` in the manner of timm.

Presets (Matcha et al., MIDL 2023 notation DxCy = x convolutions per block, y cascades):

========================  ======================================================  ==========
name                      what                                                    parameters
========================  ======================================================  ==========
``dccnn_d5c5_paper``      teacher, 1-channel real image, authors' implementation  141,765
``dccnn_d3c5_paper``      student, 1-channel real image, authors' implementation   49,285
``dccnn_d5c5``            teacher, complex (2-channel), residual, hard DC          144,650
``dccnn_d3c5``            student, complex (2-channel), residual, hard DC           52,170
========================  ======================================================  ==========

"Paper mode" reproduces the authors' code: no residual connection, 5-pixel zero padding
around each block, and a real-valued image (DC keeps the real part). Their uncentred FFT is
equivalent to fastMRI's centred one up to a fixed phase ramp, which data consistency (a
pointwise operation in k-space, applied with the same convention to data and estimate) does
not see, so fastMRI's centred convention (:func:`fastmri.fft2c`) is used throughout.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping

from torch import nn

from .dccnn import DCCNN

__all__ = ["build_model", "create_model", "list_models", "model_config", "register_model"]

_PRESETS: Dict[str, Callable[..., nn.Module]] = {}
_PRESET_CONFIGS: Dict[str, Dict[str, Any]] = {}


def register_model(name: str, **config: Any) -> None:
    """Register a DC-CNN preset ``name`` with constructor arguments ``config``."""
    if name in _PRESETS:
        raise ValueError(f"model {name!r} is already registered")
    _PRESETS[name] = DCCNN
    _PRESET_CONFIGS[name] = dict(config)


def list_models() -> List[str]:
    """Names of the registered presets."""
    return sorted(_PRESETS)


class OptionError(TypeError, ValueError):
    """An option a constructor does not take (a TypeError, as Python's own; also a
    ValueError, so command lines report it as bad input)."""


def model_config(name: str, **overrides: Any) -> Dict[str, Any]:
    """The constructor arguments of preset ``name`` with ``overrides`` applied."""
    if name not in _PRESETS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    config = dict(_PRESET_CONFIGS[name])
    unknown = set(overrides) - set(DCCNN(num_cascades=1).config)
    if unknown:
        known = ", ".join(sorted(DCCNN(num_cascades=1).config))
        raise OptionError(
            f"unknown option(s) for {name!r}: {', '.join(sorted(unknown))}; known: {known}"
        )
    config.update(overrides)
    return config


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """The network a recorded ``config`` describes (fresh weights): a :class:`DCCNN`
    (its constructor arguments), or a :class:`~sftkd_fastmri.models.CascadedVarNet` (a config
    with ``architecture="cascaded_varnet"``, see its ``config``).

    Raises:
        ValueError: the config builds neither (the message names the problem).
    """
    from .varnet import VARNET_ARCHITECTURE, CascadedVarNet

    if not isinstance(config, Mapping):
        raise ValueError(f"a model config is a mapping, got {config!r}")
    architecture = config.get("architecture")
    if architecture == VARNET_ARCHITECTURE:
        return CascadedVarNet.from_config(config)
    if architecture is not None:
        raise ValueError(
            f"unknown architecture {architecture!r} (known: DC-CNN configs without the key, "
            f"{VARNET_ARCHITECTURE!r})"
        )
    try:
        return DCCNN(**config)
    except TypeError as err:  # unknown keyword arguments
        raise ValueError(f"not a DC-CNN config ({err})") from None


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build preset ``name`` (see :func:`list_models`), e.g. ``create_model("dccnn_d3c5")``.

    Keyword ``overrides`` replace the preset's constructor arguments
    (``num_cascades``, ``depth``, ``chans``, ``in_chans``, ``residual``, ``dc_mode``, ``pad``,
    ``init_lambda``).
    """
    config = model_config(name, **overrides)
    model = _PRESETS[name](**config)
    model.preset = name
    return model


_PAPER = dict(chans=32, in_chans=1, residual=False, dc_mode="hard", pad=5)
_COMPLEX = dict(chans=32, in_chans=2, residual=True, dc_mode="hard", pad=0)
register_model("dccnn_d5c5_paper", num_cascades=5, depth=5, **_PAPER)
register_model("dccnn_d3c5_paper", num_cascades=5, depth=3, **_PAPER)
register_model("dccnn_d5c5", num_cascades=5, depth=5, **_COMPLEX)
register_model("dccnn_d3c5", num_cascades=5, depth=3, **_COMPLEX)
