"""DistillationCallback: drop-in KD for unchanged LightningModules (toy module, DCCNNModule,
fastMRI's VarNetModule through the Lightning 2 adapter)."""

from __future__ import annotations

import copy
import functools
import math
from typing import Dict, List

import fastmri
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from sftkd_fastmri.callbacks import DistillationCallback
from sftkd_fastmri.kd import AttentionTransfer, available_losses
from sftkd_fastmri.models import (
    CheckpointError,
    create_model,
    load_model,
    save_model_checkpoint,
)

H, W = 14, 12
pytestmark = pytest.mark.filterwarnings(
    "ignore:You defined a `validation_step` but have no `val_dataloader`",
    "ignore:Be aware that when using `ckpt_path`",
)


def _dataset(n: int = 8, seed: int = 0) -> TensorDataset:
    """Single-coil samples: k-space (1, H, W, 2), mask (1, 1, W, 1), target (H, W)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 1, H, W, 2, generator=g)
    mask = torch.zeros(n, 1, 1, W, 1, dtype=torch.bool)
    mask[..., ::3, :] = True
    mask[..., W // 2 - 1 : W // 2 + 1, :] = True
    kspace = fastmri.fft2c(image) * mask
    return TensorDataset(kspace, mask, fastmri.complex_abs(image[:, 0]))


def _loader(n: int = 8, batch_size: int = 2) -> DataLoader:
    return DataLoader(_dataset(n), batch_size=batch_size, shuffle=False)


class ToyRecon(pl.LightningModule):
    """A minimal ReconModule-style module: ``self.model``, own L1 loss, Adam."""

    def __init__(self, model: torch.nn.Module, return_dict: bool = False) -> None:
        super().__init__()
        self.model = model
        self.return_dict = return_dict

    def training_step(self, batch, batch_idx):
        kspace, mask, target = batch
        loss = F.l1_loss(self.model(kspace, mask), target)
        self.log("train_loss", loss, batch_size=target.shape[0])
        return {"loss": loss, "extra": 1} if self.return_dict else loss

    def validation_step(self, batch, batch_idx):
        kspace, mask, target = batch
        self.log("val_loss", F.l1_loss(self.model(kspace, mask), target), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _nets(student_chans: int = 4, teacher_chans: int = 8):
    torch.manual_seed(0)
    student = create_model("dccnn_d3c5", chans=student_chans, num_cascades=3)
    teacher = create_model("dccnn_d5c5", chans=teacher_chans, num_cascades=3)
    return student, teacher


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    kwargs.setdefault("devices", 1)
    kwargs.setdefault("max_epochs", 1)
    kwargs.setdefault("limit_val_batches", 0)
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kwargs,
    )


class Recorder(pl.Callback):
    """Records step outputs, logged metrics, optimiser contents and teacher calls."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        self.losses: List[float] = []
        self.metrics: List[Dict[str, float]] = []
        self.teacher_calls: List[int] = []  # epoch of each teacher forward
        self.teacher_modes: List[bool] = []
        self.optimizer_params: List[int] = []
        self.state_keys: List[str] = []
        self.teacher_grad_flags: List[bool] = []
        self.trainer = None
        self.teacher = teacher
        teacher.register_forward_hook(self._teacher_hook)

    def _teacher_hook(self, module, args, output):
        self.teacher_calls.append(self.trainer.current_epoch if self.trainer else -1)
        self.teacher_modes.append(module.training)

    def on_train_start(self, trainer, pl_module):
        self.trainer = trainer
        self.optimizer_params = [
            id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]
        ]
        self.state_keys = list(pl_module.state_dict())
        self.teacher_grad_flags = [p.requires_grad for p in self.teacher.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


class ForwardCalls(pl.Callback):
    """Records every training batch and the arguments and output of every forward of the
    student network and of the teacher."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
        self.batches: List = []
        self.calls: Dict[str, List] = {"student": [], "teacher": []}
        for role, net in (("student", student), ("teacher", teacher)):
            net.register_forward_hook(functools.partial(self._hook, role), with_kwargs=True)

    def _hook(self, role, module, args, kwargs, output):
        self.calls[role].append((args, dict(kwargs), output.detach().clone()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch)


def _assert_teacher_ran_on_the_students_varnet_inputs(calls: ForwardCalls, metrics) -> None:
    """fastMRI VarNet arguments: the batch's (masked_kspace, mask, num_low_frequencies) for
    student and teacher alike; the logged imitation term is L1(student output, teacher output)."""
    student, teacher = calls.calls["student"], calls.calls["teacher"]
    assert len(calls.batches) == len(student) == len(teacher) == len(metrics) > 0
    for batch, (s_args, s_kwargs, s_out), (t_args, t_kwargs, t_out), logged in zip(
        calls.batches, student, teacher, metrics
    ):
        num_low = int(batch.num_low_frequencies)
        for args, kwargs in ((s_args, s_kwargs), (t_args, t_kwargs)):
            assert len(args) == 3 and kwargs == {}
            assert torch.equal(args[0], batch.masked_kspace)
            assert torch.equal(args[1], batch.mask)
            assert int(args[2]) == num_low
        imitation = F.l1_loss(s_out, t_out)
        assert logged["kd/imitation_step"] == pytest.approx(imitation.item(), rel=1e-5)


def _manual_features(model, kspace, mask, relu: int):
    """The ReLU activation ``relu`` of every cascade and the output, by hand."""
    feats, state = [], model.initial_state(kspace, mask)
    for cascade in model.cascades:
        h = state
        for j in range(cascade.cnn.depth):
            h = getattr(cascade.cnn, f"conv{j}")(h)
            if j < cascade.cnn.depth - 1:
                h = torch.relu(h)
                if j == relu:
                    feats.append(h)
        state = cascade.dc(state + h, kspace, mask, None)
    return feats, model.final_image(state)


# -- construction ---------------------------------------------------------------------------
def test_constructor_validates_arguments(tmp_path):
    _, teacher = _nets()
    with pytest.raises(ValueError, match="available: " + ", ".join(available_losses())):
        DistillationCallback(teacher, {"attention": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        DistillationCallback(teacher, {"at": -0.5})
    with pytest.raises(ValueError, match="kd_epochs"):
        DistillationCallback(teacher, {"at": 1.0}, schedule="two_stage")
    with pytest.raises(ValueError, match="kd_epochs"):
        DistillationCallback(teacher, {"at": 1.0}, schedule="two_stage", kd_epochs=0)
    with pytest.raises(ValueError, match="schedule"):
        DistillationCallback(teacher, {"at": 1.0}, schedule="alternating")
    with pytest.raises(ValueError, match="not among the losses"):
        DistillationCallback(teacher, {"at": 1.0}, layers={"fsp": [("a", "b")]})
    with pytest.raises(ValueError, match="pair"):
        DistillationCallback(teacher, {"at": 1.0}, layers={"at": ["cascades.0"]})
    with pytest.raises(TypeError, match="nn.Module or a checkpoint path"):
        DistillationCallback(42, {"at": 1.0})
    with pytest.raises(CheckpointError, match="does not exist"):
        DistillationCallback(tmp_path / "missing.pt", {"at": 1.0})


def test_teacher_from_checkpoint_and_lightning_module(tmp_path):
    _, teacher = _nets()
    path = save_model_checkpoint(teacher, tmp_path / "teacher.pt", role="teacher")
    callback = DistillationCallback(path, {"imitation": 1.0})
    assert not callback.teacher.training
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(callback.teacher.state_dict()[k], v)
    assert DistillationCallback(ToyRecon(teacher), {"sp": 1.0}).teacher is teacher


# -- the training step ----------------------------------------------------------------------
@pytest.mark.parametrize("return_dict", [False, True])
def test_loss_is_recon_plus_weighted_kd(tmp_path, return_dict):
    student, teacher = _nets()
    student0, teacher0 = copy.deepcopy(student), copy.deepcopy(teacher)
    weights = {"at": 0.7, "imitation": 2.0}
    kd = DistillationCallback(teacher, weights)
    recorder = Recorder(teacher)
    module = ToyRecon(student, return_dict=return_dict)
    _trainer(tmp_path, [kd, recorder], limit_train_batches=1).fit(module, _loader())

    kspace, mask, target = next(iter(_loader()))
    with torch.no_grad():
        s_feats, s_out = _manual_features(student0, kspace, mask, relu=1)
        t_feats, t_out = _manual_features(teacher0, kspace, mask, relu=2)
        recon = F.l1_loss(s_out, target)
        at = AttentionTransfer()(s_feats, t_feats)
        imitation = F.l1_loss(s_out, t_out)
    expected = recon + 0.7 * at + 2.0 * imitation
    assert recorder.losses[0] == pytest.approx(expected.item(), rel=1e-5)
    logged = recorder.metrics[0]
    assert logged["kd/at_step"] == pytest.approx(at.item(), rel=1e-5)
    assert logged["kd/imitation_step"] == pytest.approx(imitation.item(), rel=1e-5)
    assert logged["kd/recon_step"] == pytest.approx(recon.item(), rel=1e-5)
    assert logged["kd/total_step"] == pytest.approx((expected - recon).item(), rel=1e-5)
    assert logged["kd/loss_step"] == pytest.approx(expected.item(), rel=1e-5)
    assert logged["kd/stage_step"] == 1.0
    assert logged["train_loss"] == pytest.approx(recon.item(), rel=1e-5)  # module's own log


def test_module_and_teacher_are_left_untouched(tmp_path):
    student, teacher = _nets()
    teacher_state = copy.deepcopy(teacher.state_dict())
    layers = {"fitnet": [("cascades.1.cnn.relu1", "cascades.1.cnn.relu2")]}  # 4 -> 8 channels
    kd = DistillationCallback(teacher, {"fitnet": 1.0, "sp": 0.5}, layers=layers)
    recorder = Recorder(teacher)

    class TeacherToTrain(pl.Callback):  # a careless callback flipping the teacher's mode
        def on_validation_end(self, trainer, pl_module):
            teacher.train()

    module = ToyRecon(student)
    step_before = type(module).training_step
    trainer = _trainer(
        tmp_path,
        [kd, recorder, TeacherToTrain()],
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=1,
    )
    with pytest.warns(UserWarning, match="training mode"):
        trainer.fit(module, _loader(), _loader(4))

    # the teacher: same weights, frozen and in eval mode at every forward; after fit as given
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_state[k], rtol=0, atol=0)
    assert len(recorder.teacher_calls) == 4 and not any(recorder.teacher_modes)
    assert recorder.teacher_grad_flags == [False] * len(list(teacher.parameters()))
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    # not in the optimiser or the module's state dict; the KD regressor is, under its prefix
    teacher_ids = {id(p) for p in teacher.parameters()}
    regressor_ids = {id(p) for p in kd.distiller.parameters()}
    assert len(regressor_ids) == 2
    assert not teacher_ids & set(recorder.optimizer_params)
    assert regressor_ids <= set(recorder.optimizer_params)
    kd_keys = [k for k in recorder.state_keys if not k.startswith("model.")]
    assert kd_keys == [
        "distillation.losses.fitnet.regressors.0.weight",
        "distillation.losses.fitnet.regressors.0.bias",
    ]
    # the module is restored: class code path, no instance attribute, no KD submodule
    assert "training_step" not in module.__dict__
    assert type(module).training_step is step_before and type(module) is ToyRecon
    assert not hasattr(module, "distillation")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in student.modules())
    assert all(not m._forward_hooks for m in list(teacher.modules())[1:])


def test_a_callback_built_before_its_teachers_own_training_leaves_it_trainable(tmp_path):
    """The teacher is frozen while the callback fits, not from its construction: a callback
    set up in advance (e.g. both stages of a study) must not freeze a teacher still to be
    trained, and after its fit the teacher is as it was given."""
    student, teacher = _nets()
    kd = DistillationCallback(teacher, {"imitation": 1.0})
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    teacher.cascades[0].requires_grad_(False)  # a choice of the user's, kept
    own = ToyRecon(teacher)
    before = copy.deepcopy(teacher.state_dict())
    _trainer(tmp_path / "own", [], limit_train_batches=2).fit(own, _loader())
    changed = [k for k, v in teacher.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(
        k.startswith("cascades.1.") or k.startswith("cascades.2.") for k in changed
    )
    flags = [p.requires_grad for p in teacher.parameters()]
    _trainer(tmp_path / "kd", [kd], limit_train_batches=2).fit(ToyRecon(student), _loader())
    assert [p.requires_grad for p in teacher.parameters()] == flags
    assert teacher.training
    # ... also when the fit fails in setup (a layer name the student lacks)
    bad = DistillationCallback(teacher, {"at": 1.0}, layers={"at": [("nope", "cascades.0")]})
    with pytest.raises(KeyError, match="no submodule 'nope'"):
        _trainer(tmp_path / "bad", [bad], limit_train_batches=2).fit(ToyRecon(student), _loader())
    assert [p.requires_grad for p in teacher.parameters()] == flags and teacher.training


def test_test_and_validate_from_a_checkpoint_with_kd_parameters(tmp_path):
    """A module checkpoint written during a fit with FitNet regressors holds
    ``distillation.*``; ``trainer.test/validate(ckpt_path=...)`` with the callback still in the
    trainer load the module's weights from it without them."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    student, teacher = _nets()
    layers = {"fitnet": [("cascades.1.cnn.relu1", "cascades.1.cnn.relu2")]}  # 4 -> 8 channels
    kd = DistillationCallback(teacher, {"fitnet": 1.0}, layers=layers)

    class Scored(ToyRecon):
        def test_step(self, batch, batch_idx):
            kspace, mask, target = batch
            error = F.l1_loss(self.model(kspace, mask), target)
            self.log("test_loss", error, batch_size=target.shape[0])

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss")
    module = Scored(student)
    trainer = _trainer(
        tmp_path,
        [kd, checkpoint],
        limit_train_batches=2,
        limit_val_batches=1,
        enable_checkpointing=True,
    )
    trainer.fit(module, _loader(), _loader(4))
    saved = torch.load(checkpoint.best_model_path, weights_only=True)["state_dict"]
    assert any(k.startswith("distillation.") for k in saved)
    with torch.no_grad():  # change the weights, so that loading them back is visible
        for p in module.model.parameters():
            p.add_(1.0)
    metrics = trainer.test(module, _loader(4), ckpt_path="best", verbose=False)[0]
    expected = {k[len("model.") :]: v for k, v in saved.items() if k.startswith("model.")}
    got = module.model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert math.isfinite(metrics["test_loss"])
    trainer.validate(module, _loader(4), ckpt_path=checkpoint.best_model_path, verbose=False)
    assert "on_load_checkpoint" not in module.__dict__ and not hasattr(module, "distillation")

    # without the callback: weights_only reading, strict loading of all but distillation.*
    from sftkd_fastmri.callbacks import load_module_weights

    fresh = Scored(create_model("dccnn_d3c5", chans=4, num_cascades=3))
    assert load_module_weights(fresh, checkpoint.best_model_path)["epoch"] == 0
    assert all(torch.equal(fresh.model.state_dict()[k], v) for k, v in expected.items())
    with pytest.raises(CheckpointError, match=r"unexpected keys \(2\): distillation"):
        load_module_weights(fresh, checkpoint.best_model_path, attr_name="kd")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_module_weights(Scored(create_model("dccnn_d3c5", chans=4)), checkpoint.best_model_path)


def test_fitnet_regressors_are_trained(tmp_path):
    student, teacher = _nets()
    layers = {"fitnet": [("cascades.1.cnn.relu1", "cascades.1.cnn.relu2")]}
    kd = DistillationCallback(teacher, {"fitnet": 1.0}, layers=layers)
    module = ToyRecon(student)
    trainer = _trainer(tmp_path, [kd], limit_train_batches=2)
    kd.setup(trainer, module, "fit")  # build the regressor now, to compare after fit
    before = copy.deepcopy(kd.distiller.state_dict())
    kd.teardown(trainer, module, "fit")
    trainer.fit(module, _loader())
    after = kd.distiller.state_dict()
    assert set(before) == {"losses.fitnet.regressors.0.weight", "losses.fitnet.regressors.0.bias"}
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_two_stage_schedule(tmp_path):
    student, teacher = _nets()
    kd = DistillationCallback(teacher, {"imitation": 1.0}, schedule="two_stage", kd_epochs=1)
    recorder = Recorder(teacher)
    _trainer(tmp_path, [kd, recorder], max_epochs=3, limit_train_batches=2).fit(
        ToyRecon(student), _loader()
    )
    # stage 1 (epoch 0): teacher runs, only the KD loss is optimised, recon still logged
    assert recorder.teacher_calls == [0, 0]  # stage 2 (epochs 1, 2): no teacher forward
    stages = [m["kd/stage_step"] for m in recorder.metrics]
    assert stages == [1.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    first = recorder.metrics[0]
    assert recorder.losses[0] == pytest.approx(first["kd/total_step"], rel=1e-6)
    assert first["kd/recon_step"] > 0 and first["kd/recon_step"] != recorder.losses[0]
    # stage 2: the module's own loss, untouched
    for loss, metrics in zip(recorder.losses[2:], recorder.metrics[2:]):
        assert loss == pytest.approx(metrics["train_loss"], rel=1e-6)
    assert kd.state_dict() == {
        "stage": 2,
        "schedule": "two_stage",
        "kd_epochs": 1,
        "losses": {"imitation": 1.0},
    }


def test_a_resumed_two_stage_run_continues_in_its_stage(tmp_path, caplog):
    """Resumed in stage 2, the callback is in stage 2 when training starts (the epoch counter
    is restored after on_fit_start) and announces no stage change."""
    student, teacher = _nets()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    kd = DistillationCallback(teacher, {"imitation": 1.0}, schedule="two_stage", kd_epochs=1)
    _trainer(
        tmp_path, [kd, checkpoint], max_epochs=2, limit_train_batches=1, enable_checkpointing=True
    ).fit(ToyRecon(student), _loader())
    assert kd.stage == 2

    seen = []

    class StageAtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append((trainer.current_epoch, kd2.stage))

    kd2 = DistillationCallback(teacher, {"imitation": 1.0}, schedule="two_stage", kd_epochs=1)
    recorder = Recorder(teacher)
    caplog.clear()
    with caplog.at_level("INFO"):
        _trainer(
            tmp_path, [kd2, StageAtStart(), recorder], max_epochs=3, limit_train_batches=1
        ).fit(ToyRecon(copy.deepcopy(student)), _loader(), ckpt_path=checkpoint.last_model_path)
    assert seen == [(2, 2)]
    assert recorder.teacher_calls == []  # stage 2: no teacher forward
    assert [m["kd/stage_step"] for m in recorder.metrics] == [2.0]
    assert "stage 1 -> 2" not in caplog.text


def test_gradient_accumulation_and_resume_state(tmp_path):
    student, teacher = _nets()
    before = copy.deepcopy(student.state_dict())
    kd = DistillationCallback(teacher, {"at": 1.0, "cc": 1.0})
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = _trainer(
        tmp_path,
        [kd, checkpoint],
        limit_train_batches=4,
        accumulate_grad_batches=2,
        enable_checkpointing=True,
    )
    trainer.fit(ToyRecon(student), _loader())
    assert trainer.global_step == 2  # 4 batches, 2 optimiser steps
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())

    # the checkpoint holds the callback's state
    saved = torch.load(checkpoint.best_model_path, weights_only=False)["callbacks"]
    assert saved[kd.state_key] == {
        "stage": 1,
        "schedule": "joint",
        "kd_epochs": None,
        "losses": {"at": 1.0, "cc": 1.0},
    }
    # resuming with other settings: the callback reads the checkpoint's state, says what it was
    # trained with, and continues distilling with its own settings
    kd2 = DistillationCallback(teacher, {"at": 0.5}, kd_epochs=5)
    recorder = Recorder(teacher)
    trainer = _trainer(tmp_path, [kd2, recorder], max_epochs=2, limit_train_batches=1)
    with pytest.warns(UserWarning, match="the checkpoint was trained with") as caught:
        trainer.fit(
            ToyRecon(copy.deepcopy(student)), _loader(), ckpt_path=checkpoint.best_model_path
        )
    resumed = sorted(str(w.message) for w in caught if "checkpoint was trained" in str(w.message))
    assert resumed == [
        "DistillationCallback: the checkpoint was trained with kd_epochs=None; continuing with "
        "kd_epochs=5",
        "DistillationCallback: the checkpoint was trained with losses={'at': 1.0, 'cc': 1.0}; "
        "continuing with losses={'at': 0.5}",
    ]
    assert recorder.teacher_calls == [1] and kd2.state_dict()["losses"] == {"at": 0.5}
    assert "kd/at_step" in recorder.metrics[0] and "kd/cc_step" not in recorder.metrics[0]


def test_true_precision_runs_a_cast_copy_of_the_teacher(tmp_path):
    student, teacher = _nets()
    teacher_state = copy.deepcopy(teacher.state_dict())
    kd = DistillationCallback(teacher, {"at": 1.0, "imitation": 1.0})
    seen = []

    class Dtypes(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((outputs["loss"].dtype, next(kd.distiller.teacher.parameters()).dtype))

    _trainer(tmp_path, [kd, Dtypes()], limit_train_batches=1, precision="64-true").fit(
        ToyRecon(student), _loader()
    )
    assert seen == [(torch.float64, torch.float64)]
    assert next(teacher.parameters()).dtype == torch.float32
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_state[k], rtol=0, atol=0)
    assert kd.distiller.teacher is teacher  # the copy is dropped at teardown


def test_student_discovery_and_guards(tmp_path):
    student, teacher = _nets()

    class TwoNets(ToyRecon):
        def __init__(self, model):
            super().__init__(model)
            self.other = create_model("dccnn_d3c5", chans=2, num_cascades=1)

    module = TwoNets(student)
    module.net = module.model
    del module.model
    trainer = _trainer(tmp_path, [])
    with pytest.raises(ValueError, match="student_attr"):
        DistillationCallback(teacher, {"imitation": 1.0}).setup(trainer, module, "fit")
    with pytest.raises(ValueError, match="no submodule 'nett'"):
        DistillationCallback(teacher, {"imitation": 1.0}, student_attr="nett").setup(
            trainer, module, "fit"
        )
    with pytest.raises(ValueError, match="shares parameters"):
        DistillationCallback(student, {"imitation": 1.0}).setup(trainer, ToyRecon(student), "fit")
    kd = DistillationCallback(teacher, {"imitation": 1.0}, student_attr="net")
    kd.setup(trainer, module, "fit")
    assert kd.distiller.student is student and module.distillation is kd.distiller
    kd.teardown(trainer, module, "fit")
    assert "training_step" not in module.__dict__ and not hasattr(module, "distillation")

    class Manual(ToyRecon):
        def __init__(self, model):
            super().__init__(model)
            self.automatic_optimization = False

    with pytest.raises(RuntimeError, match="manual optimisation.*sftkd_fastmri.kd.Distiller"):
        DistillationCallback(teacher, {"imitation": 1.0}).setup(trainer, Manual(student), "fit")


def test_failed_fit_restores_the_module_and_unoptimised_kd_parameters_warn(tmp_path):
    student, teacher = _nets()
    layers = {"fitnet": [("cascades.1.cnn.relu1", "cascades.1.cnn.relu2")]}

    class ModelOnlyOptimiser(ToyRecon):
        def configure_optimizers(self):
            return torch.optim.Adam(self.model.parameters(), lr=1e-2)

        def on_train_batch_end(self, *args):
            raise RuntimeError("boom")

    module = ModelOnlyOptimiser(student)
    kd = DistillationCallback(teacher, {"fitnet": 1.0}, layers=layers)
    with (
        pytest.warns(UserWarning, match="in no optimiser"),
        pytest.raises(RuntimeError, match="boom"),
    ):
        _trainer(tmp_path, [kd], limit_train_batches=1).fit(module, _loader())
    assert "training_step" not in module.__dict__ and not hasattr(module, "distillation")
    assert all(not m._forward_hooks for m in teacher.modules())
    # the callback can be used again
    _trainer(tmp_path, [kd], limit_train_batches=1).fit(ToyRecon(student), _loader())


def test_lightning_tuners_run_their_trial_steps_with_the_kd_terms(tmp_path):
    """LearningRateFinder and BatchSizeFinder run training steps in their on_fit_start, before
    this callback's, with the callback list swapped: the trial steps still get the KD terms
    (the learning rate is found for the loss that is trained), and a step that fails there
    leaves the module and teacher as they were, though on_exception never reaches the
    callback."""
    from pytorch_lightning.callbacks import BatchSizeFinder, LearningRateFinder

    class FinderLosses(pl.Callback):  # runs inside the finder's loop (kept by Lightning)
        losses: List[float] = []

    class Module(ToyRecon):
        fail = False

        def __init__(self, model):
            super().__init__(model)
            self.batch_size = 2
            self.lr = 1e-2

        def train_dataloader(self):
            return _loader(batch_size=self.batch_size)

        def training_step(self, batch, batch_idx):
            if self.fail:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            FinderLosses.losses.append(float(outputs["loss"]))

    for finder in (
        LearningRateFinder(num_training_steps=2, update_attr=False),
        BatchSizeFinder(max_trials=1, steps_per_trial=1),
    ):
        student, teacher = _nets()
        kd = DistillationCallback(teacher, {"imitation": 5.0})
        module = Module(student)
        kspace, mask, target = next(iter(_loader()))
        with torch.no_grad():
            recon = F.l1_loss(student(kspace, mask), target)  # the finder's first step
        FinderLosses.losses = []
        _trainer(tmp_path, [kd, finder], limit_train_batches=2).fit(module)
        assert FinderLosses.losses[0] > recon.item() + 1e-3  # reconstruction + KD
        assert "training_step" not in module.__dict__ and not hasattr(module, "distillation")
        assert teacher.training and all(p.requires_grad for p in teacher.parameters())

        module.fail = True
        with pytest.raises(RuntimeError, match="boom"):
            _trainer(tmp_path, [kd, finder], limit_train_batches=2).fit(module)
        assert "training_step" not in module.__dict__ and not hasattr(module, "distillation")
        assert all(not m._forward_hooks for m in teacher.modules())
        assert teacher.training and all(p.requires_grad for p in teacher.parameters())
        module.fail = False
        _trainer(tmp_path, [kd], limit_train_batches=1).fit(module)  # usable again


def test_an_out_of_memory_trial_of_the_batch_size_finder_keeps_distillation_on(tmp_path):
    """BatchSizeFinder catches an out-of-memory error and tries a smaller batch: the fit goes
    on, so the callback stays set up and the real fit distils (with learned KD parameters,
    the finder's restore of its checkpoint needs the KD submodule too)."""
    from pytorch_lightning.callbacks import BatchSizeFinder

    class Module(ToyRecon):
        def __init__(self, model):
            super().__init__(model)
            self.batch_size = 2

        def train_dataloader(self):
            return _loader(n=16, batch_size=self.batch_size)

        def val_dataloader(self):
            return _loader(n=2)

        def training_step(self, batch, batch_idx):
            if batch[0].shape[0] > 2:  # what a GPU says of a batch too large
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().training_step(batch, batch_idx)

    student, teacher = _nets()
    layers = {"fitnet": [("cascades.1.cnn.relu1", "cascades.1.cnn.relu2")]}  # 4 -> 8 channels
    kd = DistillationCallback(teacher, {"fitnet": 1.0, "imitation": 5.0}, layers=layers)
    recorder = Recorder(teacher)
    finder = BatchSizeFinder(mode="power", max_trials=3, steps_per_trial=1, init_val=2)
    module = Module(student)
    _trainer(tmp_path, [kd, finder, recorder], limit_train_batches=2).fit(module)
    assert module.batch_size == 2
    assert "kd/fitnet_step" in recorder.metrics[-1] and len(recorder.teacher_calls) >= 3
    assert "training_step" not in module.__dict__ and not hasattr(module, "distillation")
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())


# -- this package's and fastMRI's modules ----------------------------------------------------
def test_dccnn_module_with_default_pairings(demo_root, tmp_path):
    from sftkd_fastmri.pl_modules import DCCNNModule, FastMRIDataModule

    pl.seed_everything(0)
    data = FastMRIDataModule(demo_root, "singlecoil", accelerations=(4,), batch_size=2, seed=0)
    module = DCCNNModule("dccnn_d3c5", model_overrides={"chans": 8})
    teacher = create_model("dccnn_d5c5", chans=8)
    losses = dict.fromkeys(("at", "fitnet", "fsp", "sp", "cc", "imitation"), 1.0)
    kd = DistillationCallback(teacher, losses)
    recorder = Recorder(teacher)
    trainer = _trainer(tmp_path, [kd, recorder], limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, datamodule=data)
    logged = recorder.metrics[-1]
    assert all(f"kd/{name}_step" in logged for name in losses)
    assert recorder.losses[-1] == pytest.approx(logged["kd/loss_step"], rel=1e-6)
    assert "validation_loss" in trainer.callback_metrics
    # a Lightning checkpoint of the distilled module: load_model takes the student alone
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    student = load_model(tmp_path / "student.ckpt", expected_preset="dccnn_d3c5")
    for k, v in module.model.state_dict().items():
        torch.testing.assert_close(student.state_dict()[k], v)


def test_varnet_module_via_compat_adapter(demo_root, tmp_path):
    from fastmri.data import SliceDataset
    from fastmri.data.subsample import RandomMaskFunc
    from fastmri.data.transforms import VarNetDataTransform
    from fastmri.models import VarNet

    from sftkd_fastmri.pl_modules import VarNetModule2

    pl.seed_everything(0)
    transform = VarNetDataTransform(RandomMaskFunc([0.08], [4]), use_seed=False)
    dataset = SliceDataset(demo_root / "multicoil_train", "multicoil", transform=transform)
    loader = DataLoader(dataset, batch_size=1, shuffle=True)  # VarNet takes batch size 1
    # VarNet is slow on CPU: one cascade for the student, two wider ones for the teacher
    student = VarNetModule2(num_cascades=1, chans=4, sens_chans=4, pools=2, sens_pools=2)
    teacher = VarNet(num_cascades=2, chans=8, sens_chans=4, pools=2, sens_pools=2)
    bottleneck = "cascades.{}.model.unet.conv.layers.2"  # LeakyReLU of the U-Net bottleneck
    layers = {
        "at": [(bottleneck.format(0), bottleneck.format(1))],
        "fitnet": [(bottleneck.format(0), bottleneck.format(1))],  # 16 -> 32 channels
    }
    kd = DistillationCallback(teacher, {"imitation": 1.0, "at": 10.0, "fitnet": 1.0}, layers=layers)
    recorder = Recorder(teacher)
    calls = ForwardCalls(student.varnet, teacher)
    trainer = _trainer(tmp_path, [kd, recorder, calls], limit_train_batches=2)
    trainer.fit(student, loader)
    assert len(recorder.teacher_calls) == 2
    _assert_teacher_ran_on_the_students_varnet_inputs(calls, recorder.metrics)
    for loss, logged in zip(recorder.losses, recorder.metrics):
        total = logged["kd/recon_step"] + sum(
            w * logged[f"kd/{n}_step"]
            for n, w in {"imitation": 1.0, "at": 10.0, "fitnet": 1.0}.items()
        )
        assert loss == pytest.approx(total, rel=1e-5)
        assert logged["kd/recon_step"] == pytest.approx(logged["train_loss"], rel=1e-6)
    assert kd.distiller.losses["fitnet"].regressors[0].in_channels == 16
    assert "training_step" not in student.__dict__


def test_cascaded_varnet_teacher_serves_a_varnet_module_student(demo_root, tmp_path):
    """An SFT-style teacher (fastMRI's VarNet in :class:`CascadedVarNet`) is called with the
    VarNetModule student's own arguments (``masked_kspace, mask, num_low_frequencies``)."""
    from fastmri.data import SliceDataset
    from fastmri.data.subsample import RandomMaskFunc
    from fastmri.data.transforms import VarNetDataTransform
    from fastmri.models import VarNet

    from sftkd_fastmri.models import CascadedVarNet
    from sftkd_fastmri.pl_modules import VarNetModule2

    pl.seed_everything(0)
    transform = VarNetDataTransform(RandomMaskFunc([0.08], [4]), use_seed=False)
    dataset = SliceDataset(demo_root / "multicoil_train", "multicoil", transform=transform)
    loader = DataLoader(dataset, batch_size=1)
    student = VarNetModule2(num_cascades=1, chans=4, sens_chans=4, pools=2, sens_pools=2)
    varnet = VarNet(num_cascades=2, chans=8, sens_chans=4, pools=2, sens_pools=2)
    teacher = CascadedVarNet(varnet)
    kd = DistillationCallback(teacher, {"imitation": 1.0})
    recorder = Recorder(teacher)
    calls = ForwardCalls(student.varnet, teacher)
    trainer = _trainer(tmp_path, [kd, recorder, calls], limit_train_batches=1)
    trainer.fit(student, loader)
    assert len(recorder.teacher_calls) == 1
    # the teacher ran on the student's (masked_kspace, mask, num_low_frequencies), and the
    # imitation term is the L1 distance between the two outputs
    _assert_teacher_ran_on_the_students_varnet_inputs(calls, recorder.metrics)
    # ... which for the wrapper is the wrapped VarNet's own output on those arguments
    (args, _, teacher_output) = calls.calls["teacher"][0]
    with torch.no_grad():
        assert torch.equal(teacher_output, varnet(*args))


class _Weights(pl.Callback):
    """Keeps rank 0's student and KD-regressor weights at the start of training (after the DDP
    wrap, which gives every rank rank 0's) and at the end of every epoch, as a list in a file
    (ddp_spawn runs in children)."""

    def __init__(self, path) -> None:
        self.path = str(path)
        self.states: List[Dict[str, torch.Tensor]] = []

    def _keep(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
            torch.save(self.states, self.path)

    def on_train_start(self, trainer, pl_module):
        self._keep(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._keep(trainer, pl_module)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_ddp_two_processes_joint_then_two_stage(tmp_path):
    """DDP (2 CPU processes, gloo): one backward per step with learned KD parameters, also in
    the fine-tuning stage of the two-stage schedule, where they get no KD gradient."""
    student, teacher = _nets()
    student_before = copy.deepcopy(student.state_dict())
    teacher_before = copy.deepcopy(teacher.state_dict())
    kd = DistillationCallback(
        teacher,
        {"fitnet": 1.0, "at": 1.0},
        layers={"fitnet": [("cascades.2.cnn.relu1", "cascades.2.cnn.relu2")]},
        schedule="two_stage",
        kd_epochs=1,
    )
    out = tmp_path / "weights.pt"
    trainer = _trainer(
        tmp_path,
        [kd, _Weights(out)],
        max_epochs=2,
        limit_train_batches=2,
        devices=2,
        strategy="ddp_spawn",
    )
    trainer.fit(ToyRecon(student), _loader())
    start, stage1, stage2 = torch.load(out, weights_only=True)
    regressor = [k for k in start if k.startswith("distillation.")]
    assert regressor == [
        "distillation.losses.fitnet.regressors.0.weight",
        "distillation.losses.fitnet.regressors.0.bias",
    ]
    assert stage2[regressor[0]].shape == (8, 4, 1, 1)
    # stage 1 (KD only) trains the regressor; stage 2 (reconstruction only) leaves it alone
    assert all(not torch.equal(start[k], stage1[k]) for k in regressor)
    assert all(torch.equal(stage1[k], stage2[k]) for k in regressor)
    # the student trains in both stages
    for before, after in ((start, stage1), (stage1, stage2)):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("model."))
    assert all(torch.equal(start[f"model.{k}"], v) for k, v in student_before.items())
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k])


def test_relational_losses_skip_single_sample_batches_with_one_warning(tmp_path):
    # 5 samples in batches of 2: the last batch holds one sample, on which SP is undefined.
    student, teacher = _nets()
    kd = DistillationCallback(teacher, {"sp": 1.0, "imitation": 1.0})
    recorder = Recorder(teacher)
    with pytest.warns(UserWarning, match=r"sp left out of a training step with a batch of 1") as w:
        _trainer(tmp_path, [kd, recorder], max_epochs=2).fit(
            ToyRecon(student), _loader(n=5, batch_size=2)
        )
    assert sum("left out of a training step" in str(x.message) for x in w) == 1
    assert len(recorder.losses) == 6  # every batch trained, the single-sample one included
    last = recorder.metrics[-1]  # the single-sample step: recon + imitation alone
    assert recorder.losses[-1] == pytest.approx(last["kd/recon_step"] + last["kd/imitation_step"])


def test_two_stage_kd_only_step_without_a_defined_term_is_skipped(tmp_path):
    student, teacher = _nets()
    kd = DistillationCallback(teacher, {"sp": 1.0}, schedule="two_stage", kd_epochs=1)
    skipped = []

    class Outputs(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            skipped.append("loss" not in (outputs or {}))

    trainer = _trainer(tmp_path, [kd, Outputs()], max_epochs=1)
    with pytest.warns(UserWarning, match="left out"):
        trainer.fit(ToyRecon(student), _loader(n=5, batch_size=2))
    assert skipped == [False, False, True]  # the single-sample batch gets no KD-only step


def test_a_loader_of_single_sample_batches_is_refused_for_relational_losses(tmp_path):
    student, teacher = _nets()
    kd = DistillationCallback(teacher, {"cc": 1.0, "imitation": 1.0})
    with pytest.raises(ValueError, match=r"cc relate the samples.*batch size is 1"):
        _trainer(tmp_path, [kd]).fit(ToyRecon(student), _loader(n=4, batch_size=1))


def test_ddp_log_advice_filter_lasts_only_for_the_fit(tmp_path):
    import warnings
    from types import SimpleNamespace

    student, teacher = _nets()
    module = ToyRecon(student)
    trainer = SimpleNamespace(world_size=2)  # what setup reads of a DDP trainer
    advice = "It is recommended to use `self.log('kd/total', ..., sync_dist=True)`"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        kd = DistillationCallback(teacher, {"imitation": 1.0})
        kd.setup(trainer, module, "fit")
        warnings.warn(advice, stacklevel=1)  # silenced during the fit
        kd.teardown(trainer, module, "fit")
        warnings.warn(advice, stacklevel=1)  # seen again afterwards
        n_filters = len(warnings.filters)
        warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('kd/")
        kd.setup(trainer, module, "fit")
        kd.teardown(trainer, module, "fit")
        assert len(warnings.filters) == n_filters + 1  # the user's own filter is kept
    assert [str(w.message) for w in seen] == [advice]


def test_an_sft_teacher_is_distilled_from_its_teacher_network(tmp_path):
    """Given an SFTModule, the callback took the network it found in it, the
    StudentFriendlyTeacher wrapper (which also holds the student): no default layer pairing
    fitted it. As from an SFT checkpoint, the teacher network is taken (teacher_prefix:
    the student)."""
    from sftkd_fastmri.pl_modules import SFTModule

    torch.manual_seed(0)
    sft = SFTModule(teacher_overrides={"chans": 4}, student_overrides={"chans": 4})
    assert DistillationCallback(sft, {"at": 1.0}).teacher is sft.teacher
    assert DistillationCallback(sft.sft, {"at": 1.0}).teacher is sft.teacher
    taken = DistillationCallback(sft, {"at": 1.0}, teacher_prefix="student").teacher
    assert taken is sft.student
    with pytest.raises(ValueError, match="teacher_prefix .*'teacher' or 'student', got 'model'"):
        DistillationCallback(sft, {"at": 1.0}, teacher_prefix="model")
    # the default pairings of two DC-CNNs apply, and a step trains with the KD term
    student = create_model("dccnn_d3c5", chans=4)
    kd = DistillationCallback(sft, {"at": 1.0})
    recorder = Recorder(sft.teacher)
    _trainer(tmp_path, [kd, recorder], limit_train_batches=1).fit(ToyRecon(student), _loader())
    assert recorder.teacher_calls == [0] and "kd/at_step" in recorder.metrics[-1]
