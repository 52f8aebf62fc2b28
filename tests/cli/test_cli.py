"""Smoke tests of the sftkd-fastmri command on tiny demo data."""

import json
import re
import shutil

import pytest
import yaml

from sftkd_fastmri.cli.main import build_parser, main
from sftkd_fastmri.models import create_model, save_model_checkpoint

TINY = ["--max-epochs", "1", "--batch-size", "2", "--progress", "false", "--accelerator", "cpu"]


def _common(root, challenge="singlecoil"):
    return ["--data-path", str(root), "--challenge", challenge, *TINY]


@pytest.mark.parametrize(
    "command", ["train", "sft", "distill", "evaluate", "pipeline", "demo", "make-demo-data"]
)
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: sftkd-fastmri" in capsys.readouterr().out


def test_models_lists_presets_with_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "dccnn_d5c5_paper" in out and "141,765" in out and "49,285" in out
    assert "varnet" in out and "cascaded_varnet: num_cascades=12" in out


def test_the_varnet_preset_trains_through_sft_and_evaluates(tiny_demo, tmp_path, capsys):
    """fastMRI's VarNet as a preset of the commands: SFT with a VarNet teacher and a narrower
    VarNet student, exports that evaluate reloads from their recorded configs."""
    from sftkd_fastmri.models import CascadedVarNet, load_model

    small = "num_cascades=2,pools=1,sens_chans=2,sens_pools=1,chans="
    out = tmp_path / "sft"
    argv = ["sft", *_common(tiny_demo, "multicoil"), "--limit-train-batches", "1"]
    argv += ["--teacher", "varnet", "--teacher-overrides", small + "4", "--student", "varnet"]
    assert main([*argv, "--student-overrides", small + "2", "--out-dir", str(out)]) == 0
    teacher, student = (
        load_model(out / "sft_teacher.ckpt"),
        load_model(out / "sft_student_init.ckpt"),
    )
    assert isinstance(teacher, CascadedVarNet) and isinstance(student, CascadedVarNet)
    assert (teacher.config["chans"], student.config["chans"]) == (4, 2)
    capsys.readouterr()
    args = ["evaluate", "--data-path", str(tiny_demo), "--challenge", "multicoil"]
    args += ["--split", "test_full", "--progress", "false"]
    assert main([*args, "--checkpoint", str(out / "sft_teacher.ckpt")]) == 0
    assert "mean" in capsys.readouterr().out
    # distilled with a feature loss by its default pairing (the cascades' U-Nets)
    kd = tmp_path / "kd"
    argv = ["distill", *_common(tiny_demo, "multicoil"), "--limit-train-batches", "1"]
    argv += ["--model", "varnet", "--model-overrides", small + "2", "--out-dir", str(kd)]
    argv += ["--teacher-checkpoint", str(out / "sft_teacher.ckpt")]
    argv += ["--init-checkpoint", str(out / "sft_student_init.ckpt")]
    assert main([*argv, "--methods", "at=1,sp=1"]) == 0
    header = (kd / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "kd/at_step" in header and "kd/sp_step" in header


def test_train_with_config_file_flags_override_and_resume(tiny_demo, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": "dccnn_d3c5",
                "model_overrides": {"chans": 4},
                "max_epochs": 5,
                "lr": 1e-3,
                "accelerations": 4,
            }
        )
    )
    out_dir = tmp_path / "run"
    argv = ["train", "--config", str(config), *_common(tiny_demo), "--out-dir", str(out_dir)]
    assert main(argv) == 0  # --max-epochs 1 on the command line beats max_epochs: 5
    assert (out_dir / "model.pt").is_file() and (out_dir / "checkpoints" / "last.ckpt").is_file()
    metrics = (out_dir / "logs" / "version_0" / "metrics.csv").read_text()
    assert "val_metrics/psnr" in metrics and "validation_loss" in metrics
    assert json.loads((out_dir / "done.json").read_text())["best_checkpoint"]
    # resume: a second run with more epochs continues from last.ckpt (epoch 1 only)
    argv[argv.index("1")] = "2"
    assert main(argv) == 0
    resumed = (out_dir / "logs" / "version_1" / "metrics.csv").read_text().splitlines()
    epoch_col = resumed[0].split(",").index("epoch")
    assert {row.split(",")[epoch_col] for row in resumed[1:]} == {"1"}
    # the same settings again: the run is finished, and says so
    capsys.readouterr()
    assert main(argv) == 0
    assert "already trained 2 epochs (max_epochs=2); nothing to train" in capsys.readouterr().out
    # other settings in the same folder: refused before anything trains, differences listed
    before = sorted(p.name for p in (out_dir / "checkpoints").iterdir())
    assert main([*argv, "--model", "dccnn_d5c5", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "holds a run started with other settings" in err
    assert "model: 'dccnn_d3c5' then, 'dccnn_d5c5' now" in err and "lr: 0.001 then, 0.5 now" in err
    assert sorted(p.name for p in (out_dir / "checkpoints").iterdir()) == before

    eval_dir = tmp_path / "eval"
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                "--data-path",
                str(tiny_demo),
                "--challenge",
                "singlecoil",
                "--checkpoint",
                str(out_dir / "model.pt"),
                "--split",
                "test_full",
                "--progress",
                "false",
                "--eval-out-dir",
                str(eval_dir),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "PSNR" in out and "mean" in out
    rows = json.loads((eval_dir / "metrics.json").read_text())
    assert len(rows) == 1 and rows[0]["psnr"] > 0
    assert list((eval_dir / "reconstructions").glob("*.h5"))


def test_sft_then_distill_multicoil(tiny_demo, tmp_path, capsys):
    sft_dir = tmp_path / "sft"
    assert (
        main(
            [
                "sft",
                *_common(tiny_demo, "multicoil"),
                "--out-dir",
                str(sft_dir),
                "--teacher-overrides",
                "chans=4",
                "--student-overrides",
                "chans=4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    teacher = out.split("teacher export:")[1].split()[0]
    student = out.split("student initialisation:")[1].split()[0]
    kd_dir = tmp_path / "kd"
    assert (
        main(
            [
                "distill",
                *_common(tiny_demo, "multicoil"),
                "--out-dir",
                str(kd_dir),
                "--teacher-checkpoint",
                teacher,
                "--init-checkpoint",
                student,
                "--model-overrides",
                "chans=4",
                "--methods",
                "at=1,imitation=0.5",
            ]
        )
        == 0
    )
    metrics = (kd_dir / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "kd/at" in metrics and "kd/imitation" in metrics
    assert (kd_dir / "model.pt").is_file()
    # the data's challenge is recorded beside the weights (the export's default signature)
    from sftkd_fastmri.models import read_checkpoint

    for path in (teacher, student, kd_dir / "model.pt"):
        assert read_checkpoint(path)["sftkd_fastmri"]["extra"]["challenge"] == "multicoil"
    assert main(["export", str(kd_dir / "model.pt"), "--format", "torchscript"]) == 0
    assert "inputs (masked_kspace, mask, sens_maps)" in capsys.readouterr().out
    assert main(["export", str(kd_dir / "model.pt"), "--role", "teacher"]) == 2
    assert "holds the student network: leave the role at 'auto'" in capsys.readouterr().err
    # the network a file holds may be asked for by its role (it was refused as well)
    from sftkd_fastmri.export.loading import check_role_applies

    check_role_applies(kd_dir / "model.pt", "student")
    check_role_applies(student, "student")
    with pytest.raises(ValueError, match="holds the student network"):
        check_role_applies(student, "teacher")


def test_bad_input_gives_a_clear_error(tiny_demo, tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--data-path",
                str(tmp_path / "missing"),
                *TINY,
                "--out-dir",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    wrong = save_model_checkpoint(create_model("dccnn_d5c5", chans=4), tmp_path / "t.pt")
    assert (
        main(
            [
                "train",
                *_common(tiny_demo),
                "--model",
                "dccnn_d3c5",
                "--model-overrides",
                "chans=4",
                "--init-checkpoint",
                str(wrong),
                "--out-dir",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "dccnn_d5c5" in err and "t.pt" in err
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("max_epoch: 3\n")
    assert main(["train", "--config", str(bad_cfg), "--data-path", str(tiny_demo)]) == 2
    assert re.search("unknown key.*max_epoch", capsys.readouterr().err)


def test_bad_slice_in_a_dataloader_worker_gives_a_clear_error(tiny_demo, tmp_path, capsys):
    import shutil

    import h5py
    import numpy as np

    data = tmp_path / "data"
    shutil.copytree(tiny_demo, data)
    volume = sorted((data / "multicoil_train").glob("*.h5"))[0]
    with h5py.File(volume, "a") as f:
        kspace = f["kspace"][()]
        kspace[:] = np.nan
        f["kspace"][...] = kspace
    argv = ["train", *_common(data, "multicoil"), "--num-workers", "1"]
    assert main([*argv, "--out-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    last = [line for line in err.splitlines() if line.startswith("error: ")][-1]
    assert str(volume) in last and "'kspace' holds NaN or Inf values" in last
    assert "DataLoader worker" in last and "Traceback" not in last
    # the run never started: no record of it, no empty log or checkpoint folders
    assert (tmp_path / "x").is_dir() and list((tmp_path / "x").iterdir()) == []


def test_parser_accepts_underscore_and_dash_flags():
    parser = build_parser()
    a = parser.parse_args(["train", "--data_path", "x", "--max-epochs", "3"])
    assert a.data_path == "x" and a.max_epochs == 3


def test_batch_limits_read_as_lightning_does(tmp_path, capsys):
    from sftkd_fastmri.cli.options import load_config
    from sftkd_fastmri.experiment.builders import batch_limit, build_trainer

    parser = build_parser()
    a = parser.parse_args(["train", "--limit-train-batches", "1", "--limit-val-batches", "1.0"])
    assert a.limit_train_batches == 1 and isinstance(a.limit_train_batches, int)  # one batch
    assert a.limit_val_batches == 1.0 and isinstance(a.limit_val_batches, float)  # all
    assert parser.parse_args(["train", "--limit-val-batches", "0.25"]).limit_val_batches == 0.25
    for bad in ("1.5", "-2", "many", "inf", "1e400"):  # infinity: an OverflowError before
        with pytest.raises(SystemExit):
            parser.parse_args(["train", "--limit-train-batches", bad])
        assert "limit-train-batches" in capsys.readouterr().err
    # config values (YAML ints and floats) the same way; keys also written like the flags
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("limit-train-batches: 1\nlimit_val_batches: 5.0\n")
    cfg = load_config(str(cfg_file))
    assert cfg == {"limit_train_batches": 1, "limit_val_batches": 5.0}
    trainer = build_trainer(
        {**cfg, "max_epochs": 1, "accumulate_grad_batches": 1, "logger": "none",
         "accelerator": "cpu", "devices": 1, "precision": "32-true", "progress": False,
         "seed": 0},
        tmp_path / "run",
    )  # fmt: skip
    assert trainer.limit_train_batches == 1 and trainer.limit_val_batches == 5
    from sftkd_fastmri.callbacks import FiniteLossCheck

    assert any(isinstance(c, FiniteLossCheck) for c in trainer.callbacks)  # every command
    with pytest.raises(ValueError, match="fraction in \\[0, 1\\]"):
        batch_limit(2.5)


def test_distill_short_forms():
    parser = build_parser()
    a = parser.parse_args(
        ["distill", "--teacher", "t.pt", "--method", "at", "--method", "fitnet=0.5",
         "--init-student", "s.pt"]
    )  # fmt: skip
    assert a.teacher_checkpoint == "t.pt" and a.init_checkpoint == "s.pt"
    assert a.methods == {"at": 1.0, "fitnet": 0.5}
    b = parser.parse_args(["distill", "--teacher-checkpoint", "t.pt", "--methods", "at=2,sp=1"])
    assert b.teacher_checkpoint == "t.pt" and b.methods == {"at": 2, "sp": 1}
    # --methods and --method combine in either order (--methods after --method replaced it)
    c = parser.parse_args(["distill", "--method", "at", "--methods", "imitation=0.5"])
    assert c.methods == {"at": 1.0, "imitation": 0.5}
    d = parser.parse_args(["distill", "--methods", "imitation=0.5,at=2", "--method", "at"])
    assert d.methods == {"imitation": 0.5, "at": 1.0}


def test_example_configs_use_known_keys():
    from pathlib import Path

    from sftkd_fastmri.cli.options import load_config, resolve
    from sftkd_fastmri.pipeline import STUDY_DEFAULTS

    configs = sorted((Path(__file__).parents[2] / "examples" / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        cfg = resolve(
            ("data", "optim", "trainer", "runtime"),
            load_config(str(path)),
            {},
            extra_keys=STUDY_DEFAULTS,
            source=str(path),
        )
        assert cfg["challenge"] in ("singlecoil", "multicoil"), path


def test_seed_sets_the_initial_weights_whatever_ran_before(tiny_demo, tmp_path):
    # The stage's --seed fixes the networks' initial weights: the same seed gives the same
    # trained model even after other code consumed or reseeded torch's global generator, and
    # another seed gives another one.
    import torch

    def trained(seed: int, name: str, disturb: int):
        torch.manual_seed(disturb)
        torch.rand(disturb)  # what earlier work in the process might have drawn
        out_dir = tmp_path / name
        argv = ["train", *_common(tiny_demo), "--model", "dccnn_d3c5", "--out-dir", str(out_dir)]
        assert main([*argv, "--seed", str(seed), "--model-overrides", '{"chans": 4}']) == 0
        return torch.load(out_dir / "model.pt", weights_only=True)["state_dict"]

    first, again, other = trained(0, "a", 1), trained(0, "b", 7), trained(1, "c", 1)
    assert first.keys() == again.keys()
    for key in first:
        torch.testing.assert_close(again[key], first[key], rtol=0, atol=0)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_volumes_of_several_shapes_train_distill_and_evaluate_in_batches(mixed_root, tmp_path):
    # fastMRI data mixes k-space widths and coil counts; batches above 1 used to fail in the
    # collate. Evaluation must not depend on how slices are batched.
    import h5py
    import numpy as np

    common = ["--data-path", str(mixed_root), "--challenge", "multicoil", "--progress", "false"]
    tiny = ["--max-epochs", "1", "--accelerator", "cpu", "--batch-size", "4"]
    train_dir = tmp_path / "train"
    argv = ["train", *common, *tiny, "--model", "dccnn_d3c5", "--out-dir", str(train_dir)]
    assert main([*argv, "--model-overrides", '{"chans": 4}']) == 0
    model = str(train_dir / "model.pt")
    kd = ["distill", *common, *tiny, "--teacher", model, "--method", "sp", "--method", "at"]
    kd += ["--model-overrides", '{"chans": 4}', "--out-dir", str(tmp_path / "kd")]
    assert main(kd) == 0

    results = {}
    for batch in ("1", "4"):
        out = tmp_path / f"eval{batch}"
        argv = ["evaluate", *common, "--checkpoint", model, "--split", "test_full"]
        assert main([*argv, "--batch-size", batch, "--eval-out-dir", str(out)]) == 0
        rows = json.loads((out / "metrics.json").read_text())
        results[batch] = (rows, sorted(p.name for p in (out / "reconstructions").glob("*.h5")))
    rows, files = results["4"]
    assert len(rows) == len(files) == 3  # every volume, of both shapes
    assert files == results["1"][1]
    # the same figures, up to float32 rounding (batched convolutions may sum in another order)
    assert [r["fname"] for r in rows] == [r["fname"] for r in results["1"][0]]
    for row, single in zip(rows, results["1"][0]):
        assert row == pytest.approx(single, rel=1e-6), row["fname"]
    for name in files:
        with h5py.File(tmp_path / "eval1" / "reconstructions" / name, "r") as a:
            with h5py.File(tmp_path / "eval4" / "reconstructions" / name, "r") as b:
                np.testing.assert_allclose(
                    a["reconstruction"][()], b["reconstruction"][()], atol=1e-6
                )


def test_relational_kd_with_batches_of_one_is_refused_before_training(tiny_demo, tmp_path, capsys):
    teacher = tmp_path / "teacher.pt"
    save_model_checkpoint(create_model("dccnn_d5c5", chans=4), teacher)
    out = tmp_path / "kd"
    argv = ["distill", *_common(tiny_demo), "--teacher", str(teacher), "--method", "at"]
    assert main([*argv, "--method", "sp", "--batch-size", "1", "--out-dir", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: KD loss(es) sp relate the samples of a batch")
    assert "--batch-size is 1" in last and not out.exists()
    # the study checks it before its first stage
    from sftkd_fastmri.pipeline import run_study

    with pytest.raises(ValueError, match="cc relate the samples.*batch_size is 1"):
        run_study({"methods": {"cc": 1.0}, "batch_size": 1, "out_dir": str(tmp_path / "s")})
    assert not (tmp_path / "s").exists()


def test_a_kd_method_that_cannot_pair_the_networks_is_refused_before_training(
    tiny_demo, tmp_path, capsys
):
    """FSP between a 16-channel teacher and an 8-channel student cannot compare their Gram
    matrices: refused before the data loads (distill) and before the first stage (pipeline),
    not at the first KD step after hours of training."""
    teacher = tmp_path / "teacher.pt"
    save_model_checkpoint(create_model("dccnn_d5c5", chans=16), teacher)
    out = tmp_path / "kd"
    argv = ["distill", "--data-path", str(tmp_path / "no_data"), "--teacher", str(teacher)]
    argv += ["--model-overrides", "chans=8", "--method", "fsp", "--out-dir", str(out)]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "FSP matrices differ in shape" in last and "student 8x8, teacher 16x16" in last
    assert not out.exists()
    study = {"methods": {"at": 1.0, "fsp": 1.0}, "out_dir": str(tmp_path / "s")}
    study.update(data_path=str(tmp_path / "no_data"), progress=False)
    study.update(teacher_overrides={"chans": 16}, student_overrides={"chans": 8})
    config = tmp_path / "study.yaml"
    for changes, expected in (
        ({}, r"FSP matrices differ in shape.*student 8x8, teacher 16x16"),
        ({"teacher_overrides": {"chans": 0}}, "chans must be an integer"),
        ({"student_overrides": {"chans": 16}}, "no_data"),  # they pair: on to the data
    ):
        config.write_text(yaml.safe_dump({**study, **changes}))
        assert main(["pipeline", "--config", str(config)]) == 2
        assert re.search(expected, capsys.readouterr().err.strip().splitlines()[-1])
        assert not (tmp_path / "s").exists()


def test_evaluate_on_a_split_without_targets(tiny_demo, tmp_path, capsys):
    """fastMRI's public test files carry no targets: scoring them is refused with a hint
    before anything loads; with --eval-out-dir the reconstructions alone are written."""
    ckpt = save_model_checkpoint(create_model("dccnn_d3c5", chans=4), tmp_path / "s.pt")
    args = ["evaluate", "--data-path", str(tiny_demo), "--challenge", "multicoil",
            "--progress", "false", "--checkpoint", str(ckpt)]  # fmt: skip
    assert main([*args, "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "multicoil_test has no target ('reconstruction_rss')" in err
    assert "holdout-split" in err and "--eval-out-dir" in err
    out = tmp_path / "ev"
    assert main([*args, "--split", "test", "--eval-out-dir", str(out)]) == 0
    assert "no targets, so no scores; 1 reconstructions" in capsys.readouterr().out
    assert len(list((out / "reconstructions").glob("*.h5"))) == 1
    assert not (out / "metrics.json").exists()
    assert main([*args, "--split", "test_full"]) == 0  # with targets: a table of scores
    assert "PSNR" in capsys.readouterr().out.upper()

    # A folder holding an earlier evaluation is not mixed into (a submission folder holds
    # one split's volumes only): refused, or replaced with --overwrite once this one is done.
    scored = tmp_path / "scored"
    assert main([*args, "--split", "val", "--eval-out-dir", str(scored)]) == 0
    val_files = sorted(p.name for p in (scored / "reconstructions").glob("*.h5"))
    assert val_files and (scored / "metrics.json").is_file()
    capsys.readouterr()
    assert main([*args, "--split", "test", "--eval-out-dir", str(scored)]) == 2
    assert "holds the results of an earlier evaluation" in capsys.readouterr().err
    assert sorted(p.name for p in (scored / "reconstructions").glob("*.h5")) == val_files
    # an --overwrite that fails at its last step (the scores, a full disk) leaves the earlier
    # results whole: it replaced them file by file before
    import sftkd_fastmri.cli.commands as commands

    def digest(folder):
        return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    before = digest(scored)
    real_write = commands.atomic_write_text

    def disk_full(path, text):
        raise OSError(28, "No space left on device")

    commands.atomic_write_text = disk_full
    capsys.readouterr()
    try:  # one error line, as for any path the user can act on
        assert (
            main([*args, "--split", "test_full", "--eval-out-dir", str(scored), "--overwrite"]) == 2
        )
    finally:
        commands.atomic_write_text = real_write
    assert "error: [Errno 28] No space left on device" in capsys.readouterr().err
    assert digest(scored) == before and not any(p.name.startswith(".") for p in scored.iterdir())
    fresh = tmp_path / "fresh"
    commands.atomic_write_text = disk_full
    try:
        assert main([*args, "--split", "test_full", "--eval-out-dir", str(fresh)]) == 2
    finally:
        commands.atomic_write_text = real_write
    assert not fresh.exists()  # nothing half-made where nothing was
    assert main([*args, "--split", "test", "--eval-out-dir", str(scored), "--overwrite"]) == 0
    test_files = sorted(p.name for p in (out / "reconstructions").glob("*.h5"))
    assert sorted(p.name for p in (scored / "reconstructions").glob("*.h5")) == test_files
    assert not set(test_files) & set(val_files)
    assert not (scored / "metrics.json").exists()  # the val scores went with their files


def test_evaluate_names_a_stray_file_and_keeps_its_hints_to_missing_targets(
    tiny_demo, tmp_path, capsys
):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_demo / "multicoil_val", root / "multicoil_val")
    (root / "multicoil_val" / ".DS_Store").write_bytes(b"\x00\x01")
    args = ["evaluate", "--data-path", str(root), "--challenge", "multicoil", "--split", "val"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert ".DS_Store: not an HDF5 file" in err and "no target" not in err
    # errors about where the data is do not get the hint meant for splits without targets
    assert main(["evaluate", "--data-config", str(tmp_path / "dirs.yaml")]) == 2
    assert "--eval-out-dir" not in capsys.readouterr().err


def test_pipeline_checks_its_splits_before_training(tiny_demo, tmp_path, capsys):
    out = tmp_path / "study"
    base = ["pipeline", *_common(tiny_demo, "multicoil"), "--out-dir", str(out)]
    assert main([*base, "--test-split", "test"]) == 2
    err = capsys.readouterr().err
    assert "test_split" in err and not out.exists()  # nothing trained
    assert "(e.g. --test-split val)" in err and "--split val" not in err  # its own option
    config = tmp_path / "figure.yaml"
    config.write_text(yaml.safe_dump({"test_split": "test_full", "figure_volume": "nope"}))
    assert main([*base, "--config", str(config)]) == 2
    assert "figure_volume 'nope': no volume nope.h5 in" in capsys.readouterr().err
    assert not out.exists()
    assert main([*base, "--test-split", "test_full", "--val-split", "nope"]) == 2
    err = capsys.readouterr().err
    assert "multicoil_nope does not exist" in err and not out.exists()
    assert "(its data folder holds multicoil_test," in err  # what there is instead
    # a held-out split whose volumes are still in the selection split: no held-out test
    import shutil

    from sftkd_fastmri.data import holdout_split

    data = tmp_path / "data"
    for split in ("train", "val"):
        shutil.copytree(tiny_demo / f"multicoil_{split}", data / f"multicoil_{split}")
    (data / "multicoil_val" / "copy.h5").symlink_to(
        next((data / "multicoil_val").glob("*.h5")).resolve()
    )  # two volumes to divide
    held = holdout_split(data, "multicoil", fraction=0.5, seed=0)
    study = ["pipeline", *_common(data, "multicoil"), "--out-dir", str(out)]
    assert main([*study, "--test-split", "test_heldout"]) == 2
    err = capsys.readouterr().err
    assert f"shares {len(held.test)} volume(s) with its val_split multicoil_val" in err
    assert "val_split: val_select" in err and not out.exists()
    from sftkd_fastmri.pipeline.study import _check_held_out

    cfg = {"challenge": "multicoil", "train_split": "train", "val_split": "val_select",
           "test_split": "test_heldout"}  # fmt: skip
    _check_held_out(cfg, data, data / "multicoil_test_heldout")  # selecting on the rest
    # scoring on the validation split is allowed (a caveat says so), not when it was trained on
    assert main([*base, "--test-split", "val", "--combine-train-val", "true"]) == 2
    err = capsys.readouterr().err
    assert "is its val_split, which combine_train_val trains on" in err and not out.exists()
    # a challenge whose folders are not there: the other challenge is suggested
    single = tmp_path / "single"
    (single / "singlecoil_train").mkdir(parents=True)
    argv = ["train", "--data-path", str(single), "--challenge", "multicoil", *TINY]
    assert main([*argv, "--out-dir", str(tmp_path / "t")]) == 2
    assert "another --challenge (singlecoil)?" in capsys.readouterr().err


def test_a_setting_lightning_refuses_is_one_error_line(tiny_demo, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    args = ["train", "--data-path", str(tiny_demo), "--max-epochs", "1", "--progress", "false"]
    assert main([*args, "--accelerator", "gpu", "--out-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "gpu" in err.lower() and "Traceback" not in err
    assert main([*args, "--strategy", "nope", "--out-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nope" in err and "Traceback" not in err


def test_strategy_and_nodes_reach_the_trainer(tiny_demo, tmp_path):
    from sftkd_fastmri.cli.options import resolve
    from sftkd_fastmri.experiment.builders import build_trainer

    groups = ("data", "optim", "trainer", "runtime")
    cfg = resolve(groups, {"strategy": "ddp", "num_nodes": 1, "accelerator": "cpu"}, {})
    cfg.update(data_path=str(tiny_demo), progress=False)
    trainer = build_trainer(cfg, out_dir=tmp_path)
    assert type(trainer.strategy).__name__ == "DDPStrategy" and trainer.num_nodes == 1


def test_config_values_are_checked_like_flags(tiny_demo, tmp_path, capsys):
    from sftkd_fastmri.cli.options import load_config, resolve

    groups = ("data", "optim", "trainer", "runtime")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("resume: 'false'\nfixed_mask: 'no'\nprogress: 'off'\nbatch_size: '2'\n")
    cfg = resolve(groups, load_config(str(cfg_file)), {}, source="c.yaml")
    assert cfg["resume"] is False and cfg["fixed_mask"] is False and cfg["progress"] is False
    assert cfg["batch_size"] == 2
    bad = {
        "lr: fast\n": "lr: expected a number",
        "accelerations: four\n": "accelerations: expected an integer",
        "center_fractions: [1.5]\n": "center_fractions: expected a fraction between 0 and 1",
        "max_epochs: 0\n": "max_epochs: expected an integer >= 1",
        "methods: 5\n": "methods: expected a mapping",
        "mask_type: spiral\n": "mask_type: expected one of random",
        "lr: [1, 2\n": "is not valid YAML",
    }
    extra = {"methods": None}
    for text, message in bad.items():
        cfg_file.write_text(text)
        with pytest.raises(SystemExit, match=message):
            resolve((*groups, "distill"), load_config(str(cfg_file)), {}, extra, source="c.yaml")
    # flags: the same checks, as argparse errors
    parser = build_parser()
    for flag, value in (("--accelerations", "0"), ("--center-fractions", "1.5"),
                        ("--max-epochs", "-1"), ("--accumulate-grad-batches", "0"),
                        ("--lr-step-size", "0"), ("--batch-size", "0")):  # fmt: skip
        with pytest.raises(SystemExit):
            parser.parse_args(["train", flag, value])
        assert flag in capsys.readouterr().err
    # the study's own keys
    study = tmp_path / "s.yaml"
    study.write_text(f"data_path: {tiny_demo}\nchallenge: multicoil\nseeds: [0, one]\n")
    assert main(["pipeline", "--config", str(study), "--out-dir", str(tmp_path / "st")]) == 2
    assert "seeds: expected an integer, got 'one'" in capsys.readouterr().err
    study.write_text(f"data_path: {tiny_demo}\nchallenge: multicoil\ncontrols: maybe\n")
    assert main(["pipeline", "--config", str(study), "--out-dir", str(tmp_path / "st")]) == 2
    assert "controls: expected true, false, all or a list of a, b (e.g. [a, b]), got 'maybe'" in (
        capsys.readouterr().err
    )
    study.write_text(f"data_path: {tiny_demo}\nchallenge: multicoil\ncontrols: [a, c]\n")
    assert main(["pipeline", "--config", str(study), "--out-dir", str(tmp_path / "st")]) == 2
    assert "got ['a', 'c']" in capsys.readouterr().err
    study.write_text(
        f"data_path: {tiny_demo}\nchallenge: multicoil\ntrain_first_student_cascade: maybe\n"
    )
    assert main(["pipeline", "--config", str(study), "--out-dir", str(tmp_path / "st")]) == 2
    assert "train_first_student_cascade: expected true/false, got 'maybe'" in (
        capsys.readouterr().err
    )
    study.write_text(f"data_path: {tiny_demo}\nchallenge: multicoil\nepochs: two\ntest_split: x\n")
    assert main(["pipeline", "--config", str(study), "--out-dir", str(tmp_path / "st")]) == 2
    assert "epochs: teacher: expected a whole number of epochs >= 1, got 'two'" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "st").exists()


def test_output_paths_that_are_files_or_folders_are_refused_up_front(tiny_demo, tmp_path, capsys):
    import numpy as np

    afile = tmp_path / "afile"
    afile.write_text("x")
    ckpt = save_model_checkpoint(create_model("dccnn_d3c5", chans=4), tmp_path / "s.pt")
    args = ["--data-path", str(tiny_demo), "--challenge", "multicoil", "--progress", "false"]
    assert main(["evaluate", *args, "--checkpoint", str(ckpt), "--split", "test_full",
                 "--eval-out-dir", str(afile)]) == 2  # fmt: skip
    assert "--eval-out-dir" in capsys.readouterr().err
    assert main(["train", *args, *TINY, "--out-dir", str(afile)]) == 2
    assert "is a file; expected a folder" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--out", str(tmp_path)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    half = tmp_path / "half.npy"
    np.save(half, np.full(24, 0.5))
    assert main(["train", *args, *TINY, "--mask-path", str(half), "--out-dir",
                 str(tmp_path / "m")]) == 2  # fmt: skip
    assert "half.npy: a mask holds 0/1" in capsys.readouterr().err
    assert afile.read_text() == "x"


def test_damaged_run_records_are_named(tiny_demo, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *_common(tiny_demo), "--model", "dccnn_d3c5", "--model-overrides",
            "chans=4", "--out-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    last = out / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # stopped while writing it
    assert main([*argv, "--max-epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "last.ckpt: cannot resume from it" in err and "--resume false" in err
    assert main([*argv, "--max-epochs", "2", "--resume", "false"]) == 0  # starts over
    # a run from before run_config.json, resumed as another network
    (out / "run_config.json").unlink()
    assert main([*argv, "--max-epochs", "3", "--model", "dccnn_d5c5"]) == 2
    assert "holds a run of another network" in capsys.readouterr().err
    (out / "run_config.json").write_text('{"model": "dcc')  # cut short
    assert main([*argv, "--max-epochs", "3"]) == 2
    assert "run_config.json: damaged run record" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "none"), "--limit-train-batches", "0"]) == 2
    assert "produced no checkpoint: no training step ran" in capsys.readouterr().err

    from sftkd_fastmri.experiment import StageResult

    (out / "done.json").write_text('{"name": "tr')
    with pytest.raises(ValueError, match="done.json: not a stage record"):
        StageResult.load(out)
    # bad option values of model and KD losses: one error line each
    for extra, message in (
        (["--model-overrides", "chans=0"], "chans must be an integer >= 1"),
        (["--model-overrides", "chans=abc"], "chans must be an integer >= 1, got 'abc'"),
        (["--model-overrides", "bogus=1"], "unknown option(s) for 'dccnn_d3c5': bogus"),
    ):
        assert main([*argv[:-1], str(tmp_path / "x"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_evaluate_names_a_damaged_volume(tiny_demo, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_demo / "multicoil_test_full", root / "multicoil_test_full")
    vol = sorted((root / "multicoil_test_full").glob("*.h5"))[0]
    vol.write_bytes(vol.read_bytes()[: vol.stat().st_size // 2])
    args = ["evaluate", "--data-path", str(root), "--challenge", "multicoil", "--split",
            "test_full", "--progress", "false"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{vol.name}: unreadable HDF5 file" in err and "Traceback" not in err


def test_sft_starts_from_a_trained_teacher(tiny_demo, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from sftkd_fastmri.experiment.runs import RUN_CONFIG_FILE
    from sftkd_fastmri.models import load_model

    trained = create_model("dccnn_d5c5", chans=4)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)  # weights no seed reproduces
    teacher_path = save_model_checkpoint(trained, tmp_path / "teacher.pt")
    sft_dir = tmp_path / "sft"
    argv = ["sft", *_common(tiny_demo), "--out-dir", str(sft_dir)]
    argv += ["--teacher-overrides", "chans=4", "--student-overrides", "chans=4"]
    argv += ["--lr", "1e-30", "--limit-train-batches", "1", "--init-teacher", str(teacher_path)]
    assert main(argv) == 0
    # A step of 1e-30 rounds away: the exported teacher is the checkpoint's network.
    exported = load_model(sft_dir / "sft_teacher.ckpt")
    expected = trained.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in exported.state_dict().items())
    record = json.loads((sft_dir / RUN_CONFIG_FILE).read_text())
    assert record["init_teacher"] == str(teacher_path)
    assert set(record["file_digests"]) == {"init_teacher"}
    capsys.readouterr()

    # sft's --teacher is a preset: a checkpoint there points to --init-teacher.
    argv = ["sft", *_common(tiny_demo), "--out-dir", str(tmp_path / "x")]
    assert main([*argv, "--teacher", str(teacher_path)]) == 2
    err = capsys.readouterr().err
    assert "--init-teacher" in err and "teacher.pt" in err
    assert not (tmp_path / "x").exists()


def test_kspace_from_multicoil_targets_trains_single_coil_networks(tiny_demo, tmp_path, capsys):
    """k-space simulated from the RSS targets of multi-coil files is single-coil: the model
    and its export record a single-coil signature (they recorded multi-coil)."""
    from sftkd_fastmri.models import read_checkpoint

    out = tmp_path / "run"
    argv = ["train", *_common(tiny_demo, "multicoil"), "--kspace-from-target", "true"]
    argv += ["--model", "dccnn_d3c5", "--model-overrides", "chans=4", "--out-dir", str(out)]
    assert main(argv) == 0
    assert read_checkpoint(out / "model.pt")["sftkd_fastmri"]["extra"]["challenge"] == "singlecoil"
    best = read_checkpoint(sorted((out / "checkpoints").glob("*.ckpt"))[0])
    assert best["hyper_parameters"]["challenge"] == "singlecoil"
    capsys.readouterr()
    assert main(["export", str(out / "model.pt"), "--format", "torchscript"]) == 0
    assert "inputs (masked_kspace, mask)" in capsys.readouterr().out


def test_evaluating_a_network_of_the_other_challenge_warns(tiny_demo, tmp_path, capsys):
    net = create_model("dccnn_d3c5", chans=4)
    single = save_model_checkpoint(net, tmp_path / "s.pt", extra={"challenge": "singlecoil"})
    args = ["evaluate", "--data-path", str(tiny_demo), "--split", "test_full", "--progress"]
    args += ["false", "--checkpoint", str(single)]
    assert main([*args, "--challenge", "multicoil"]) == 0
    assert "s.pt was trained on singlecoil k-space; evaluating it on multicoil" in (
        capsys.readouterr().err
    )
    assert main([*args, "--challenge", "singlecoil"]) == 0
    assert "trained on" not in capsys.readouterr().err
    # training-data options are not silently taken as a subsampling of the scored split
    assert main([*args, "--challenge", "singlecoil", "--sample-rate", "0.5"]) == 0
    assert "--sample-rate selects training or validation data; evaluate scores every slice" in (
        capsys.readouterr().err
    )
    assert main([*args, "--challenge", "singlecoil", "--val-sample-rate", "0.5"]) == 0
    assert "--val-sample-rate selects training or validation data" in capsys.readouterr().err
    assert main([*args, "--challenge", "singlecoil", "--combine-train-val", "true"]) == 0
    assert "--combine-train-val selects training or validation data" in capsys.readouterr().err


def test_starting_over_removes_the_earlier_run_before_anything_can_resume_it(
    tiny_demo, tmp_path, capsys, monkeypatch
):
    """--resume false used to write the new run record while the old last.ckpt, done.json and
    model.pt stayed until the new run replaced them: a kill in between left the old run to be
    resumed under the new record, and a study reused the old stage as finished."""
    import pytorch_lightning as pl

    from sftkd_fastmri.experiment import StageResult

    out = tmp_path / "run"
    argv = ["train", *_common(tiny_demo), "--model", "dccnn_d3c5", "--model-overrides",
            "chans=4", "--out-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert StageResult.load(out) is not None and (out / "model.pt").is_file()
    # deployment exports `export` writes beside them by default, and a file of the user's
    (out / "model.ts.pt").write_bytes(b"old network")
    (out / "checkpoints" / "best.student.onnx").write_bytes(b"old network")
    for mine in ("model.txt", "model.backup.pt", "checkpoints/best.keep-me.onnx"):
        (out / mine).write_text("the user's")
    capsys.readouterr()
    # a stray file in a split folder is named before anything of the earlier run is removed
    data = tmp_path / "data"
    shutil.copytree(tiny_demo, data)
    (data / "singlecoil_train" / "notes.txt").write_text("not a volume")
    stray = [a if a != str(tiny_demo) else str(data) for a in argv]
    assert main([*stray, "--resume", "false"]) == 2
    assert "notes.txt: not an HDF5 file" in capsys.readouterr().err
    assert StageResult.load(out) is not None and (out / "model.pt").is_file()

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt  # stopped before the new run's first checkpoint

    monkeypatch.setattr(pl.Trainer, "fit", killed)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--resume", "false", "--lr", "0.01"])
    assert (
        "removed the earlier run's done.json, best.ckpt, last.ckpt, model.pt, model.ts.pt, "
        "best.student.onnx"
    ) in capsys.readouterr().out
    for mine in ("model.txt", "model.backup.pt", "checkpoints/best.keep-me.onnx"):
        assert (out / mine).read_text() == "the user's"
    assert StageResult.load(out) is None
    assert not (out / "model.pt").exists()
    assert not list((out / "checkpoints").glob("*.ckpt"))
    monkeypatch.undo()
    # the next run starts afresh with the settings given (nothing of the old run to resume)
    assert main([*argv, "--lr", "0.02"]) == 0
    assert json.loads((out / "run_config.json").read_text())["lr"] == 0.02


def test_a_finished_run_that_trains_on_is_no_longer_finished(
    tiny_demo, tmp_path, capsys, monkeypatch
):
    """Training on (more epochs) kept done.json until the end: a stop meanwhile left the run
    marked finished beside newer weights, and a study reused it. Deployment exports of the
    old weights are removed too (they went stale under the run's names)."""
    import pytorch_lightning as pl

    from sftkd_fastmri.experiment import StageResult

    out = tmp_path / "run"
    argv = ["train", *_common(tiny_demo), "--model", "dccnn_d3c5", "--model-overrides",
            "chans=4", "--out-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    (out / "model.ts.pt").write_bytes(b"old network")
    (out / "model.backup.pt").write_text("the user's")
    capsys.readouterr()
    assert main(argv) == 0  # nothing to train: the run and its exports stay as they are
    assert StageResult.load(out) is not None and (out / "model.ts.pt").is_file()

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pl.Trainer, "fit", killed)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--max-epochs", "2"])
    assert "training on; removed the exports of its earlier weights model.ts.pt" in (
        capsys.readouterr().out
    )
    assert StageResult.load(out) is None and not (out / "model.ts.pt").exists()
    assert (out / "model.pt").is_file() and (out / "model.backup.pt").read_text() == "the user's"


def test_workers_killed_by_sigterm_stop_the_command_as_sigterm_does(monkeypatch, capsys):
    """SIGTERM to the whole process group (a scheduler's cancel) kills the DataLoader workers
    before Lightning stops the run at a batch boundary: PyTorch's error about them ended the
    command with a traceback and status 1 instead of 143."""
    import sftkd_fastmri.cli.main as cli

    def killed(args):
        try:
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated. ")
        except RuntimeError as err:
            raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly") from err

    monkeypatch.setattr(cli, "cmd_models", killed)
    assert cli.main(["models"]) == 143
    assert capsys.readouterr().err.startswith("error: stopped by SIGTERM")

    def other(args):
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")

    monkeypatch.setattr(cli, "cmd_models", other)
    with pytest.raises(RuntimeError, match="Killed"):  # not a SIGTERM: reported as it is
        cli.main(["models"])


def test_a_run_stopped_by_sigterm_exits_with_its_status(tiny_demo, tmp_path):
    """Lightning stops on SIGTERM with a SystemExit carrying no status, so the command used
    to exit 0 as if it had finished: schedulers and scripts must see 143 (a real signal to a
    real process here), and the run keeps its last finished epoch to resume from."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "sftkd_fastmri.cli.main", "train", *_common(tiny_demo),
            "--model", "dccnn_d3c5", "--model-overrides", "chans=4", "--max-epochs", "500",
            "--out-dir", str(out)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "last.ckpt").is_file():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no epoch finished in 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    assert "error: stopped by SIGTERM" in err
    assert (out / "checkpoints" / "last.ckpt").is_file() and not (out / "done.json").exists()


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_resumed_run_trains_on_as_the_uninterrupted_run(tiny_demo, tmp_path, workers):
    """Lightning checkpoints neither the random generators nor the count of training masks
    drawn: a run resumed after epoch 1 shuffled and masked differently from the run it
    continued, and ended with other weights. With a worker, persistent workers kept seeds and
    mask counts of their own across epochs, which a resumed run could not draw again."""
    import torch

    argv = ["train", *_common(tiny_demo), "--model", "dccnn_d3c5", "--model-overrides",
            "chans=4", "--num-workers", workers]  # fmt: skip
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main([*argv, "--max-epochs", "3", "--out-dir", str(whole)]) == 0
    assert main([*argv, "--max-epochs", "1", "--out-dir", str(resumed)]) == 0
    assert main([*argv, "--max-epochs", "3", "--out-dir", str(resumed)]) == 0
    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)  # still readable
    assert a["epoch"] == b["epoch"] == 2
    for key in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], rtol=0, atol=0)


def test_command_summaries_are_printed_by_rank_zero_only(monkeypatch, capsys):
    """Under DDP every rank runs a command to its end; its summary comes once."""
    from pytorch_lightning.utilities import rank_zero_only

    from sftkd_fastmri.cli.main import _print_once

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    _print_once("best checkpoint: x")
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    _print_once("best checkpoint: x")
    assert capsys.readouterr().out == "best checkpoint: x\n"


def test_16_mixed_on_a_cpu_is_run_and_recorded_as_bf16_mixed(tiny_demo, tmp_path, capsys):
    """Lightning runs 16-mixed as bf16-mixed on a CPU; the run record said 16-mixed, so the
    run could not be resumed as what ran, and a GPU resume would switch to float16."""
    import json

    out = tmp_path / "run"
    argv = ["train", *_common(tiny_demo), "--model", "dccnn_d3c5", "--model-overrides"]
    argv += ["chans=4", "--out-dir", str(out), "--precision", "16-mixed"]
    assert main(argv) == 0
    assert "16-mixed runs as bf16-mixed on a CPU" in capsys.readouterr().err
    assert json.loads((out / "run_config.json").read_text())["precision"] == "bf16-mixed"
    resumed = [*argv[:-1], "bf16-mixed", "--max-epochs", "2"]
    assert main(resumed) == 0  # resumes under the name of what ran
    from sftkd_fastmri.cli.commands import _precision_that_runs

    gpu = {"precision": "16-mixed", "accelerator": "gpu"}
    assert _precision_that_runs(gpu) is gpu


def test_a_64_true_network_evaluates_at_mixed_precision(tiny_demo, tmp_path, capsys):
    """A float64 checkpoint (of a 64-true run) at --precision bf16-mixed or 16-mixed failed
    with a raw dtype error inside its first convolution."""
    model = create_model("dccnn_d3c5", chans=4).double()
    checkpoint = save_model_checkpoint(model, tmp_path / "model.pt")
    argv = ["evaluate", "--data-path", str(tiny_demo), "--challenge", "multicoil"]
    argv += ["--split", "test_full", "--progress", "false", "--checkpoint", str(checkpoint)]
    for precision in ("bf16-mixed", "16-mixed"):
        assert main([*argv, "--precision", precision]) == 0
        assert "mean" in capsys.readouterr().out


def test_evaluate_writes_metrics_json_as_strict_json(tiny_demo, tmp_path, monkeypatch):
    """The PSNR of a reconstruction equal to its target (inf) was written as Infinity, which
    strict JSON readers refuse; it is null, as in a study's report.json."""
    import math

    import sftkd_fastmri.experiment as experiment

    evaluate = experiment.run_evaluate

    def exact_first_volume(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        result.metrics[0].psnr = math.inf
        return result

    monkeypatch.setattr(experiment, "run_evaluate", exact_first_volume)
    out = tmp_path / "scores"
    argv = ["evaluate", "--data-path", str(tiny_demo), "--challenge", "multicoil"]
    argv += ["--split", "test_full", "--progress", "false", "--eval-out-dir", str(out)]
    assert main(argv) == 0

    def refuse(constant):
        raise ValueError(f"metrics.json holds {constant}, which is not JSON")

    rows = json.loads((out / "metrics.json").read_text(), parse_constant=refuse)
    assert rows[0]["psnr"] is None and rows[0]["ssim"] > 0
