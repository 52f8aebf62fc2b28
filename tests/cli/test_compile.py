"""``--compile``: the trained network runs under ``torch.compile`` in every training command,
its checkpoints keep plain names, and a run may resume with or without it."""

import argparse
import csv
import importlib.util

import pytest
import torch
from torch._dynamo import list_backends, register_backend

from sftkd_fastmri.cli.main import main
from sftkd_fastmri.cli.options import compile_value, resolve
from sftkd_fastmri.models import read_checkpoint

from .test_cli import _common

#: Graphs handed to the counting backend, by the class of the code they came from.
GRAPHS = []
BACKEND = "sftkd_test_counting"


def _counting(gm, example_inputs):
    GRAPHS.append(gm)
    return gm.forward  # runs the captured graph as it is (autograd as in eager)


if BACKEND not in list_backends(exclude_tags=()):
    register_backend(compiler_fn=_counting, name=BACKEND)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    GRAPHS.clear()
    yield
    torch._dynamo.reset()


def test_compile_values():
    assert compile_value("true") is True and compile_value("off") is False
    assert compile_value(True) is True and compile_value("aot_eager") == "aot_eager"
    with pytest.raises(argparse.ArgumentTypeError, match="torch.compile backend .*inductor"):
        compile_value("inductr")
    if importlib.util.find_spec("tvm") is None:  # registered by torch, not installed here
        with pytest.raises(argparse.ArgumentTypeError, match="needs the package 'tvm'"):
            compile_value("tvm")
    cfg = resolve(("trainer",), {"compile": "yes"}, {})  # a config file's value
    assert cfg["compile"] is True
    assert resolve(("trainer",), {}, {})["compile"] is False  # eager by default


def _first_train_loss(out_dir):
    with open(out_dir / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train_loss")]
    return float(rows[0]["train_loss"])


def _plain_names(ckpt):
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return not any("_orig_mod" in k for k in state)


@pytest.mark.parametrize("command", ["train", "sft"])
def test_compiled_training_computes_what_eager_training_does(command, tiny_demo, tmp_path):
    sizes = (
        ["--model-overrides", "chans=4"]
        if command == "train"
        else ["--teacher-overrides", "chans=4", "--student-overrides", "chans=4"]
    )
    losses = {}
    for setting in ("false", BACKEND):
        out = tmp_path / setting
        args = [command, *_common(tiny_demo), *sizes, "--out-dir", str(out)]
        assert main([*args, "--compile", setting]) == 0
        losses[setting] = _first_train_loss(out)
        assert _plain_names(out / "checkpoints" / "last.ckpt")
    assert GRAPHS, "the compiled run never called torch.compile's backend"
    # the first step's loss comes before any update: the compiled forward computes the same
    assert losses[BACKEND] == pytest.approx(losses["false"], rel=1e-5)
    # the exports are plain networks
    exported = ["model.pt"] if command == "train" else ["sft_teacher.ckpt", "sft_student_init.ckpt"]
    for name in exported:
        assert read_checkpoint(tmp_path / BACKEND / name)["state_dict"]
    # a compiled run resumes without compiling (and the other way round): same run, same names
    out = tmp_path / BACKEND
    args = [command, *_common(tiny_demo), *sizes, "--out-dir", str(out), "--max-epochs", "2"]
    assert main(args) == 0
    assert main([*args[:-1], "3", "--compile", BACKEND]) == 0
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 2


def test_distillation_runs_on_the_compiled_student(tiny_demo, tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    common = [*_common(tiny_demo), "--model-overrides", "chans=4"]
    assert main(["train", *common, "--model", "dccnn_d5c5", "--out-dir", str(teacher_dir)]) == 0
    losses = {}
    for setting in ("false", BACKEND):
        out = tmp_path / setting
        args = ["distill", *common, "--out-dir", str(out), "--compile", setting]
        args += ["--teacher-checkpoint", str(teacher_dir / "model.pt")]
        assert main([*args, "--methods", "at=1,imitation=1"]) == 0
        with open(out / "logs" / "version_0" / "metrics.csv") as f:
            first = next(r for r in csv.DictReader(f) if r.get("kd/at_step"))
        losses[setting] = (float(first["kd/at_step"]), float(first["kd/imitation_step"]))
        assert _plain_names(out / "checkpoints" / "last.ckpt")
    assert GRAPHS
    # the feature hooks fired under compilation, and captured the same features
    assert losses[BACKEND] == pytest.approx(losses["false"], rel=1e-5)
    assert losses[BACKEND][0] > 0
