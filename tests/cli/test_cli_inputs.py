"""Command-line input that used to be ignored, refused late or explained misleadingly."""

from __future__ import annotations

import pytest
import torch

from sftkd_fastmri.cli.main import build_parser, main
from sftkd_fastmri.models import CheckpointError, create_model, read_checkpoint


def test_a_distill_config_with_the_sft_key_init_student_is_refused(tmp_path, capsys):
    """--init-student sets init_checkpoint; as a config key, init_student belongs to sft and
    was ignored: the student trained from scratch."""
    config = tmp_path / "kd.yaml"
    config.write_text("init_student: sft_student_init.ckpt\nmethods: {imitation: 1.0}\n")
    assert main(["distill", "--config", str(config), "--data-path", str(tmp_path)]) == 2
    assert "Rename the key to init_checkpoint" in capsys.readouterr().err


def test_config_keys_of_other_commands_are_named(tmp_path, capsys):
    from sftkd_fastmri.cli.options import resolve

    config = {"lr": 0.01, "methods": {"at": 1.0}, "teacher": "dccnn_d5c5"}
    cfg = resolve(("data", "optim"), config, {}, source="c")
    assert cfg["lr"] == 0.01 and "methods" not in cfg and "teacher" not in cfg
    assert "c: not options of this command, ignored: methods, teacher" in capsys.readouterr().err
    resolve(("data", "optim"), {"lr": 0.01}, {}, source="c")
    assert capsys.readouterr().err == ""


def test_config_note_is_printed_by_rank_zero_only(monkeypatch, capsys):
    from pytorch_lightning.utilities import rank_zero_only

    from sftkd_fastmri.cli.options import resolve

    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)  # another DDP process
    assert resolve(("optim",), {"lr": 0.01, "teacher": "t"}, {}, source="c")["lr"] == 0.01
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("precision", ["16-true", "bf16-true"])
def test_16_bit_true_precision_is_refused_by_the_parser(precision, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--precision", precision])
    assert "data-consistency FFTs need float32" in capsys.readouterr().err
    assert build_parser().parse_args(["train", "--precision", "bf16-mixed"]).precision == (
        "bf16-mixed"
    )


def test_a_study_whose_profile_device_is_missing_fails_before_training(tmp_path):
    from sftkd_fastmri.pipeline import run_study

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    from sftkd_fastmri.cli.options import GROUPS

    defaults = {o.name: o.default for group in GROUPS.values() for o in group}
    for device, message in (("cuda", "no CUDA device here"), ("tpu", "'cpu' or a CUDA device")):
        cfg = {**defaults, "profile_device": device, "out_dir": str(tmp_path / "study")}
        with pytest.raises(ValueError, match=message):
            run_study(cfg)
    assert not (tmp_path / "study").exists()


def test_pipeline_resume_false_trains_every_stage_from_the_start(tmp_path, monkeypatch):
    """It skipped finished stages and labelled a stage it then restarted 'training on'."""
    from sftkd_fastmri.pipeline import stages

    calls = []

    def runner(cfg):
        calls.append(cfg)
        return "trained"

    monkeypatch.setitem(stages._KIND, runner, "train")
    finished = object()  # a stage that finished earlier
    monkeypatch.setattr(stages.StageResult, "load", staticmethod(lambda out_dir: finished))
    log = []
    result = stages._stage("teacher", {"resume": False, "max_epochs": 2}, tmp_path, runner, log)
    assert result == "trained" and calls[0]["resume"] is False
    assert log[0].startswith("[new ] teacher") and "resume false" in log[0]


def test_demo_runs_differ_in_epochs_only(tmp_path):
    """A finished demo asked for more epochs trains on: its learning-rate step no longer
    follows the epochs (which made the run look like one of other settings)."""
    from sftkd_fastmri.cli.demo_config import demo_config
    from sftkd_fastmri.experiment.run_record import RUN_IDENTITY_KEYS

    one, two = demo_config(tmp_path, tmp_path, epochs=1), demo_config(tmp_path, tmp_path, 2)
    assert [k for k in RUN_IDENTITY_KEYS if one.get(k) != two.get(k)] == []


def test_checkpoint_paths_that_are_folders_or_onnx_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder; give a checkpoint file in it"):
        read_checkpoint(tmp_path)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07")
    with pytest.raises(CheckpointError, match="is an ONNX export"):
        read_checkpoint(onnx)
    other = tmp_path / "other.pt"
    other.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(other)
    assert "weights_only=False" not in str(err.value)  # torch's advice is left out


def test_an_sft_checkpoint_given_for_the_student_names_its_student_export(tmp_path):
    from sftkd_fastmri.models import init_from_checkpoint

    teacher, student = create_model("dccnn_d5c5", chans=4), create_model("dccnn_d3c5", chans=4)
    state = {f"sft.teacher.{k}": v for k, v in teacher.state_dict().items()}
    state.update({f"sft.student.{k}": v for k, v in student.state_dict().items()})
    hp = {"teacher_preset": "dccnn_d5c5", "student_preset": "dccnn_d3c5",
          "teacher_config": teacher.config, "student_config": student.config}  # fmt: skip
    path = tmp_path / "best.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hp}, path)
    with pytest.raises(CheckpointError, match="its student initialisation is the sft_student"):
        init_from_checkpoint(create_model("dccnn_d3c5", chans=4), path)


def test_a_closed_stdout_ends_the_command_quietly(monkeypatch):
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone, as `sftkd-fastmri models | head -1` leaves it
    with open(write_end, "w", buffering=1) as stdout:
        monkeypatch.setattr("sys.stdout", stdout)
        assert main(["models"]) == 141  # no traceback: BrokenPipeError is not raised
        print("more output", file=stdout)  # later writes (the final flush) go nowhere


def test_inputs_of_the_other_challenge_warn_in_training_commands(tmp_path, capsys):
    """evaluate warned about a network trained on the other challenge; distill, sft and
    train took one silently."""
    from sftkd_fastmri.models import create_model, save_model_checkpoint

    single = save_model_checkpoint(
        create_model("dccnn_d5c5", chans=4), tmp_path / "t.pt", extra={"challenge": "singlecoil"}
    )
    (tmp_path / "data").mkdir()  # no split folders: each command stops at reading the data
    common = ["--data-path", str(tmp_path / "data"), "--challenge", "multicoil"]
    common += ["--out-dir", str(tmp_path / "out")]
    runs = {
        "distilling it": ["distill", "--teacher", str(single), "--method", "imitation"],
        "training from it": ["train", "--model", "dccnn_d5c5", "--init-checkpoint", str(single)],
    }
    for use, argv in runs.items():
        assert main([*argv, *common, "--model-overrides", "chans=4"]) == 2
        err = capsys.readouterr().err
        assert f"t.pt was trained on singlecoil k-space; {use} on multicoil data" in err
        assert "multicoil_train does not exist" in err


def test_flags_and_keys_read_as_they_are_meant(tmp_path, capsys):
    from sftkd_fastmri.cli.options import overrides_option

    # a bare key was read as 1.0 ("chans must be an integer >= 1, got 1.0")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--model-overrides", "chans"])
    assert "expected KEY=VALUE items (e.g. chans=16,dc_mode=soft), got chans" in (
        capsys.readouterr().err
    )
    assert overrides_option("chans=8,dc_mode=soft") == {"chans": 8, "dc_mode": "soft"}
    # YAML 1.1 reads 1e-3 as text: a TypeError deep in the model before
    assert overrides_option("init_lambda=1e-3") == {"init_lambda": 0.001}
    from sftkd_fastmri.models import create_model

    for bad in ({"init_lambda": float("nan")}, {"init_lambda": "1e-3"}, {"in_chans": 2.0}):
        with pytest.raises(ValueError, match="must be"):  # NaN outputs, or torch's TypeError
            create_model("dccnn_d3c5", dc_mode="soft", **bad)
    # 0 volumes / slices / coils fell back to the defaults
    for flag in ("--volumes", "--slices", "--num-coils"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["make-demo-data", str(tmp_path), flag, "0"])
        assert "expected an integer >= 1, got 0" in capsys.readouterr().err
    # "seeds: 3" ran the one seed 3
    config = tmp_path / "study.yaml"
    config.write_text("seeds: 3\n")
    assert main(["pipeline", "--config", str(config)]) == 2
    assert "seeds: expected a list of seeds such as [0, 1, 2], got 3" in capsys.readouterr().err


def test_max_epochs_flag_overrides_a_configs_epochs(tmp_path, monkeypatch, capsys):
    """Flags override the file: --max-epochs was silently beaten by a config's epochs."""
    from sftkd_fastmri.pipeline import study

    seen = {}

    def fake_study(cfg):
        seen.update(cfg)
        raise SystemExit("error: stopped")

    monkeypatch.setattr(study, "run_study", fake_study)
    monkeypatch.setattr("sftkd_fastmri.pipeline.run_study", fake_study)
    config = tmp_path / "study.yaml"
    config.write_text("epochs: {teacher: 150, kd: 100}\n")
    assert main(["pipeline", "--config", str(config), "--max-epochs", "1"]) == 2
    assert seen["epochs"] is None and seen["max_epochs"] == 1
    assert "--max-epochs 1 sets the epochs of every stage" in capsys.readouterr().err
    assert main(["pipeline", "--config", str(config)]) == 2
    assert seen["epochs"] == {"teacher": 150, "kd": 100}


def test_demo_finishes_demo_data_that_a_stopped_run_left(tmp_path, monkeypatch, capsys):
    """demo took any folder with a manifest as finished demo data: after a stop while writing
    them, it ran the study on the few files written."""
    import json
    from types import SimpleNamespace

    import sftkd_fastmri.cli.commands as commands
    import sftkd_fastmri.data.demo as demo

    written = []

    def write(root, **kwargs):
        written.append(root)
        return SimpleNamespace(backend="phantom")

    monkeypatch.setattr(demo, "write_demo_data", write)
    monkeypatch.setattr(commands, "_run_study", lambda cfg: 0)
    data = tmp_path / "out" / "data"
    data.mkdir(parents=True)
    argv = ["demo", "--out-dir", str(tmp_path / "out"), "--quiet"]
    (data / "demo_info.json").write_text(json.dumps({"complete": False}))
    assert main(argv) == 0 and written == [data]  # finished by the writer
    (data / "demo_info.json").write_text(json.dumps({"complete": True}))
    assert main(argv) == 0 and written == [data]  # used as it is
    assert "using the demo data in" in capsys.readouterr().out


def test_a_missing_optional_dependency_is_one_error_line(tmp_path, monkeypatch, capsys):
    """An option that needs an extra not installed (nilearn for the demo's brain anatomy) is
    the user's input: one error line naming it, not a traceback, and nothing written."""
    import sys

    monkeypatch.setitem(sys.modules, "nilearn", None)  # import nilearn fails
    out = tmp_path / "demo"
    assert main(["make-demo-data", str(out), "--backend", "nilearn"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nilearn" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert main(["make-demo-data", str(afile), "--backend", "phantom"]) == 2
    assert "afile is a file; expected a folder" in capsys.readouterr().err
    assert afile.read_text() == "mine"


def test_evaluate_takes_its_own_options_from_a_config_and_refuses_a_folder_in_the_split(
    tiny_demo, tmp_path, capsys
):
    """evaluate's --config takes its own keys (they were "unknown keys"), flags still win;
    an --eval-out-dir inside the split folder being scored is refused by name (the error
    blamed evaluate's own staging folder)."""
    import json

    out = tmp_path / "scores"
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"data_path: {tiny_demo}\nchallenge: multicoil\nsplit: test_full\n"
        f"eval_out_dir: {out}\nprogress: false\n"
    )
    assert main(["evaluate", "--config", str(config)]) == 0
    assert {r["fname"] for r in json.loads((out / "metrics.json").read_text())}
    # the same folder again: refused without overwrite, which the config may give
    assert main(["evaluate", "--config", str(config)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    config.write_text(config.read_text() + "overwrite: true\nrole: student\n")
    assert main(["evaluate", "--config", str(config)]) == 0
    config.write_text(config.read_text() + "role: neither\n")
    assert main(["evaluate", "--config", str(config)]) == 2
    assert "role: expected one of auto, teacher, student" in capsys.readouterr().err

    inside = tiny_demo / "multicoil_test_full"
    flags = ["--data-path", str(tiny_demo), "--challenge", "multicoil", "--split", "test_full"]
    assert main(["evaluate", *flags, "--eval-out-dir", str(inside / "sub")]) == 2
    assert "is inside the split folder" in capsys.readouterr().err
    assert not (inside / "sub").exists()
