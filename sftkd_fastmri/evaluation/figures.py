"""Figures of the study report: the paper-style reconstruction panel and the KD PSNR plot.

matplotlib is an optional dependency (the ``report`` extra); it is imported when a figure is
drawn, not when this module is imported. Figures are drawn on a bare
:class:`matplotlib.figure.Figure` (Agg canvas), never through ``pyplot``, so nothing here
changes the user's backend or leaks open figures, and it works on headless machines.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from fastmri.evaluate import psnr as fastmri_psnr

from .._io import make_temp_file

__all__ = ["auto_zoom_box", "paper_panel", "psnr_plot", "slice_psnr"]

PathLike = Union[str, os.PathLike]
ZoomBox = Tuple[int, int, int, int]  # (top, left, height, width) in pixels

DPI = 150


def _figure(**kwargs: Any):
    """A new Agg-backed :class:`matplotlib.figure.Figure`, or a clear ImportError."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "sftkd_fastmri.evaluation.figures needs matplotlib; install the report extra: "
            "pip install 'sftkd_fastmri[report]'"
        ) from err
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)  # attach an Agg canvas explicitly: no pyplot, no global backend
    return fig


def _save(fig, out_path: PathLike, dpi: int) -> Path:
    """Save ``fig`` as PNG via a temporary file renamed over ``out_path``."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_file(out_path, suffix=".png")
    try:
        fig.savefig(tmp, dpi=dpi, format="png", facecolor="white")
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


# -- the reconstruction panel --------------------------------------------------------------
def slice_psnr(target: np.ndarray, image: np.ndarray, data_range: Optional[float] = None) -> float:
    """PSNR (dB) of one slice: :func:`fastmri.evaluate.psnr`, ``data_range`` defaulting to
    ``target.max()``; ``inf`` for an exact reconstruction."""
    target = np.asarray(target, dtype=np.float64)
    image = np.asarray(image, dtype=np.float64)
    if np.array_equal(target, image):
        return math.inf  # skimage would divide by zero
    return float(fastmri_psnr(target, image, None if data_range is None else float(data_range)))


def auto_zoom_box(target: np.ndarray, fraction: float = 0.25) -> ZoomBox:
    """The square window (side ``fraction`` of the smaller image side) with the most detail.

    Detail = summed gradient magnitude of the target, so the choice depends on the anatomy
    only, never on which reconstruction looks best or worst.

    Returns:
        ``(top, left, height, width)`` in pixels.
    """
    target = np.asarray(target, dtype=np.float64)
    h, w = target.shape
    side = max(4, int(round(fraction * min(h, w))))
    side = min(side, h, w)
    gy, gx = np.gradient(target)
    energy = np.hypot(gx, gy)
    # Box sums of every side x side window from an integral image.
    integral = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = (
        integral[side:, side:]
        - integral[:-side, side:]
        - integral[side:, :-side]
        + integral[:-side, :-side]
    )
    top, left = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(top), int(left), side, side


def paper_panel(
    images: Mapping[str, np.ndarray],
    target: np.ndarray,
    out_path: PathLike,
    zoom_box: Union[ZoomBox, None, bool] = None,
    title: Optional[str] = None,
    data_range: Optional[float] = None,
    residual_vmax: Optional[float] = None,
    dpi: int = DPI,
) -> Path:
    """The paper-style panel: reconstructions with an inset zoom over their residual maps.

    Columns: the target, then ``images`` in the given order (e.g. zero-filled, teacher,
    student, Std-KD, SFT-KD). Top row: magnitude images on one grey scale (0 to the target's
    99.5th percentile), each titled with its PSNR against the target, with the ``zoom_box``
    outlined and magnified in an inset. Bottom row: ``|x - target|`` on one shared colour scale,
    so darker means better across columns.

    Args:
        images: name -> ``(h, w)`` reconstruction, same shape as ``target``.
        target: ``(h, w)`` reference slice.
        out_path: PNG file to write (atomically).
        zoom_box: ``(top, left, height, width)`` in pixels; ``None`` picks the most detailed
            window of the target (:func:`auto_zoom_box`); ``False`` draws no inset.
        title: figure title.
        data_range: PSNR data range; defaults to ``target.max()`` (the slice maximum; the
            report's volume metrics use the volume maximum, so the numbers can differ).
        residual_vmax: top of the shared residual colour scale; defaults to the median over
            images of their residual's 99.5th percentile (larger residuals saturate).
        dpi: resolution.

    Returns:
        ``out_path`` as a :class:`~pathlib.Path`.
    """
    target = np.asarray(target, dtype=np.float64)
    if target.ndim != 2:
        raise ValueError(f"target must be one slice (h, w), got shape {target.shape}")
    if not images:
        raise ValueError("paper_panel needs at least one image besides the target")
    recons: Dict[str, np.ndarray] = {}
    for name, image in images.items():
        image = np.asarray(image, dtype=np.float64)
        if image.shape != target.shape:
            raise ValueError(f"image {name!r} has shape {image.shape}, target {target.shape}")
        recons[name] = image
    if zoom_box is None or zoom_box is True:
        zoom_box = auto_zoom_box(target)
    elif zoom_box is not False:
        zoom_box = _check_box(zoom_box, target.shape)

    ncols = len(recons) + 1
    h, w = target.shape
    cell = 2.3
    fig = _figure(figsize=(cell * ncols + 0.9, 2 * cell * h / w + 0.9), layout="constrained")
    axes = fig.subplots(2, ncols, squeeze=False)
    vmax = float(np.percentile(target, 99.5)) or float(target.max()) or 1.0
    residuals = {name: np.abs(image - target) for name, image in recons.items()}
    if residual_vmax is None:
        # The median of the per-image 99.5th percentiles: learned reconstructions stay
        # readable and the (much worse) zero-filled residual saturates, flagged by the
        # colour bar's arrow, instead of compressing every other map to black.
        residual_vmax = float(np.median([np.percentile(r, 99.5) for r in residuals.values()]))
    rmax = residual_vmax or 1.0

    columns: List[Tuple[str, np.ndarray]] = [("Target", target), *recons.items()]
    for col, (name, image) in enumerate(columns):
        ax = axes[0, col]
        ax.imshow(image, cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
        if col == 0:
            ax.set_title(f"{name}\nreference", fontsize=9)
        else:
            psnr = slice_psnr(target, image, data_range)
            ax.set_title(f"{name}\n{psnr:.2f} dB", fontsize=9)
        if zoom_box is not False:
            _inset_zoom(ax, image, zoom_box, vmax)
        _bare(ax)

        ax = axes[1, col]
        if col == 0:
            ax.text(
                0.5,
                0.5,
                "residual\n|x - target|\n(shared scale)",
                ha="center",
                va="center",
                fontsize=9,
                transform=ax.transAxes,
            )
            ax.set_axis_off()
            continue
        im = ax.imshow(residuals[name], cmap="inferno", vmin=0, vmax=rmax, interpolation="nearest")
        _bare(ax)
    saturated = any(float(r.max()) > rmax for r in residuals.values())
    fig.colorbar(
        im,
        ax=list(axes[1, 1:]),
        shrink=0.9,
        pad=0.01,
        label="|x - target|",
        extend="max" if saturated else "neither",
    )
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, out_path, dpi)


def _check_box(box: Sequence[int], shape: Tuple[int, int]) -> ZoomBox:
    if len(box) != 4:
        raise ValueError(f"zoom_box must be (top, left, height, width), got {box!r}")
    top, left, bh, bw = (int(v) for v in box)
    if bh < 1 or bw < 1 or top < 0 or left < 0 or top + bh > shape[0] or left + bw > shape[1]:
        raise ValueError(
            f"zoom_box (top, left, height, width) = {tuple(box)} does not fit an image of "
            f"shape {shape}"
        )
    return top, left, bh, bw


def _inset_zoom(ax, image: np.ndarray, box: ZoomBox, vmax: float) -> None:
    """Outline ``box`` on ``ax`` and magnify it in an inset at the lower right corner."""
    top, left, bh, bw = box
    inset = ax.inset_axes([0.56, 0.0, 0.44, 0.44])
    inset.imshow(image, cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
    # Pixel centres sit on integers, so the box spans [left - 0.5, left + bw - 0.5].
    inset.set_xlim(left - 0.5, left + bw - 0.5)
    inset.set_ylim(top + bh - 0.5, top - 0.5)
    _bare(inset)
    for spine in inset.spines.values():
        spine.set_edgecolor("yellow")
        spine.set_linewidth(1.0)
    ax.indicate_inset_zoom(inset, edgecolor="yellow", alpha=0.9)


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


# -- the KD PSNR plot ----------------------------------------------------------------------
def psnr_plot(
    report_or_rows: Any,
    out_path: PathLike,
    teacher_psnr: Optional[float] = None,
    student_psnr: Optional[float] = None,
    title: Optional[str] = None,
    dpi: int = DPI,
) -> Path:
    """PSNR per KD method, Std-KD vs SFT-KD (and control (b), where the study has it) as
    grouped bars with error bars of the std over volumes (of all seeds pooled).

    Dashed horizontal lines mark the standard and SFT teachers, the student without KD and
    control (a), the student from the SFT initialisation without KD. The y axis
    is zoomed to the data (differences are tenths of a dB), so bar heights are not
    proportional to PSNR; the axis label says so.

    Args:
        report_or_rows: a :class:`~sftkd_fastmri.evaluation.report.Report` (teacher and
            student lines are taken from it), or rows - :class:`KDComparison` objects or
            mappings with ``name`` (or ``method``), ``std_psnr``, ``std_psnr_std``,
            ``sft_psnr``, ``sft_psnr_std`` (missing/``None`` values draw no bar).
        out_path: PNG file to write (atomically).
        teacher_psnr: standard teacher PSNR (overrides the report's).
        student_psnr: student-without-KD PSNR (overrides the report's).
        title: figure title.
        dpi: resolution.

    Returns:
        ``out_path`` as a :class:`~pathlib.Path`.
    """
    rows, teacher, student, sft_teacher, control = _plot_inputs(report_or_rows)
    seeds = getattr(report_or_rows, "num_seeds", 1)
    spread = "volumes" if seeds <= 1 else f"volumes\nof {seeds} seeds pooled"
    teacher = teacher if teacher_psnr is None else teacher_psnr
    student = student if student_psnr is None else student_psnr
    if not rows:
        raise ValueError("psnr_plot needs at least one KD method")

    names = [r["name"] for r in rows]
    x = np.arange(len(rows), dtype=float)
    width = 0.38
    fig = _figure(figsize=(max(4.5, 1.1 * len(rows) + 2.5), 3.6), layout="constrained")
    ax = fig.subplots()
    values: List[float] = []
    bars = [("std", "Std-KD", "#8c8c8c"), ("sft", "SFT-KD", "#1f77b4")]
    if any(r.get("budget_psnr") is not None for r in rows):
        bars.insert(1, ("budget", "Std-KD, SFT+KD epochs\n(control (b))", "#bcbd22"))
        width = 0.27
    offsets = (np.arange(len(bars)) - (len(bars) - 1) / 2) * width
    for offset, (variant, label, color) in zip(offsets, bars):
        means = [r.get(f"{variant}_psnr") for r in rows]
        stds = [r.get(f"{variant}_psnr_std") or 0.0 for r in rows]
        keep = [i for i, m in enumerate(means) if m is not None and math.isfinite(m)]
        if not keep:
            continue
        m = np.array([means[i] for i in keep])
        s = np.array([stds[i] for i in keep])
        values += list(m - s) + list(m + s)
        ax.bar(x[keep] + offset, m, width, yerr=s, capsize=3, label=label, color=color)
    lines = [
        (teacher, "teacher (standard)", "#d62728"),
        (sft_teacher, "teacher (SFT)", "#ff7f0e"),
        (student, "student, no KD", "#2ca02c"),
        (control, "student, SFT init, no KD\n(control (a))", "#9467bd"),
    ]
    for value, label, color in lines:
        if value is not None and math.isfinite(value):
            values.append(value)
            ax.axhline(value, linestyle="--", linewidth=1.2, color=color, label=label)
    if not values:
        raise ValueError("psnr_plot: no PSNR value to draw")
    lo, hi = min(values), max(values)
    pad = max(0.15 * (hi - lo), 0.05)
    ax.set_ylim(lo - 2 * pad, hi + pad)  # bars are cut: differences of tenths of a dB matter
    ax.set_xticks(x, names)
    ax.set_ylabel(f"PSNR (dB), mean ± std over {spread}\n(axis does not start at 0)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, out_path, dpi)


def _plot_inputs(
    obj: Any,
) -> Tuple[
    List[Dict[str, Any]], Optional[float], Optional[float], Optional[float], Optional[float]
]:
    """Rows as dicts plus the teacher / student / SFT-teacher / control (a) PSNR of a report
    (all ``None`` for plain rows)."""
    lines: List[Optional[float]] = [None, None, None, None]
    if hasattr(obj, "kd_table") and hasattr(obj, "get"):  # a Report (no import: no cycle)
        keys = ("teacher_key", "student_key", "sft_teacher_key", "control_key")
        for slot, key in enumerate(keys):
            model = obj.get(getattr(obj, key, None))
            if model is not None:
                lines[slot] = model.mean("psnr")
        obj = obj.kd_table
    rows = []
    for r in obj:
        d = dict(r.as_dict() if hasattr(r, "as_dict") else r)
        d.setdefault("name", d.get("method", "?"))
        rows.append(d)
    return (rows, *lines)
