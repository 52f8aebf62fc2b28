"""export_sft: teacher and student initialisation as plain DC-CNN model checkpoints."""

from __future__ import annotations

import pytest
import torch

from sftkd_fastmri.models import (
    CheckpointError,
    create_model,
    load_model,
    load_state_dict_strict,
    read_checkpoint,
)
from sftkd_fastmri.sft import StudentFriendlyTeacher, export_sft, load_sft_models

from .test_wrapper import PAIRS, make_batch, make_sft


def trained_a_bit(kind: str = "complex", branch0: bool = False) -> StudentFriendlyTeacher:
    """An SFT whose weights moved away from any seeded initialisation."""
    sft = make_sft(kind, seed=5, train_first_student_cascade=branch0)
    with torch.no_grad():
        for i, p in enumerate(sft.parameters()):
            p.add_(0.01 * (i % 7))
    return sft


def lightning_checkpoint(sft: StudentFriendlyTeacher, path, kind="complex", prefix="sft.", **hp):
    """What a Lightning module holding ``self.sft`` writes (the documented contract)."""
    teacher_preset, student_preset = PAIRS[kind]
    hparams = dict(
        teacher_preset=teacher_preset,
        teacher_config=dict(sft.teacher.config),
        student_preset=student_preset,
        student_config=dict(sft.student.config),
        train_first_student_cascade=sft.train_first_student_cascade,
        lr=1e-3,
    )
    hparams.update(hp)
    hparams = {k: v for k, v in hparams.items() if v is not None}
    state = {f"{prefix}{k}": v.clone() for k, v in sft.state_dict().items()}
    torch.save(
        {"epoch": 3, "global_step": 12, "state_dict": state, "hyper_parameters": hparams}, path
    )
    return path


def assert_round_trip(sft, teacher_path, student_path, kind, coils=1, branch0="from sft"):
    teacher_preset, student_preset = PAIRS[kind]
    masked_kspace, mask, sens, _ = make_batch(coils=coils)
    sft.eval()
    teacher = load_model(teacher_path, expected_preset=teacher_preset).eval()
    assert torch.equal(teacher(masked_kspace, mask, sens), sft(masked_kspace, mask, sens))

    student = create_model(student_preset, chans=4)
    load_state_dict_strict(student, read_checkpoint(student_path)["state_dict"])
    for name, value in sft.student.state_dict().items():
        assert torch.equal(student.state_dict()[name], value), name
    assert load_model(student_path, expected_preset=student_preset).config == student.config

    t_meta = read_checkpoint(teacher_path)["sftkd_fastmri"]
    s_meta = read_checkpoint(student_path)["sftkd_fastmri"]
    assert (t_meta["role"], t_meta["preset"]) == ("teacher", teacher_preset)
    assert (s_meta["role"], s_meta["preset"]) == ("student", student_preset)
    if branch0 == "from sft":
        branch0 = sft.train_first_student_cascade
    assert s_meta["extra"]["train_first_student_cascade"] == branch0


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("branch0", [False, True])
def test_export_from_wrapper(tmp_path, kind, branch0):
    sft = trained_a_bit(kind, branch0)
    teacher_path, student_path = export_sft(sft, tmp_path / "out")
    assert teacher_path.parent == student_path.parent == tmp_path / "out"
    assert_round_trip(sft, teacher_path, student_path, kind, coils=3)


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_export_from_lightning_checkpoint(tmp_path, kind):
    sft = trained_a_bit(kind)
    ckpt = lightning_checkpoint(sft, tmp_path / "last.ckpt", kind)
    teacher_path, student_path = export_sft(ckpt, tmp_path, teacher_filename="t.ckpt")
    assert teacher_path.name == "t.ckpt"
    assert_round_trip(sft, teacher_path, student_path, kind)


def test_export_with_another_prefix_and_from_a_state_dict(tmp_path):
    sft = trained_a_bit()
    ckpt = lightning_checkpoint(sft, tmp_path / "a.ckpt", prefix="model.sft.")
    paths = export_sft(ckpt, tmp_path / "a", prefix="model.sft.")
    assert_round_trip(sft, *paths, "complex")

    paths = export_sft(
        sft.state_dict(),
        tmp_path / "b",
        prefix="",
        teacher_preset="dccnn_d5c5",
        teacher_config=sft.teacher.config,
        student_preset="dccnn_d3c5",
        student_config=sft.student.config,
    )
    assert_round_trip(sft, *paths, "complex", branch0=None)  # a bare state dict does not say


def test_load_sft_models_rebuilds_both_networks(tmp_path):
    sft = trained_a_bit("paper")
    ckpt = lightning_checkpoint(sft, tmp_path / "last.ckpt", "paper")
    teacher, student, info = load_sft_models(ckpt)
    assert (teacher.preset, student.preset) == PAIRS["paper"]
    assert not teacher.training and info["train_first_student_cascade"] is False
    rebuilt = StudentFriendlyTeacher(teacher, student).eval()
    masked_kspace, mask, sens, _ = make_batch()
    assert torch.equal(rebuilt(masked_kspace, mask, sens), sft.eval()(masked_kspace, mask, sens))


def test_missing_key_raises_and_names_it(tmp_path):
    sft = trained_a_bit()
    ckpt_path = lightning_checkpoint(sft, tmp_path / "last.ckpt")
    ckpt = torch.load(ckpt_path, weights_only=True)
    del ckpt["state_dict"]["sft.student.cascades.4.cnn.conv1.weight"]
    torch.save(ckpt, ckpt_path)
    with pytest.raises(CheckpointError, match=r"cascades\.4\.cnn\.conv1\.weight") as err:
        export_sft(ckpt_path, tmp_path / "out")
    assert "'sft.student.*'" in str(err.value) and str(ckpt_path) in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_missing_hyperparameters_raise(tmp_path):
    sft = trained_a_bit()
    ckpt = tmp_path / "last.ckpt"
    lightning_checkpoint(sft, ckpt, student_config=None)
    with pytest.raises(CheckpointError, match="no 'student_config'"):
        export_sft(ckpt, tmp_path / "out")
    # ... unless given explicitly
    export_sft(ckpt, tmp_path / "out", student_config=sft.student.config)

    # A config without a preset (a user's own module that records no SFT hyperparameters):
    # the config is enough, the preset recorded as None.
    lightning_checkpoint(sft, ckpt, teacher_preset=None)
    teacher_path, _ = export_sft(ckpt, tmp_path / "out2")
    teacher = load_model(teacher_path)
    assert teacher.preset is None and teacher.config == sft.teacher.config
    for k, v in sft.teacher.state_dict().items():
        assert torch.equal(teacher.state_dict()[k], v)
    torch.save({"state_dict": torch.load(ckpt, weights_only=True)["state_dict"]}, ckpt)
    with pytest.raises(CheckpointError, match="no config for the teacher.*pass teacher_config"):
        export_sft(ckpt, tmp_path / "out3")
    export_sft(
        ckpt,
        tmp_path / "out3",
        teacher_config=sft.teacher.config,
        student_config=sft.student.config,
    )


def test_other_checkpoint_errors(tmp_path):
    sft = trained_a_bit()
    ckpt = lightning_checkpoint(sft, tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match="no weights under the prefix 'model.'"):
        export_sft(ckpt, tmp_path / "out", prefix="model.")
    with pytest.raises(CheckpointError, match="conflicts"):
        export_sft(ckpt, tmp_path / "out", student_preset="dccnn_d3c5_paper")
    with pytest.raises(CheckpointError, match="does not exist"):
        export_sft(tmp_path / "missing.ckpt", tmp_path / "out")

    wide = dict(sft.student.config, chans=8)  # config that does not fit the weights
    lightning_checkpoint(sft, ckpt, student_config=wide)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        export_sft(ckpt, tmp_path / "out")

    state = dict(sft.state_dict())
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="neither the teacher nor the student"):
        export_sft(state, tmp_path / "out", prefix="", teacher_preset="dccnn_d5c5")
    with pytest.raises(CheckpointError, match="no config for the teacher"):
        export_sft(sft.state_dict(), tmp_path / "out", prefix="")


def test_an_sft_export_asked_for_the_other_network_is_refused(tmp_path):
    """The two SFT exports are single-network files: a role asking one of them for the other
    network (e.g. the student initialisation given as the KD teacher with role 'teacher')
    is refused instead of silently answered with the network the file holds."""
    from sftkd_fastmri.callbacks import DistillationCallback
    from sftkd_fastmri.models import save_model_checkpoint

    sft = trained_a_bit()
    teacher_path, student_path = export_sft(sft, tmp_path / "out")
    with pytest.raises(CheckpointError, match="student export; asked for the teacher"):
        load_model(student_path, role="teacher")
    with pytest.raises(CheckpointError, match="teacher export; asked for the student"):
        load_model(teacher_path, role="student")
    with pytest.raises(CheckpointError, match="sft_teacher.ckpt"):
        DistillationCallback(student_path, {"imitation": 1.0}, teacher_prefix="teacher")
    assert load_model(student_path, role="student").config == sft.student.config
    assert load_model(student_path).config == sft.student.config  # role "auto"
    # files of one network outside the SFT stage take any role (e.g. a distilled student
    # as the teacher of a smaller one)
    other = save_model_checkpoint(sft.student, tmp_path / "kd.pt", role="student")
    assert load_model(other, role="teacher").config == sft.student.config


def test_a_single_network_checkpoint_is_named_as_such(tmp_path):
    """A model checkpoint or a train/distill run's Lightning checkpoint holds one network: the
    error says so, rather than asking for a prefix that no file of that kind has."""
    from sftkd_fastmri.models import save_model_checkpoint

    sft = trained_a_bit()
    model_file = save_model_checkpoint(sft.student, tmp_path / "model.pt", role="student")
    state = {f"model.{k}": v for k, v in sft.student.state_dict().items()}
    run_file = tmp_path / "best.ckpt"
    hparams = {"model_preset": "dccnn_d3c5", "model_config": dict(sft.student.config)}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, run_file)
    for path, what in ((model_file, "model checkpoint"), (run_file, "Lightning checkpoint")):
        with pytest.raises(CheckpointError, match=f"a {what} of one network.*not an SFT"):
            export_sft(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_module_of_preset_instances_exports_what_distill_accepts(tmp_path):
    """SFTModule given create_model instances records their presets, so the student export of
    its checkpoint initialises the student preset's DCCNNModule (as distill does)."""
    import pytorch_lightning as pl

    from sftkd_fastmri.pl_modules import DCCNNModule, SFTModule

    torch.manual_seed(0)
    teacher, student = create_model("dccnn_d5c5", chans=4), create_model("dccnn_d3c5", chans=4)
    module = SFTModule(teacher=teacher, student=student)
    assert (module.hparams["teacher_preset"], module.hparams["student_preset"]) == (
        "dccnn_d5c5",
        "dccnn_d3c5",
    )
    trainer = pl.Trainer(logger=False, accelerator="cpu", enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "sft.ckpt")
    _, student_path = export_sft(tmp_path / "sft.ckpt", tmp_path / "out")
    initialised = DCCNNModule(
        "dccnn_d3c5", model_overrides={"chans": 4}, init_checkpoint=student_path
    )
    for name, value in student.state_dict().items():
        assert torch.equal(initialised.model.state_dict()[name], value), name


def test_a_float64_sft_run_exports_float64_networks(tmp_path):
    """Weights trained in float64 (Trainer(precision="64-true")) are exported unrounded, as
    load_model keeps them; a float32 run still exports float32."""
    sft = trained_a_bit().double()
    with torch.no_grad():  # differences float32 cannot hold
        for p in sft.parameters():
            p.add_(1e-12 * (1 + p.detach().abs()))
    src = lightning_checkpoint(sft, tmp_path / "sft64.ckpt")
    teacher_path, student_path = export_sft(src, tmp_path / "out")
    for path, net in ((teacher_path, sft.teacher), (student_path, sft.student)):
        model = load_model(path)
        assert next(model.parameters()).dtype == torch.float64
        for name, value in net.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), name
    teacher, _, _ = load_sft_models(src)
    assert next(teacher.parameters()).dtype == torch.float64

    src32 = lightning_checkpoint(trained_a_bit(), tmp_path / "sft32.ckpt")
    teacher_path, _ = export_sft(src32, tmp_path / "out32")
    assert next(load_model(teacher_path).parameters()).dtype == torch.float32
