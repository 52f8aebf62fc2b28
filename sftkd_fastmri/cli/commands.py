"""What each ``sftkd-fastmri`` command does once its arguments are parsed: merge the config
file with the flags, check what the library cannot, call the library and print the result.
The parser and the error handling are in :mod:`sftkd_fastmri.cli.main`."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from .._io import atomic_write_text
from .options import ROLE_CHOICES, boolean, load_config, nonnegative_int, resolve

TRAIN_GROUPS = ("data", "optim", "trainer", "runtime")
STUDENT_PRESET = "dccnn_d3c5"  # the model `distill` trains unless told otherwise


def _cfg(args: argparse.Namespace, groups, extra=(), config: Optional[Dict] = None) -> Dict:
    """Defaults < ``--config`` file (``config``: that file already read) < flags."""
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "func", "config")}
    if config is None:
        config = load_config(args.config)
    cfg = resolve(groups, config, flags, extra_keys=extra, source=args.config or "config")
    return _precision_that_runs(cfg)


def _precision_that_runs(cfg: Dict) -> Dict:
    """``cfg`` with the precision Lightning will run: on a CPU it runs ``16-mixed`` as
    ``bf16-mixed`` (no float16 autocast there), which the run record must say, so that the
    run resumes under the name of what ran, and resuming it in float16 on a GPU is refused
    rather than switch arithmetic mid-run."""
    from .._precision import canonical_precision, precision_that_runs

    precision = cfg.get("precision")
    if precision is None:
        return cfg
    runs = precision_that_runs(precision, cfg.get("accelerator"))
    if runs == canonical_precision(precision):
        return cfg
    warnings.warn(
        f"precision {precision} runs as {runs} on a CPU (no float16 autocast there); the run "
        f"uses and records {runs}",
        stacklevel=2,
    )
    return {**cfg, "precision": runs}


# -- commands -----------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from ..models import create_model, list_models

    print(f"{'preset':<20}{'parameters':>12}  description")
    for name in list_models():
        model = create_model(name)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:<20}{n:>12,}  {_describe(getattr(model, 'config', None))}")
    return 0


def _describe(config: Any) -> str:
    """One line about a preset's network: DxCy for a DC-CNN, else its architecture and
    settings (a registered architecture's config may hold anything)."""
    if not isinstance(config, dict):
        return "(no config)"
    if "architecture" in config:
        settings = ", ".join(f"{k}={v}" for k, v in config.items() if k != "architecture")
        return f"{config['architecture']}: {settings}"
    kind = "paper mode, real" if config.get("pad") else "complex, residual"
    return f"D{config.get('depth')}C{config.get('num_cascades')} {kind}, {config.get('dc_mode')} DC"


def cmd_make_demo_data(args: argparse.Namespace) -> int:
    from ..data.demo import write_demo_data

    kwargs = dict(
        seed=args.seed, overwrite=args.overwrite, progress=not args.quiet, backend=args.backend
    )
    if args.image_size:
        kwargs["image_size"] = tuple(args.image_size)
    if args.num_coils is not None:
        kwargs["num_coils"] = args.num_coils
    if args.volumes is not None:
        kwargs["volumes_per_split"] = args.volumes
    if args.slices is not None:
        kwargs["slices_per_volume"] = args.slices
    try:
        info = write_demo_data(args.out_dir, **kwargs)
    except FileExistsError as err:  # the library's wording names its keyword argument
        raise FileExistsError(str(err).replace("overwrite=True", "--overwrite")) from None
    print(f"demo data ({info.backend}) written to {args.out_dir}")
    return 0


def cmd_holdout_split(args: argparse.Namespace) -> int:
    from ..data.splits import holdout_split

    select_name = args.select_name or f"{args.source}_select"
    result = holdout_split(
        args.data_path,
        args.challenge,
        source=args.source,
        fraction=args.fraction,
        seed=args.seed,
        select_name=select_name,
        test_name=args.test_name,
        mode="copy" if args.copy else "link",
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    # the rest keeps its source's role: val_select of val (or val_small...) for validation
    if args.source.startswith("val"):
        use = f"--val-split {select_name}"
    elif args.source.startswith("train"):
        use = f"--train-split {select_name}"
    else:
        use = f"--train-split or --val-split {select_name}"
    print(
        f"{len(result.select)} volume(s) -> {result.select_dir} (use {use})\n"
        f"{len(result.test)} volume(s) -> {result.test_dir} (use --test-split {args.test_name})"
    )
    return 0


def _print_once(text: str) -> None:
    """Print from rank zero only: under DDP every rank runs the command to its end."""
    from pytorch_lightning.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        print(text)


def cmd_train(args: argparse.Namespace) -> int:
    from ..experiment import run_train

    cfg = _cfg(args, TRAIN_GROUPS + ("model",))
    result = run_train(cfg)
    _print_once(
        f"best checkpoint: {result.best_checkpoint}\nmodel export:    {result.exports['model']}"
    )
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from ..experiment import run_sft

    cfg = _cfg(args, TRAIN_GROUPS + ("sft",))
    result = run_sft(cfg)
    _print_once(
        f"best checkpoint:        {result.best_checkpoint}\n"
        f"teacher export:         {result.exports['teacher']}\n"
        f"student initialisation: {result.exports['student_init']}"
    )
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from ..experiment import run_distill

    config = load_config(args.config)
    if "init_student" in config and "init_checkpoint" not in config:
        # the flag --init-student sets init_checkpoint; as a key, init_student is the SFT
        # stage's option, which distill would ignore and train the student from scratch
        raise SystemExit(
            f"error: {args.config}: distill starts its student from init_checkpoint (the flag "
            "--init-student sets it); init_student is an option of sft. Rename the key to "
            "init_checkpoint"
        )
    cfg = _cfg(args, TRAIN_GROUPS + ("model", "distill"), config=config)
    if "model" not in vars(args) and "model" not in config:
        cfg["model"] = STUDENT_PRESET  # distillation trains a student
    result = run_distill(cfg)
    _print_once(
        f"best checkpoint: {result.best_checkpoint}\nstudent export:  {result.exports['model']}"
    )
    return 0


_SUBSAMPLING_KEYS = (
    "sample_rate",
    "volume_sample_rate",
    "val_sample_rate",
    "val_volume_sample_rate",
    "combine_train_val",
)


def _given(key: str, value: Any) -> bool:
    """Whether a training-data option is set to other than its default (``True == 1.0`` in
    Python, so a flag and a rate are told apart by the key)."""
    if key == "combine_train_val":
        return bool(value)
    return value is not None and value != 1.0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..experiment import check_scored_split, evaluation_device, run_evaluate
    from ..experiment.builders import NoTargetsError
    from ..export.loading import check_role_applies

    config = load_config(args.config)
    _evaluate_keys_from(config, args, args.config or "config")
    cfg = _cfg(args, ("data", "runtime"), extra=_EVALUATE_KEYS, config=config)
    evaluation_device(cfg)  # a device it cannot run on, refused before anything is read
    split = args.split or cfg["test_split"]
    subsampled = [k for k in _SUBSAMPLING_KEYS if _given(k, cfg.get(k))]
    if subsampled:
        warnings.warn(
            f"{' and '.join('--' + k.replace('_', '-') for k in subsampled)} selects training "
            "or validation data; evaluate scores every slice of the split",
            stacklevel=2,
        )
    out_dir = Path(args.out_dir) if args.out_dir else None
    earlier: List[Path] = []
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--eval-out-dir {out_dir} is a file; expected a folder")
        _check_out_of_splits(out_dir, cfg)
        earlier = sorted((out_dir / "reconstructions").glob("*.h5"))
        if (out_dir / "metrics.json").is_file():
            earlier.append(out_dir / "metrics.json")
        if earlier and not args.overwrite:
            raise FileExistsError(
                f"--eval-out-dir {out_dir} holds the results of an earlier evaluation "
                f"({len(earlier)} file(s), e.g. {earlier[0].name}), which this one would mix "
                "with its own (a submission folder must hold one split's volumes only): choose "
                "another folder, or pass --overwrite to replace them once this evaluation "
                "has finished"
            )
    if args.checkpoint:
        check_role_applies(args.checkpoint, args.role)
    try:  # before loading anything: a split without targets has nothing to score
        check_scored_split(cfg, split, "evaluate")
        scored = True
    except NoTargetsError as err:
        if out_dir is None:
            raise NoTargetsError(
                f"{err}; or pass --eval-out-dir DIR to write its reconstructions only"
            ) from None
        scored = False
    label = args.checkpoint or "zero-filled"
    if out_dir is None:
        result = run_evaluate(cfg, args.checkpoint, split=split, role=args.role)
    else:
        result = _evaluate_into(out_dir, scored, cfg, args, split)
    if not scored:
        print(
            f"{label} on {cfg['challenge']}_{split}: no targets, so no scores; "
            f"{len(result.reconstructions)} reconstructions in {out_dir / 'reconstructions'}"
        )
        return 0
    print(f"{label} on {cfg['challenge']}_{split}:")
    print(result.table())
    if out_dir is not None:
        print(f"reconstructions and metrics.json in {out_dir}")
    return 0


#: evaluate's own options, as config keys: key -> (attribute of the parsed flags, check).
_EVALUATE_KEYS = {
    "checkpoint": ("checkpoint", "path"),
    "split": ("split", "text"),
    "role": ("role", ROLE_CHOICES),
    "eval_out_dir": ("out_dir", "path"),
    "overwrite": ("overwrite", "bool"),
}


def _evaluate_keys_from(config: Dict, args: argparse.Namespace, source: str) -> None:
    """evaluate's own options from its ``--config`` file where no flag gave them (flags win,
    as for every other option)."""
    from .options import path_value

    for key, (attr, kind) in _EVALUATE_KEYS.items():
        if key not in config or config[key] is None or getattr(args, attr) not in (None, False):
            continue
        value = config[key]
        if kind == "path":
            value = path_value(value)
        elif kind == "bool":
            value = boolean(value)
        elif isinstance(kind, tuple) and value not in kind:
            raise ValueError(f"{source}: {key}: expected one of {', '.join(kind)}, got {value!r}")
        else:
            value = str(value)
        setattr(args, attr, value)
    if args.role is None:
        args.role = "auto"


def _check_out_of_splits(out_dir: Path, cfg: Dict) -> None:
    """``--eval-out-dir`` must not be a split folder of the data folder nor lie inside one,
    the split being scored or any other (``multicoil_val`` while scoring ``test_full``):
    fastMRI's reader takes every entry of a split folder as a volume, so the
    ``reconstructions/`` and ``metrics.json`` written there would break every later command
    that reads that split. Checked before anything is written."""
    from ..experiment import check_out_of_splits, resolve_data_path

    try:
        data_path = resolve_data_path(cfg)
    except (ValueError, OSError):
        return  # no data folder: reported where the data are read
    check_out_of_splits(out_dir, data_path, "--eval-out-dir")


def _evaluate_into(
    out_dir: Path, scored: bool, cfg: Dict, args: argparse.Namespace, split: str
) -> Any:
    """Evaluate into a hidden staging folder inside ``out_dir``, then swap its
    ``reconstructions/`` and ``metrics.json`` in for the earlier ones all at once: a failed or
    interrupted evaluation leaves the earlier results whole, never a mix of two."""
    from .._io import make_temp_dir, swap_in
    from ..experiment import run_evaluate

    folder = out_dir / "reconstructions"
    # the user's files (hidden ones are temporaries of earlier writes, replaced with the rest)
    others = sorted(
        p.name
        for p in (folder.iterdir() if folder.is_dir() else ())
        if p.suffix != ".h5" and not p.name.startswith(".")
    )
    if others:
        raise FileExistsError(
            f"--eval-out-dir {out_dir}: {folder} holds other files than reconstructions "
            f"({', '.join(others[:3])}), which replacing the folder would remove: choose "
            "another folder"
        )
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = make_temp_dir(out_dir, ".evaluation-")
    try:
        result = run_evaluate(cfg, args.checkpoint, split=split, role=args.role, out_dir=staging)
        filled = [(staging / "reconstructions", folder)]
        if scored:
            # strict JSON: a PSNR of inf (a reconstruction equal to its target) as null, as
            # report.json writes it, not Python's non-standard Infinity
            rows = [m.as_json_dict() for m in result.metrics]
            text = json.dumps(rows, indent=2, allow_nan=False)
            atomic_write_text(staging / "metrics.json", text)
            filled.append((staging / "metrics.json", out_dir / "metrics.json"))
        swap_in(filled, "evaluate", "results")
        if not scored:  # an earlier evaluation's scores do not describe these volumes
            (out_dir / "metrics.json").unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return result


def _complete_demo_data(data_dir: Path) -> bool:
    """Whether ``data_dir`` holds demo data whose writing finished (its manifest says so)."""
    from ..data.demo import MANIFEST_NAME

    try:
        manifest = json.loads((data_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("complete") is True


def _run_study(cfg: Dict) -> int:
    """Run a study and print its table and summary (rank zero's part under DDP)."""
    from ..pipeline import run_study, study_summary

    result = run_study(cfg)
    if result is None:  # a rank other than zero of a multi-device study: rank zero reports
        return 0
    result.report.print()
    print(study_summary(result))
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from ..pipeline import STUDY_DEFAULTS, parse_controls

    groups = ("data", "optim", "trainer", "runtime")
    cfg = _cfg(args, groups, extra=STUDY_DEFAULTS)
    for key, value in STUDY_DEFAULTS.items():
        cfg.setdefault(key, value)
    cfg.setdefault("out_dir", None)
    source = args.config or "the config"
    seeds = cfg.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, (list, tuple)):  # "seeds: 3" read as three seeds, or seed 3?
            raise SystemExit(
                f"error: {source}: seeds: expected a list of seeds such as [0, 1, 2], got "
                f"{seeds!r} (one seed: [{seeds}], or seed: {seeds})"
            )
        try:
            cfg["seeds"] = [nonnegative_int(s) for s in seeds]
        except argparse.ArgumentTypeError as err:
            raise SystemExit(f"error: {source}: seeds: {err} (a list such as [0, 1, 2])") from None
    if "max_epochs" in vars(args) and cfg.get("epochs") is not None:
        # flags override the file: --max-epochs sets every stage's epochs
        print(
            f"note: --max-epochs {args.max_epochs} sets the epochs of every stage; "
            f"{source}'s epochs {cfg['epochs']!r} ignored",
            file=sys.stderr,
        )
        cfg["epochs"] = None
    try:
        cfg["controls"] = list(parse_controls(cfg["controls"]))
    except ValueError as err:
        raise SystemExit(f"error: {source}: {err}") from None
    try:
        cfg["train_first_student_cascade"] = boolean(cfg["train_first_student_cascade"])
    except argparse.ArgumentTypeError as err:
        raise SystemExit(f"error: {source}: train_first_student_cascade: {err}") from None
    return _run_study(cfg)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..data.demo import write_demo_data
    from .demo_config import demo_config

    out_dir = Path(args.out_dir)
    data_dir = Path(args.data_dir) if args.data_dir else out_dir / "data"
    if _complete_demo_data(data_dir):
        print(f"using the demo data in {data_dir}")
    else:  # none yet, or a run stopped while writing them: the writer finishes them
        info = write_demo_data(data_dir, seed=0, progress=not args.quiet, **_DEMO_DATA)
        print(f"demo data ({info.backend}) written to {data_dir}")
    if args.quiet:  # Lightning's per-stage notes (devices, batch limits, tips) as well
        import logging

        for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    cfg = demo_config(data_dir, out_dir, epochs=args.epochs, progress=not args.quiet)
    return _run_study(cfg)


# brain multi-coil only, 3 training volumes: the whole study takes 1-3 minutes on 2 idle cores
_DEMO_DATA = dict(challenges=("multicoil",), volumes_per_split={"train": 3, "val": 2, "test": 2})
