"""The comparison report of the end-to-end study: quality, cost and the KD gap per model.

Input: one :class:`ModelEntry` per trained model (and per seed, when seeds are repeated) with
its per-volume :class:`~sftkd_fastmri.evaluation.metrics.VolumeMetrics` and, for networks, the
profile of :func:`~sftkd_fastmri.evaluation.profile.profile_model`. Output: a :class:`Report`
with per-model means and spreads, the teacher-student gap, the fraction of it that each KD
variant closes and the paper-style Std-KD vs SFT-KD table of Matcha et al., "SFT-KD-Recon:
Learning a Student-friendly Teacher for Knowledge Distillation in Magnetic Resonance Image
Reconstruction", MIDL 2023, as Markdown, CSV, JSON and plain text.

Roles are read from ``kind`` and ``variant``:

* ``kind="baseline"``: zero-filled (or any non-learned reference);
* ``kind="teacher"``: ``variant="std"`` (or ``None``) is the standard teacher that defines the
  gap, ``variant="sft"`` the student-friendly teacher;
* ``kind="student"``: ``variant="std"`` (or ``None``) is the student trained without KD;
  ``variant="sft"`` is control (a) of the fair comparison, the student initialised from the
  SFT branches and fine-tuned without KD;
* ``kind="kd"``: a distilled student, ``method`` names the KD loss, ``variant`` is ``"std"``
  (KD from the standard teacher), ``"sft"`` (KD from the SFT teacher) or ``"budget"``:
  control (b), Std-KD trained from scratch for as many epochs as the SFT stage and SFT-KD
  together, so that SFT-KD's head start is matched by epochs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .._io import atomic_write_text, atomic_write_texts
from .caveats import MIN_GAP_DB, above, caveats, finite
from .metrics import VolumeMetrics, summarize

__all__ = [
    "KDComparison",
    "MIN_GAP_DB",
    "ModelEntry",
    "ModelSummary",
    "Report",
    "build_report",
    "write_report",
]

KINDS = ("baseline", "teacher", "student", "kd")
VARIANTS = ("std", "sft", "budget", None)
METRICS = ("psnr", "ssim", "nmse", "hfen")

# Display names of the KD losses registered in sftkd_fastmri.kd (paper spelling).
METHOD_NAMES = {
    "at": "AT",
    "fitnet": "FitNets",
    "fitnets": "FitNets",
    "fsp": "FSP",
    "sp": "SP",
    "cc": "CC",
    "imitation": "Imitation",
}


def method_name(method: Optional[str]) -> str:
    """Paper spelling of a KD method key (``"fitnet"`` -> ``"FitNets"``)."""
    if method is None:
        return "-"
    return METHOD_NAMES.get(method.lower(), method)


# -- input ---------------------------------------------------------------------------------
@dataclass
class ModelEntry:
    """One trained (or baseline) model of the study, one seed.

    Args:
        key: unique id of the model within the study, e.g. ``"teacher"``, ``"kd_sft/at"``
            (entries that share a key are seeds of the same model).
        name: display name.
        kind: ``"baseline"``, ``"teacher"``, ``"student"`` or ``"kd"``.
        metrics: per-volume metrics on the report split.
        method: KD method key (``"at"``, ``"fitnet"``, ...) for ``kind="kd"``.
        variant: ``"std"``, ``"sft"`` or ``None`` (see the module docstring).
        profile: :func:`~sftkd_fastmri.evaluation.profile.profile_model` output (``None`` for
            the zero-filled baseline).
        seed: training seed, when several are reported.
    """

    key: str
    name: str
    kind: str
    metrics: List[VolumeMetrics]
    method: Optional[str] = None
    variant: Optional[str] = None
    profile: Optional[Dict[str, Any]] = None
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model {self.key!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.variant not in VARIANTS:
            raise ValueError(
                f"model {self.key!r}: variant must be 'std', 'sft', 'budget' or None, got "
                f"{self.variant!r}"
            )
        if self.kind == "kd" and not self.method:
            raise ValueError(f"model {self.key!r}: a KD entry needs its method (e.g. 'at')")
        self.metrics = [
            m if isinstance(m, VolumeMetrics) else VolumeMetrics(**m) for m in self.metrics
        ]
        if not self.metrics:
            raise ValueError(f"model {self.key!r}: no volume metrics")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelEntry:
        """Build from a mapping (metrics as :class:`VolumeMetrics` or their dicts)."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"model entry {data.get('key')!r}: unknown field(s) {sorted(unknown)}; "
                f"expected {sorted(known)}"
            )
        return cls(**dict(data))


# -- output --------------------------------------------------------------------------------
@dataclass
class ModelSummary:
    """Per-model numbers of the report (means and population std over volumes)."""

    key: str
    name: str
    kind: str
    method: Optional[str]
    variant: Optional[str]
    num_volumes: int
    seeds: List[Optional[int]]
    metrics: Dict[str, float]
    params: Optional[int] = None
    flops_total: Optional[float] = None
    flops_conv_matmul: Optional[float] = None
    flops_fft: Optional[float] = None
    latency_median_s: Optional[float] = None
    latency_mean_s: Optional[float] = None
    latency_std_s: Optional[float] = None
    latency_device: Optional[str] = None
    peak_memory_mib: Optional[float] = None
    gap_closed: Optional[float] = None
    delta_psnr_teacher: Optional[float] = None
    seed_psnr: List[float] = field(default_factory=list)

    def mean(self, metric: str) -> float:
        return self.metrics[f"{metric}_mean"]

    def std(self, metric: str) -> float:
        return self.metrics[f"{metric}_std"]

    def row(self) -> Dict[str, Any]:
        """Flat dict, one CSV row."""
        out = {k: v for k, v in asdict(self).items() if k not in ("metrics", "seeds", "seed_psnr")}
        out["seeds"] = ";".join("" if s is None else str(s) for s in self.seeds)
        out["seed_psnr"] = ";".join(f"{v:.4f}" for v in self.seed_psnr)
        for metric in METRICS:
            out[f"{metric}_mean"] = self.metrics[f"{metric}_mean"]
            out[f"{metric}_std"] = self.metrics[f"{metric}_std"]
            out[f"{metric}_seed_std"] = self.metrics.get(f"{metric}_seed_std")
        return out


@dataclass
class KDComparison:
    """One row of the paper-style table: a KD method with Std-KD and SFT-KD side by side."""

    method: str
    name: str
    std_key: Optional[str] = None
    sft_key: Optional[str] = None
    std_psnr: Optional[float] = None
    std_psnr_std: Optional[float] = None
    std_ssim: Optional[float] = None
    std_ssim_std: Optional[float] = None
    sft_psnr: Optional[float] = None
    sft_psnr_std: Optional[float] = None
    sft_ssim: Optional[float] = None
    sft_ssim_std: Optional[float] = None
    std_gap_closed: Optional[float] = None
    sft_gap_closed: Optional[float] = None
    diff_psnr: Optional[float] = None
    diff_ssim: Optional[float] = None
    sft_minus_control_psnr: Optional[float] = None
    # Control (b): Std-KD with the epochs of the SFT stage and SFT-KD together.
    budget_key: Optional[str] = None
    budget_psnr: Optional[float] = None
    budget_psnr_std: Optional[float] = None
    budget_ssim: Optional[float] = None
    budget_ssim_std: Optional[float] = None
    budget_gap_closed: Optional[float] = None
    sft_minus_budget_psnr: Optional[float] = None
    # Per seed, paired (same seed): SFT-KD PSNR minus Std-KD PSNR, minus control (a)'s, minus
    # control (b)'s.
    seed_diffs_psnr: List[float] = field(default_factory=list)
    seed_diffs_control_psnr: List[float] = field(default_factory=list)
    seed_diffs_budget_psnr: List[float] = field(default_factory=list)

    @property
    def diff_psnr_seed_std(self) -> Optional[float]:
        """Sample std over seeds of the paired SFT - Std PSNR difference (>= 2 seeds)."""
        d = self.seed_diffs_psnr
        return float(np.std(d, ddof=1)) if len(d) >= 2 else None

    @property
    def sft_wins(self) -> Optional[Tuple[int, int]]:
        """``(seeds where SFT-KD beats Std-KD in PSNR, paired seeds)``, or ``None``."""
        d = self.seed_diffs_psnr
        return (sum(above(x) for x in d), len(d)) if d else None

    def as_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["diff_psnr_seed_std"] = self.diff_psnr_seed_std
        wins = self.sft_wins
        out["sft_wins"] = None if wins is None else f"{wins[0]}/{wins[1]}"
        return out


@dataclass
class Report:
    """The study report; build it with :func:`build_report`."""

    models: List[ModelSummary]
    kd_table: List[KDComparison]
    meta: Dict[str, Any] = field(default_factory=dict)
    teacher_key: Optional[str] = None
    student_key: Optional[str] = None
    sft_teacher_key: Optional[str] = None
    control_key: Optional[str] = None
    gap_psnr: Optional[float] = None
    gap_ssim: Optional[float] = None
    num_seeds: int = 1
    caveats: List[str] = field(default_factory=list)

    def model(self, key: str) -> ModelSummary:
        """The summary of model ``key``."""
        for m in self.models:
            if m.key == key:
                return m
        raise KeyError(f"no model {key!r} in the report; have {[m.key for m in self.models]}")

    def get(self, key: Optional[str]) -> Optional[ModelSummary]:
        return None if key is None else next((m for m in self.models if m.key == key), None)

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (NaN becomes ``None``)."""
        return _clean(
            {
                "meta": self.meta,
                "teacher_key": self.teacher_key,
                "student_key": self.student_key,
                "sft_teacher_key": self.sft_teacher_key,
                "control_key": self.control_key,
                "gap_psnr": self.gap_psnr,
                "gap_ssim": self.gap_ssim,
                "num_seeds": self.num_seeds,
                "models": [asdict(m) for m in self.models],
                "kd_table": [r.as_dict() for r in self.kd_table],
                "caveats": self.caveats,
                "conventions": MEASUREMENT_NOTES,
            }
        )

    def to_json(self, path: Optional[Union[str, os.PathLike]] = None) -> str:
        """The report as JSON text, also written (atomically) to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        if path is not None:
            atomic_write_text(path, text)
        return text

    def to_csv(self, path: Optional[Union[str, os.PathLike]] = None) -> str:
        """One row per model with every number; also written to ``path`` when given."""
        rows = [m.row() for m in self.models]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_COLUMNS})
        text = buf.getvalue()
        if path is not None:
            atomic_write_text(path, text)
        return text

    def to_markdown(self) -> str:
        """The report as Markdown: results, gap, paper-style table, methods, caveats."""
        from .report_text import render_report

        return render_report(self, markdown=True)

    def __str__(self) -> str:
        from .report_text import render_report

        return render_report(self, markdown=False)

    def print(self) -> None:
        """Print the plain-text tables (for the terminal)."""
        print(str(self))


CSV_COLUMNS = [
    "key",
    "name",
    "kind",
    "method",
    "variant",
    "num_volumes",
    "seeds",
    "seed_psnr",
    *[f"{m}_{s}" for m in METRICS for s in ("mean", "std", "seed_std")],
    "params",
    "flops_total",
    "flops_conv_matmul",
    "flops_fft",
    "latency_median_s",
    "latency_mean_s",
    "latency_std_s",
    "latency_device",
    "peak_memory_mib",
    "gap_closed",
    "delta_psnr_teacher",
]

MEASUREMENT_NOTES = {
    "metrics": (
        "per-volume fastMRI metrics (fastmri.evaluate): NMSE, PSNR and SSIM (7x7 window) with "
        "data range = the volume's max, HFEN (Ravishankar & Bresler, IEEE TMI 2011: LoG 15x15, "
        "sigma 1.5); mean and population std over volumes"
    ),
    "flops": (
        "per slice, one forward; convolutions/matmuls by torch.utils.flop_counter "
        "(multiply-add = 2 FLOPs), FFTs as 5 N log2 N per complex transform of N points; "
        "element-wise operations not counted"
    ),
    "latency": "wall-clock seconds per slice, median over repeats, torch.inference_mode",
    "peak_memory": (
        "MiB of tensor memory allocated during one forward above the pre-forward allocation "
        "(CUDA allocator statistics, or live ATen storages on CPU); not RSS"
    ),
    "gap_closed": "(PSNR_kd - PSNR_student) / (PSNR_teacher - PSNR_student), standard teacher",
}


# -- building ------------------------------------------------------------------------------
def build_report(
    entries: Iterable[Union[ModelEntry, Mapping[str, Any]]],
    meta: Optional[Mapping[str, Any]] = None,
    min_gap_db: float = MIN_GAP_DB,
) -> Report:
    """Summarise the models of a study into a :class:`Report`.

    Args:
        entries: :class:`ModelEntry` objects or mappings with their fields. Entries sharing a
            ``key`` are seeds of one model: their volumes are pooled for mean and std, and the
            std of the per-seed means is reported as ``*_seed_std``.
        meta: free-form facts about the study, rendered at the top of the Markdown. Keys the
            report itself reads: ``title``; ``seeds`` (a list or a count, read only where the
            entries carry no seeds: the number of seeds is the fewest that any learned model
            was scored with); ``split`` (the split the metrics come from);
            ``epochs`` (mapping stage -> epochs, for control (b), equal epoch budgets).
        min_gap_db: Smallest teacher-student PSNR gap for which "gap closed" is reported; below
            it (or with a student better than its teacher) the fraction is ``None``: divided by
            a gap smaller than seed noise it only magnifies noise (a 0.03 dB gap turns a
            0.3 dB difference into "1000 %").

    Returns:
        The :class:`Report`. Models missing from the study (no SFT teacher, only Std-KD, no
        student) leave the corresponding numbers ``None``; nothing raises for them.
    """
    meta = dict(meta or {})
    groups: Dict[str, List[ModelEntry]] = {}
    for e in entries:
        entry = e if isinstance(e, ModelEntry) else ModelEntry.from_dict(e)
        first = groups.setdefault(entry.key, [entry])[0]
        if first is not entry:
            role, other = (
                (first.kind, first.method, first.variant),
                (entry.kind, entry.method, entry.variant),
            )
            if role != other:
                raise ValueError(
                    f"entries with key {entry.key!r} disagree on kind/method/variant: "
                    f"{role} vs {other}"
                )
            if entry.seed is not None and entry.seed in [r.seed for r in groups[entry.key]]:
                raise ValueError(
                    f"entries with key {entry.key!r} repeat seed {entry.seed}: one entry per "
                    "seed of a model (a repeat would pool its volumes twice and count as "
                    "another seed)"
                )
            groups[entry.key].append(entry)
    if not groups:
        raise ValueError("build_report needs at least one model entry")

    models = [_summarise(runs) for runs in groups.values()]
    teacher = _find(models, "teacher", ("std", None))
    student = _find(models, "student", ("std", None))
    report = Report(
        models=models,
        kd_table=[],
        meta=meta,
        teacher_key=_key(teacher),
        student_key=_key(student),
        sft_teacher_key=_key(_find(models, "teacher", ("sft",))),
        control_key=_key(_find(models, "student", ("sft",))),
        num_seeds=_num_seeds(meta.get("seeds"), models),
    )
    if teacher is not None and student is not None:
        gap_psnr = teacher.mean("psnr") - student.mean("psnr")
        gap_ssim = teacher.mean("ssim") - student.mean("ssim")
        if finite(gap_psnr) and finite(gap_ssim):  # else undefined, as without a model
            report.gap_psnr, report.gap_ssim = gap_psnr, gap_ssim
    for m in models:
        if teacher is not None:
            m.delta_psnr_teacher = m.mean("psnr") - teacher.mean("psnr")
        if m.kind in ("kd", "student") and m is not student:
            m.gap_closed = _gap_closed(m, teacher, student, min_gap_db)
    report.kd_table = _kd_table(models, report.get(report.control_key))
    report.caveats = caveats(report, min_gap_db)
    return report


def _summarise(runs: Sequence[ModelEntry]) -> ModelSummary:
    first = runs[0]
    pooled = [v for r in runs for v in r.metrics]
    metrics = summarize(pooled)
    del metrics["volumes"]
    if len(runs) > 1:
        for metric in METRICS:
            per_seed = [np.mean([getattr(v, metric) for v in r.metrics]) for r in runs]
            metrics[f"{metric}_seed_std"] = float(np.std(per_seed, ddof=1))
    summary = ModelSummary(
        key=first.key,
        name=first.name,
        kind=first.kind,
        method=first.method,
        variant=first.variant,
        num_volumes=len({v.fname for v in pooled}),
        seeds=[r.seed for r in runs],
        metrics=metrics,
        seed_psnr=[float(np.mean([v.psnr for v in r.metrics])) for r in runs],
    )
    profile = next((r.profile for r in runs if r.profile), None)
    if profile:
        _apply_profile(summary, profile)
    return summary


def _apply_profile(summary: ModelSummary, profile: Mapping[str, Any]) -> None:
    """Copy the numbers of a profile_model dict (nested) or of a flat dict with the same names."""
    flops = profile.get("flops") or {}
    latency = profile.get("latency") or {}
    if not isinstance(flops, Mapping):  # a bare number: total FLOPs per slice
        flops = {"total": flops}
    summary.params = _opt_int(profile.get("params"))
    summary.flops_total = _opt_float(flops.get("total", profile.get("flops_total")))
    summary.flops_conv_matmul = _opt_float(
        flops.get("conv_matmul", profile.get("flops_conv_matmul"))
    )
    summary.flops_fft = _opt_float(flops.get("fft", profile.get("flops_fft")))
    summary.latency_median_s = _opt_float(latency.get("median_s", profile.get("latency_median_s")))
    summary.latency_mean_s = _opt_float(latency.get("mean_s", profile.get("latency_mean_s")))
    summary.latency_std_s = _opt_float(latency.get("std_s", profile.get("latency_std_s")))
    device = latency.get("device", profile.get("latency_device"))
    if device is not None and latency.get("device_name"):
        device = f"{device} ({latency['device_name']}, {latency.get('num_threads', '?')} threads)"
    summary.latency_device = device
    summary.peak_memory_mib = _opt_float(profile.get("peak_memory_mib"))


def _num_seeds(declared: Any, models: Sequence[ModelSummary]) -> int:
    """The seeds scored: the fewest runs any learned model has, where the entries carry
    their seeds (each at most once per model: :func:`build_report` refuses a repeat); else
    the seeds declared in ``meta`` (a count, or a list of distinct seeds) for entries that
    pool their seeds themselves, else the fewest runs.

    The fewest, because a comparison is only as repeated as its least repeated side; the
    seeds scored rather than those declared, so that a report never states more seeds
    than ran (``seeds: [1, 1, 1]`` scored each model once).
    """
    learned = [m for m in models if m.kind != "baseline"] or list(models)
    fewest = min(len(m.seeds) for m in learned)
    if any(s is not None for m in learned for s in m.seeds):
        return fewest
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    if isinstance(declared, (list, tuple)) and declared:
        return len(set(declared))
    return fewest


def _find(models: Sequence[ModelSummary], kind: str, variants: Sequence) -> Optional[ModelSummary]:
    found = [m for m in models if m.kind == kind and m.variant in variants]
    if len(found) > 1:
        raise ValueError(
            f"more than one {kind} with variant in {list(variants)}: {[m.key for m in found]}; "
            "give seeds of one model the same key"
        )
    return found[0] if found else None


def _key(model: Optional[ModelSummary]) -> Optional[str]:
    return None if model is None else model.key


def _gap_closed(
    model: ModelSummary,
    teacher: Optional[ModelSummary],
    student: Optional[ModelSummary],
    min_gap_db: float,
) -> Optional[float]:
    if teacher is None or student is None:
        return None
    gap = teacher.mean("psnr") - student.mean("psnr")
    if not (gap > 0 and gap >= min_gap_db):  # no gap worth dividing by: the fraction is noise
        return None
    return (model.mean("psnr") - student.mean("psnr")) / gap


def _kd_table(
    models: Sequence[ModelSummary], control: Optional[ModelSummary]
) -> List[KDComparison]:
    rows: Dict[str, KDComparison] = {}
    by_key = {m.key: m for m in models}
    for m in models:
        if m.kind != "kd":
            continue
        row = rows.setdefault(m.method, KDComparison(method=m.method, name=method_name(m.method)))
        prefix = m.variant if m.variant in ("sft", "budget") else "std"
        if getattr(row, f"{prefix}_key") is not None:
            raise ValueError(
                f"two {prefix.upper()}-KD models for method {m.method!r}: "
                f"{getattr(row, f'{prefix}_key')!r} and {m.key!r}"
            )
        setattr(row, f"{prefix}_key", m.key)
        setattr(row, f"{prefix}_psnr", m.mean("psnr"))
        setattr(row, f"{prefix}_psnr_std", m.std("psnr"))
        setattr(row, f"{prefix}_ssim", m.mean("ssim"))
        setattr(row, f"{prefix}_ssim_std", m.std("ssim"))
        setattr(row, f"{prefix}_gap_closed", m.gap_closed)
    for row in rows.values():
        sft_m = by_key.get(row.sft_key) if row.sft_key is not None else None
        if sft_m is not None and row.std_key is not None:
            row.diff_psnr = row.sft_psnr - row.std_psnr
            row.diff_ssim = row.sft_ssim - row.std_ssim
            row.seed_diffs_psnr = _paired(sft_m, by_key[row.std_key])
        if sft_m is not None and control is not None:
            row.sft_minus_control_psnr = row.sft_psnr - control.mean("psnr")
            row.seed_diffs_control_psnr = _paired(sft_m, control)
        if sft_m is not None and row.budget_key is not None:
            row.sft_minus_budget_psnr = row.sft_psnr - row.budget_psnr
            row.seed_diffs_budget_psnr = _paired(sft_m, by_key[row.budget_key])
    return list(rows.values())


def _paired(a: ModelSummary, b: ModelSummary) -> List[float]:
    """Per seed both models share: mean PSNR of ``a`` minus that of ``b``."""
    b_by_seed = dict(zip(b.seeds, b.seed_psnr))
    return [
        v - b_by_seed[seed]
        for seed, v in zip(a.seeds, a.seed_psnr)
        if seed is not None and seed in b_by_seed
    ]


# -- rendering -----------------------------------------------------------------------------
def _opt_float(x: Any) -> Optional[float]:
    return None if x is None else float(x)


def _opt_int(x: Any) -> Optional[int]:
    return None if x is None else int(x)


def _clean(obj: Any) -> Any:
    """Replace NaN/inf by ``None`` and numpy scalars by Python ones, for strict JSON."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _csv_value(x: Any) -> Any:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, float):
        return repr(x)  # full precision
    return x


def write_report(report: Report, out_dir: Union[str, os.PathLike]) -> Dict[str, Path]:
    """Write ``report.md``, ``report.csv`` and ``report.json`` to ``out_dir`` as one: the three
    texts are made and written to temporary files before any is renamed into place, so a
    failure leaves the earlier report whole rather than three files of two studies.

    Returns:
        ``{"markdown": path, "csv": path, "json": path}``.
    """
    out_dir = Path(out_dir)
    paths = {
        "markdown": out_dir / "report.md",
        "csv": out_dir / "report.csv",
        "json": out_dir / "report.json",
    }
    texts = {"markdown": report.to_markdown(), "csv": report.to_csv(), "json": report.to_json()}
    atomic_write_texts({paths[kind]: text for kind, text in texts.items()})
    return paths
