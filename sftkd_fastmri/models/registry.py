"""Model registry: ``create_model(name, **overrides)`` in the manner of timm.

Presets (Matcha et al., MIDL 2023 notation DxCy = x convolutions per block, y cascades):

========================  ======================================================  ==========
name                      what                                                    parameters
========================  ======================================================  ==========
``dccnn_d5c5_paper``      teacher, 1-channel real image, authors' implementation  141,765
``dccnn_d3c5_paper``      student, 1-channel real image, authors' implementation   49,285
``dccnn_d5c5``            teacher, complex (2-channel), residual, hard DC          144,650
``dccnn_d3c5``            student, complex (2-channel), residual, hard DC           52,170
``varnet``                fastMRI's ``VarNet`` with its defaults (12 cascades,  29,936,966
                          chans 18, pools 4; sensitivity net chans 8, pools 4)
========================  ======================================================  ==========

``varnet`` takes fastMRI ``VarNet``'s arguments as overrides (``create_model("varnet",
num_cascades=8, chans=8)``); an SFT pair needs the same ``num_cascades`` on both sides. Its
KD pairings are defined only for output imitation; the feature losses take ``layers``.

"Paper mode" reproduces the authors' code: no residual connection, 5-pixel zero padding
around each block, and a real-valued image (DC keeps the real part). Their uncentred FFT is
equivalent to fastMRI's centred one up to a fixed phase ramp, which data consistency (a
pointwise operation in k-space, applied with the same convention to data and estimate) does
not see, so fastMRI's centred convention (:func:`fastmri.fft2c`) is used throughout.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

from torch import nn

from .dccnn import DCCNN

__all__ = [
    "build_model",
    "create_model",
    "list_architectures",
    "list_models",
    "model_config",
    "register_architecture",
    "register_model",
]

#: Preset name -> its architecture (``None``: a DC-CNN).
_PRESETS: Dict[str, Optional[str]] = {}
_PRESET_CONFIGS: Dict[str, Dict[str, Any]] = {}
#: Architecture name -> ``from_config(config) -> nn.Module`` (besides the DC-CNN and the
#: built-in :class:`~sftkd_fastmri.models.CascadedVarNet`).
_ARCHITECTURES: Dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {}


def register_architecture(name: str, from_config: Callable[[Mapping[str, Any]], nn.Module]):
    """Let :func:`build_model` - and so :func:`~sftkd_fastmri.models.load_model`, ``evaluate``,
    ``export``, ``--init-checkpoint`` and the SFT exports - rebuild a new kind of network.

    The network's ``config`` attribute must return a JSON-like dict holding
    ``architecture=name`` and everything ``from_config`` needs to build it again (fresh
    weights); checkpoints record that dict (:func:`~sftkd_fastmri.models.save_model_checkpoint`).
    Presets of the architecture are then registered with
    ``register_model(preset, architecture=name, **config)``.

    Args:
        name: the value of ``config["architecture"]``.
        from_config: builds the network from such a dict (the ``architecture`` key included);
            raises ``ValueError`` or ``TypeError`` on a config it cannot build.
    """
    from .varnet import VARNET_ARCHITECTURE

    if name in _ARCHITECTURES or name == VARNET_ARCHITECTURE:
        raise ValueError(f"architecture {name!r} is already registered")
    if not callable(from_config):
        raise TypeError(f"from_config must be callable, got {type(from_config).__name__}")
    _ARCHITECTURES[name] = from_config


def list_architectures() -> List[str]:
    """Architectures :func:`build_model` rebuilds besides the DC-CNN (whose configs have no
    ``architecture`` key)."""
    from .varnet import VARNET_ARCHITECTURE

    return sorted([VARNET_ARCHITECTURE, *_ARCHITECTURES])


def register_model(name: str, architecture: Optional[str] = None, **config: Any) -> None:
    """Register preset ``name``: a DC-CNN with constructor arguments ``config``, or, with
    ``architecture``, a network of an architecture registered with
    :func:`register_architecture` built from ``config`` (the ``architecture`` key added)."""
    if name in _PRESETS:
        raise ValueError(f"model {name!r} is already registered")
    if architecture is not None and architecture not in list_architectures():
        raise ValueError(
            f"unknown architecture {architecture!r}: register it first with "
            f"register_architecture (known: {', '.join(list_architectures())})"
        )
    _PRESETS[name] = architecture
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
    architecture = _PRESETS[name]
    if architecture is not None:  # its from_config judges the options
        config.update(overrides)
        config["architecture"] = architecture
        return config
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
    (its constructor arguments), a :class:`~sftkd_fastmri.models.CascadedVarNet` (a config
    with ``architecture="cascaded_varnet"``, see its ``config``), or a network of an
    architecture registered with :func:`register_architecture`.

    Raises:
        ValueError: the config builds none of them (the message names the problem).
    """
    from .varnet import VARNET_ARCHITECTURE, CascadedVarNet

    if not isinstance(config, Mapping):
        raise ValueError(f"a model config is a mapping, got {config!r}")
    architecture = config.get("architecture")
    if architecture == VARNET_ARCHITECTURE:
        return CascadedVarNet.from_config(config)
    if architecture in _ARCHITECTURES:
        try:
            return _ARCHITECTURES[architecture](config)
        except TypeError as err:  # e.g. unknown keyword arguments
            raise ValueError(f"not a {architecture} config ({err})") from None
    if architecture is not None:
        raise ValueError(
            f"unknown architecture {architecture!r} (known: DC-CNN configs without the key, "
            f"{', '.join(repr(a) for a in list_architectures())}); a network of a new "
            "architecture is rebuilt once it is registered (register_architecture)"
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
    model = DCCNN(**config) if _PRESETS[name] is None else build_model(config)
    model.preset = name
    return model


_PAPER = dict(chans=32, in_chans=1, residual=False, dc_mode="hard", pad=5)
_COMPLEX = dict(chans=32, in_chans=2, residual=True, dc_mode="hard", pad=0)
register_model("dccnn_d5c5_paper", num_cascades=5, depth=5, **_PAPER)
register_model("dccnn_d3c5_paper", num_cascades=5, depth=3, **_PAPER)
register_model("dccnn_d5c5", num_cascades=5, depth=5, **_COMPLEX)
register_model("dccnn_d3c5", num_cascades=5, depth=3, **_COMPLEX)
# fastMRI's VarNet (Sriram et al., MICCAI 2020) with the constructor defaults of
# fastmri.models.VarNet, through the cascade protocol: a teacher or student of its own kind
register_model(
    "varnet",
    architecture="cascaded_varnet",
    num_cascades=12,
    sens_chans=8,
    sens_pools=4,
    chans=18,
    pools=4,
    mask_center=True,
)
