"""The report figures are written as PNG files that matplotlib reads back."""

from __future__ import annotations

import numpy as np
import pytest
from fastmri import evaluate as fm_eval

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

from sftkd_fastmri.evaluation.figures import (  # noqa: E402
    auto_zoom_box,
    paper_panel,
    psnr_plot,
    slice_psnr,
)
from sftkd_fastmri.evaluation.metrics import VolumeMetrics  # noqa: E402
from sftkd_fastmri.evaluation.report import build_report  # noqa: E402


def phantom(h: int = 40, w: int = 34) -> np.ndarray:
    """An ellipse 'head' with a bright inner structure (odd, non-square size)."""
    y, x = np.mgrid[:h, :w]
    head = ((y - h / 2) / (0.45 * h)) ** 2 + ((x - w / 2) / (0.4 * w)) ** 2 < 1
    inner = ((y - 0.4 * h) / (0.1 * h)) ** 2 + ((x - 0.6 * w) / (0.08 * w)) ** 2 < 1
    return 0.6 * head + 0.4 * inner


def assert_png(path) -> None:
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0
    assert image.shape[2] in (3, 4)


def test_paper_panel(tmp_path):
    target = phantom()
    rng = np.random.default_rng(0)
    images = {
        name: target + sigma * rng.standard_normal(target.shape)
        for name, sigma in [("Zero-filled", 0.2), ("Teacher", 0.02), ("Student", 0.04)]
    }
    out = paper_panel(images, target, tmp_path / "figs" / "panel.png", title="demo")
    assert_png(out)
    assert [p.name for p in (tmp_path / "figs").iterdir()] == ["panel.png"]
    one = {"Teacher": images["Teacher"]}
    assert_png(paper_panel(one, target, tmp_path / "box.png", zoom_box=(5, 4, 10, 12)))
    assert_png(paper_panel(one, target, tmp_path / "nobox.png", zoom_box=False))


def test_paper_panel_rejects_bad_input(tmp_path):
    target = phantom()
    with pytest.raises(ValueError, match="'Teacher'"):
        paper_panel({"Teacher": target[:-1]}, target, tmp_path / "x.png")
    with pytest.raises(ValueError, match="zoom_box"):
        paper_panel({"Teacher": target}, target, tmp_path / "x.png", zoom_box=(30, 0, 20, 5))


def test_slice_psnr_and_zoom_box():
    target = phantom()
    noisy = target + 0.05 * np.random.default_rng(1).standard_normal(target.shape)
    expected = fm_eval.psnr(target[None], noisy[None], target.max())
    assert slice_psnr(target, noisy) == pytest.approx(expected)
    top, left, h, w = auto_zoom_box(target)
    assert h == w and 0 <= top <= target.shape[0] - h and 0 <= left <= target.shape[1] - w


def _vm(p):
    """Two volumes of PSNR ``p - 0.1`` and ``p + 0.1``."""
    return [VolumeMetrics(f"v{i}", 4, 0.01, p + d, 0.95, 0.3) for i, d in enumerate((-0.1, 0.1))]


def _report():
    entries = [
        dict(key="teacher", name="T", kind="teacher", variant="std", metrics=_vm(40.0)),
        dict(key="student", name="S", kind="student", variant="std", metrics=_vm(39.4)),
        dict(key="kd_std/at", name="AT", kind="kd", method="at", variant="std", metrics=_vm(39.6)),
        dict(key="kd_sft/at", name="AT", kind="kd", method="at", variant="sft", metrics=_vm(39.9)),
        dict(key="kd_std/sp", name="SP", kind="kd", method="sp", variant="std", metrics=_vm(39.5)),
    ]
    return build_report(entries)


def test_psnr_plot_from_report_and_rows(tmp_path):
    assert_png(psnr_plot(_report(), tmp_path / "psnr.png", title="demo"))
    rows = [
        {"method": "at", "std_psnr": 39.6, "std_psnr_std": 0.1, "sft_psnr": 39.9},
        {"name": "FitNets", "std_psnr": 39.5, "sft_psnr": None},
    ]
    out = psnr_plot(rows, tmp_path / "rows.png", teacher_psnr=40.0, student_psnr=39.4)
    assert_png(out)
    with pytest.raises(ValueError, match="KD method"):
        psnr_plot([], tmp_path / "empty.png")


def test_psnr_plot_lines_include_control_a():
    from sftkd_fastmri.evaluation.figures import _plot_inputs

    entries = [
        dict(key="teacher", name="T", kind="teacher", variant="std", metrics=_vm(40.0)),
        dict(key="student", name="S", kind="student", variant="std", metrics=_vm(39.4)),
        dict(key="sft_teacher", name="T'", kind="teacher", variant="sft", metrics=_vm(40.1)),
        dict(key="control_sft_init", name="C", kind="student", variant="sft", metrics=_vm(39.7)),
        dict(key="kd_sft/at", name="AT", kind="kd", method="at", variant="sft", metrics=_vm(39.9)),
    ]
    rows, teacher, student, sft_teacher, control = _plot_inputs(build_report(entries))
    assert (teacher, student, sft_teacher, control) == pytest.approx((40.0, 39.4, 40.1, 39.7))
    assert [r["name"] for r in rows] == ["AT"]


def test_psnr_plot_draws_control_b_and_names_its_spread(tmp_path, monkeypatch):
    """Control (b) gets its own bar; the error bars are the std over volumes of all seeds
    pooled, and the axis says so (not a spread over seeds)."""
    from sftkd_fastmri.evaluation import figures

    drawn = {}
    real_save = figures._save

    def keep(fig, out_path, dpi):
        drawn["fig"] = fig
        return real_save(fig, out_path, dpi)

    monkeypatch.setattr(figures, "_save", keep)
    entries = []
    for seed in (0, 1):
        entries += [
            dict(key="teacher", name="T", kind="teacher", variant="std", metrics=_vm(40.0)),
            dict(key="student", name="S", kind="student", variant="std", metrics=_vm(39.4)),
            dict(key="kd_std/at", name="a", kind="kd", method="at", variant="std",
                 metrics=_vm(39.6)),
            dict(key="kd_sft/at", name="b", kind="kd", method="at", variant="sft",
                 metrics=_vm(39.9)),
            dict(key="kd_budget/at", name="c", kind="kd", method="at", variant="budget",
                 metrics=_vm(39.7)),
        ]  # fmt: skip
        for e in entries[-5:]:
            e["seed"] = seed
    assert_png(psnr_plot(build_report(entries), tmp_path / "psnr.png"))
    ax = drawn["fig"].axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "Std-KD, SFT+KD epochs\n(control (b))" in labels
    heights = sorted(round(p.get_height(), 3) for p in ax.patches)
    assert heights == [39.6, 39.7, 39.9]  # three bars for the one method
    assert "std over volumes\nof 2 seeds pooled" in ax.get_ylabel()
    assert "mean ± std over volumes of all seeds pooled" in build_report(entries).to_markdown()


def test_a_study_without_matplotlib_skips_its_figures(tmp_path, monkeypatch, capsys):
    """matplotlib is the optional report extra: a study without it writes its report and
    says the figures were skipped (figures.py imports matplotlib only when drawing, so the
    error came from the first plot, after every stage had trained)."""
    import sys

    from sftkd_fastmri.pipeline import study

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    assert study._figures(None, [], {}, [], tmp_path) == {}
    assert "[warn] figures skipped" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
