"""The Lightning precisions the networks cannot run in, and why (one message for every
place that refuses them: the command line, the Lightning modules, the evaluation)."""

from __future__ import annotations

__all__ = [
    "HALF_TRUE_PRECISIONS",
    "canonical_precision",
    "check_precision",
    "precision_that_runs",
]

#: Lightning precisions that cast the whole model to 16 bits: the data-consistency layers'
#: complex FFTs have no half or bfloat16 kernels on the CPU, and no bfloat16 complex dtype.
HALF_TRUE_PRECISIONS = ("16-true", "bf16-true")


def check_precision(name: str, subject: str = "precision {!r}") -> str:
    """``name``, unless it is one of :data:`HALF_TRUE_PRECISIONS` (ValueError, saying why;
    ``subject`` names the setting, formatted with ``name``)."""
    if str(name) in HALF_TRUE_PRECISIONS:
        raise ValueError(
            f"{subject.format(str(name))} casts the whole network to 16 bits, and the "
            "data-consistency FFTs need float32: use 16-mixed or bf16-mixed (the FFTs then "
            "run in float32)"
        )
    return str(name)


#: Lightning's older spellings of a precision, and the setting each stands for.
_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}


def canonical_precision(name: object) -> str:
    """Lightning's name of a precision setting (``32`` and ``32-true`` are one setting)."""
    text = str(name)
    return _ALIASES.get(text, text)


def precision_that_runs(name: object, accelerator: object = "auto") -> str:
    """The precision Lightning runs for ``name`` on ``accelerator`` (canonical): on a CPU,
    ``16-mixed`` runs as ``bf16-mixed`` (there is no float16 autocast there)."""
    precision = canonical_precision(name)
    if precision != "16-mixed":
        return precision
    import torch

    accelerator = str(accelerator or "auto")
    mps = getattr(torch.backends, "mps", None)
    gpu = torch.cuda.is_available() or (mps is not None and mps.is_available())
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not gpu)
    return "bf16-mixed" if on_cpu else precision
