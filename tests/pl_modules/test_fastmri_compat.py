"""fastMRI's own UnetModule / VarNetModule fitted, validated and tested on Lightning 2."""

from __future__ import annotations

from collections import defaultdict
from unittest import mock

import fastmri
import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from fastmri import evaluate
from fastmri.data import SliceDataset
from fastmri.data.subsample import RandomMaskFunc
from fastmri.data.transforms import UnetDataTransform, VarNetDataTransform
from fastmri.pl_modules import MriModule, UnetModule, VarNetModule
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from sftkd_fastmri.pl_modules import (
    Lightning2MriMixin,
    UnetModule2,
    VarNetModule2,
    lightning2_compatible,
)

# Demo images are 80 x 64: two poolings keep both sides even (80/4, 64/4); VarNet's NormUnet
# pads to multiples of 16 itself.
TINY_UNET = dict(chans=8, num_pool_layers=2)
TINY_VARNET = dict(num_cascades=2, chans=4, sens_chans=4, pools=2, sens_pools=2)
METRICS = {"validation_loss", "val_metrics/nmse", "val_metrics/ssim", "val_metrics/psnr"}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny tensors: a second intra-op thread buys nothing, and when other processes share
    # the two cores its spin-waits slowed a 5 s fit to over 2 minutes.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _mask():
    return RandomMaskFunc([0.08], [4])


def _loader(root, challenge, split, transform, batch_size, shuffle=False):
    dataset = SliceDataset(root / f"{challenge}_{split}", challenge, transform=transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def _trainer(tmp_path, logger, **kwargs):
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_plain_fastmri_module_is_refused_by_lightning2(demo_root, tmp_path):
    # the reason for the adapter: fastMRI's MriModule defines validation_epoch_end
    val = _loader(demo_root, "singlecoil", "val", UnetDataTransform("singlecoil", _mask()), 4)
    with pytest.raises(NotImplementedError, match="validation_epoch_end"):
        _trainer(tmp_path, False).validate(UnetModule(**TINY_UNET), val)


def test_unet_fit_validate_test_with_tensorboard(demo_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pl.seed_everything(0)
    train_tf = UnetDataTransform("singlecoil", _mask(), use_seed=False)
    val_tf = UnetDataTransform("singlecoil", _mask())
    train = _loader(demo_root, "singlecoil", "train", train_tf, 4, shuffle=True)
    val = _loader(demo_root, "singlecoil", "val", val_tf, 4)
    logger = TensorBoardLogger(tmp_path, name="tb")
    module = UnetModule2(num_log_images=2, **TINY_UNET)
    trainer = _trainer(tmp_path, logger, max_epochs=1, limit_train_batches=2)
    trainer.fit(module, train, val)
    assert METRICS <= set(trainer.callback_metrics)

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "val_images_idx_0/reconstruction" in events.Tags()["images"]

    # the adapter's aggregation = fastMRI's contract, recomputed with fastmri.evaluate from
    # the outputs of fastMRI's own validation_step
    (logged,) = trainer.validate(module, val, verbose=False)
    outputs, targets, maxima = defaultdict(dict), defaultdict(dict), {}
    module.eval()
    with torch.no_grad():
        for i, batch in enumerate(val):
            logs = UnetModule.validation_step(module, batch, i)
            for j, fname in enumerate(logs["fname"]):
                s = int(logs["slice_num"][j])
                outputs[fname][s] = logs["output"][j].numpy()
                targets[fname][s] = logs["target"][j].numpy()
                maxima[fname] = float(logs["max_value"][j])
    rows = []
    for fname in outputs:
        gt = np.stack([targets[fname][s] for s in sorted(targets[fname])])
        pred = np.stack([outputs[fname][s] for s in sorted(outputs[fname])])
        rows.append(
            (
                evaluate.nmse(gt, pred),
                evaluate.psnr(gt, pred, maxval=maxima[fname]),
                evaluate.ssim(gt, pred, maxval=maxima[fname])[0],
            )
        )
    nmse, psnr, ssim = np.mean(rows, axis=0)
    assert logged["val_metrics/nmse"] == pytest.approx(nmse, rel=1e-4)
    assert logged["val_metrics/psnr"] == pytest.approx(psnr, rel=1e-4)
    assert logged["val_metrics/ssim"] == pytest.approx(ssim, rel=1e-4)

    test = _loader(demo_root, "singlecoil", "test", UnetDataTransform("singlecoil"), 4)
    trainer.test(module, test, verbose=False)
    files = sorted((tmp_path / "reconstructions").glob("*.h5"))
    assert len(files) == 2
    with h5py.File(files[0], "r") as hf:
        assert hf["reconstruction"].shape == (6, 80, 64)
        saved = hf["reconstruction"][()]
    predicted = trainer.predict(module, test)
    first = predicted[0]
    assert list(first["fname"]) == [files[0].name] * 4 and first["slice_num"].tolist() == [
        0,
        1,
        2,
        3,
    ]
    np.testing.assert_allclose(first["reconstruction"].numpy(), saved[:4], rtol=1e-5, atol=1e-6)


def test_varnet_fit_validate_test_with_csv_logger(demo_root, tmp_path):
    pl.seed_everything(0)
    # fastMRI's VarNet takes batch size 1 (num_low_frequencies must be a single number)
    train = _loader(
        demo_root, "multicoil", "train", VarNetDataTransform(_mask(), use_seed=False), 1, True
    )
    val = _loader(demo_root, "multicoil", "val", VarNetDataTransform(_mask()), 1)
    module = VarNetModule2(**TINY_VARNET)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _trainer(tmp_path, logger, max_epochs=1, limit_train_batches=2)
    trainer.fit(module, train, val)
    assert METRICS <= set(trainer.callback_metrics)
    assert all(np.isfinite(module.val_metrics[k]) for k in ("nmse", "ssim", "psnr"))

    test = _loader(demo_root, "multicoil", "test", VarNetDataTransform(), 1)
    trainer.test(module, test, verbose=False)
    for path in sorted((demo_root / "multicoil_test").glob("*.h5")):
        with h5py.File(tmp_path / "reconstructions" / path.name, "r") as hf:
            assert hf["reconstruction"].shape == (6, 80, 64)
            saved = hf["reconstruction"][()]
    # predict: the test step's reconstructions, returned (as ReconModule's) and not written
    (tmp_path / "reconstructions" / path.name).unlink()
    predicted = trainer.predict(module, test)
    assert not (tmp_path / "reconstructions" / path.name).exists()
    slices = {
        (f, int(s)): r.numpy()
        for p in predicted
        for f, s, r in zip(p["fname"], p["slice_num"], p["reconstruction"])
    }
    assert len(slices) == 12 and slices[(path.name, 0)].shape == (80, 64)
    np.testing.assert_allclose(slices[(path.name, 5)], saved[5], rtol=1e-5, atol=1e-6)


def test_lightning2_compatible_builds_adapters():
    adapted = lightning2_compatible(VarNetModule)
    assert issubclass(adapted, VarNetModule) and issubclass(adapted, Lightning2MriMixin)
    assert adapted.__name__ == "VarNetModule2" and adapted.validation_epoch_end is None
    assert lightning2_compatible(UnetModule2) is UnetModule2

    class MyNet(MriModule):
        pass

    assert issubclass(lightning2_compatible(MyNet, name="MyNetL2"), MyNet)
    with pytest.raises(TypeError, match="MriModule"):
        lightning2_compatible(pl.LightningModule)


def test_log_image_without_tensorboard_is_a_no_op(tmp_path):
    module = UnetModule2(**TINY_UNET)
    # fastMRI's version crashes without a logger
    assert module.log_image("x", torch.zeros(1, 4, 4)) is None
    # with a logger that is not TensorBoard's (fastMRI's version calls its add_image)
    logger = CSVLogger(tmp_path / "logs", name="csv")
    logger._experiment = mock.MagicMock()  # what CSVLogger.experiment returns
    module.trainer = _trainer(tmp_path, logger)
    assert module.loggers == [logger] and module.logger.experiment is logger._experiment
    assert module.log_image("x", torch.zeros(1, 4, 4)) is None
    assert logger.experiment.mock_calls == []
    assert not (tmp_path / "logs").exists()


def test_unet_module_refuses_kspace_samples_clearly(demo_root):
    """FastMRIDataModule's k-space samples are not U-Net inputs: a clear error, not an
    AttributeError from inside fastMRI's step."""
    from sftkd_fastmri.pl_modules import FastMRIDataModule

    data = FastMRIDataModule(demo_root, "singlecoil", batch_size=1)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = UnetModule2(**TINY_UNET)
    for step in (module.training_step, module.validation_step, module.test_step):
        with pytest.raises(TypeError, match="U-Net samples.*FastMRIDataModule"):
            step(batch, 0)


def test_varnet_module_trains_on_batches_of_several_slices(demo_root, tmp_path):
    """A DataLoader collates num_low_frequencies into a (B,) tensor, which fastMRI's VarNet
    cannot read ("Boolean value of Tensor ... ambiguous") for B > 1."""
    from sftkd_fastmri.models.varnet import batch_low_frequencies
    from sftkd_fastmri.pl_modules import FastMRIDataModule

    assert batch_low_frequencies(torch.tensor([6, 6, 6])) == 6
    assert batch_low_frequencies(None) is None and batch_low_frequencies(4) == 4
    with pytest.raises(ValueError, match=r"this batch mixes \[4, 6\]"):
        batch_low_frequencies(torch.tensor([6, 4]))
    module = VarNetModule2(**TINY_VARNET)
    data = FastMRIDataModule(demo_root, challenge="multicoil", batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train_loss"])


def test_varnet_module_on_normalised_samples_scores_in_the_files_units(demo_root):
    """FastMRIDataModule's samples are normalised by the zero-filled maximum; fastMRI's SSIM
    loss and metrics take data_range = the volume's max in the files' units."""
    from fastmri.losses import SSIMLoss

    from sftkd_fastmri.pl_modules import FastMRIDataModule

    torch.manual_seed(0)
    module = VarNetModule2(**TINY_VARNET).eval()
    data = FastMRIDataModule(demo_root, challenge="multicoil", batch_size=2)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    scale = batch.scale.reshape(-1, 1, 1)
    assert not torch.allclose(scale, torch.ones_like(scale))  # the check means something
    with torch.no_grad():
        normalised = module(batch.masked_kspace, batch.mask, batch.num_low_frequencies)
        logs = module.validation_step(batch, 0)
        loss = module.training_step(batch, 0)
    h, w = batch.target.shape[-2:]
    expected = fastmri.data.transforms.center_crop(normalised, (h, w)) * scale
    # the VarNet is scale-equivariant: run on k-space in the files' units, it gives the
    # normalised output times the scale
    torch.testing.assert_close(
        logs["output"], expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max())
    )
    torch.testing.assert_close(logs["target"], batch.target * scale)
    want = SSIMLoss()(
        (expected).unsqueeze(1), (batch.target * scale).unsqueeze(1), data_range=batch.max_value
    )
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)


def test_varnet_module_tests_batches_of_several_slices(demo_root):
    """Collated, crop_size is two (B,) tensors, which fastMRI's test_step compared as numbers
    ("Boolean value of Tensor ... ambiguous") for B > 1."""
    from sftkd_fastmri.pl_modules import FastMRIDataModule
    from sftkd_fastmri.pl_modules.fastmri_compat import _one_crop_size

    module = VarNetModule2(**TINY_VARNET).eval()
    data = FastMRIDataModule(demo_root, challenge="multicoil", batch_size=2)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    assert batch.crop_size[0].shape == (2,)
    with torch.no_grad():
        out = module.test_step(batch, 0)
    assert out["output"].shape == (2, *batch.target.shape[-2:])
    mixed = batch._replace(crop_size=(torch.tensor([8, 8]), torch.tensor([8, 6])))
    with pytest.raises(ValueError, match=r"different reconstruction sizes \[\(8, 6\), \(8, 8\)\]"):
        _one_crop_size(mixed)


def test_varnet_module_ssim_loss_is_float32_under_autocast(demo_root):
    """fastMRI's SSIMLoss ran its window means in 16 bits under bf16-mixed autocast, where
    the variances cancel: the training loss and validation_loss (the checkpoint monitor) were
    off by several percent. They must be fastMRI's SSIM of the same images in float32."""
    from fastmri.losses import SSIMLoss

    from sftkd_fastmri.pl_modules import FastMRIDataModule

    torch.manual_seed(0)
    module = VarNetModule2(**TINY_VARNET).eval()
    # still fastMRI's loss with fastMRI's checkpoint entries
    assert isinstance(module.loss, SSIMLoss) and "loss.w" in module.state_dict()
    data = FastMRIDataModule(demo_root, challenge="multicoil", batch_size=2)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    outputs = []
    module.varnet.register_forward_hook(lambda net, args, out: outputs.append(out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logs = module.validation_step(batch, 0)
        loss = module.training_step(batch, 0)

    def float32_ssim(output, target):
        output, target = output.float().unsqueeze(1), target.float().unsqueeze(1)
        return SSIMLoss()(output, target, data_range=batch.max_value)

    val_loss = logs["val_loss"]
    want = float32_ssim(logs["output"], logs["target"])
    assert val_loss.dtype != torch.bfloat16 and float(val_loss) == pytest.approx(float(want))
    scale = batch.scale.reshape(-1, 1, 1)
    output = fastmri.data.transforms.center_crop(outputs[-1], batch.target.shape[-2:]) * scale
    want = float32_ssim(output, batch.target * scale)
    assert loss.dtype != torch.bfloat16 and float(loss) == pytest.approx(float(want), rel=1e-5)
