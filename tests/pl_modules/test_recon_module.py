"""ReconModule: fastMRI's metric contract on Lightning 2, loggers, test-time reconstructions."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from fastmri import evaluate
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sftkd_fastmri.data import DCCNNSample
from sftkd_fastmri.pl_modules import (
    LOSSES,
    ReconModule,
    VolumeMetricAccumulator,
    create_loss,
    crop_to_target,
    model_inputs,
)

H, W = 23, 19  # odd, non-square: catches transposed or hard-coded shapes
VOLUMES = {"vol_a.h5": 3, "vol_b.h5": 2}  # different slice counts: per-volume means matter


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny tensors: a second intra-op thread buys nothing, and when other processes share
    # the two cores its spin-waits slowed a 5 s fit to over 2 minutes.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _volumes(seed: int = 0):
    """Unnormalised targets and zero-filled images per volume, plus one scale per slice."""
    rng = np.random.default_rng(seed)
    data = {}
    for v, (fname, n) in enumerate(VOLUMES.items()):
        target = rng.uniform(0.5, 2.0, size=(n, H, W)).astype(np.float32) * (v + 1)
        zero_filled = (target + rng.normal(0, 0.2 * (v + 1), size=target.shape)).astype(np.float32)
        scales = rng.uniform(0.5, 3.0, size=n).astype(np.float32)
        data[fname] = (target, np.abs(zero_filled), scales)
    return data


class FakeSlices(Dataset):
    """DCCNNSample slices of :func:`_volumes`, normalised by a per-slice scale."""

    def __init__(self, with_target: bool = True, seed: int = 0):
        self.items = []
        for fname, (target, zero_filled, scales) in _volumes(seed).items():
            max_value = float(target.max())
            for s in range(target.shape[0]):
                self.items.append((fname, s, target[s], zero_filled[s], scales[s], max_value))
        self.with_target = with_target

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        fname, s, target, zero_filled, scale, max_value = self.items[i]
        scale = torch.tensor(scale)
        return DCCNNSample(
            masked_kspace=torch.zeros(1, H, W, 2),
            mask=torch.ones(1, 1, W, 1, dtype=torch.bool),
            sens_maps=torch.zeros(0),
            zero_filled=torch.from_numpy(zero_filled) / scale,
            target=torch.from_numpy(target) / scale if self.with_target else torch.zeros(0),
            scale=scale,
            max_value=max_value if self.with_target else 0.0,
            fname=fname,
            slice_num=s,
            num_low_frequencies=W,
            crop_size=(H, W),
        )


class ZeroFilledModule(ReconModule):
    """Reconstruction = gain * zero-filled image (gain starts at 1)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.gain = nn.Parameter(torch.ones(()))

    def reconstruct(self, batch):
        return crop_to_target(batch.zero_filled * self.gain, batch)


class BranchModule(ZeroFilledModule):
    """Logs a second output (half the main one) under the key "branch1"."""

    def validation_step(self, batch, batch_idx):
        loss = super().validation_step(batch, batch_idx)
        self.update_metrics("branch1", 0.5 * self.reconstruct(batch), batch)
        return loss


def _expected(factor: float = 1.0):
    """fastMRI's contract computed independently with fastmri.evaluate on whole volumes."""
    rows = []
    for target, zero_filled, _ in _volumes().values():
        pred = factor * zero_filled
        rows.append(
            (
                evaluate.nmse(target, pred),
                evaluate.psnr(target, pred, maxval=target.max()),
                evaluate.ssim(target, pred, maxval=target.max())[0],
            )
        )
    nmse, psnr, ssim = np.mean(rows, axis=0)
    return {"nmse": nmse, "psnr": psnr, "ssim": ssim}


def _trainer(tmp_path, logger=False, **kwargs):
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


def _loader(**kwargs):
    # batch of 2 over 3 + 2 slices: the middle batch mixes both volumes
    return DataLoader(FakeSlices(**kwargs), batch_size=2, shuffle=False)


def test_volume_metrics_match_fastmri_evaluate():
    metrics = VolumeMetricAccumulator()
    for fname, (target, zero_filled, _) in _volumes().items():
        for s in reversed(range(target.shape[0])):  # order must not matter
            metrics.update(
                [fname],
                [s],
                torch.from_numpy(zero_filled[s : s + 1]),
                torch.from_numpy(target[s : s + 1]),
                [float(target.max())],
            )
    # a duplicated slice (DDP sampler padding) counts once
    target, zero_filled, _ = _volumes()["vol_b.h5"]
    duplicate = (torch.from_numpy(zero_filled[:1]), torch.from_numpy(target[:1]))
    metrics.update(["vol_b.h5"], [0], *duplicate, [float(target.max())])
    expected = _expected()
    result = metrics.compute()
    for name in ("nmse", "psnr", "ssim"):
        assert result[name] == pytest.approx(expected[name], rel=1e-6), name
    rows = metrics.per_volume()
    assert [r["fname"] for r in rows] == list(VOLUMES)
    assert [r["num_slices"] for r in rows] == list(VOLUMES.values())


def test_volume_metrics_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        VolumeMetricAccumulator().update(
            ["a"], [0], torch.zeros(1, 8, 8), torch.zeros(1, 8, 9), [1.0]
        )


def test_validation_logs_contract_metrics_unnormalised(tmp_path):
    module = ZeroFilledModule(num_log_images=2)
    (logged,) = _trainer(tmp_path).validate(module, _loader(), verbose=False)
    expected = _expected()
    for name in ("nmse", "psnr", "ssim"):
        assert logged[f"val_metrics/{name}"] == pytest.approx(expected[name], rel=1e-5)
        assert module.val_metrics[name] == pytest.approx(expected[name], rel=1e-6)
    # validation_loss: the L1 loss in normalised units, averaged over slices
    ds = FakeSlices()
    l1 = np.mean([(ds[i].zero_filled - ds[i].target).abs().mean().item() for i in range(len(ds))])
    assert logged["validation_loss"] == pytest.approx(l1, rel=1e-5)
    assert [row["fname"] for row in module.val_volume_metrics] == list(VOLUMES)


def test_extra_metric_keys_are_logged_under_their_name(tmp_path):
    (logged,) = _trainer(tmp_path).validate(BranchModule(), _loader(), verbose=False)
    main, half = _expected(), _expected(0.5)
    assert logged["val_metrics/psnr"] == pytest.approx(main["psnr"], rel=1e-5)
    for name in ("nmse", "psnr", "ssim"):
        assert logged[f"val_metrics/branch1/{name}"] == pytest.approx(half[name], rel=1e-5)


def test_fit_with_csv_logger_and_checkpoint_monitor(tmp_path):
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="validation_loss")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path, name="csv"),
        callbacks=[checkpoint],
        max_epochs=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    module = ZeroFilledModule(loss="l1+ssim")
    trainer.fit(module, _loader(), _loader())
    assert checkpoint.best_model_path.endswith(".ckpt")
    csv_text = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    for name in ("validation_loss", "val_metrics/nmse", "val_metrics/psnr", "val_metrics/ssim"):
        assert name in csv_text


def test_images_logged_to_tensorboard_only(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    module = ZeroFilledModule(num_log_images=2)
    _trainer(tmp_path, logger=logger).validate(module, _loader(), verbose=False)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    tags = set(events.Tags()["images"])
    # 3 batches, 2 images: the first and the last batch, always the same slices
    for idx in (0, 2):
        for name in ("target", "reconstruction", "error"):
            assert f"val_images_idx_{idx}/{name}" in tags
    assert len(tags) == 6


def test_test_writes_reconstructions_and_volume_table(tmp_path):
    module = ZeroFilledModule(output_dir=tmp_path / "out")
    (logged,) = _trainer(tmp_path).test(module, _loader(), verbose=False)
    expected = _expected()
    for name in ("nmse", "psnr", "ssim"):
        assert logged[f"test_metrics/{name}"] == pytest.approx(expected[name], rel=1e-5)
    assert module.reconstruction_dir == tmp_path / "out" / "reconstructions"
    for fname, (_, zero_filled, _) in _volumes().items():
        with h5py.File(module.reconstruction_dir / fname, "r") as hf:
            recon = hf["reconstruction"][()]
        assert recon.shape == zero_filled.shape  # (slices, h, w), in the file's units
        np.testing.assert_allclose(recon, zero_filled, rtol=1e-5)
    table = {row["fname"]: row for row in module.test_volume_metrics}
    assert set(table) == set(VOLUMES)
    assert table["vol_a.h5"]["num_slices"] == 3
    target, zero_filled, _ = _volumes()["vol_a.h5"]
    assert table["vol_a.h5"]["nmse"] == pytest.approx(evaluate.nmse(target, zero_filled), rel=1e-5)


def test_test_without_targets_writes_reconstructions_only(tmp_path):
    module = ZeroFilledModule()
    (logged,) = _trainer(tmp_path).test(module, _loader(with_target=False), verbose=False)
    assert logged == {} and module.test_metrics == {} and module.test_volume_metrics == []
    for fname, n in VOLUMES.items():
        with h5py.File(tmp_path / "reconstructions" / fname, "r") as hf:
            assert hf["reconstruction"].shape == (n, H, W)


def test_predict_returns_unnormalised_reconstructions(tmp_path):
    (first, *_) = _trainer(tmp_path).predict(ZeroFilledModule(), _loader())
    target, zero_filled, _ = _volumes()["vol_a.h5"]
    np.testing.assert_allclose(first["reconstruction"].numpy(), zero_filled[:2], rtol=1e-5)


def test_model_inputs_turns_empty_sens_maps_into_none():
    batch = next(iter(_loader()))
    kspace, mask, sens = model_inputs(batch)
    assert sens is None and kspace.shape == (2, 1, H, W, 2) and mask.shape == (2, 1, 1, W, 1)


def test_base_module_needs_reconstruct():
    with pytest.raises(NotImplementedError, match="reconstruct"):
        ReconModule().reconstruct(None)


@pytest.mark.parametrize("name", LOSSES)
def test_losses_by_name(name):
    torch.manual_seed(0)
    output, target = torch.rand(2, 16, 12), torch.rand(2, 16, 12)
    loss = create_loss(name)(output, target, torch.ones(2, dtype=torch.float64))
    assert loss.ndim == 0 and loss > 0
    # no constant buffers in checkpoints: changing the loss must not break strict loading
    assert create_loss(name).state_dict() == {}


def test_l1_ssim_mixes_both_terms():
    torch.manual_seed(0)
    output, target, rng = torch.rand(2, 16, 12), torch.rand(2, 16, 12), torch.ones(2)
    mixed = create_loss("l1+ssim")(output, target, rng)
    ssim, l1 = create_loss("ssim")(output, target, rng), create_loss("l1")(output, target, rng)
    assert mixed == pytest.approx(0.84 * ssim + 0.16 * l1)
    with pytest.raises(ValueError, match="unknown loss"):
        create_loss("huber")


def test_an_all_zero_target_volume_is_named_not_scored_as_inf():
    from sftkd_fastmri.evaluation.metrics import volume_metrics
    from sftkd_fastmri.pl_modules.recon_module import VolumeMetricAccumulator

    zero = np.zeros((2, 4, 4))
    with pytest.raises(ValueError, match="z.h5: the target volume is all zero"):
        volume_metrics("z.h5", zero, np.ones((2, 4, 4)), max_value=1.0)
    acc = VolumeMetricAccumulator()
    acc.update(["z.h5"], [0], torch.ones(1, 8, 8), torch.zeros(1, 8, 8), [1.0])
    with pytest.raises(ValueError, match="z.h5: the target volume is all zero"):
        acc.per_volume()


def test_a_non_finite_reconstruction_is_named_not_scored_as_nan():
    from sftkd_fastmri.evaluation.metrics import volume_metrics

    pred = np.ones((3, 4, 4))
    pred[2, 1, 1] = np.nan  # one pixel of a diverged model's output
    with pytest.raises(
        ValueError, match=r"v.h5: the reconstruction holds NaN or Inf \(slices \[2\]"
    ):
        volume_metrics("v.h5", np.ones((3, 4, 4)), pred, max_value=1.0)


def test_a_repeated_validation_batch_counts_once_in_validation_loss():
    """ShapeBatchSampler repeats whole batches so DDP ranks run equal steps: their losses
    were summed again, and validation_loss (the checkpoint monitor) differed from one
    process's."""
    from sftkd_fastmri.pl_modules.recon_module import FastMRIMetricsMixin

    mixin = FastMRIMetricsMixin()
    mixin._reset_stage("val")
    mixin.accumulate_loss(torch.tensor(1.0), 2, ["a.h5", "a.h5"], torch.tensor([0, 1]))
    mixin.accumulate_loss(torch.tensor(4.0), 1, ["b.h5"], torch.tensor([0]))
    mixin.accumulate_loss(torch.tensor(1.0), 2, ("a.h5", "a.h5"), [0, 1])  # the repeat
    mixin._finish_stage("val")
    state = mixin._fm_state()["val"]
    assert state["loss_count"] == 3 and state["loss_sum"] / state["loss_count"] == 2.0


def test_a_slice_repeated_inside_another_batch_counts_once_in_validation_loss():
    """DDP samplers pad a rank with repeated slices (fastMRI's VolumeSampler, Lightning's
    DistributedSampler), which land in batches of other contents: counted again, they moved
    validation_loss by 0.6-7 % with the number of devices. Per-slice losses count once."""
    from sftkd_fastmri.pl_modules.recon_module import FastMRIMetricsMixin

    mixin = FastMRIMetricsMixin()
    mixin._reset_stage("val")
    mixin.accumulate_loss(torch.tensor([1.0, 3.0]), 2, ["a.h5", "a.h5"], torch.tensor([0, 1]))
    mixin.accumulate_loss(torch.tensor([5.0, 3.0]), 2, ["b.h5", "a.h5"], [0, 1])  # a.h5 1 again
    mixin._finish_stage("val")
    state = mixin._fm_state()["val"]
    assert state["loss_count"] == 3 and state["loss_sum"] / state["loss_count"] == 3.0


def test_validation_loss_is_the_batch_loss_split_into_slices(demo_root):
    """The modules hand accumulate_loss each slice's loss; their mean is the batch's loss,
    for every reconstruction loss."""
    from sftkd_fastmri.pl_modules import DCCNNModule, FastMRIDataModule

    batch = next(iter(FastMRIDataModule(demo_root, "singlecoil", batch_size=3).val_dataloader()))
    for name in ("l1", "l2", "ssim", "l1+ssim"):
        module = DCCNNModule("dccnn_d3c5", model_overrides={"chans": 4}, loss=name)
        with torch.no_grad():
            output = module.reconstruct(batch)
            losses = module.per_slice_loss(output, batch.target, module.data_range(batch))
            whole = module.loss_fn(output, batch.target, module.data_range(batch))
        assert losses.shape == (3,) and len(set(losses.tolist())) == 3
        torch.testing.assert_close(losses.mean(), whole)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_ssim_loss_is_float32_under_autocast(dtype):
    """Autocast ran fastMRI's SSIM window means in 16 bits; the variances cancelled and
    1 - SSIM came out below zero, with gradients of the wrong sign."""
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 48), indexing="ij")
    target = (torch.sin(3 * yy) * torch.cos(2 * xx) + 2).unsqueeze(0)
    output = (target + 0.01 * torch.randn_like(target)).requires_grad_()
    loss = create_loss("ssim")
    reference = loss(output, target, torch.tensor([3.0]))
    (expected,) = torch.autograd.grad(reference, output)
    with torch.autocast("cpu", dtype=dtype):
        value = loss(output, target, torch.tensor([3.0]))
    (grad,) = torch.autograd.grad(value, output)
    assert value.dtype == torch.float32 and value.item() == pytest.approx(reference.item())
    torch.testing.assert_close(grad, expected)


def test_a_compiled_networks_weights_are_saved_under_the_plain_names():
    """Lightning saved ``model._orig_mod.*`` for a module whose network was compiled; no
    plain module, loader or export knew those names."""
    from sftkd_fastmri.pl_modules import DCCNNModule

    torch.manual_seed(0)
    compiled = DCCNNModule("dccnn_d3c5", model_overrides={"chans": 4})
    compiled.model = torch.compile(compiled.model)  # wraps only
    checkpoint = {"state_dict": compiled.state_dict()}
    compiled.on_save_checkpoint(checkpoint)
    assert not any("_orig_mod" in k for k in checkpoint["state_dict"])
    plain = DCCNNModule("dccnn_d3c5", model_overrides={"chans": 4})
    plain.on_load_checkpoint(checkpoint)
    plain.load_state_dict(checkpoint["state_dict"])  # strict
    again = DCCNNModule("dccnn_d3c5", model_overrides={"chans": 4})
    again.model = torch.compile(again.model)  # resuming a compiled module
    again.on_load_checkpoint(checkpoint)
    again.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(
        again.model._orig_mod.cascades[0].cnn.conv0.bias, plain.model.cascades[0].cnn.conv0.bias
    )


@pytest.mark.parametrize("precision", ["16-true", "bf16-true"])
def test_16_bit_true_precision_is_refused_with_the_reason(precision):
    from types import SimpleNamespace

    from sftkd_fastmri.pl_modules import DCCNNModule

    module = DCCNNModule("dccnn_d3c5", model_overrides={"chans": 4})
    module._trainer = SimpleNamespace(precision=precision, datamodule=None)
    with pytest.raises(ValueError, match=f"precision='{precision}'.*FFTs need float32"):
        module.setup("fit")


def test_per_slice_values_count_each_slice_once_across_ranks(monkeypatch):
    """Values handed over per slice (SFTModule's val/* terms) are averaged over slices, a
    slice repeated on this rank or on another (DDP sampler padding) counted once, as in
    validation_loss; logged as batch means with sync_dist, they counted the repeats."""
    from sftkd_fastmri.pl_modules import recon_module
    from sftkd_fastmri.pl_modules.recon_module import FastMRIMetricsMixin

    ranks = [FastMRIMetricsMixin(), FastMRIMetricsMixin()]
    for mixin in ranks:
        mixin._reset_stage("val")
    ranks[0].accumulate_slice_values({"val/x": torch.tensor([1.0, 3.0])}, ["a", "a"], [0, 1])
    ranks[0].accumulate_slice_values({"val/x": torch.tensor([3.0])}, ["a"], [1])  # again
    ranks[1].accumulate_slice_values({"val/x": torch.tensor([8.0, 1.0])}, ["b", "a"], [0, 0])
    states = [m._fm_state()["val"] for m in ranks]
    # the gather of two ranks: each receives every rank's state
    monkeypatch.setattr(
        recon_module,
        "_all_gather_object",
        lambda obj: [
            (s["metrics"], s["loss_sum"], s["loss_count"], s["loss_batches"], s["slice_values"])
            for s in states
        ],
    )
    for mixin in ranks:
        mixin._finish_stage("val")
    assert [s["slice_means"] for s in states] == [{"val/x": 4.0}] * 2  # (1 + 3 + 8) / 3
    with pytest.raises(ValueError, match=r"val/x: expected one value per slice, shape \(2,\)"):
        ranks[0].accumulate_slice_values({"val/x": torch.tensor(1.0)}, ["a", "a"], [0, 1])


def test_modules_refuse_fastmri_samples_clearly(demo_root):
    """fastMRI's own samples (SliceDataset + VarNetDataTransform) carry no sens_maps and no
    scale: an AttributeError from inside the step, now a TypeError naming what was given and
    what is expected (the opposite of UnetModule2's refusal of k-space samples)."""
    from fastmri.data import SliceDataset
    from fastmri.data.subsample import RandomMaskFunc
    from fastmri.data.transforms import UnetDataTransform, VarNetDataTransform

    from sftkd_fastmri.pl_modules import DCCNNModule, SFTModule

    def batch(challenge, transform):
        folder = demo_root / f"{challenge}_train"
        dataset = SliceDataset(folder, challenge, transform=transform, use_dataset_cache=False)
        return next(iter(DataLoader(dataset, batch_size=1)))

    mask = RandomMaskFunc([0.08], [4])
    varnet = batch("multicoil", VarNetDataTransform(mask_func=mask, use_seed=True))
    small = {"chans": 2}
    for module in (
        DCCNNModule("dccnn_d3c5", model_overrides=small),
        SFTModule(teacher_overrides=small, student_overrides=small),
    ):
        name = type(module).__name__
        steps = (module.training_step, module.validation_step, module.test_step)
        for step in (*steps, module.predict_step):
            with pytest.raises(
                TypeError,
                match=rf"{name} takes the k-space samples of FastMRIDataModule \(.*"
                r"DCCNNDataTransform.*\), got a VarNetSample without sens_maps, scale "
                r"\(fastMRI's VarNetDataTransform samples",
            ):
                step(varnet, 0)
    unet = batch("singlecoil", UnetDataTransform("singlecoil", mask_func=mask, use_seed=True))
    with pytest.raises(TypeError, match=r"got a UnetSample .*UnetModule2"):
        DCCNNModule("dccnn_d3c5", model_overrides=small).reconstruct(unet)
