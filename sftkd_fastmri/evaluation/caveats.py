"""The caveats of the study report: what the paper's protocol does not control and whether
this study's controls settle it (seeds, control (a): the SFT-initialised student without KD,
control (b): Std-KD given SFT-KD's epochs, the split, the size of the teacher-student gap).
See Matcha et al., "SFT-KD-Recon", MIDL 2023, and :mod:`.report`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence

if TYPE_CHECKING:
    from .report import KDComparison, Report

MIN_SEEDS = 3  # fewer seeds cannot separate 0.1-0.3 dB from seed noise
#: Differences of PSNR means within this many dB are ties: two variants equal in every seed
#: can differ by ~1e-14 dB after pooling, which must not read as one being ahead.
TIE_DB = 1e-9


def above(diff: Optional[float]) -> bool:
    """Whether a PSNR difference says "ahead": finite and more than a rounding tie."""
    return diff is not None and math.isfinite(diff) and diff > TIE_DB


def finite(x: Optional[float]) -> bool:
    return x is not None and math.isfinite(x)


# Smallest teacher-student gap (dB PSNR) that "gap closed" divides by; seed noise at demo scale
# is a few tenths of a dB, so a fraction of a smaller gap is noise magnified.
MIN_GAP_DB = 0.1


def caveats(report: Report, min_gap_db: float = MIN_GAP_DB) -> List[str]:
    """The fair-comparison caveats (what the paper's protocol does not control) that apply
    to this study."""
    out: List[str] = []
    if report.num_seeds < MIN_SEEDS:
        out.append(
            f"Only {report.num_seeds} seed(s): single runs differ by a few tenths of a dB between "
            "seeds at demo scale, so PSNR differences of 0.1-0.3 dB (SFT-KD vs Std-KD, KD vs "
            f"teacher) are not distinguishable from seed noise. Repeat with >= {MIN_SEEDS} "
            "seeds and compare the spread (`*_seed_std`) before calling them real."
        )
    has_sft_kd = any(r.sft_key is not None for r in report.kd_table)
    if has_sft_kd and report.control_key is None:
        out.append(
            "Control (a) missing: the SFT-KD students start from weights trained during the SFT "
            "stage, so they have seen more epochs than Std-KD students trained from scratch. "
            "Without a student initialised from the SFT branches and fine-tuned without KD, "
            "the SFT-KD advantage cannot be separated from that head start."
        )
    elif has_sft_kd:
        text = (
            "Control (a) present: compare SFT-KD against the SFT-initialised student without KD "
            "(column 'SFT - ctrl(a)'); only the margin over it is attributable to distillation "
            "from the SFT teacher."
        )
        text += _below_control(
            report.kd_table,
            "a",
            lambda r: (r.sft_minus_control_psnr, r.seed_diffs_control_psnr),
            report.num_seeds,
            "there its result comes from the SFT initialisation, not from distillation",
        )
        out.append(text)
    if has_sft_kd:
        out.append(_budget_caveat(report))
    if _on_validation_split(report.meta):
        out.append(
            "Metrics are on the validation split, which also chose the checkpoints; report the "
            "test split for unbiased numbers."
        )
    if report.meta.get("combine_train_val"):
        out.append(
            "The networks trained on the validation split too (combine_train_val), so the "
            "checkpoints were chosen by scores on training data."
        )
    if report.gap_psnr is not None and not report.gap_psnr > 0:
        out.append(
            f"The student without KD is not below the teacher (gap {report.gap_psnr:+.3f} dB): "
            "'gap closed' is undefined."
        )
    elif report.gap_psnr is not None and report.gap_psnr < min_gap_db:
        out.append(
            f"The teacher-student gap ({report.gap_psnr:+.3f} dB) is below {min_gap_db:g} dB, "
            "within seed noise: 'gap closed' is not reported (it would only magnify noise)."
        )
    return out


def _below_control(
    rows: Sequence[KDComparison],
    control: str,
    margins,
    num_seeds: int,
    conclusion: str,
    needs_margin: bool = False,
) -> str:
    """The methods for which SFT-KD's mean PSNR is not above control ``control`` (``margins``
    gives a row's mean SFT - control difference and its per-seed paired differences), and
    what that shows: ``conclusion`` only for methods at or below the control in every one of
    >= MIN_SEEDS paired seeds (with ``needs_margin``, only where SFT-KD is above Std-KD:
    there is a margin to explain); the others with the reason no conclusion is drawn. Empty
    when SFT-KD is above the control for every method."""
    groups: Dict[str, List[str]] = {}
    for r in rows:
        mean, diffs = margins(r)
        if not finite(mean) or above(mean):
            continue
        if num_seeds < MIN_SEEDS or len(diffs) < MIN_SEEDS:
            seeds = min(num_seeds, len(diffs) or num_seeds)
            why = f"with {seeds} seed(s): not separable from seed noise"
        elif any(above(d) for d in diffs):
            why = "above it in some seeds: not separable from seed noise"
        elif needs_margin and not above(r.diff_psnr):
            why = "SFT-KD is not above Std-KD either"
        else:
            why = f"in every seed: {conclusion}"
        groups.setdefault(why, []).append(r.name)
    if not groups:
        return ""
    listed = "; ".join(f"{', '.join(names)} ({why})" for why, names in groups.items())
    return f" SFT-KD is not above control ({control}) for {listed}."


def _budget_caveat(report: Report) -> str:
    """Control (b): whether Std-KD got the epochs SFT-KD had (SFT stage + KD) and what the
    comparison with it shows."""
    with_sft = [r for r in report.kd_table if r.sft_key is not None]
    matched = [r for r in with_sft if r.budget_key is not None]
    if matched:
        text = (
            "Control (b) present: Std-KD trained from scratch for the epochs of the SFT stage "
            "and SFT-KD together (column 'SFT - ctrl(b)'); a margin of SFT-KD over it is not "
            "explained by more training epochs."
        )
        text += _below_control(
            matched,
            "b",
            lambda r: (r.sft_minus_budget_psnr, r.seed_diffs_budget_psnr),
            report.num_seeds,
            "there the SFT-KD margin over Std-KD is explained by its extra epochs",
            needs_margin=True,
        )
        unmatched = [r.name for r in with_sft if r.budget_key is None]
        if unmatched:
            text += f" Not run for {', '.join(unmatched)}."
        return text
    epochs = report.meta.get("epochs")
    if isinstance(epochs, Mapping) and "sft" in epochs and "kd" in epochs:
        return (
            f"Control (b) not run: Std-KD students trained {epochs['kd']} epochs from scratch, "
            f"SFT-KD students {epochs['sft']} (the SFT stage, as student branches) + "
            f"{epochs['kd']}, so Std-KD vs SFT-KD is not matched in epochs. The pipeline runs "
            "it with `controls: [a, b]`."
        )
    listed = (
        ", ".join(f"{k}: {v}" for k, v in epochs.items())
        if isinstance(epochs, Mapping) and epochs
        else "not given"
    )
    return (
        f"Control (b) not run (epoch budgets: {listed}): Std-KD should get the same total "
        "number of epochs as the SFT stage plus SFT-KD for the comparison to be fair."
    )


def _on_validation_split(meta: Mapping[str, Any]) -> bool:
    """Whether the metrics are on the split that chose the checkpoints: the study's
    ``val_split`` itself, or a split named ``val`` (``multicoil_val``, ``validation``)."""
    split = meta.get("split")
    if split is None:
        return False
    if meta.get("val_split") is not None:  # known: a split named "val" may be a held-out test
        return str(split) == str(meta["val_split"])
    name = str(split).lower()
    for challenge in ("singlecoil_", "multicoil_"):
        name = name[len(challenge) :] if name.startswith(challenge) else name
    return name in ("val", "validation")
