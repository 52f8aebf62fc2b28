"""The example scripts under ``examples/`` run end to end (one tiny epoch on demo data)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = ["--max-epochs", "1", "--limit-train-batches", "2", "--limit-val-batches", "1"]
TINY += ["--progress", "false", "--accelerator", "cpu"]


def _run(script: str, args, monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / script), *args])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    return stop.value.code


def test_train_knee_singlecoil_example(tiny_demo, tmp_path, monkeypatch):
    out = tmp_path / "teacher"
    args = ["--data_path", str(tiny_demo), "--model", "dccnn_d3c5", "--out-dir", str(out)]
    assert _run("train_knee_singlecoil.py", args + TINY, monkeypatch) == 0
    assert (out / "model.pt").is_file()


def test_sft_kd_brain_multicoil_example(tiny_demo, tmp_path, monkeypatch):
    out = tmp_path / "sftkd"
    args = ["--data_path", str(tiny_demo), "--method", "fsp", "--out-dir", str(out)]
    assert _run("sft_kd_brain_multicoil.py", args + TINY, monkeypatch) == 0
    assert (out / "sft" / "sft_teacher.ckpt").is_file()
    assert (out / "kd_fsp" / "model.pt").is_file()
