"""Text of the study report: the tables and notes of :class:`~.report.Report` as Markdown
(``report.md``) or plain text (the terminal). The numbers and the caveats are computed in
:mod:`.report`; this module only lays them out."""

from __future__ import annotations

import math
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .caveats import MIN_SEEDS, above, finite
from .report import MEASUREMENT_NOTES, ModelSummary, Report

_NA = "-"


def _pm(mean: Optional[float], std: Optional[float], digits: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return _NA
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _num(x: Optional[float], fmt: str) -> str:
    return _NA if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _pct(x: Optional[float]) -> str:
    return f"{100 * x:.0f}%" if finite(x) else _NA


def _gflops(m: ModelSummary) -> str:
    if m.flops_total is None:
        return _NA
    if m.flops_fft is None or m.flops_conv_matmul is None:
        return f"{m.flops_total / 1e9:.3f}"
    return f"{m.flops_total / 1e9:.3f} ({m.flops_conv_matmul / 1e9:.3f} + {m.flops_fft / 1e9:.3f})"


def _model_table(report: Report) -> Tuple[List[str], List[List[str]]]:
    seeds = report.num_seeds > 1
    head = [
        "Model",
        "Kind",
        "PSNR (dB)",
        "SSIM",
        "NMSE",
        "HFEN",
        "Params",
        "GFLOPs/slice (conv + FFT)",
        "Latency (ms/slice)",
        "Peak mem (MiB)",
        "Gap closed",
    ]
    if seeds:
        head.insert(3, "PSNR seed std")
    rows = []
    for m in report.models:
        kind = m.kind if m.variant is None else f"{m.kind} ({m.variant})"
        row = [
            m.name,
            kind,
            _pm(m.mean("psnr"), m.std("psnr"), 2),
            _pm(m.mean("ssim"), m.std("ssim"), 4),
            _pm(m.mean("nmse"), m.std("nmse"), 5),
            _pm(m.mean("hfen"), m.std("hfen"), 4),
            _num(m.params, ","),
            _gflops(m),
            _num(None if m.latency_median_s is None else 1e3 * m.latency_median_s, ".1f"),
            _num(m.peak_memory_mib, ".1f"),
            _pct(m.gap_closed),
        ]
        if seeds:
            row.insert(3, _num(m.metrics.get("psnr_seed_std"), ".3f"))
        rows.append(row)
    return head, rows


def _kd_rows(report: Report) -> Tuple[List[str], List[List[str]]]:
    control = report.control_key is not None
    head = [
        "Method",
        "Std-KD PSNR",
        "Std-KD SSIM",
        "SFT-KD PSNR",
        "SFT-KD SSIM",
        "Gap closed Std",
        "Gap closed SFT",
        "PSNR SFT - Std",
        "SSIM SFT - Std",
    ]
    budget = any(r.budget_key is not None for r in report.kd_table)
    if control:
        head.append("PSNR SFT - ctrl(a)")
    if budget:
        head.append("PSNR SFT - ctrl(b)")
    rows = []
    for r in report.kd_table:
        row = [
            r.name,
            _pm(r.std_psnr, r.std_psnr_std, 2),
            _pm(r.std_ssim, r.std_ssim_std, 4),
            _pm(r.sft_psnr, r.sft_psnr_std, 2),
            _pm(r.sft_ssim, r.sft_ssim_std, 4),
            _pct(r.std_gap_closed),
            _pct(r.sft_gap_closed),
            _diff_cell(r.diff_psnr, r.seed_diffs_psnr, _seeds_of(report, r.sft_key, r.std_key)),
            _num(r.diff_ssim, "+.4f"),
        ]
        if control:
            row.append(
                _diff_cell(
                    r.sft_minus_control_psnr,
                    r.seed_diffs_control_psnr,
                    _seeds_of(report, r.sft_key, report.control_key),
                )
            )
        if budget:
            row.append(
                _diff_cell(
                    r.sft_minus_budget_psnr,
                    r.seed_diffs_budget_psnr,
                    _seeds_of(report, r.sft_key, r.budget_key),
                )
            )
        rows.append(row)
    return head, rows


def _kd_table_note(report: Report) -> str:
    """What the two kinds of ± in the KD table are: they are not comparable."""
    pooled = "volumes" if report.num_seeds <= 1 else "volumes of all seeds pooled"
    return (
        f"PSNR and SSIM columns: mean ± std over {pooled} (how much the test volumes differ). "
        "The 'SFT - ...' columns: the difference of the means; with several seeds, ± the std "
        "over seeds of the per-seed paired difference and (k/n) the seeds with SFT-KD ahead "
        "(how much a repeat of the study could move it)."
    )


def _seeds_of(report: Report, *keys: Optional[str]) -> int:
    """The most seeds any of the models ``keys`` ran (0 when none is in the report)."""
    counts = [len(report.model(k).seeds) for k in keys if k is not None and report.get(k)]
    return max(counts, default=0)


def _diff_cell(diff: Optional[float], seed_diffs: Sequence[float], seeds: int = 0) -> str:
    """``+0.249``, or with several paired seeds ``+0.249 ± 0.110 (3/3)``: the std over seeds of
    the paired difference and the seeds in which SFT-KD was ahead. When fewer seeds are paired
    than the study has (a variant missing a seed), the cell says so: the difference of the
    means then covers seeds the ± and the count do not."""
    text = _num(diff, "+.3f")
    if finite(diff) and len(seed_diffs) >= 2 and all(finite(d) for d in seed_diffs):
        spread = float(np.std(seed_diffs, ddof=1))
        text += f" ± {spread:.3f} ({sum(above(d) for d in seed_diffs)}/{len(seed_diffs)}"
        if len(seed_diffs) < seeds:
            text += f"; {len(seed_diffs)} of {seeds} seeds paired"
        text += ")"
    return text


def _table(head: List[str], rows: List[List[str]], markdown: bool) -> List[str]:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return lines + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)
    ]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return [fmt.format(*head), rule] + [fmt.format(*r) for r in rows]


def _gap_lines(report: Report) -> List[str]:
    teacher, student = report.get(report.teacher_key), report.get(report.student_key)
    lines = []
    if teacher is None or student is None:
        missing = " and ".join(
            w
            for w, m in (("standard teacher", teacher), ("student without KD", student))
            if m is None
        )
        lines.append(f"No {missing} in the study: the teacher-student gap is not defined.")
    elif report.gap_psnr is None:
        lines.append(
            f"Standard teacher ({teacher.name}) {_num(teacher.mean('psnr'), '.2f')} dB vs "
            f"student without KD ({student.name}) {_num(student.mean('psnr'), '.2f')} dB: a "
            "mean is not finite, so the teacher-student gap is not defined."
        )
    else:
        lines.append(
            f"Standard teacher ({teacher.name}) {teacher.mean('psnr'):.2f} dB vs student "
            f"without KD ({student.name}) {student.mean('psnr'):.2f} dB: gap "
            f"{report.gap_psnr:.3f} dB PSNR, {report.gap_ssim:.4f} SSIM. "
            "'Gap closed' = (PSNR_model - PSNR_student) / gap: 0% = no gain over the student, "
            "100% = as good as the standard teacher."
        )
    sft = report.get(report.sft_teacher_key)
    if sft is not None:
        delta = (
            ""
            if teacher is None
            else f" ({sft.mean('psnr') - teacher.mean('psnr'):+.3f} dB vs standard)"
        )
        lines.append(f"SFT teacher ({sft.name}): {sft.mean('psnr'):.2f} dB{delta}.")
    control = report.get(report.control_key)
    if control is not None:
        lines.append(
            f"Control (a), {control.name} (SFT-initialised, no KD): {control.mean('psnr'):.2f} dB, "
            f"gap closed {_pct(control.gap_closed)}."
        )
    both = [r for r in report.kd_table if finite(r.diff_psnr)]
    if both:
        ahead = sum(above(r.diff_psnr) for r in both)
        line = (
            f"SFT-KD's mean PSNR is above Std-KD's for {ahead} of {len(both)} method(s) with "
            f"both variants (mean difference {np.mean([r.diff_psnr for r in both]):+.3f} dB)."
        )
        if report.num_seeds < MIN_SEEDS:
            line += (
                f" With {report.num_seeds} seed(s) that does not separate them from seed noise "
                "(see the caveats)."
            )
        lines.append(line)
        paired = [r for r in both if len(r.seed_diffs_psnr) > 1]
        if paired:
            won = sum(sum(above(d) for d in r.seed_diffs_psnr) for r in paired)
            total = sum(len(r.seed_diffs_psnr) for r in paired)
            every = [r.name for r in paired if all(above(d) for d in r.seed_diffs_psnr)]
            lines.append(
                f"Per seed (same seed, same data order): SFT-KD is ahead of Std-KD in {won} of "
                f"{total} (method, seed) pairs, in every paired seed for "
                f"{', '.join(every) if every else 'no method'}; 'PSNR SFT - Std' shows the "
                "difference of the means and, over the seeds both variants ran, the std of the "
                "paired difference and the seeds SFT-KD was ahead."
            )
    for column, label, diffs in (
        ("ctrl(a)", "control (a)", [r.sft_minus_control_psnr for r in report.kd_table]),
        ("ctrl(b)", "control (b)", [r.sft_minus_budget_psnr for r in report.kd_table]),
    ):
        diffs = [d for d in diffs if finite(d)]
        if diffs:
            lines.append(
                f"SFT-KD is above {label} for {sum(above(d) for d in diffs)} of {len(diffs)} "
                f"method(s) (mean 'SFT - {column}' {np.mean(diffs):+.3f} dB)."
            )
    return lines


def _measurement_lines(report: Report) -> List[str]:
    devices = sorted({m.latency_device for m in report.models if m.latency_device})
    lines = [
        f"Quality: {MEASUREMENT_NOTES['metrics']}.",
        f"FLOPs: {MEASUREMENT_NOTES['flops']}.",
        f"Latency: {MEASUREMENT_NOTES['latency']}; device: {', '.join(devices) or 'not given'}.",
        f"Peak memory: {MEASUREMENT_NOTES['peak_memory']}.",
        f"Gap closed: {MEASUREMENT_NOTES['gap_closed']}.",
    ]
    if report.num_seeds > 1:
        lines.append(
            "Seeds: volumes of all seeds are pooled for mean ± std; 'seed std' is the sample std "
            "of the per-seed means."
        )
    return lines


def _meta_lines(report: Report) -> List[str]:
    out = []
    for k, v in report.meta.items():
        if k == "title":
            continue
        if isinstance(v, Mapping):
            v = ", ".join(f"{a}: {b}" for a, b in v.items())
        elif isinstance(v, (list, tuple)):
            v = ", ".join(str(x) for x in v)
        out.append(f"{k}: {v}")
    if "seeds" not in report.meta:
        out.append(f"number of seeds: {report.num_seeds}")
    return out


def render_report(report: Report, markdown: bool) -> str:
    title = str(report.meta.get("title", "SFT-KD-Recon study report"))
    lines: List[str] = []

    def section(name: str) -> None:
        if markdown:
            lines.extend(["", f"## {name}", ""])
        else:
            lines.extend(["", name, "=" * len(name)])

    def bullets(items: List[str]) -> None:
        lines.extend(f"- {x}" for x in items)

    lines.append(f"# {title}" if markdown else title)
    if not markdown:
        lines.append("=" * len(title))
    lines.append("")
    bullets(_meta_lines(report))
    section("Models (mean ± std over volumes)")
    lines.extend(_table(*_model_table(report), markdown))
    section("Teacher-student gap")
    bullets(_gap_lines(report))
    if report.kd_table:
        section("Std-KD vs SFT-KD per method (paper-style table, Matcha et al. 2023)")
        lines.extend(_table(*_kd_rows(report), markdown))
        lines.append("")
        lines.append(_kd_table_note(report))
    if markdown:
        section("How the numbers were measured")
        bullets(_measurement_lines(report))
    if report.caveats:
        section("Fair-comparison caveats")
        bullets(report.caveats)
    return "\n".join(lines) + "\n"


# -- helpers -------------------------------------------------------------------------------
