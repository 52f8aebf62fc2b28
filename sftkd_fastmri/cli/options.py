"""Options shared by the commands, YAML config files, and their merging.

One option table serves argparse (flags), YAML configs and defaults, so a value has one name
everywhere: ``--max-epochs 3`` on the command line, ``max_epochs: 3`` in a config file.
Precedence: built-in default < config file < command-line flag.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import yaml

from .._precision import check_precision

__all__ = [
    "GROUPS",
    "OPTIONS",
    "ROLE_CHOICES",
    "Option",
    "add_options",
    "boolean",
    "compile_value",
    "fraction_or_count",
    "load_config",
    "mapping_option",
    "overrides_option",
    "resolve",
]


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


#: The true/false converter of the flags, for commands' own keys (e.g. the study's ``controls``).
boolean = _bool


def _number(text: Any, kind: type) -> Any:
    if isinstance(text, bool):
        raise argparse.ArgumentTypeError(f"expected a number, got {text}")
    try:
        if kind is int:
            value = float(text) if isinstance(text, float) else int(str(text).strip())
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                value = int(value)
            return value
        return float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None


def positive_int(text: Any) -> int:
    """An integer >= 1 (epochs, batch size, acceleration, ...)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def nonnegative_int(text: Any) -> int:
    """An integer >= 0 (seeds, workers)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_number(text: Any) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def nonnegative_number(text: Any) -> float:
    value = _number(text, float)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def open_fraction(text: Any) -> float:
    """A fraction strictly between 0 and 1 (fully sampled centre fraction)."""
    value = _number(text, float)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return value


def rate(text: Any) -> float:
    """A fraction in (0, 1] (sample rates)."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def text_value(text: Any) -> str:
    """One text value (a config file's list or mapping is refused)."""
    if isinstance(text, (dict, list, tuple)):
        raise argparse.ArgumentTypeError(f"expected a single value, got {text!r}")
    return str(text)


#: ``--role`` of evaluate and export: which network of an SFT checkpoint (``auto``: the
#: teacher of an SFT checkpoint, the one network of any other).
ROLE_CHOICES = ("auto", "teacher", "student")


def path_value(text: Any) -> str:
    """A file or folder path; ``~`` is expanded (a config file's value, or ``--opt=~/x``,
    which the shell leaves as it is)."""
    return os.path.expanduser(text_value(text))


def precision_value(text: Any) -> str:
    """argparse type of ``--precision``: Lightning's names, the 16-bit "true" ones refused."""
    try:
        return check_precision(text_value(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def compile_value(text: Any) -> Any:
    """argparse type of ``--compile``: ``false`` (eager), ``true`` (``torch.compile``'s default
    backend) or the name of a ``torch.compile`` backend (e.g. ``aot_eager``)."""
    if isinstance(text, bool):
        return text
    value = text_value(text).strip()
    if value.lower() in ("0", "1", "true", "false", "yes", "no", "on", "off"):
        return _bool(value)
    from torch._dynamo import list_backends

    if value not in list_backends(exclude_tags=()):  # debugging backends included
        raise argparse.ArgumentTypeError(
            f"expected true, false or a torch.compile backend (e.g. "
            f"{', '.join(sorted(list_backends()))}), got {text!r}"
        )
    package = _BACKEND_PACKAGES.get(value)
    if package is not None and importlib.util.find_spec(package) is None:
        # registered with torch.compile, but it would fail at the first training step
        raise argparse.ArgumentTypeError(
            f"the torch.compile backend {value!r} needs the package {package!r}, which is not "
            "installed"
        )
    return value


#: torch.compile backends registered by torch whose compiler lives in another package.
_BACKEND_PACKAGES = {
    "tvm": "tvm",
    "openxla": "torch_xla",
    "openxla_eval": "torch_xla",
    "onnxrt": "onnxruntime",
    "tensorrt": "torch_tensorrt",
    "torch_tensorrt": "torch_tensorrt",
    "ipex": "intel_extension_for_pytorch",
}


def fraction_or_count(text: Any):
    """argparse type of ``--limit-*-batches`` (see :func:`..experiment.builders.batch_limit`)."""
    from ..experiment.builders import batch_limit

    try:
        return batch_limit(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def mapping_option(text: str) -> Dict[str, Any]:
    """``at=1.0,imitation=0.5`` (a bare name means 1.0) or JSON -> dict."""
    if isinstance(text, dict):
        return dict(text)
    if not isinstance(text, str):
        raise argparse.ArgumentTypeError(
            f"expected a mapping (name=value,... or {{name: value}}), got {text!r}"
        )
    text = text.strip()
    if text.startswith("{"):
        return json.loads(text)
    out: Dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = item.partition("=")
        out[key.strip()] = yaml.safe_load(value) if value else 1.0
    return out


_YAML_11_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def overrides_option(text: str) -> Dict[str, Any]:
    """``chans=16,dc_mode=soft`` or JSON -> dict: as :func:`mapping_option`, but every item
    needs its value (a bare name would be read as ``1.0``), and ``1e-3`` is a number (YAML
    1.1, which PyYAML reads, takes exponents without a decimal point as text)."""
    out = {
        k: float(v) if isinstance(v, str) and _YAML_11_FLOAT.fullmatch(v.strip()) else v
        for k, v in mapping_option(text).items()
    }
    if isinstance(text, str) and not text.strip().startswith("{"):
        bare = [p.strip() for p in text.split(",") if p.strip() and "=" not in p]
        if bare:
            raise argparse.ArgumentTypeError(
                f"expected KEY=VALUE items (e.g. chans=16,dc_mode=soft), got {', '.join(bare)} "
                "without a value"
            )
    return out


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    help: str
    type: Optional[Callable] = None
    nargs: Optional[str] = None
    choices: Optional[Sequence[Any]] = None


_O = Option
GROUPS: Dict[str, List[Option]] = {
    "data": [
        _O(
            "data_path",
            None,
            "fastMRI-layout folder holding {challenge}_{split} sub-folders "
            "(e.g. .../knee or .../brain); see also --data-config",
            path_value,
        ),
        _O(
            "data_config",
            None,
            "fastMRI's fastmri_dirs.yaml; with --dataset knee|brain it supplies data_path",
            path_value,
        ),
        _O(
            "dataset",
            None,
            "key prefix in --data-config: 'knee' or 'brain'",
            text_value,
            choices=("knee", "brain"),
        ),
        _O(
            "challenge",
            "singlecoil",
            "singlecoil or multicoil",
            text_value,
            choices=("singlecoil", "multicoil"),
        ),
        _O("train_split", "train", "training split name", text_value),
        _O("val_split", "val", "validation split name (checkpoint selection)", text_value),
        _O("test_split", "test", "held-out split for evaluation", text_value),
        _O(
            "mask_type",
            "random",
            "fastMRI mask type",
            text_value,
            choices=("random", "equispaced", "equispaced_fraction", "magic", "magic_fraction"),
        ),
        _O("center_fractions", [0.08], "fully sampled centre fraction(s)", open_fraction, "+"),
        _O("accelerations", [4], "acceleration(s)", positive_int, "+"),
        _O(
            "fixed_mask",
            False,
            "one mask for every slice, drawn from --seed (the paper's protocol)",
            _bool,
        ),
        _O("mask_path", None, ".npy file with a fixed 1-D mask (W,)", path_value),
        _O(
            "kspace_from_target",
            False,
            "simulate single-coil k-space from the target magnitude (the paper's protocol on "
            "magnitude images; on multi-coil files too, the networks are then single-coil)",
            _bool,
        ),
        _O("sample_rate", 1.0, "fraction of training slices to use", rate),
        _O(
            "volume_sample_rate",
            None,
            "fraction of training volumes to use (all their slices); not with --sample-rate",
            rate,
        ),
        _O(
            "val_sample_rate",
            None,
            "fraction of validation slices to use (a faster validation; default: all)",
            rate,
        ),
        _O(
            "val_volume_sample_rate",
            None,
            "fraction of validation volumes to use (all their slices); not with --val-sample-rate",
            rate,
        ),
        _O(
            "combine_train_val",
            False,
            "train on the training and validation splits together (fastMRI's option, e.g. for "
            "a leaderboard submission; validation metrics are then on training data)",
            _bool,
        ),
        _O(
            "dataset_cache",
            True,
            "remember each volume's header between runs, so unchanged files are not opened "
            "to scan a split (in $SFTKD_FASTMRI_CACHE_DIR, else ~/.cache/sftkd_fastmri); "
            "a file read again whenever its size, times or inode changed",
            _bool,
        ),
        _O("batch_size", 4, "batch size", positive_int),
        _O("num_workers", 0, "DataLoader workers", nonnegative_int),
        _O(
            "persistent_workers",
            False,
            "keep DataLoader workers between epochs (faster where workers are spawned; a "
            "resumed run then draws other training masks than the uninterrupted run)",
            _bool,
        ),
        _O("seed", 0, "random seed (weights, masks, shuffling)", nonnegative_int),
    ],
    "optim": [
        _O("lr", 1e-3, "Adam learning rate", positive_number),
        _O("lr_step_size", 40, "StepLR step (epochs)", positive_int),
        _O("lr_gamma", 0.1, "StepLR decay", positive_number),
        _O("weight_decay", 0.0, "Adam weight decay", nonnegative_number),
        _O("loss", "l1", "reconstruction loss", text_value),
    ],
    "trainer": [
        _O("out_dir", None, "output folder (checkpoints, logs, exports)", path_value),
        _O("max_epochs", 150, "training epochs", positive_int),
        _O(
            "limit_train_batches",
            1.0,
            "training batches per epoch: a fraction (0.5; 1.0 = all) or a number (1 = one batch)",
            fraction_or_count,
        ),
        _O(
            "limit_val_batches",
            1.0,
            "validation batches: a fraction (0.5; 1.0 = all) or a number (1 = one batch)",
            fraction_or_count,
        ),
        _O("accumulate_grad_batches", 1, "gradient accumulation", positive_int),
        _O(
            "resume",
            True,
            "resume from out_dir/checkpoints/last.ckpt when it exists (false: start over "
            "there, removing the earlier run's checkpoints, exports and done.json; logs stay)",
            _bool,
        ),
        _O(
            "strategy",
            "auto",
            "Lightning strategy, e.g. ddp (auto: ddp on several devices)",
            text_value,
        ),
        _O(
            "num_nodes",
            1,
            "machines of a multi-node DDP run (with --devices per machine)",
            positive_int,
        ),
        _O(
            "compile",
            False,
            "torch.compile the trained network: true (PyTorch's default backend, inductor), "
            "false, or a backend name (e.g. aot_eager); the first steps then compile it",
            compile_value,
        ),
        _O(
            "logger",
            "csv",
            "csv, tensorboard (needs the tensorboard package) or none",
            text_value,
            choices=("csv", "tensorboard", "none"),
        ),
    ],
    "runtime": [
        _O("accelerator", "auto", "Lightning accelerator: auto, cpu, gpu", text_value),
        _O("devices", 1, "number of devices", positive_int),
        _O(
            "precision",
            "32-true",
            "Lightning precision, e.g. 32-true, 16-mixed, bf16-mixed (not 16-true or bf16-true)",
            precision_value,
        ),
        _O("progress", True, "show progress bars", _bool),
    ],
    "model": [
        _O("model", "dccnn_d5c5", "model preset (see `sftkd-fastmri models`)", text_value),
        _O("model_overrides", {}, "preset overrides, e.g. chans=16,dc_mode=soft", overrides_option),
        _O(
            "init_checkpoint",
            None,
            "initialise the model from this checkpoint (strict)",
            path_value,
        ),
    ],
    "sft": [
        _O("teacher", "dccnn_d5c5", "teacher preset", text_value),
        _O("student", "dccnn_d3c5", "student preset", text_value),
        _O("teacher_overrides", {}, "teacher preset overrides", overrides_option),
        _O("student_overrides", {}, "student preset overrides", overrides_option),
        _O(
            "init_teacher",
            None,
            "start the teacher from this checkpoint, e.g. a trained teacher's model.pt "
            "(strict; the paper starts from scratch)",
            path_value,
        ),
        _O(
            "init_student",
            None,
            "start the student from this checkpoint (strict; of an SFT checkpoint, its student)",
            path_value,
        ),
        _O(
            "train_first_student_cascade",
            False,
            "add branch 0 (zero-filled input through all student cascades) so S_1 is trained too",
            _bool,
        ),
        _O("teacher_weight", 1.0, "weight of the teacher reconstruction term", nonnegative_number),
        _O(
            "branch_weight",
            1.0,
            "weight of the student-branch reconstruction term",
            nonnegative_number,
        ),
        _O(
            "imitation_weight",
            1.0,
            "weight of the branch-to-teacher imitation term",
            nonnegative_number,
        ),
    ],
    "distill": [
        _O(
            "teacher_checkpoint",
            None,
            "teacher: DC-CNN checkpoint or SFT teacher export",
            path_value,
        ),
        _O(
            "methods",
            {"imitation": 1.0},
            "KD losses and weights, e.g. at=1,imitation=1",
            mapping_option,
        ),
        _O(
            "kd_schedule",
            "joint",
            "joint (paper) or two_stage (KD only, then fine-tuning)",
            text_value,
            choices=("joint", "two_stage"),
        ),
        _O("kd_epochs", None, "two_stage: epochs of the KD-only stage", positive_int),
        _O(
            "layers",
            None,
            "layer pairings per loss as JSON {loss: [[student, teacher], ...]}",
            mapping_option,
        ),
        _O(
            "loss_options", None, "options per loss as JSON {loss: {option: value}}", mapping_option
        ),
    ],
}
OPTIONS: Dict[str, Option] = {o.name: o for group in GROUPS.values() for o in group}


def add_options(
    parser: argparse.ArgumentParser,
    groups: Iterable[str],
    shown_defaults: Optional[Mapping[str, Any]] = None,
    actions: Optional[Mapping[str, type]] = None,
) -> None:
    """Add the options of ``groups`` to ``parser`` with SUPPRESS defaults, so only flags the
    user typed appear in the namespace (the rest come from the config file or defaults).
    ``shown_defaults`` replaces the default the help shows for a command that applies its own
    (``distill`` trains a ``dccnn_d3c5`` student by default); ``actions`` gives options an
    argparse action class (e.g. one merging repeated ``methods``)."""
    shown_defaults = dict(shown_defaults or {})
    actions = dict(actions or {})
    for group_name in groups:
        group = parser.add_argument_group(group_name)
        for opt in GROUPS[group_name]:
            flags = [f"--{opt.name.replace('_', '-')}"]
            if "_" in opt.name:
                flags.append(f"--{opt.name}")
            default = shown_defaults.get(opt.name, opt.default)
            default_text = "" if default in (None, {}) else f" (default: {default})"
            kwargs: Dict[str, Any] = dict(
                dest=opt.name, default=argparse.SUPPRESS, help=opt.help + default_text
            )
            if opt.type is not None:
                kwargs["type"] = opt.type
            if opt.nargs:
                kwargs["nargs"] = opt.nargs
            if opt.choices:
                kwargs["choices"] = opt.choices
            if opt.name in actions:
                kwargs["action"] = actions[opt.name]
            group.add_argument(*flags, **kwargs)


def load_config(path: Optional[str]) -> Dict[str, Any]:
    """Read a YAML config (flat mapping of option names); unknown keys are an error."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: config file {p} does not exist")
    try:
        with open(p) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise SystemExit(f"error: {p} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: {p} must hold a mapping of option: value")
    # Keys may be written like the flags (max-epochs) or like Python names (max_epochs).
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def _typed(key: str, value: Any, source: str) -> Any:
    """A config file's value through the same conversion and checks as the flag's."""
    opt = OPTIONS.get(key)
    if opt is None or opt.type is None or value is None:
        return value
    try:
        if opt.nargs:
            items = value if isinstance(value, (list, tuple)) else [value]
            converted: Any = [opt.type(item) for item in items]
        elif opt.type is mapping_option and isinstance(value, dict):
            converted = value
        else:
            converted = opt.type(value)
        if opt.choices and converted not in opt.choices:
            raise argparse.ArgumentTypeError(
                f"expected one of {', '.join(map(str, opt.choices))}, got {value!r}"
            )
    except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
        raise SystemExit(f"error: {source}: {key}: {err}") from None
    return converted


def _rank() -> int:
    """This process's rank as Lightning reads it from the launcher (0 in a one-process run)."""
    from pytorch_lightning.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def resolve(
    groups: Iterable[str],
    config: Dict[str, Any],
    flags: Dict[str, Any],
    extra_keys: Iterable[str] = (),
    source: str = "config",
) -> Dict[str, Any]:
    """Merge defaults < config < flags for the options of ``groups``."""
    groups = list(groups)
    names = {o.name for g in groups for o in GROUPS[g]} | set(extra_keys)
    unknown = sorted(set(config) - names - set(OPTIONS) - set(extra_keys))
    if unknown:
        raise SystemExit(
            f"error: unknown key(s) in {source}: {', '.join(unknown)}; known keys: "
            f"{', '.join(sorted(names))}"
        )
    ignored = sorted(set(config) - names)
    if ignored and _rank() == 0:
        # options of other commands (a config shared with the pipeline or sft): said, so that
        # a key meant for this command but spelled as another command's is not lost unseen;
        # once, not by every process of a multi-GPU run
        print(
            f"note: {source}: not options of this command, ignored: {', '.join(ignored)}",
            file=sys.stderr,
        )
    values = {o.name: o.default for g in groups for o in GROUPS[g]}
    values.update({k: _typed(k, v, source) for k, v in config.items() if k in names})
    values.update({k: v for k, v in flags.items() if k in names})
    for key in ("center_fractions", "accelerations"):
        if key in values and not isinstance(values[key], (list, tuple)):
            values[key] = [values[key]]
    return values
