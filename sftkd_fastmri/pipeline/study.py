"""The end-to-end SFT-KD study (Matcha et al., MIDL 2023, Table 1 and Fig. 3) in one call.

Stages, each in its own folder under ``out_dir`` (``seed_<s>/<stage>`` for every seed):

1. ``teacher``: the standard teacher (e.g. D5C5) trained alone;
2. ``student``: the student (e.g. D3C5) trained alone, without KD;
3. ``sft``: the student-friendly teacher, trained with unfolded student branches;
4. ``control_sft_init`` (``controls`` holds ``a``; ``true`` is ``[a]``): control (a) of a
   fair comparison - the student initialised from the SFT branches and fine-tuned without KD;
5. for every KD method: ``kd_std_<m>`` (student from scratch, standard teacher) and
   ``kd_sft_<m>`` (student initialised from the SFT branches, SFT teacher), as in the paper;
   with ``controls: [a, b]`` also ``control_budget_<m>``: control (b), Std-KD from scratch
   for the epochs of the SFT stage and the KD stage together (the epochs SFT-KD's student
   has had), so a margin of SFT-KD over it is not a matter of more training.

Checkpoints are selected on the validation split; every model is then scored on the held-out
test split (``test_split``) that no selection has seen. A stage that finished (``done.json``)
is skipped on re-run, after its recorded settings are compared with the study's (those
that define a run of its kind); one that trained fewer epochs than now asked for trains on
from its ``last.ckpt``, one that trained more (or other batches per epoch) is refused. A
stage whose teacher or initialisation came from a stage that has trained on since starts
over (``[redo]``). An interrupted stage resumes from its ``last.ckpt``. Paths in
``done.json`` are relative to the stage folder, so a moved or copied study reads its own
models.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .._io import atomic_write_text
from ..callbacks.networks import check_batch_size
from ..data.datasets import missing_split_hint
from ..evaluation import evaluate_model
from ..evaluation.profile import profile_model
from ..evaluation.report import ModelEntry, Report, build_report, write_report
from ..experiment import (
    StageResult,
    build_datamodule,
    check_kd_schedule,
    check_out_of_splits,
    check_scored_split,
    resolve_data_path,
    run_distill,
    run_sft,
    run_train,
)
from ..export.loading import load_reconstruction_model
from ..kd import available_losses, check_distillation
from ..models import create_model
from ..sft import StudentFriendlyTeacher
from .stages import _is_rank_zero, _stage

__all__ = ["CONTROLS", "STUDY_DEFAULTS", "StudyResult", "parse_controls", "run_study"]

#: Study-level options (besides the data/optim/trainer/runtime options of the CLI).
STUDY_DEFAULTS: Dict[str, Any] = {
    "teacher": "dccnn_d5c5",
    "student": "dccnn_d3c5",
    "teacher_overrides": {},
    "student_overrides": {},
    "methods": {"at": 1.0, "fitnet": 1.0, "fsp": 1.0, "sp": 1.0, "cc": 1.0},
    "kd_schedule": "joint",
    "kd_epochs": None,
    "layers": None,
    "loss_options": None,
    "epochs": None,  # int, or {teacher, student, sft, kd}; None: max_epochs for every stage
    "controls": True,
    "seeds": None,  # list of seeds; None: [seed]
    "train_first_student_cascade": False,
    "teacher_weight": 1.0,
    "branch_weight": 1.0,
    "imitation_weight": 1.0,
    "profile_device": "cpu",
    "figure_volume": None,
    "title": "SFT-KD study",
}
STAGE_EPOCH_KEYS = ("teacher", "student", "sft", "kd")
#: The controls of a fair comparison a study can train (method.md section 6).
CONTROLS = ("a", "b")


def parse_controls(value: Any) -> Tuple[str, ...]:
    """The study's ``controls``: ``true`` (control (a), the default), ``false`` or ``[]``
    (none), ``all``, or a list of ``a`` (the SFT-initialised student without KD) and ``b``
    (Std-KD with the epochs of the SFT stage and SFT-KD together)."""
    words = {"true": ("a",), "yes": ("a",), "on": ("a",), "false": (), "no": (), "off": ()}
    if value is None or isinstance(value, bool):
        return ("a",) if value else ()
    if isinstance(value, str):
        word = value.strip().lower()
        if word in words:
            return words[word]
        items = list(CONTROLS) if word == "all" else [w.strip() for w in word.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [str(v).strip().lower() for v in value]  # [] is no control
    else:
        items = [value]
    if any(item not in CONTROLS for item in items):
        raise ValueError(
            f"controls: expected true, false, all or a list of {', '.join(CONTROLS)} "
            f"(e.g. [a, b]), got {value!r}"
        )
    return tuple(c for c in CONTROLS if c in items)


class StudyResult:
    """The report and where everything was written."""

    def __init__(self, report: Report, out_dir: Path, files: Dict[str, Path]):
        self.report = report
        self.out_dir = out_dir
        self.files = files


def _epochs(cfg: Mapping[str, Any]) -> Dict[str, int]:
    spec = cfg.get("epochs")
    if spec is None:
        spec = {}
    elif not isinstance(spec, Mapping):
        spec = {k: spec for k in STAGE_EPOCH_KEYS}
    unknown = set(spec) - set(STAGE_EPOCH_KEYS)
    if unknown:
        raise ValueError(f"epochs: unknown stage(s) {sorted(unknown)}; use {STAGE_EPOCH_KEYS}")
    out: Dict[str, int] = {}
    for key in STAGE_EPOCH_KEYS:
        value = spec.get(key, cfg["max_epochs"])
        try:
            number = math.nan if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not (number.is_integer() and number >= 1):
            raise ValueError(
                f"epochs: {key}: expected a whole number of epochs >= 1, got {value!r} (epochs "
                f"is one number for every stage, or a mapping of {', '.join(STAGE_EPOCH_KEYS)})"
            )
        out[key] = int(number)
    return out


def _methods(cfg: Mapping[str, Any]) -> Dict[str, float]:
    methods = cfg["methods"]
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, Mapping):
        methods = {m: 1.0 for m in methods}
    unknown = sorted(set(methods) - set(available_losses()))
    if unknown:
        raise ValueError(f"unknown KD method(s) {unknown}; available: {available_losses()}")
    if not methods:
        raise ValueError("the study needs at least one KD method")
    return {str(k): float(v) for k, v in methods.items()}


def _train_seed(
    cfg: Dict[str, Any], root: Path, log: List[str]
) -> Dict[str, Tuple[str, Dict[str, Any], str]]:
    """Run (or skip) every training stage of one seed; returns key -> (model file, entry
    info, stage folder)."""
    ep = _epochs(cfg)
    teacher_net = dict(model=cfg["teacher"], model_overrides=cfg["teacher_overrides"])
    student_net = dict(model=cfg["student"], model_overrides=cfg["student_overrides"])
    models: Dict[str, Tuple[str, Dict[str, Any], str]] = {}

    def stage(name: str, runner, **overrides: Any) -> StageResult:
        return _stage(name, cfg, root, runner, log, **overrides)

    def add(
        key: str, result: StageResult, export: str, folder: Optional[str] = None, **info: Any
    ) -> None:
        """``folder``: the stage's folder, where it is not named ``key``."""
        models[key] = (result.exports[export], info, folder or key)

    teacher = stage(
        "teacher", run_train, **teacher_net, max_epochs=ep["teacher"], init_checkpoint=None
    )
    add("teacher", teacher, "model", name="Teacher", kind="teacher", variant="std")
    student = stage(
        "student", run_train, **student_net, max_epochs=ep["student"], init_checkpoint=None
    )
    add("student", student, "model", name="Student (no KD)", kind="student", variant="std")
    sft = stage("sft", run_sft, max_epochs=ep["sft"])
    add("sft_teacher", sft, "teacher", "sft", name="SFT teacher", kind="teacher", variant="sft")
    controls = parse_controls(cfg["controls"])
    if "a" in controls:
        ctrl = stage(
            "control_sft_init",
            run_train,
            **student_net,
            max_epochs=ep["kd"],
            init_checkpoint=sft.exports["student_init"],
        )
        add(
            "control_sft_init",
            ctrl,
            "model",
            name="Student, SFT init, no KD",
            kind="student",
            variant="sft",
        )
    for method, weight in _methods(cfg).items():
        kd = dict(
            **student_net,
            max_epochs=ep["kd"],
            methods={method: weight},
            # each stage distils one method: only its own pairing and options
            **_method_entries(cfg, method),
        )
        # (variant, stage folder, display name, options, student start, teacher)
        runs = [
            ("std", f"kd_std_{method}", f"Std-KD {method}", kd, None, teacher.exports["model"]),
            (
                "sft",
                f"kd_sft_{method}",
                f"SFT-KD {method}",
                kd,
                sft.exports["student_init"],
                sft.exports["teacher"],
            ),
        ]
        if "b" in controls:  # Std-KD for the epochs SFT-KD's student has had in all
            budget = {**kd, "max_epochs": ep["sft"] + ep["kd"]}
            name = f"Std-KD {method}, SFT+KD epochs"
            runs.append(
                ("budget", f"control_budget_{method}", name, budget, None, teacher.exports["model"])
            )
        for variant, folder, name, options, start, teacher_file in runs:
            result = stage(
                folder,
                run_distill,
                **options,
                init_checkpoint=start,
                teacher_checkpoint=teacher_file,
            )
            add(
                f"kd_{variant}/{method}",
                result,
                "model",
                folder,
                name=name,
                kind="kd",
                method=method,
                variant=variant,
            )
    return models


def _example_inputs(loader) -> Tuple:
    batch = next(iter(loader))
    sens = batch.sens_maps[:1] if batch.sens_maps.numel() else None
    return (batch.masked_kspace[:1], batch.mask[:1], sens)


def _check_networks(cfg: Dict[str, Any]) -> None:
    """Build the teacher and the student (bad presets or overrides fail here), wrap them as
    the sft stage will (a pair SFT cannot unfold, e.g. of other cascade counts, fails here
    rather than after the teacher and student stages have trained) and run each KD method
    once on a tiny batch, so that one that cannot pair them (FSP between layers of other
    channel counts) fails before the teacher, student and SFT stages have trained."""
    teacher = create_model(cfg["teacher"], **dict(cfg.get("teacher_overrides") or {}))
    student = create_model(cfg["student"], **dict(cfg.get("student_overrides") or {}))
    try:
        StudentFriendlyTeacher(
            teacher,
            student,
            train_first_student_cascade=cfg.get("train_first_student_cascade", False),
        )
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"the study's teacher {cfg['teacher']} and student {cfg['student']} cannot be "
            f"trained together in its sft stage: {err}"
        ) from None
    for method, weight in _methods(cfg).items():
        entries = _method_entries(cfg, method)
        check_distillation(
            student, teacher, {method: weight}, entries["layers"], entries["loss_options"]
        )


def _kd_schedule_names(cfg: Mapping[str, Any]) -> Dict[str, str]:
    """The study's keys, for :func:`check_kd_schedule`'s errors: the KD stages' epochs come
    from ``epochs`` (a number, or its ``kd`` entry) where it gives them, else ``max_epochs``."""
    spec = cfg.get("epochs")
    if isinstance(spec, Mapping):
        source = "epochs' kd entry" if "kd" in spec else "max_epochs"
    else:
        source = "max_epochs" if spec is None else "epochs"
    return {"kd_schedule": "kd_schedule", "kd_epochs": "kd_epochs", "max_epochs": source}


def _method_entries(cfg: Dict[str, Any], method: str) -> Dict[str, Any]:
    """The study's ``layers`` and ``loss_options`` entries of one KD method (``None`` where it
    has none): what the stage distilling that method alone is given."""
    found = {}
    for key in ("layers", "loss_options"):
        entries = cfg.get(key) or {}
        found[key] = {method: entries[method]} if method in entries else None
    return found


def _check_profile_device(value: Any) -> None:
    """The device the report's latency is timed on must exist here: a CPU, or a CUDA GPU."""
    try:
        kind = torch.device(value).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ValueError(
            f"profile_device must be 'cpu' or a CUDA device ('cuda', 'cuda:1'), got {value!r}"
        )
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"profile_device {value!r}: no CUDA device here; use profile_device: cpu, or run "
            "the study on a GPU machine"
        )


def run_study(cfg: Dict[str, Any]) -> Optional[StudyResult]:
    """Run the whole study described by ``cfg`` (see :data:`STUDY_DEFAULTS` and the CLI
    options) and write ``report.{md,csv,json}`` and the figures into ``cfg["out_dir"]``.

    With ``devices > 1`` every rank trains the stages; the other ranks return ``None`` after
    training, and rank zero scores the models and writes the report."""
    cfg = {**STUDY_DEFAULTS, **cfg}
    # before any stage trains: a KD method that no batch can compute would fail only after
    # the teacher, student and SFT stages
    check_batch_size(_methods(cfg), int(cfg["batch_size"]), "batch_size")
    seeds = _seeds(cfg)  # a repeated seed, before anything trains or is written
    _check_networks(cfg)
    epochs = _epochs(cfg)  # a bad epochs entry, before the first stage rather than inside it
    # the KD schedule, which the distill stages read only after the teacher, student and SFT
    # stages: the shortest of them (the budget control's are longer) must fine-tune too
    check_kd_schedule(
        cfg["kd_schedule"], cfg["kd_epochs"], epochs["kd"], names=_kd_schedule_names(cfg)
    )
    parse_controls(cfg["controls"])
    _check_profile_device(cfg["profile_device"])  # used only after every stage has trained
    # ... and the held-out split must have targets to score, and the training splits exist
    test_folder = check_scored_split(
        cfg, cfg["test_split"], "the study's test_split", option="--test-split"
    )
    figure_volume = _figure_volume(cfg, test_folder)
    data_path = resolve_data_path(cfg)
    for key in ("train_split", "val_split"):
        folder = data_path / f"{cfg['challenge']}_{cfg[key]}"
        if not folder.is_dir():
            raise FileNotFoundError(
                f"the study's {key}: split folder {folder} does not exist"
                f"{missing_split_hint(folder)}"
            )
    _check_held_out(cfg, data_path, test_folder)
    out_dir = Path(os.path.expanduser(str(cfg.get("out_dir") or "runs/study")))
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is a file; expected a folder for the study")
    check_out_of_splits(out_dir, data_path, "out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    log: List[str] = []

    per_seed = {}
    for seed in seeds:
        seed_cfg = {**cfg, "seed": seed}
        per_seed[seed] = _train_seed(seed_cfg, out_dir / f"seed_{seed}", log)
    if not _is_rank_zero():
        # under DDP (devices > 1) every rank runs the study to train its stages together;
        # rank zero alone scores the models and writes the report and figures
        return None

    print(f"[eval] scoring every model on {cfg['challenge']}_{cfg['test_split']}", flush=True)
    loaders = _test_loaders(cfg, seeds)
    loader = loaders[seeds[0]]  # the figures' and the profile's inputs
    example = _example_inputs(loader)
    entries: List[ModelEntry] = []
    recons: Dict[str, Dict[str, np.ndarray]] = {}
    mask_per_seed = _mask_per_seed(cfg) and len(seeds) > 1
    for seed in seeds if mask_per_seed else seeds[:1]:
        zero = evaluate_model(None, loaders[seed], progress=False)
        entries.append(
            ModelEntry(
                "zero_filled",
                "Zero-filled",
                "baseline",
                zero.metrics,
                seed=seed if mask_per_seed else None,
            )
        )
        if seed == seeds[0]:
            recons["Zero-filled"] = zero.reconstructions
    profiles: Dict[Tuple, Dict[str, Any]] = {}
    device = "cuda" if torch.cuda.is_available() and cfg.get("accelerator") != "cpu" else "cpu"
    show = bool(cfg.get("progress", True))
    for seed, models in per_seed.items():
        for key, (path, info, folder) in models.items():
            try:
                model = load_reconstruction_model(path).float()  # a 64-true run's too
                result = evaluate_model(model, loaders[seed], device=device, progress=show)
            except ValueError as err:  # e.g. a diverged model's NaN reconstruction
                raise ValueError(
                    f"scoring the model of stage {folder} (seed {seed}, checkpoint {path}) on "
                    f"{cfg['challenge']}_{cfg['test_split']}: {err}"
                ) from err
            psnr = float(np.mean([v.psnr for v in result.metrics]))
            print(f"[eval] {key} (seed {seed}): PSNR {psnr:.2f} dB", flush=True)
            # architecture-level numbers, once per architecture: networks of the same
            # shapes (every student, both teachers) get the same latency, not the noise of
            # separate timings
            arch = _architecture(model)
            if arch not in profiles:
                profiles[arch] = profile_model(model.cpu(), example, device=cfg["profile_device"])
            entries.append(
                ModelEntry(
                    key,
                    info.pop("name"),
                    metrics=result.metrics,
                    profile=profiles[arch],
                    seed=seed,
                    **info,
                )
            )
            if seed == seeds[0]:
                recons[entries[-1].name] = result.reconstructions
    meta = {
        "title": cfg["title"],
        "split": f"{cfg['challenge']}_{cfg['test_split']}",
        "val_split": f"{cfg['challenge']}_{cfg['val_split']}",  # chose the checkpoints
        "combine_train_val": bool(cfg.get("combine_train_val")),  # trained on val_split too
        "epochs": _epochs(cfg),
        "accelerations": list(cfg["accelerations"]),
        "teacher": cfg["teacher"],
        "student": cfg["student"],
        "methods": _methods(cfg),
        "seeds": seeds,
        "precision": cfg.get("precision"),  # of every stage (a run record's identity)
        "data_path": str(data_path),  # also when read from --data-config/--dataset
    }
    report = build_report(entries, meta)
    files = dict(write_report(report, out_dir))
    files.update(_figures(report, entries, recons, loader, out_dir, figure_volume))
    atomic_write_text(out_dir / "stages.log", "\n".join(log) + "\n")
    return StudyResult(report, out_dir, files)


def _seeds(cfg: Mapping[str, Any]) -> List[int]:
    """The study's seeds (``seeds``, else ``[seed]``), each at most once: a repeated seed
    would train and score every model once (both repeats share the folder ``seed_<s>``)
    yet count as another seed in the report, which would state more seeds than ran and
    drop the few-seeds caveat."""
    seeds = [int(s) for s in (cfg.get("seeds") or [cfg["seed"]])]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        once = list(dict.fromkeys(seeds))
        raise ValueError(
            f"seeds {seeds} repeat seed(s) {repeated}: a seed trains and scores every model "
            f"once (in seed_<s>/), so a repeat adds no run but would be counted as one; list "
            f"each seed once, e.g. seeds: {once}"
        )
    return seeds


def _mask_per_seed(cfg: Mapping[str, Any]) -> bool:
    """Whether each seed draws its own mask: a fixed mask drawn from the seed."""
    return bool(cfg["fixed_mask"]) and not cfg.get("mask_path")


def _test_loaders(cfg: Dict[str, Any], seeds: Sequence[int]) -> Dict[int, Any]:
    """The test loader of each seed. A fixed mask drawn from the seed (``fixed_mask`` without
    ``mask_path``) differs between seeds, and each seed's models are scored on the mask they
    were trained and selected with (and the zero-filled baseline on each); otherwise every
    seed shares one loader (random-type test masks are seeded by file name)."""
    if _mask_per_seed(cfg):
        return {seed: build_datamodule({**cfg, "seed": seed}).test_dataloader() for seed in seeds}
    shared = build_datamodule(cfg).test_dataloader()
    return {seed: shared for seed in seeds}


def _architecture(model: torch.nn.Module) -> Tuple:
    """What a network's cost depends on: its class and the names and shapes of its weights."""
    shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
    return (type(model).__qualname__, shapes)


def _check_held_out(cfg: Dict[str, Any], data_path: Path, test_folder: Path) -> None:
    """The report's test split must hold no volume the study trains on or selects
    checkpoints with (by file name: fastMRI volumes are named uniquely, and holdout-split
    links keep the names). The common slip: after ``holdout-split``, selecting on ``val``,
    which still holds the held-out volumes, instead of ``val_select``. A test split that *is*
    the validation split is allowed; the report says so in its caveats."""
    if cfg["test_split"] == cfg["val_split"]:
        if cfg.get("combine_train_val"):
            raise ValueError(
                f"the study's test_split {test_folder.name} is its val_split, which "
                "combine_train_val trains on: those are no held-out test; choose another "
                "test_split (holdout-split makes one)"
            )
        return
    test = {p.name for p in test_folder.glob("*.h5")}
    for key in ("train_split", "val_split"):
        folder = data_path / f"{cfg['challenge']}_{cfg[key]}"
        shared = sorted(test & {p.name for p in folder.glob("*.h5")})
        if shared:
            hint = (
                " (after holdout-split, select on the split it made: val_split: val_select)"
                if key == "val_split"
                else ""
            )
            raise ValueError(
                f"the study's test_split {test_folder.name} shares {len(shared)} volume(s) "
                f"with its {key} {folder.name} (e.g. {shared[0]}): those are no held-out "
                f"test{hint}"
            )


def _figure_volume(cfg: Dict[str, Any], test_folder: Path) -> Optional[str]:
    """The test volume ``figure_volume`` names (with or without ``.h5``), checked before
    anything trains; ``None``: the first."""
    volume = cfg.get("figure_volume")
    if volume in (None, ""):
        return None
    name = str(volume) if str(volume).endswith(".h5") else f"{volume}.h5"
    if not (test_folder / name).is_file():
        shown = ", ".join(sorted(p.name for p in test_folder.glob("*.h5"))[:6])
        raise ValueError(
            f"figure_volume {volume!r}: no volume {name} in {test_folder} (e.g. {shown})"
        )
    return name


def _figures(
    report, entries, recons, loader, out_dir: Path, volume: Optional[str] = None
) -> Dict[str, Path]:
    try:
        # matplotlib is the optional `report` extra; figures.py imports it only when drawing
        import matplotlib  # noqa: F401

        from ..evaluation.figures import paper_panel, psnr_plot
    except ImportError as err:
        print(
            f"[warn] figures skipped: {err} (they need matplotlib: "
            "pip install 'sftkd_fastmri[report]'; the report is written without them)"
        )
        return {}
    files: Dict[str, Path] = {}
    files["psnr_plot"] = psnr_plot(report, out_dir / "psnr_per_method.png")
    # the middle slice of the chosen (else the first) test volume; one KD method (the first)
    targets: Dict[str, Dict[int, np.ndarray]] = {}
    for batch in loader:
        scale = batch.scale.reshape(-1, 1, 1)
        for i, (fname, s) in enumerate(zip(batch.fname, batch.slice_num.tolist())):
            targets.setdefault(fname, {})[s] = (batch.target[i] * scale[i]).numpy()
    fname = volume if volume in targets else sorted(targets)[0]
    slices = sorted(targets[fname])
    mid = len(slices) // 2
    target = targets[fname][slices[mid]]
    first_method = next((e.method for e in entries if e.kind == "kd"), None)
    order = ["Zero-filled", "Teacher", "Student (no KD)"]
    if first_method is not None:
        order += [f"Std-KD {first_method}", f"SFT-KD {first_method}"]
    images = {name: recons[name][fname][mid] for name in order if name in recons}
    seed = next((e.seed for e in entries if e.seed is not None), None)
    of_seed = "" if seed is None else f", models of seed {seed}"
    files["panel"] = paper_panel(
        images,
        target,
        out_dir / "panel.png",
        title=f"{fname}, slice {slices[mid]}{of_seed} (PSNR of this slice)",
    )
    return files


def study_summary(result: StudyResult) -> str:
    """Short text naming the report and figure files."""
    lines = [f"report and figures in {result.out_dir}:"]
    lines += [f"  {k:<10} {v}" for k, v in sorted(result.files.items())]
    return "\n".join(lines)
