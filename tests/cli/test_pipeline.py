"""The whole study end to end on tiny demo data (one epoch per stage)."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from sftkd_fastmri.cli.main import main


def _tiny_study(data, out_dir, **changes):
    """A study config on the tiny demo data: one epoch per stage, 4-channel networks."""
    return {
        "data_path": str(data),
        "challenge": "multicoil",
        "test_split": "test_full",
        "batch_size": 2,
        "accelerator": "cpu",
        "progress": False,
        "max_epochs": 1,
        "teacher_overrides": {"chans": 4},
        "student_overrides": {"chans": 4},
        "methods": {"at": 1.0, "imitation": 1.0},
        "out_dir": str(out_dir),
        **changes,
    }


def test_pipeline_runs_end_to_end_and_skips_finished_stages(
    tiny_demo, tmp_path, capsys, monkeypatch
):
    out_dir = tmp_path / "study"
    config = _tiny_study(tiny_demo, out_dir)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["pipeline", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "Std-KD vs SFT-KD" in printed
    assert "[eval] kd_sft/at (seed 0): PSNR " in printed  # one line per model scored

    for name in ("report.md", "report.csv", "report.json", "panel.png", "psnr_per_method.png"):
        assert (out_dir / name).is_file(), name
    with open(out_dir / "report.csv") as f:
        rows = {row["key"]: row for row in csv.DictReader(f)}
    expected = {
        "zero_filled",
        "teacher",
        "student",
        "sft_teacher",
        "control_sft_init",
        "kd_std/at",
        "kd_sft/at",
        "kd_std/imitation",
        "kd_sft/imitation",
    }
    assert set(rows) == expected
    assert float(rows["teacher"]["params"]) > float(rows["student"]["params"])
    # latency is timed once per architecture: the students share one figure, the teachers one
    students = {k for k in expected if k.startswith(("kd_", "student", "control"))}
    assert len({rows[k]["latency_median_s"] for k in students}) == 1
    assert rows["teacher"]["latency_median_s"] == rows["sft_teacher"]["latency_median_s"]
    report = json.loads((out_dir / "report.json").read_text())
    assert {m["key"] for m in report["models"]} == expected
    # the teacher-student gap is the difference of the two rows' mean PSNRs
    gap = float(rows["teacher"]["psnr_mean"]) - float(rows["student"]["psnr_mean"])
    assert report["gap_psnr"] == pytest.approx(gap, abs=1e-3)  # the CSV is rounded
    assert {r["method"] for r in report["kd_table"]} == {"at", "imitation"}
    markdown = (out_dir / "report.md").read_text()
    assert "AT" in markdown and "Imitation" in markdown
    assert report["meta"]["precision"] == "32-true"  # every stage's (run records compare it)

    # a second run finds every stage finished and trains nothing
    assert main(["pipeline", "--config", str(path)]) == 0
    log = (out_dir / "stages.log").read_text()
    assert log.count("[skip]") == 8 and "[done]" not in log
    # under DDP the ranks other than zero train the stages with it, and leave the scoring
    # and the report to rank zero
    import sftkd_fastmri.pipeline.stages as stages
    import sftkd_fastmri.pipeline.study as study

    capsys.readouterr()
    (out_dir / "report.md").unlink()
    for module in (study, stages):
        monkeypatch.setattr(module, "_is_rank_zero", lambda: False)
    assert main(["pipeline", "--config", str(path)]) == 0
    monkeypatch.undo()
    assert capsys.readouterr().out == ""  # the stage lines come once, from rank zero
    assert not (out_dir / "report.md").exists()
    assert main(["pipeline", "--config", str(path)]) == 0
    assert (out_dir / "report.md").is_file()
    # with other settings the finished stages are not passed off as the new ones
    capsys.readouterr()
    changed = {**config, "accelerations": [8], "lr": 0.01}
    path.write_text(yaml.safe_dump(changed))
    assert main(["pipeline", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run with other settings" in err
    assert "accelerations: [4] then, [8] now" in err and "lr: 0.001 then, 0.01 now" in err
    assert (out_dir / "stages.log").read_text() == log  # nothing rewritten

    # a moved study folder reads its own models (done.json paths are relative to the stage)
    from sftkd_fastmri.experiment import StageResult

    moved = tmp_path / "moved"
    out_dir.rename(moved)
    config["out_dir"] = str(moved)
    path.write_text(yaml.safe_dump(config))
    assert main(["pipeline", "--config", str(path)]) == 0
    assert (moved / "stages.log").read_text().count("[skip]") == 8
    teacher = StageResult.load(moved / "seed_0" / "teacher")
    assert teacher.exports["model"] == str(moved / "seed_0" / "teacher" / "model.pt")
    assert teacher.epochs == 1

    # an SFT-only setting concerns the SFT stage alone: the standard teacher is not refused
    capsys.readouterr()
    path.write_text(yaml.safe_dump({**config, "teacher_weight": 0.5}))
    assert main(["pipeline", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "[skip] teacher" in out and "[skip] student" in out
    assert "seed_0/sft holds a finished run with other settings" in err
    assert "teacher_weight: 1.0 then, 0.5 now" in err

    # more epochs for the KD stages: those train on from their last epoch, the rest is reused;
    # (another DDP rank removing done.json first is no error)
    reuse = stages._reuse_or_train_on

    def other_rank_first(done, cfg):
        more = reuse(done, cfg)
        if more:
            (Path(done.out_dir) / "done.json").unlink()
        return more

    monkeypatch.setattr(stages, "_reuse_or_train_on", other_rank_first)
    path.write_text(yaml.safe_dump({**config, "epochs": {"kd": 2}}))
    assert main(["pipeline", "--config", str(path)]) == 0
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert out.count("[more]") == 5 and "trained 1 of the 2 epochs" in out  # control + 4 KD
    log = (moved / "stages.log").read_text()
    assert log.count("[skip]") == 3 and log.count("[done]") == 5
    assert StageResult.load(moved / "seed_0" / "kd_sft_at").epochs == 2
    assert json.loads((moved / "report.json").read_text())["meta"]["epochs"]["kd"] == 2
    # the teacher trains on: the Std-KD stages distilled from its old weights start over,
    # the SFT-side stages (which never saw it) are reused
    path.write_text(yaml.safe_dump({**config, "epochs": {"teacher": 2, "kd": 2}}))
    assert main(["pipeline", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[more] teacher: trained 1 of the 2 epochs" in out
    assert out.count("[redo]") == 2 and "[redo] kd_std_at: its teacher changed" in out
    assert "[skip] kd_sft_at" in out and "[skip] control_sft_init" in out
    assert StageResult.load(moved / "seed_0" / "kd_std_at").epochs == 2
    log = (moved / "stages.log").read_text()
    assert "[more] teacher: trained 1 of the 2 epochs" in log and log.count("[redo]") == 2
    from sftkd_fastmri.experiment.run_record import _sha256

    # a record whose digest is of an earlier kind cannot tell a changed teacher from an
    # unchanged one: refused, never retrained (its outputs stay)
    both = {**config, "epochs": {"teacher": 2, "kd": 2}}
    record_file = moved / "seed_0" / "kd_std_at" / "run_config.json"
    record = json.loads(record_file.read_text())
    record["file_digests"]["teacher_checkpoint"] = "0" * 64  # a digest of the file's bytes
    record_file.write_text(json.dumps(record))
    assert main(["pipeline", "--config", str(path)]) == 2
    assert "kd_std_at holds a finished run with other settings" in capsys.readouterr().err
    assert (moved / "seed_0" / "kd_std_at" / "model.pt").is_file()
    record["file_digests"]["teacher_checkpoint"] = _sha256(
        moved / "seed_0" / "teacher" / "model.pt"
    )
    record_file.write_text(json.dumps(record))
    path.write_text(yaml.safe_dump(both))
    assert main(["pipeline", "--config", str(path)]) == 0
    assert "[redo]" not in capsys.readouterr().out
    # fewer epochs than a finished stage trained: refused, not reported as the fewer
    path.write_text(yaml.safe_dump({**config, "epochs": {"teacher": 2, "kd": 1}}))
    assert main(["pipeline", "--config", str(path)]) == 2
    assert "holds a finished stage of 2 epochs; this study asks for 1" in capsys.readouterr().err
    # ... and so is an unfinished one (no done.json) that trained more than asked
    (moved / "seed_0" / "control_sft_init" / "done.json").unlink()
    assert main(["pipeline", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "control_sft_init holds an unfinished stage that has trained 2 epochs" in err
    path.write_text(yaml.safe_dump(both))  # as many epochs as it trained: it is finished
    assert main(["pipeline", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[run ] control_sft_init -> " in out
    assert "nothing to train; its last checkpoints are exported" in out  # no CLI flags
    assert "(resuming after epoch 2)" in (moved / "stages.log").read_text()
    assert StageResult.load(moved / "seed_0" / "control_sft_init").epochs == 2
    # an interrupted stage of other settings is refused as such, before any epoch advice
    # (two_stage with kd_epochs: without them, or with no epoch left to fine-tune, the study
    # is refused before its first stage)
    (moved / "seed_0" / "kd_std_at" / "done.json").unlink()
    other = {**both, "kd_schedule": "two_stage", "kd_epochs": 1}
    path.write_text(yaml.safe_dump(other))
    assert main(["pipeline", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "kd_std_at holds a run started with other settings (kd_schedule:" in err


def test_controls_are_read_as_the_study_documents():
    from sftkd_fastmri.pipeline import parse_controls

    assert parse_controls(True) == ("a",) and parse_controls("yes") == ("a",)
    assert parse_controls(False) == () and parse_controls("off") == ()
    assert parse_controls(["b", "a"]) == ("a", "b") == parse_controls("all")
    assert parse_controls("b") == ("b",) and parse_controls("a, b") == ("a", "b")
    assert parse_controls([]) == ()
    for bad in ("maybe", ["a", "c"], 3, "a,"):
        with pytest.raises(ValueError, match="controls: expected"):
            parse_controls(bad)


def test_each_kd_stage_gets_only_its_own_methods_layers_and_options(monkeypatch, tmp_path):
    """A study of several KD methods with ``layers`` / ``loss_options`` for one of them: the
    stages of the other methods get none (they refused entries of a method they do not
    distil, after the teacher, student and SFT stages had trained)."""
    from sftkd_fastmri.pipeline import study

    given = {}

    class Finished:
        exports = {"model": "m.pt", "teacher": "t.pt", "student_init": "s.pt"}

    def record(name, cfg, root, runner, log, **overrides):
        given[name] = {**cfg, **overrides}
        return Finished()

    monkeypatch.setattr(study, "_stage", record)
    layers = {"at": [["cascades.0.cnn.relu1", "cascades.0.cnn.relu2"]]}
    cfg = dict(study.STUDY_DEFAULTS, methods={"at": 1.0, "imitation": 1.0}, max_epochs=1)
    cfg.update(layers=layers, loss_options={"at": {"p": 2}}, controls=["a", "b"])
    cfg.update(teacher_overrides=None, student_overrides=None)
    study._train_seed(cfg, tmp_path, [])
    for variant in ("kd_std", "kd_sft", "control_budget"):
        assert given[f"{variant}_at"]["layers"] == layers
        assert given[f"{variant}_at"]["loss_options"] == {"at": {"p": 2}}
        assert given[f"{variant}_imitation"]["layers"] is None
        assert given[f"{variant}_imitation"]["loss_options"] is None
    study._check_networks({**cfg, "teacher": "dccnn_d5c5", "student": "dccnn_d3c5"})


def test_control_b_trains_std_kd_for_the_sft_and_kd_epochs(tiny_demo, tmp_path, capsys):
    from sftkd_fastmri.experiment import StageResult

    out_dir = tmp_path / "study"
    config = _tiny_study(
        tiny_demo, out_dir, limit_train_batches=2, methods={"imitation": 1.0}, controls=["b"]
    )
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["pipeline", "--config", str(path)]) == 0
    assert not (out_dir / "seed_0" / "control_sft_init").exists()  # (a) not asked for
    budget = StageResult.load(out_dir / "seed_0" / "control_budget_imitation")
    assert budget.epochs == 2  # the SFT stage's epoch and the KD stage's
    assert StageResult.load(out_dir / "seed_0" / "kd_std_imitation").epochs == 1
    report = json.loads((out_dir / "report.json").read_text())
    (row,) = report["kd_table"]
    assert row["budget_key"] == "kd_budget/imitation"
    assert row["sft_minus_budget_psnr"] == pytest.approx(row["sft_psnr"] - row["budget_psnr"])
    assert "PSNR SFT - ctrl(b)" in (out_dir / "report.md").read_text()
    assert any(c.startswith("Control (b) present") for c in report["caveats"])
    assert any(c.startswith("Control (a) missing") for c in report["caveats"])


def test_a_ddp_study_trains_on_every_rank_and_reports_once(tiny_demo, tmp_path):
    """Two CPU processes (gloo): Lightning re-runs the command for rank 1, which trains every
    stage with rank zero. Every rank used to score every model again and write the same
    report, print every stage line twice, and a stage that trained on could fail on the
    ``done.json`` the other rank had removed."""
    import subprocess
    import sys

    out_dir = tmp_path / "study"
    config = _tiny_study(tiny_demo, out_dir, devices=2, methods={"imitation": 1.0})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "sftkd_fastmri.cli.main", "pipeline", "--config", str(path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in proc.stderr  # two processes trained
    assert proc.stdout.count("[run ] teacher") == 1  # once, from rank zero
    assert proc.stdout.count("[eval] kd_sft/imitation") == 1
    assert proc.stdout.count("report and figures in") == 1
    report = json.loads((out_dir / "report.json").read_text())
    assert {m["key"] for m in report["models"]} >= {"teacher", "kd_sft/imitation"}


def test_a_fixed_mask_drawn_from_each_seed_scores_each_seed_on_its_own_mask(tiny_demo):
    """With ``fixed_mask`` the mask is drawn from the run's seed: scoring every seed's models
    on the first seed's mask reported them on a mask they never saw."""
    from sftkd_fastmri.cli.options import resolve
    from sftkd_fastmri.experiment.builders import build_datamodule
    from sftkd_fastmri.pipeline import STUDY_DEFAULTS
    from sftkd_fastmri.pipeline.study import _test_loaders

    cfg = {**STUDY_DEFAULTS, **resolve(("data", "optim", "trainer", "runtime"), {}, {})}
    cfg.update(data_path=str(tiny_demo), challenge="multicoil", test_split="test_full")

    def first_mask(loader):
        return next(iter(loader)).mask

    fixed = _test_loaders({**cfg, "fixed_mask": True}, [0, 1])
    for seed in (0, 1):  # the mask each seed's runs trained and validated with
        own = build_datamodule({**cfg, "fixed_mask": True, "seed": seed}).val_dataloader()
        assert (first_mask(fixed[seed]) == first_mask(own)).all()
    assert not (first_mask(fixed[0]) == first_mask(fixed[1])).all()
    shared = _test_loaders({**cfg, "fixed_mask": False}, [0, 1])
    assert shared[0] is shared[1]  # random-type test masks are seeded by file name


def test_an_unfinished_stage_is_not_resumed_at_other_batches_per_epoch(tmp_path):
    """A finished stage trained at another limit_train_batches is refused; an unfinished one
    was resumed at the new setting, mixing both in one stage."""
    from sftkd_fastmri.cli.options import resolve
    from sftkd_fastmri.experiment.run_record import RUN_CONFIG_FILE, run_record
    from sftkd_fastmri.experiment.runs import last_checkpoint
    from sftkd_fastmri.pipeline.stages import _unfinished_epochs

    cfg = resolve(("data", "optim", "trainer", "runtime", "model"), {}, {})
    cfg.update(data_path=str(tmp_path), challenge="multicoil", limit_train_batches=2)
    stage = tmp_path / "teacher"
    last_checkpoint(stage).parent.mkdir(parents=True)
    last_checkpoint(stage).write_bytes(b"")  # an interrupted run's checkpoint
    (stage / RUN_CONFIG_FILE).write_text(json.dumps(run_record({**cfg, "stage": "train"})))
    with pytest.raises(ValueError, match="limit_train_batches=2; this study asks for 1.0"):
        _unfinished_epochs(stage, {**cfg, "limit_train_batches": 1.0}, "train")


def test_a_model_that_scores_nan_is_named_by_its_stage_seed_and_checkpoint(
    tiny_demo, tmp_path, monkeypatch
):
    """One diverged model (a NaN reconstruction) stopped the study's scoring with an error
    naming only a test volume, not which of its models it was."""
    import torch

    from sftkd_fastmri.cli.options import resolve
    from sftkd_fastmri.models import create_model, save_model_checkpoint
    from sftkd_fastmri.pipeline import STUDY_DEFAULTS, study

    torch.manual_seed(0)
    teacher = save_model_checkpoint(create_model("dccnn_d3c5", chans=4), tmp_path / "t.pt")
    student = save_model_checkpoint(create_model("dccnn_d3c5", chans=2), tmp_path / "s.pt")
    diverged = save_model_checkpoint(create_model("dccnn_d3c5", chans=2), tmp_path / "d.pt")
    load = study.load_reconstruction_model

    def load_diverged(path, *args, **kwargs):  # finite weights whose output is not
        model = load(path, *args, **kwargs)
        if str(path) == str(diverged):
            model.cascades[-1].register_forward_hook(lambda m, args, out: out * float("nan"))
        return model

    class Finished:  # a stage that trained earlier: no training in this test
        def __init__(self, model):
            self.exports = {"model": str(model), "teacher": str(teacher), "student_init": ""}

    def stage(name, cfg, root, runner, log, **overrides):
        model = {"teacher": teacher, "kd_sft_imitation": diverged}.get(name, student)
        return Finished(model)

    monkeypatch.setattr(study, "_stage", stage)
    monkeypatch.setattr(study, "load_reconstruction_model", load_diverged)
    cfg = {**STUDY_DEFAULTS, **resolve(("data", "optim", "trainer", "runtime"), {}, {})}
    cfg.update(_tiny_study(tiny_demo, tmp_path / "study", methods={"imitation": 1.0}))
    cfg.update(student_overrides={"chans": 2}, controls=False, seeds=[3])
    with pytest.raises(ValueError) as caught:
        study.run_study(cfg)
    message = str(caught.value)
    assert message.startswith(
        f"scoring the model of stage kd_sft_imitation (seed 3, checkpoint {diverged}) on "
        "multicoil_test_full: "
    )
    assert "the reconstruction holds NaN or Inf" in message
    assert "the reconstruction holds NaN" in str(caught.value.__cause__)  # chained
