"""The example scripts under ``examples/`` run end to end (one tiny epoch on demo data)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

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


def test_sft_kd_brain_multicoil_example(tiny_demo, tmp_path, monkeypatch, capsys):
    import json

    out = tmp_path / "sftkd"
    args = ["--data_path", str(tiny_demo), "--out-dir", str(out)]
    # a misspelt method, or an option one of the two stages does not take, is refused
    # before the SFT stage trains
    assert _run("sft_kd_brain_multicoil.py", args + ["--method", "fitnets"], monkeypatch) == 2
    assert "--method 'fitnets': available" in capsys.readouterr().err
    bad = args + ["--imitation-weight", "0.5"] + TINY
    assert _run("sft_kd_brain_multicoil.py", bad, monkeypatch) == 2
    assert not out.exists()

    args += ["--method", "fsp"]
    assert _run("sft_kd_brain_multicoil.py", args + TINY, monkeypatch) == 0
    assert (out / "sft" / "sft_teacher.ckpt").is_file()
    assert (out / "kd_fsp" / "model.pt").is_file()
    for stage in ("sft", "kd_fsp"):  # brain masks are equispaced
        record = json.loads((out / stage / "run_config.json").read_text())
        assert record["mask_type"] == "equispaced_fraction"
    # the SFT stage's teacher export changed since distillation ran (as when the SFT stage
    # trains on to a better epoch): distillation starts again from it, instead of refusing
    best = out / "sft" / "checkpoints" / "best.ckpt"  # what the SFT stage exports from
    ckpt = torch.load(best, weights_only=False)
    ckpt["state_dict"]["sft.teacher.cascades.0.cnn.conv0.bias"] += 0.01
    torch.save(ckpt, best)
    capsys.readouterr()
    assert _run("sft_kd_brain_multicoil.py", args + TINY, monkeypatch) == 0
    assert "[redo]" in capsys.readouterr().out
    assert _run("sft_kd_brain_multicoil.py", args + TINY, monkeypatch) == 0  # nothing new
    assert "[redo]" not in capsys.readouterr().out
    # a folder of a run with random masks (the script's earlier default) goes on with them
    for stage in ("sft", "kd_fsp"):
        path = out / stage / "run_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "mask_type": "random"}))
    assert _run("sft_kd_brain_multicoil.py", args + TINY, monkeypatch) == 0


def test_sft_kd_example_takes_out_dir_in_both_spellings(tmp_path, monkeypatch):
    """--out_dir (the spelling the commands accept too) names the example's folder; it was
    forwarded to both stages and overridden by the default folder."""
    import sftkd_fastmri.cli.main as cli

    calls = []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(list(argv)) or 0)
    for flag in ("--out_dir", "--out-dir"):
        calls.clear()
        out = tmp_path / flag.strip("-")
        assert (
            _run("sft_kd_brain_multicoil.py", ["--data_path", "x", flag, str(out)], monkeypatch)
            == 0
        )
        sft, distill = calls
        assert sft[sft.index("--out-dir") + 1] == str(out / "sft")
        assert distill[distill.index("--out-dir") + 1] == str(out / "kd_at")
        assert "--out_dir" not in sft + distill and "runs/brain_sftkd" not in " ".join(sft)
