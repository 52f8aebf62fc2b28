"""SFTModule: a tiny SFT run on the demo data (Matcha et al., MIDL 2023, SFT stage).

One module-scoped run (D5C5 teacher, D3C5 student, 8 channels, 4 short epochs on the
single-coil demo split) feeds most tests; the multi-coil test runs one step of its own.
"""

from __future__ import annotations

import copy
import csv
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from sftkd_fastmri.export import load_reconstruction_model
from sftkd_fastmri.models import DCCNN, load_model, read_checkpoint
from sftkd_fastmri.pl_modules.data_module import FastMRIDataModule
from sftkd_fastmri.pl_modules.recon_module import VolumeMetrics, crop_to_target
from sftkd_fastmri.pl_modules.sft_module import SFTModule
from sftkd_fastmri.sft import export_sft, load_sft_models

from ..sft.test_wrapper import count_cascade_calls

TINY = dict(
    teacher_preset="dccnn_d5c5",
    student_preset="dccnn_d3c5",
    teacher_overrides={"chans": 8},
    student_overrides={"chans": 8},
)
BRANCHES = (1, 2, 3, 4)  # branch i starts after teacher cascade i; N = 5 cascades
TERMS = ("loss", "teacher_rec", "branch_rec", "imitation")


def _trainer(root: Path, **kwargs) -> pl.Trainer:
    defaults = dict(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


@contextmanager
def _one_thread():
    # The tiny convolutions gain nothing from a second thread, and two OpenMP threads on a
    # busy two-core machine wait on each other: measured here 4-6 s with one thread against
    # 100-150 s with two for the run below while other jobs were running.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sft_run(demo_root, tmp_path_factory):
    """A few SFT epochs on single-coil demo data; the best checkpoint by validation_loss."""
    pl.seed_everything(0, verbose=False)
    root = tmp_path_factory.mktemp("sft_run")
    datamodule = FastMRIDataModule(demo_root, "singlecoil", batch_size=2, seed=0)
    module = SFTModule(**TINY, lr=3e-3)
    initial_student = {k: v.clone() for k, v in module.student.state_dict().items()}
    checkpoint = ModelCheckpoint(
        dirpath=root / "checkpoints", monitor="validation_loss", mode="min", save_top_k=1
    )
    trainer = _trainer(
        root,
        max_epochs=4,
        limit_train_batches=10,
        logger=CSVLogger(root, name="logs", version=""),
        enable_checkpointing=True,
        callbacks=[checkpoint],
    )
    with _one_thread():
        trainer.fit(module, datamodule=datamodule)
    return dict(
        root=root,
        module=module,
        trainer=trainer,
        datamodule=datamodule,
        best=Path(checkpoint.best_model_path),
        initial_student=initial_student,
        metrics_csv=Path(trainer.logger.log_dir) / "metrics.csv",
    )


def _csv_columns(path: Path) -> set:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k for row in rows for k, v in row.items() if v not in ("", None)}


def test_teacher_beats_zero_filled(sft_run):
    datamodule = sft_run["datamodule"]
    zero_filled = VolumeMetrics()
    for batch in datamodule.val_dataloader():
        scale = batch.scale.reshape(-1, 1, 1)
        zero_filled.update(
            batch.fname,
            batch.slice_num,
            batch.zero_filled * scale,
            batch.target * scale,
            batch.max_value,
        )
    zf_psnr = zero_filled.compute()["psnr"]
    teacher_psnr = sft_run["module"].val_metrics["psnr"]
    assert teacher_psnr > zf_psnr + 0.5, (teacher_psnr, zf_psnr)


def test_every_loss_term_and_branch_metric_is_logged(sft_run):
    columns = _csv_columns(sft_run["metrics_csv"])
    expected = {"train_loss", "validation_loss"}
    expected |= {f"train/{t}" for t in TERMS} | {f"val/{t}" for t in TERMS}
    for i in BRANCHES:
        expected |= {f"train/branch{i}_rec", f"train/branch{i}_imitation", f"val/branch{i}_rec"}
        expected |= {f"val_metrics/branch{i}/{m}" for m in ("nmse", "ssim", "psnr")}
    expected |= {f"val_metrics/{m}" for m in ("nmse", "ssim", "psnr")}
    assert expected <= columns, sorted(expected - columns)
    assert "val_metrics/branch0/psnr" not in columns  # no branch 0 in paper mode
    logged = sft_run["trainer"].logged_metrics
    assert all(torch.isfinite(torch.as_tensor(logged[f"train/{t}"])) for t in TERMS)


def test_validation_reports_the_teacher(sft_run):
    """validation_loss and val_metrics are the teacher's own, recomputed from scratch."""
    module, datamodule = sft_run["module"], sft_run["datamodule"]
    module.eval()
    metrics, loss_sum, count = VolumeMetrics(), 0.0, 0
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            image = module.reconstruct(batch)  # the teacher, cropped
            loss_sum += float(torch.nn.functional.l1_loss(image, batch.target)) * len(image)
            count += len(image)
            scale = batch.scale.reshape(-1, 1, 1)
            metrics.update(
                batch.fname, batch.slice_num, image * scale, batch.target * scale, batch.max_value
            )
    logged = sft_run["trainer"].logged_metrics
    # the run ended with the last epoch's validation, so the module's weights are those it saw
    assert float(logged["validation_loss"]) == pytest.approx(loss_sum / count, rel=1e-5)
    # the teacher term of the logged SFT terms is the same per-slice mean
    assert float(logged["val/teacher_rec"]) == pytest.approx(loss_sum / count, rel=1e-5)
    assert module.val_metrics["psnr"] == pytest.approx(metrics.compute()["psnr"], rel=1e-6)
    assert module.val_metrics["branch1/psnr"] != module.val_metrics["psnr"]


def test_val_terms_count_each_slice_once_as_validation_loss(demo_root):
    """DDP samplers pad a rank with repeated slices. The val/* terms were logged as batch
    means (log_dict with sync_dist), which counted a repeated slice again: val/teacher_rec
    differed from validation_loss and changed with the number of devices. Per slice, each
    slice counts once, on one rank as across ranks (see test_recon_module)."""
    from torch.utils.data import default_collate

    dataset = FastMRIDataModule(demo_root, "singlecoil", batch_size=2).dataset("val")
    samples = [dataset[i] for i in range(3)]
    # the second batch repeats slice 1, as a rank padded by a DDP sampler sees it
    batches = [default_collate(samples[:2]), default_collate([samples[2], samples[1]])]
    torch.manual_seed(0)
    small = {"chans": 4}
    module = SFTModule(**{**TINY, "teacher_overrides": small, "student_overrides": small})
    module.eval().on_validation_epoch_start()
    with torch.no_grad():
        for i, batch in enumerate(batches):
            module.validation_step(batch, i)
        module._finish_stage("val")
        unique = default_collate(samples)
        alone = module.per_slice_sft_terms(module.sft_output(unique), unique)
    state = module._fm_state()["val"]
    means = state["slice_means"]
    expected = {f"val/{t}" for t in TERMS}
    expected |= {f"val/branch{i}_{t}" for i in BRANCHES for t in ("rec", "imitation")}
    assert set(means) == set(alone) == expected
    for name, values in alone.items():  # the mean over the three slices, each once
        assert means[name] == pytest.approx(float(values.mean()), rel=1e-5), name
    validation_loss = state["loss_sum"] / state["loss_count"]
    assert means["val/teacher_rec"] == pytest.approx(validation_loss, rel=1e-6)


def test_checkpoint_contract_export_and_reload(sft_run, tmp_path):
    best = sft_run["best"]
    ckpt = read_checkpoint(best)
    hp = ckpt["hyper_parameters"]
    assert hp["teacher_preset"] == "dccnn_d5c5" and hp["student_preset"] == "dccnn_d3c5"
    assert hp["teacher_config"]["chans"] == 8 and hp["student_config"]["depth"] == 3
    assert hp["train_first_student_cascade"] is False
    assert {k.split(".")[1] for k in ckpt["state_dict"] if k.startswith("sft.")} == {
        "teacher",
        "student",
    }

    teacher, student, info = load_sft_models(best)
    assert info["train_first_student_cascade"] is False
    teacher_path, student_path = export_sft(best, tmp_path)
    for role, reference, exported in (
        ("teacher", teacher, teacher_path),
        ("student", student, student_path),
    ):
        stored = {k: v for k, v in ckpt["state_dict"].items() if k.startswith(f"sft.{role}.")}
        assert len(stored) == len(reference.state_dict())
        for name, value in reference.state_dict().items():
            assert torch.equal(value, stored[f"sft.{role}.{name}"]), (role, name)
        for model in (load_model(exported), load_reconstruction_model(best, role=role)):
            assert model.config == reference.config
            assert model.preset == hp[f"{role}_preset"]
            for name, value in model.state_dict().items():
                assert torch.equal(value, reference.state_dict()[name]), (role, name)

    # The Lightning module itself reloads from the stored configs, teacher output unchanged,
    # and its reconstruction (validation, test, predict) is that teacher's, not the student's.
    reloaded = SFTModule.load_from_checkpoint(best).eval()
    batch = next(iter(sft_run["datamodule"].val_dataloader()))
    h, w = batch.target.shape[-2:]
    with torch.no_grad():
        expected = teacher(batch.masked_kspace, batch.mask, None)
        assert torch.allclose(reloaded(batch.masked_kspace, batch.mask, None), expected)
        student_image = student(batch.masked_kspace, batch.mask, None)
        assert expected.shape[-2:] == (h, w)  # single-coil demo data: no crop to write out
        reconstruction = reloaded.reconstruct(batch)
    torch.testing.assert_close(reconstruction, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(reconstruction, student_image, rtol=1e-3, atol=1e-3)


def test_first_student_cascade_keeps_its_initialisation(sft_run):
    # Paper: no branch reaches S_1 in the SFT stage, so it stays as initialised.
    trained = sft_run["module"].student.state_dict()
    for name, value in sft_run["initial_student"].items():
        if name.startswith("cascades.0."):
            assert torch.equal(trained[name], value), name
        else:  # the shared cascades S_2 .. S_N are trained by the branches
            assert not torch.equal(trained[name], value), name


def _frozen_as_in_fit(module: SFTModule) -> SFTModule:
    module.setup("fit")
    return module


def test_unused_first_student_cascade_is_frozen():
    paper = _frozen_as_in_fit(SFTModule(**TINY))
    frozen = {id(p) for p in paper.student.cascades[0].parameters()}
    assert frozen and {id(p) for p in paper.unused_parameters()} == frozen
    assert all(not p.requires_grad for p in paper.student.cascades[0].parameters())
    assert all(p.requires_grad for p in paper.student.cascades[1].parameters())
    assert all(p.requires_grad for p in paper.teacher.parameters())
    full = _frozen_as_in_fit(SFTModule(**TINY, train_first_student_cascade=True))
    assert full.unused_parameters() == [] and all(p.requires_grad for p in full.parameters())
    # degenerate weightings: what no weighted term reaches is frozen as well
    teacher_only = _frozen_as_in_fit(SFTModule(**TINY, branch_weight=0.0, imitation_weight=0.0))
    assert not any(p.requires_grad for p in teacher_only.student.parameters())
    branches_only = _frozen_as_in_fit(
        SFTModule(
            **TINY, teacher_weight=0.0, imitation_weight=1.0, detach_teacher_in_imitation=True
        )
    )
    assert not any(p.requires_grad for p in branches_only.teacher.cascades[4].parameters())
    assert all(p.requires_grad for p in branches_only.teacher.cascades[3].parameters())


def test_instances_come_back_trainable_after_the_fit(demo_root, tmp_path):
    """The first student cascade is frozen during the SFT fit only: a student passed as an
    instance, distilled next, must train it (it stayed frozen for good before)."""
    from sftkd_fastmri.models import create_model

    student = create_model("dccnn_d3c5", chans=4)
    teacher = create_model("dccnn_d5c5", chans=4)
    module = SFTModule(teacher=teacher, student=student, val_branch_metrics=False)
    assert all(p.requires_grad for p in student.parameters())
    seen = {}

    class Flags(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["s1"] = [p.requires_grad for p in student.cascades[0].parameters()]
            seen["optimised"] = {
                id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]
            }

    data = FastMRIDataModule(demo_root, challenge="singlecoil", batch_size=2, num_workers=0)
    s1_before = copy.deepcopy(student.cascades[0].state_dict())
    _trainer(
        tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[Flags()]
    ).fit(module, datamodule=data)
    assert seen["s1"] and not any(seen["s1"])  # frozen while fitting
    for k, v in student.cascades[0].state_dict().items():  # so it kept its initialisation
        assert torch.equal(v, s1_before[k])
    assert all(p.requires_grad for p in student.parameters())  # and trainable again after

    class Stop(pl.Callback):  # a fit that fails (Lightning then calls no module teardown)
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["frozen_again"] = not any(
                p.requires_grad for p in student.cascades[0].parameters()
            )
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        _trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                 callbacks=[Stop()]).fit(module, datamodule=data)  # fmt: skip
    assert seen["frozen_again"] and all(p.requires_grad for p in student.parameters())


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"train_first_student_cascade": True},
        {"branch_weight": 0.0, "imitation_weight": 0.0},
        {"teacher_weight": 0.0, "detach_teacher_in_imitation": True},
        {"teacher_weight": 0.0, "imitation_weight": 0.0},
    ],
)
def test_frozen_parameters_are_exactly_those_without_gradient(options):
    module = _frozen_as_in_fit(SFTModule(**TINY, **options))
    frozen = {id(p) for p in module.unused_parameters()}
    for param in module.parameters():
        param.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    kspace = torch.randn(2, 1, 12, 10, 2, generator=g)
    mask = torch.zeros(1, 1, 1, 10, 1, dtype=torch.bool)
    mask[..., ::2, :] = True
    target = torch.rand(2, 12, 10, generator=g)
    module.train()
    module.sft_loss(module(kspace * mask, mask), target).total.backward()
    without_grad = {id(p) for p in module.parameters() if p.grad is None}
    assert without_grad == frozen


def test_loss_choice():
    assert SFTModule(**TINY, loss="l2").sft_loss.distance == "l2"
    assert SFTModule(**TINY, loss="mse").sft_loss.distance == "l2"
    assert SFTModule(**TINY, loss="L1").sft_loss.distance == "l1"  # as train reads "L1"
    assert SFTModule(**TINY, loss="MSE").sft_loss.distance == "l2"
    with pytest.raises(ValueError, match="'ssim'"):
        SFTModule(**TINY, loss="ssim")
    with pytest.raises(ValueError, match="imitation_weight"):
        SFTModule(**TINY, imitation_weight=-1.0)


def test_test_stage_writes_teacher_reconstructions(sft_run, tmp_path):
    module = sft_run["module"]
    module.output_dir = tmp_path
    datamodule = sft_run["datamodule"]
    trainer = _trainer(tmp_path)
    with _one_thread():
        trainer.test(module, datamodule=datamodule, verbose=False)
    files = sorted((tmp_path / "reconstructions").glob("*.h5"))
    assert [f.name for f in files] == sorted(
        p.name for p in datamodule.split_folder("test").glob("*.h5")
    )
    batch = next(iter(datamodule.test_dataloader()))
    # Computed without the module under test: a plain DC-CNN holding the teacher's weights,
    # its output centre-cropped to the batch's crop size and scaled back to the file's units.
    teacher = DCCNN(**module.teacher.config).eval()
    teacher.load_state_dict(module.teacher.state_dict())
    sens_maps = batch.sens_maps if batch.sens_maps.numel() else None
    with torch.no_grad():
        images = {
            "teacher": teacher(batch.masked_kspace, batch.mask, sens_maps)[0],
            "student": module.student.eval()(batch.masked_kspace, batch.mask, sens_maps)[0],
        }
    h, w = int(batch.crop_size[0][0]), int(batch.crop_size[1][0])
    scale = float(batch.scale[0])
    expected = {}
    for role, image in images.items():
        top, left = (image.shape[-2] - h) // 2, (image.shape[-1] - w) // 2
        expected[role] = (image[top : top + h, left : left + w] * scale).numpy()
    with h5py.File(tmp_path / "reconstructions" / batch.fname[0], "r") as hf:
        stored = hf["reconstruction"][int(batch.slice_num[0])]
    assert stored.shape == (h, w)
    np.testing.assert_allclose(stored, expected["teacher"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(stored, expected["student"], rtol=1e-3, atol=1e-3)


def test_multicoil_step_with_branch_zero_and_batched_branches(demo_root, tmp_path):
    pl.seed_everything(0, verbose=False)
    datamodule = FastMRIDataModule(demo_root, "multicoil", batch_size=2, seed=0)
    module = SFTModule(**TINY, train_first_student_cascade=True, batch_branches=True)
    trainer = _trainer(tmp_path, fast_dev_run=1)
    sizes: dict = {}
    calls, handles = count_cascade_calls(module.sft, sizes)
    with _one_thread():
        trainer.fit(module, datamodule=datamodule)
    for h in handles:
        h.remove()
    # one training and one validation step, each running the teacher once and every student
    # cascade once, on its active branches stacked (branches 0 .. k at the 0-based cascade k)
    assert module.branch_ids == [0, 1, 2, 3, 4]
    for k in range(5):
        batches = sizes[("teacher", k)]
        assert calls[("teacher", k)] == len(batches) == 2, k
        assert calls[("student", k)] == 2, k
        assert sizes[("student", k)] == [(k + 1) * b for b in batches], k
    logged = trainer.logged_metrics
    for name in ("train/loss", "train/branch0_rec", "train/branch4_imitation"):
        assert torch.isfinite(torch.as_tensor(logged[name])), name
    assert np.isfinite(module.val_metrics["branch0/psnr"])
    assert np.isfinite(module.val_metrics["psnr"])


def test_varnet_instances_train_and_reload(demo_root, tmp_path):
    from fastmri.models import VarNet

    from sftkd_fastmri.models import CascadedVarNet, CheckpointError

    def varnet(chans):
        return CascadedVarNet(
            VarNet(num_cascades=3, sens_chans=2, sens_pools=2, chans=chans, pools=2)
        )

    pl.seed_everything(0, verbose=False)
    teacher, student = varnet(6), varnet(3)
    module = SFTModule(teacher=teacher, student=student)
    frozen = {id(p) for p in module.unused_parameters()}
    # without branch 0 the branches run S_2..S_N with the teacher's coil maps: the student's
    # first block and its sensitivity network get no gradient and are frozen while fitting
    expected = list(student.cascades[0].parameters()) + list(student.varnet.sens_net.parameters())
    assert frozen == {id(p) for p in expected}
    module.setup("fit")
    assert all(not p.requires_grad for p in expected)
    module.teardown("fit")
    assert all(p.requires_grad for p in expected)
    # instances record no preset but their config, from which they are rebuilt
    assert module.hparams["teacher_preset"] is None
    assert module.hparams["teacher_config"] == teacher.config
    assert module.hparams["teacher_config"]["architecture"] == "cascaded_varnet"
    assert module.hparams["student_config"]["chans"] == 3
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    datamodule = FastMRIDataModule(demo_root, "multicoil", batch_size=2, seed=0)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    with _one_thread():
        trainer.fit(module, datamodule=datamodule)
    assert any(not torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert np.isfinite(module.val_metrics["psnr"]) and np.isfinite(
        module.val_metrics["branch2/psnr"]
    )
    ckpt = tmp_path / "varnet_sft.ckpt"
    trainer.save_checkpoint(ckpt)
    reloaded = SFTModule.load_from_checkpoint(ckpt, teacher=varnet(6), student=varnet(3))
    for k, v in module.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    # ... and without the instances: the recorded configs rebuild the VarNets
    rebuilt = SFTModule.load_from_checkpoint(ckpt)
    assert isinstance(rebuilt.teacher, CascadedVarNet) and rebuilt.student.config == student.config
    for k, v in module.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k
    # the exports are plain model checkpoints of the two VarNets (the KD stage's inputs)
    teacher_path, student_path = export_sft(ckpt, tmp_path / "out")
    # the data's challenge, recorded by the module, travels to the exports (their signature)
    assert read_checkpoint(teacher_path)["sftkd_fastmri"]["extra"]["challenge"] == "multicoil"
    batch = next(iter(datamodule.val_dataloader()))
    # the batch's num_low_frequencies reach the VarNets, as fastMRI's VarNetModule gives them
    low = int(batch.num_low_frequencies[0])
    with torch.no_grad():
        want = module.teacher.eval()(batch.masked_kspace, batch.mask, low)
        other = module.teacher(batch.masked_kspace, batch.mask)  # the centre found from the mask
        assert not torch.allclose(want, other, atol=1e-4)  # so the check below can fail
        torch.testing.assert_close(module.eval().reconstruct(batch), crop_to_target(want, batch))
    inputs = (batch.masked_kspace, batch.mask)
    for path, net in ((teacher_path, module.teacher), (student_path, module.student)):
        loaded = load_model(path).eval()
        assert isinstance(loaded, CascadedVarNet)
        with torch.no_grad():
            torch.testing.assert_close(loaded(*inputs), net.eval()(*inputs), atol=0, rtol=0)
    # a network without a config (e.g. a VarNet of another layout) records None: its
    # checkpoint cannot be exported, and says so
    saved = torch.load(ckpt, weights_only=False)
    saved["hyper_parameters"]["teacher_config"] = None
    torch.save(saved, tmp_path / "no_config.ckpt")
    with pytest.raises(CheckpointError, match="no config for the teacher.*without a config"):
        export_sft(tmp_path / "no_config.ckpt", tmp_path / "out2")


def test_init_teacher_and_student_start_from_checkpoints(tmp_path):
    from sftkd_fastmri.models import CheckpointError, create_model, save_model_checkpoint

    torch.manual_seed(3)
    trained_teacher = create_model("dccnn_d5c5", chans=8)
    trained_student = create_model("dccnn_d3c5", chans=8)
    teacher_path = save_model_checkpoint(trained_teacher, tmp_path / "teacher.pt")
    student_path = save_model_checkpoint(trained_student, tmp_path / "student.pt")

    module = SFTModule(**TINY, init_teacher=teacher_path, init_student=student_path)
    for ours, theirs in ((module.teacher, trained_teacher), (module.student, trained_student)):
        expected = theirs.state_dict()
        got = ours.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert "init_teacher" not in module.hparams  # the module's checkpoint holds the weights

    # From an SFT checkpoint: the teacher takes its teacher, the student its student.
    sft_ckpt = tmp_path / "sft.ckpt"
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, sft_ckpt
    )
    again = SFTModule(**TINY, init_teacher=sft_ckpt, init_student=sft_ckpt)
    assert torch.equal(
        again.student.cascades[1].cnn.conv0.weight, trained_student.cascades[1].cnn.conv0.weight
    )
    assert torch.equal(
        again.teacher.cascades[1].cnn.conv0.weight, trained_teacher.cascades[1].cnn.conv0.weight
    )

    # Another width is refused with the overrides that would match it.
    with pytest.raises(CheckpointError, match="chans: expected 16, found 8.*--teacher-overrides"):
        SFTModule(**{**TINY, "teacher_overrides": {"chans": 16}}, init_teacher=teacher_path)
    # The student's checkpoint as the teacher's: another preset, named.
    with pytest.raises(CheckpointError, match="holds preset 'dccnn_d3c5', expected 'dccnn_d5c5'"):
        SFTModule(**TINY, init_teacher=student_path)


def test_ddp_two_processes_with_the_unused_first_student_cascade(demo_root, tmp_path):
    """Under DDP (2 CPU processes, gloo, no search for unused parameters) the paper's SFT
    leaves S_1 without gradient: it must be frozen before DDP wraps the module, or the
    second step fails."""
    module = SFTModule(**TINY, val_branch_metrics=False)
    s1_before = copy.deepcopy(module.student.cascades[0].state_dict())
    s2_before = copy.deepcopy(module.student.cascades[1].state_dict())
    data = FastMRIDataModule(demo_root, challenge="singlecoil", batch_size=1, num_workers=0)
    trainer = _trainer(
        tmp_path,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        devices=2,
        strategy="ddp_spawn",
        enable_checkpointing=True,
    )
    trainer.fit(module, datamodule=data)
    # ddp_spawn trains copies: read the weights back from the checkpoint the fit wrote
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    s1 = {k: state[f"sft.student.cascades.0.{k}"] for k in s1_before}
    s2 = {k: state[f"sft.student.cascades.1.{k}"] for k in s2_before}
    assert all(torch.equal(v, s1_before[k]) for k, v in s1.items())
    assert any(not torch.equal(v, s2_before[k]) for k, v in s2.items())


@pytest.mark.parametrize("given", [True, False])
def test_ddp_looks_for_unused_parameters_when_varnets_take_given_maps(given):
    """With use_given_sens_maps=True the sensitivity networks get no gradient on batches that
    carry maps (known per batch only): DDP must look for unused parameters, else it fails on
    the second step. Without it every parameter is reached and DDP keeps its default."""
    from types import SimpleNamespace

    from fastmri.models import VarNet
    from pytorch_lightning.strategies import DDPStrategy

    from sftkd_fastmri.models import CascadedVarNet

    def net(chans):
        varnet = VarNet(num_cascades=2, sens_chans=2, sens_pools=1, chans=chans, pools=1)
        return CascadedVarNet(varnet, use_given_sens_maps=given)

    module = SFTModule(teacher=net(4), student=net(2))
    strategy = DDPStrategy()
    module._trainer = SimpleNamespace(world_size=2, strategy=strategy)
    module.setup("fit")
    try:
        assert strategy._ddp_kwargs.get("find_unused_parameters", False) is given
    finally:
        module.teardown("fit")
