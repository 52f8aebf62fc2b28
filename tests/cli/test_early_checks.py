"""Settings that cannot run as asked are refused before anything trains or is written: the
pipeline's SFT pair and KD schedule before its first stage, distill's KD schedule, a run
folder inside a split folder, and evaluate's accelerator and devices."""

import shutil

import pytest
import torch
import yaml

from sftkd_fastmri.cli.main import main
from sftkd_fastmri.models import create_model, save_model_checkpoint

from .test_pipeline import _tiny_study

TINY = ["--max-epochs", "1", "--batch-size", "2", "--progress", "false", "--accelerator", "cpu"]


def _study(data, out_dir, **changes):
    """A study config on the tiny demo data (4- and 2-channel DC-CNNs of 5 cascades)."""
    config = dict(
        teacher="dccnn_d3c5",
        student="dccnn_d3c5",
        student_overrides={"chans": 2},
        methods={"imitation": 1.0},
    )
    return _tiny_study(data, out_dir, **{**config, **changes})


@pytest.fixture
def no_stage(monkeypatch):
    """Make any stage of a study fail loudly: the checks must come before the first."""
    import sftkd_fastmri.pipeline.study as study

    def stage(name, *args, **kwargs):
        raise AssertionError(f"stage {name} ran before the study's settings were checked")

    monkeypatch.setattr(study, "_stage", stage)


def _pipeline(tmp_path, config):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return main(["pipeline", "--config", str(path)])


def test_a_study_whose_teacher_and_student_sft_cannot_pair_fails_before_training(
    tiny_demo, tmp_path, capsys, no_stage
):
    """Other cascade counts were found only in the sft stage, after the teacher stage."""
    out_dir = tmp_path / "study"
    student = {"chans": 2, "num_cascades": 3}
    config = _study(tiny_demo, out_dir, student_overrides=student)
    assert _pipeline(tmp_path, config) == 2
    err = capsys.readouterr().err
    assert "teacher dccnn_d3c5 and student dccnn_d3c5 cannot be trained together" in err
    assert "teacher has 5 cascades but student has 3" in err
    assert not out_dir.exists()


@pytest.mark.parametrize(
    "changes, expected",
    [
        # two_stage without kd_epochs was found only at the first distill stage
        ({"kd_schedule": "two_stage"}, "kd_schedule two_stage needs kd_epochs"),
        # ... and with kd_epochs >= the KD stages' epochs it never fine-tuned
        (
            {"kd_schedule": "two_stage", "kd_epochs": 5},
            "kd_epochs (5) must be smaller than max_epochs (1)",
        ),
        (
            {"kd_schedule": "two_stage", "kd_epochs": 2, "epochs": {"teacher": 3, "kd": 2}},
            "kd_epochs (2) must be smaller than epochs' kd entry (2)",
        ),
        (
            {"kd_schedule": "two_stage", "kd_epochs": 2, "epochs": 2},
            "kd_epochs (2) must be smaller than epochs (2)",
        ),
    ],
)
def test_a_study_whose_kd_schedule_cannot_run_fails_before_training(
    tiny_demo, tmp_path, capsys, no_stage, changes, expected
):
    out_dir = tmp_path / "study"
    assert _pipeline(tmp_path, _study(tiny_demo, out_dir, **changes)) == 2
    assert expected in capsys.readouterr().err
    assert not out_dir.exists()


def test_distill_two_stage_needs_epochs_left_to_fine_tune(tiny_demo, tmp_path, capsys):
    """kd_epochs >= max_epochs trained KD alone and never the reconstruction fine-tuning."""
    teacher = save_model_checkpoint(
        create_model("dccnn_d3c5", chans=4), tmp_path / "teacher.pt", role="teacher"
    )
    out_dir = tmp_path / "kd"
    args = [
        "distill",
        "--data-path",
        str(tiny_demo),
        "--challenge",
        "multicoil",
        *TINY,
        "--teacher-checkpoint",
        str(teacher),
        "--model-overrides",
        "chans=2",
        "--out-dir",
        str(out_dir),
        "--kd-schedule",
        "two_stage",
    ]
    for kd_epochs, max_epochs in (("1", "1"), ("3", "2")):
        run = [*args, "--kd-epochs", kd_epochs, "--max-epochs", max_epochs]
        assert main(run) == 2
        err = capsys.readouterr().err
        assert f"--kd-epochs ({kd_epochs}) must be smaller than --max-epochs ({max_epochs})" in err
        assert not out_dir.exists()
    assert main(args) == 2
    assert "--kd-schedule two_stage needs --kd-epochs" in capsys.readouterr().err
    assert not out_dir.exists()


def test_check_kd_schedule_lets_a_fine_tuning_epoch_or_joint_schedule_through():
    from sftkd_fastmri.experiment import check_kd_schedule

    check_kd_schedule("two_stage", 1, 2)
    check_kd_schedule("joint", 5, 2)  # joint with kd_epochs >= max_epochs: KD every epoch
    check_kd_schedule("joint", None, 1)
    with pytest.raises(ValueError, match="--kd-schedule: expected one of joint, two_stage"):
        check_kd_schedule("twostage", 2, 3)
    for bad in (0, 1.5, True, "2"):  # where no option parser has read them (the library)
        with pytest.raises(ValueError, match="--kd-epochs: expected a whole number"):
            check_kd_schedule("joint", bad, 3)


@pytest.fixture
def own_demo(tiny_demo, tmp_path):
    """A copy of the tiny demo data: a test that failed would leave a folder in the shared
    one's split folders, which every later test reading them would trip over."""
    return shutil.copytree(tiny_demo, tmp_path / "data", symlinks=True)


def test_a_run_folder_inside_a_split_folder_is_refused_before_it_is_made(
    own_demo, tmp_path, capsys
):
    """Training into a split folder left a folder there (its logs), which every later run
    on that split refused as a non-HDF5 entry."""
    data = ["--data-path", str(own_demo), "--challenge", "multicoil", *TINY]
    split = own_demo / "multicoil_train"
    link = tmp_path / "link"
    link.symlink_to(split, target_is_directory=True)
    for out_dir in (split / "run", split, link / "run", own_demo / "singlecoil_val" / "run"):
        assert (
            main(["train", *data, "--model-overrides", "chans=2", "--out-dir", str(out_dir)]) == 2
        )
        err = capsys.readouterr().err
        assert f"--out-dir {out_dir} is inside the split folder" in err
    assert sorted(p.suffix for p in split.iterdir()) == [".h5", ".h5"]
    assert not (own_demo / "singlecoil_val" / "run").exists()
    # beside the split folders (in the data folder itself) is no split folder
    from sftkd_fastmri.experiment import check_out_of_splits

    check_out_of_splits(own_demo / "runs" / "a", own_demo, "--out-dir")


def test_a_study_folder_inside_a_split_folder_is_refused_before_it_is_made(
    own_demo, capsys, no_stage
):
    out_dir = own_demo / "multicoil_val" / "study"
    assert _pipeline(own_demo.parent, _study(own_demo, out_dir)) == 2
    assert f"out_dir {out_dir} is inside the split folder" in capsys.readouterr().err
    assert not out_dir.exists()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--accelerator", "gpu"], "--accelerator gpu: no CUDA GPU on this machine"),
        (["--devices", "2"], "--devices 2: evaluate runs on one device"),
        (["--accelerator", "tpu"], "--accelerator tpu: evaluate runs on cpu or gpu"),
    ],
)
def test_evaluate_refuses_an_accelerator_or_devices_it_would_not_use(
    tiny_demo, tmp_path, capsys, monkeypatch, flags, expected
):
    """evaluate ran on the CPU (or the one GPU) whatever --accelerator and --devices said."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out_dir = tmp_path / "scores"
    args = ["evaluate", "--data-path", str(tiny_demo), "--challenge", "multicoil"]
    args += ["--split", "test_full", "--progress", "false", "--eval-out-dir", str(out_dir)]
    assert main([*args, *flags]) == 2
    assert expected in capsys.readouterr().err
    assert not out_dir.exists()


def test_evaluation_device_reads_the_runtime_options_as_training_does(monkeypatch):
    from sftkd_fastmri.experiment import evaluation_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert evaluation_device({"accelerator": "gpu", "devices": 1}) == "cuda"
    assert evaluation_device({"accelerator": "auto", "devices": 1}) == "cuda"
    assert evaluation_device({"accelerator": "cpu", "devices": 1}) == "cpu"
    with pytest.raises(ValueError, match="--devices 2: evaluate runs on one device"):
        evaluation_device({"accelerator": "gpu", "devices": 2})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert evaluation_device({"accelerator": "auto", "devices": 1}) == "cpu"
    assert evaluation_device({}) == "cpu"


def test_an_evaluation_folder_inside_another_split_folder_is_refused_before_it_is_made(
    own_demo, capsys
):
    """Only the split being scored was guarded: scoring test_full into multicoil_val wrote
    metrics.json and reconstructions/ there, which broke every later command reading val."""
    args = ["evaluate", "--data-path", str(own_demo), "--challenge", "multicoil"]
    args += ["--split", "test_full", "--progress", "false"]
    before = sorted(p.name for p in (own_demo / "multicoil_val").iterdir())
    for out_dir in (own_demo / "multicoil_val", own_demo / "singlecoil_train" / "scores"):
        assert main([*args, "--eval-out-dir", str(out_dir)]) == 2
        err = capsys.readouterr().err
        assert f"--eval-out-dir {out_dir} is inside the split folder" in err
    assert sorted(p.name for p in (own_demo / "multicoil_val").iterdir()) == before
    assert not (own_demo / "singlecoil_train" / "scores").exists()


def test_a_study_of_repeated_seeds_is_refused_before_training(
    tiny_demo, tmp_path, capsys, no_stage
):
    """seeds: [1, 1, 1] trained and scored each model once, and the report said 3 seeds."""
    out_dir = tmp_path / "study"
    assert _pipeline(tmp_path, _study(tiny_demo, out_dir, seeds=[1, 0, 1, 1])) == 2
    err = capsys.readouterr().err
    assert "seeds [1, 0, 1, 1] repeat seed(s) [1]" in err and "seeds: [1, 0]" in err
    assert not out_dir.exists()
