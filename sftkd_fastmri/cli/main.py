"""The ``sftkd-fastmri`` command.

Every training command takes a YAML config (``--config``) whose keys are the long option
names (``max_epochs: 3``); flags typed on the command line override it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import os
import re
import signal
import sys
import warnings
from typing import Any, Callable, Iterator, List, Optional

from .commands import (  # noqa: F401  (_print_once: tests import it from here)
    STUDENT_PRESET,
    TRAIN_GROUPS,
    _print_once,
    cmd_demo,
    cmd_distill,
    cmd_evaluate,
    cmd_holdout_split,
    cmd_make_demo_data,
    cmd_models,
    cmd_pipeline,
    cmd_sft,
    cmd_train,
)
from .options import ROLE_CHOICES, add_options, mapping_option, path_value

DESCRIPTION = """\
SFT-KD-Recon for fastMRI: train DC-CNN teachers and students, train a student-friendly
teacher (SFT), distil it into a small student (KD), and compare them.

Typical use on a fastMRI-layout folder (sub-folders {singlecoil,multicoil}_{train,val,test}):

  sftkd-fastmri make-demo-data demo_data                 # offline demo data (no download)
  sftkd-fastmri train --data-path demo_data --challenge multicoil --model dccnn_d5c5 \\
      --out-dir runs/teacher
  sftkd-fastmri evaluate --data-path demo_data --challenge multicoil \\
      --checkpoint runs/teacher/model.pt --split test_full     # a split with targets
  sftkd-fastmri sft --data-path demo_data --challenge multicoil --out-dir runs/sft
  sftkd-fastmri distill --data-path demo_data --challenge multicoil \\
      --teacher runs/sft/sft_teacher.ckpt --init-student runs/sft/sft_student_init.ckpt \\
      --method at --method imitation --out-dir runs/kd_at
  sftkd-fastmri holdout-split /data/knee --challenge singlecoil   # a test split for real data
"""


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=path_value, help="YAML file of options (flags override it)"
    )


# -- parser -------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


#: What each study-level key of a pipeline config means (shown by ``pipeline --help``).
STUDY_KEY_HELP = {
    "teacher": "teacher preset",
    "student": "student preset",
    "teacher_overrides": "preset overrides of the teacher, e.g. {chans: 64}",
    "student_overrides": "preset overrides of the student",
    "methods": "KD methods and weights, each distilled from the standard and the SFT teacher",
    "kd_schedule": "joint (the paper) or two_stage",
    "kd_epochs": "two_stage: epochs of KD alone before the fine-tuning",
    "layers": "KD layer pairings per method (default: the presets' pairings)",
    "loss_options": "options per KD method, e.g. {at: {p: 2}}",
    "epochs": "epochs per stage: a number, or {teacher, student, sft, kd} (default: "
    "max_epochs; a --max-epochs flag replaces it)",
    "controls": "controls of a fair comparison: true (= [a]), false, or [a, b]: (a) the SFT "
    "student initialisation without KD, (b) Std-KD for the SFT and KD epochs together",
    "seeds": "a list of distinct seeds, one full study each, e.g. [0, 1, 2] (default: [seed])",
    "train_first_student_cascade": "SFT branch 0 trains the student's first cascade",
    "teacher_weight": "SFT loss weight of the teacher term",
    "branch_weight": "SFT loss weight of the student-branch term",
    "imitation_weight": "SFT loss weight of the branch-to-teacher imitation term",
    "profile_device": "device of the report's latency and memory columns",
    "figure_volume": "test volume (file name) shown in the reconstruction panel (default: the "
    "first)",
    "title": "report title",
}


def _study_keys_help() -> str:
    from ..pipeline import STUDY_DEFAULTS

    lines = [
        "Study keys (YAML config only; see examples/configs/*.yaml). Outputs go to --out-dir "
        "(default: runs/study):",
    ]
    for key, default in STUDY_DEFAULTS.items():
        shown = "" if default in (None, {}) else f" [default: {default}]"
        lines.append(f"  {key:<28} {STUDY_KEY_HELP.get(key, '')}{shown}")
    return "\n".join(lines)


class _MergeMethods(argparse.Action):
    """``--method at --method fitnet=0.5`` (or ``--methods``): each use adds losses to
    ``methods``; a loss named again takes the later weight."""

    def __call__(self, parser, namespace, values, option_string=None):
        merged = dict(getattr(namespace, self.dest, None) or {})
        merged.update(values)
        setattr(namespace, self.dest, merged)


def _add_distill_short_forms(p: argparse.ArgumentParser) -> None:
    short = p.add_argument_group("short forms")
    short.add_argument(
        "--teacher",
        dest="teacher_checkpoint",
        default=argparse.SUPPRESS,
        help="same as --teacher-checkpoint",
    )
    short.add_argument(
        "--method",
        dest="methods",
        type=mapping_option,
        action=_MergeMethods,
        default=argparse.SUPPRESS,
        help="a KD loss, NAME or NAME=WEIGHT (weight 1 by default); repeat to combine, e.g. "
        "--method at --method imitation=0.5",
    )
    short.add_argument(
        "--init-student",
        "--init_student",
        dest="init_checkpoint",
        default=argparse.SUPPRESS,
        help="same as --init-checkpoint: start the student from this checkpoint (e.g. the SFT "
        "student initialisation)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sftkd-fastmri",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    command("models", cmd_models, "list the model presets and their parameter counts")

    p = command(
        "make-demo-data",
        cmd_make_demo_data,
        "write fastMRI-layout demo splits built from the MNI152 brain template",
    )
    p.add_argument("out_dir", type=path_value, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    p.add_argument(
        "--image-size", type=int, nargs=2, metavar=("H", "W"), help="target size (default: 80 64)"
    )
    p.add_argument("--num-coils", type=_positive_int, help="multi-coil coils (default: 4)")
    p.add_argument(
        "--volumes",
        type=_positive_int,
        help="volumes in every split (default: train 4, val 2, test 2)",
    )
    p.add_argument(
        "--slices",
        type=_positive_int,
        help="slices per volume (default: train 10, val 6, test 6)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "nilearn", "phantom"),
        help="anatomy: nilearn's MNI152 template, a procedural phantom, or auto (nilearn if "
        "installed; default)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="rewrite demo data of another configuration"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command(
        "holdout-split",
        cmd_holdout_split,
        "hold out part of a split (by volume, seeded) as a test split that checkpoint "
        "selection never sees",
    )
    p.add_argument(
        "data_path", type=path_value, help="folder holding the {challenge}_{split} folders"
    )
    p.add_argument("--challenge", required=True, choices=("singlecoil", "multicoil"))
    p.add_argument("--source", default="val", help="split to divide (default: val)")
    p.add_argument(
        "--fraction",
        type=float,
        default=0.2,
        help="held-out fraction of volumes (default: 0.2; rounded, at least one volume each)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default: 0)")
    p.add_argument(
        "--select-name", default=None, help="split name of the rest (default: SOURCE_select)"
    )
    p.add_argument(
        "--test-name",
        default="test_heldout",
        help="split name of the held-out part (default: test_heldout)",
    )
    p.add_argument("--copy", action="store_true", help="copy the files instead of linking them")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the two folders of an earlier holdout-split (only folders its manifest "
        "names; another split folder is never replaced)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar while copying")

    p = command(
        "train", cmd_train, "train a preset, a DC-CNN or varnet (teacher or student, no KD)"
    )
    _add_config(p)
    add_options(p, ("model",) + TRAIN_GROUPS)

    p = command("sft", cmd_sft, "train a student-friendly teacher with unfolded student branches")
    _add_config(p)
    add_options(p, ("sft",) + TRAIN_GROUPS)

    p = command(
        "distill",
        cmd_distill,
        "distil a teacher into a student (AT, FitNets, FSP, SP, CC, output imitation)",
    )
    _add_config(p)
    add_options(
        p,
        ("distill", "model") + TRAIN_GROUPS,
        shown_defaults={"model": STUDENT_PRESET},
        actions={"methods": _MergeMethods},  # --methods and --method combine, in any order
    )
    _add_distill_short_forms(p)

    p = command(
        "evaluate",
        cmd_evaluate,
        "per-volume NMSE/PSNR/SSIM/HFEN of a checkpoint on a split, and reconstructions",
    )
    _add_config(p)
    p.add_argument(
        "--checkpoint",
        type=path_value,
        help="model checkpoint (model.pt, SFT exports) or Lightning checkpoint of this package; "
        "not a deployment export (omit: the zero-filled baseline)",
    )
    p.add_argument("--split", help="split to evaluate (default: test_split)")
    p.add_argument(
        "--role",
        choices=ROLE_CHOICES,
        help="which network of an SFT checkpoint (default: auto)",
    )
    p.add_argument(
        "--eval-out-dir",
        dest="out_dir",
        type=path_value,
        help="write reconstructions/ (and metrics.json for a split with targets); a folder "
        "outside the data folder's split folders; one holding an earlier evaluation needs "
        "--overwrite",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier evaluation in --eval-out-dir (refused without)",
    )
    add_options(p, ("data", "runtime"))

    p = command(
        "pipeline",
        cmd_pipeline,
        "the whole study from one YAML: teacher, student, SFT teacher, Std-KD and SFT-KD "
        "students per method, evaluation on the held-out split, report and figures",
    )
    _add_config(p)
    add_options(p, ("data", "optim", "trainer", "runtime"))
    p.epilog = _study_keys_help()
    p.formatter_class = argparse.RawDescriptionHelpFormatter

    p = command(
        "demo",
        cmd_demo,
        "write demo data and run a reduced study end to end (about 1-3 min on 2 idle CPU cores)",
    )
    p.add_argument(
        "--out-dir",
        type=path_value,
        default="sftkd_demo",
        help="output folder (default: sftkd_demo)",
    )
    p.add_argument("--data-dir", type=path_value, help="demo data folder (default: OUT_DIR/data)")
    p.add_argument(
        "--epochs", type=_positive_int, default=None, help="epochs per stage (default: demo's)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars, no Lightning info lines")
    for hook in _EXTRA_COMMANDS:
        hook(command)
    return parser


_EXTRA_COMMANDS: List[Callable] = []

from .export_command import register as _register_export  # noqa: E402

_EXTRA_COMMANDS.append(_register_export)


def _tune_cpu_allocator() -> None:
    """Without a CUDA device, keep freed memory in the process: CPU training steps run 1.4 to
    2.3 times faster (see :mod:`sftkd_fastmri.allocator`; ``SFTKD_FASTMRI_MALLOC=default``
    opts out)."""
    import torch

    from ..allocator import retain_freed_memory

    if not torch.cuda.is_available():
        retain_freed_memory()


def _worker_message(text: str) -> str:
    """The original message of an error re-raised from a DataLoader worker (PyTorch wraps it
    as ``Caught X in DataLoader worker process N.`` + the worker's traceback)."""
    if not text.startswith("Caught ") or "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    _, sep, original = last.partition(": ")
    worker = text.splitlines()[0][len("Caught ") :].rstrip(".")
    return f"{original} ({worker.split(' in ', 1)[-1]})" if sep else text


_USER_OS_ERRORS = {
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "ENAMETOOLONG")
    if hasattr(errno, name)
}


def _is_input_error(err: Exception) -> bool:
    """Errors that describe the user's input or settings (printed as one ``error:`` line)."""
    # a path through a file (out/afile/sub) or to a folder where a file is expected: the
    # user's paths, named in the OS message
    path_errors = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)
    if isinstance(err, (*path_errors, ValueError, KeyError)):
        return True
    # an optional dependency the chosen option needs (nilearn for the demo's brain anatomy,
    # tensorboard for --logger tensorboard, matplotlib for figures): the message names it
    if isinstance(err, ImportError):
        return True
    # the machine's answer about a path the user can act on: a full disk, no permission, a
    # read-only file system, a name too long (what was written before stays whole)
    if isinstance(err, OSError) and err.errno in _USER_OS_ERRORS:
        return True
    # Lightning's refusal of a setting, e.g. ``accelerator: gpu`` on a machine without one
    return type(err).__name__ == "MisconfigurationException"


@contextlib.contextmanager
def _own_warnings_as_lines() -> Iterator[None]:
    """Print this package's warnings as ``warning: ...`` lines (no source line), as its
    errors are printed; other libraries' warnings keep Python's format."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    default = warnings.showwarning
    shown = set()

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if str(filename).startswith(package):
            if str(message) not in shown:  # e.g. a data-path warning of two code paths
                shown.add(str(message))
                print(f"warning: {message}", file=sys.stderr if file is None else file)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = default


def _stopped_by_sigterm() -> int:
    print(
        "error: stopped by SIGTERM; the same command resumes the run from its last "
        "finished epoch (checkpoints/last.ckpt)",
        file=sys.stderr,
    )
    return 128 + int(signal.SIGTERM)


def _workers_terminated(err: BaseException) -> bool:
    """Whether ``err`` is PyTorch's report of DataLoader workers killed by SIGTERM."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, RuntimeError) and re.search(
            r"DataLoader worker \(pids?[^)]*\) (is|are) killed by signal: Terminated", str(err)
        ):
            return True
        err = err.__cause__ or err.__context__
    return False


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line ``argv``; returns the exit status."""
    default = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        # the DataLoader's "Exception ignored in ... __del__" tracebacks about workers that
        # SIGTERM to the process group killed: the command says in one line it was stopped
        if unraisable.exc_value is not None and _workers_terminated(unraisable.exc_value):
            return
        default(unraisable)

    sys.unraisablehook = hook
    status = 1
    try:
        status = _main(argv)
        return status
    finally:
        if status == 128 + int(signal.SIGTERM):
            gc.collect()  # the stopped run's loader iterators are released under the hook
        sys.unraisablehook = default


def _main(argv: Optional[List[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    _tune_cpu_allocator()
    # Lightning 2.x's own use of a torch pytree API deprecated in recent torch; nothing a user
    # of this command can act on, printed once per run otherwise.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )
    try:
        with _own_warnings_as_lines():
            return args.func(args)
    except SystemExit as stop:
        if type(stop).__name__ == "SIGTERMException":  # Lightning's, with no exit status
            return _stopped_by_sigterm()
        if isinstance(stop.code, str) and stop.code.startswith("error:"):
            print(stop.code, file=sys.stderr)  # a config file's error: exit status 2 too
            return 2
        raise
    except BrokenPipeError:
        # stdout's reader has gone (``sftkd-fastmri models | head -3``): stop quietly, as
        # command-line tools do, and keep the interpreter's final flush from failing too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + int(getattr(signal, "SIGPIPE", 13))
    except Exception as err:
        if _workers_terminated(err):
            # SIGTERM to the whole process group (a scheduler's cancel or preemption): the
            # DataLoader workers die before Lightning stops the run at a batch boundary
            return _stopped_by_sigterm()
        if not _is_input_error(err):
            raise
        # Bad input (missing files, wrong keys, mismatched checkpoints): say what, not a trace.
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {_worker_message(str(message))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
