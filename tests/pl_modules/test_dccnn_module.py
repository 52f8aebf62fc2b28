"""DCCNNModule: tiny training on demo data, checkpoints that load_model rebuilds."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from sftkd_fastmri.models import (
    CheckpointError,
    load_model,
    read_checkpoint,
    save_model_checkpoint,
)
from sftkd_fastmri.pl_modules import DCCNNModule, FastMRIDataModule, VolumeMetricAccumulator

TINY = {"chans": 8}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny tensors: a second intra-op thread buys nothing, and when other processes share
    # the two cores its spin-waits slowed a 5 s fit to over 2 minutes.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _trainer(tmp_path, **kwargs):
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def _zero_filled_psnr(data_module: FastMRIDataModule) -> float:
    """The val-split PSNR of the zero-filled images, computed the same way as the module's."""
    metrics = VolumeMetricAccumulator()
    for batch in data_module.val_dataloader():
        scale = batch.scale.reshape(-1, 1, 1)
        metrics.update(
            batch.fname,
            batch.slice_num,
            batch.zero_filled * scale,
            batch.target * scale,
            batch.max_value,
        )
    return metrics.compute()["psnr"]


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    """dccnn_d3c5 (chans=8) trained a few epochs on single-coil demo data at 4x."""
    tmp_path = tmp_path_factory.mktemp("dccnn_fit")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: set up before the per-test thread fixture
    pl.seed_everything(0)
    data = FastMRIDataModule(demo_root, "singlecoil", accelerations=(4,), batch_size=4, seed=0)
    module = DCCNNModule("dccnn_d3c5", model_overrides=TINY)
    epochs = 12
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="validation_loss")
    trainer = _trainer(
        tmp_path,
        max_epochs=epochs,
        check_val_every_n_epoch=epochs,  # validate once, at the end
        num_sanity_val_steps=0,
        enable_checkpointing=True,
        callbacks=[checkpoint],
    )
    trainer.fit(module, datamodule=data)
    torch.set_num_threads(threads)
    return module, data, checkpoint.best_model_path, tmp_path


def test_tiny_training_beats_zero_filled(trained):
    module, data, _, _ = trained
    zero_filled = _zero_filled_psnr(data)
    trained_psnr = module.val_metrics["psnr"]
    print(f"\nval PSNR: zero-filled {zero_filled:.2f} dB, dccnn_d3c5 chans=8 {trained_psnr:.2f} dB")
    assert trained_psnr > zero_filled + 1.0


def test_hyperparameters_record_preset_and_config(trained):
    module, _, best, _ = trained
    assert module.hparams["model_preset"] == "dccnn_d3c5"
    assert module.hparams["model_config"] == module.model.config
    assert module.hparams["model_config"]["chans"] == 8
    hparams = read_checkpoint(best)["hyper_parameters"]  # weights_only=True reads it
    assert hparams["model_config"] == module.model.config
    assert "init_checkpoint" not in hparams


def test_load_model_rebuilds_from_lightning_checkpoint(trained):
    module, _, best, _ = trained
    model = load_model(best, expected_preset="dccnn_d3c5")
    assert model.config == module.model.config
    for name, value in module.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value)
    reloaded = DCCNNModule.load_from_checkpoint(best)
    assert reloaded.model.config == module.model.config


def test_checkpoint_of_another_preset_is_refused(trained):
    _, _, best, _ = trained
    with pytest.raises(CheckpointError, match="dccnn_d5c5"):
        load_model(best, expected_preset="dccnn_d5c5")
    with pytest.raises(CheckpointError, match="dccnn_d5c5"):
        DCCNNModule("dccnn_d5c5", model_overrides=TINY, init_checkpoint=best)
    # same preset, other width: the message says how to build the network like it
    with pytest.raises(
        CheckpointError, match="chans: expected 32, found 8.*--model-overrides chans=8"
    ):
        DCCNNModule("dccnn_d3c5", init_checkpoint=best)


def test_init_checkpoint_loads_weights(trained):
    module, _, best, tmp_path = trained
    model_ckpt = save_model_checkpoint(module.model, tmp_path / "model.pt")
    for path in (best, model_ckpt):  # a Lightning checkpoint and a model checkpoint
        fresh = DCCNNModule("dccnn_d3c5", model_overrides=TINY, init_checkpoint=path)
        for name, value in module.model.state_dict().items():
            torch.testing.assert_close(fresh.model.state_dict()[name], value)


def test_test_split_reconstructions_and_metrics(trained, demo_root):
    module, _, _, tmp_path = trained
    trainer = _trainer(tmp_path)
    # fastMRI-style test files: stored masks, no targets -> reconstructions only
    data = FastMRIDataModule(demo_root, "singlecoil", batch_size=4)
    trainer.test(module, datamodule=data, verbose=False)
    files = sorted(module.reconstruction_dir.glob("*.h5"))
    assert len(files) == 2 and module.test_metrics == {}
    with h5py.File(files[0], "r") as hf:
        assert hf["reconstruction"].shape == (6, 80, 64)
    # the same volumes fully sampled with targets -> test metrics
    data = FastMRIDataModule(demo_root, "singlecoil", batch_size=4, test_split="test_full")
    (logged,) = trainer.test(module, datamodule=data, verbose=False)
    assert set(logged) == {"test_metrics/nmse", "test_metrics/psnr", "test_metrics/ssim"}
    assert [row["num_slices"] for row in module.test_volume_metrics] == [6, 6]


def test_multicoil_training_runs(demo_root, tmp_path):
    pl.seed_everything(0)
    data = FastMRIDataModule(demo_root, "multicoil", batch_size=2, test_split="test_full")
    module = DCCNNModule("dccnn_d3c5", model_overrides={"chans": 4, "num_cascades": 2})
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=2)
    trainer.fit(module, datamodule=data)
    assert torch.isfinite(torch.tensor(module.val_metrics["psnr"]))
    trainer.test(module, datamodule=data, verbose=False)
    assert len(module.test_volume_metrics) == 2


def test_forward_shapes_single_coil():
    module = DCCNNModule("dccnn_d3c5", model_overrides={"chans": 4, "num_cascades": 1})
    out = module(torch.randn(2, 1, 12, 10, 2), torch.ones(2, 1, 1, 10, 1, dtype=torch.bool), None)
    assert out.shape == (2, 12, 10)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_ddp_metrics_and_reconstructions_match_single_process(trained, demo_root, tmp_path):
    # Lightning's DistributedSampler interleaves slices, so every volume is split over the
    # two ranks: the metrics must still be those of one process, and rank 0 writes whole files.
    module, _, _, _ = trained
    data = FastMRIDataModule(demo_root, "singlecoil", batch_size=3, test_split="test_full")
    results = {}
    for name, kwargs in (("single", {"devices": 1}), ("ddp", {"devices": 2})):
        if name == "ddp":
            kwargs["strategy"] = "ddp_spawn"
        module.output_dir = tmp_path / name
        trainer = pl.Trainer(
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            **kwargs,
        )
        (val,) = trainer.validate(module, datamodule=data, verbose=False)
        (test,) = trainer.test(module, datamodule=data, verbose=False)
        results[name] = {**val, **test}
    single, ddp = results["single"], results["ddp"]
    assert set(single) == set(ddp)
    for key in single:
        assert ddp[key] == pytest.approx(single[key], rel=1e-5), key
    written = sorted(p.name for p in (tmp_path / "single" / "reconstructions").glob("*.h5"))
    assert written and written == sorted(
        p.name for p in (tmp_path / "ddp" / "reconstructions").glob("*.h5")
    )
    assert len(written) == len(list((demo_root / "singlecoil_test_full").glob("*.h5")))
    for path in sorted((tmp_path / "single" / "reconstructions").glob("*.h5")):
        with (
            h5py.File(path, "r") as a,
            h5py.File(tmp_path / "ddp" / "reconstructions" / path.name) as b,
        ):
            np.testing.assert_allclose(b["reconstruction"][()], a["reconstruction"][()], rtol=1e-5)


def test_a_varnet_sees_the_batchs_centre_columns_in_every_stage(demo_root):
    """fastMRI's VarNetModule (and SFTModule) hand a VarNet the data transform's count of
    centre columns; train, distill and evaluate called it without, so fastMRI's VarNet found
    another count from the mask (its symmetric count is even: 5 centre columns read as 4 or
    more) and the SFT teacher was scored on other inputs than it was selected on."""
    from sftkd_fastmri.evaluation.evaluate import reconstruct_batch
    from sftkd_fastmri.pl_modules import SFTModule
    from sftkd_fastmri.pl_modules.recon_module import crop_to_target

    small = dict(num_cascades=2, chans=4, pools=1, sens_chans=2, sens_pools=1)
    data = FastMRIDataModule(demo_root, "multicoil", batch_size=2, center_fractions=[0.08])
    batch = next(iter(data.val_dataloader()))
    assert batch.num_low_frequencies.tolist() == [5, 5]  # round(0.08 x 64): odd
    torch.manual_seed(0)
    module = DCCNNModule("varnet", model_overrides=small).eval()
    net = module.model
    inputs = (batch.masked_kspace, batch.mask, batch.sens_maps)
    with torch.no_grad():
        given = crop_to_target(net(*inputs, num_low_frequencies=batch.num_low_frequencies), batch)
        found = crop_to_target(net(*inputs), batch)
        assert not torch.allclose(given, found)  # the two conventions differ on this batch
        torch.testing.assert_close(module.reconstruct(batch), given)
        torch.testing.assert_close(reconstruct_batch(net, batch, "cpu"), given, rtol=0, atol=0)
        sft = SFTModule(teacher=net, student=DCCNNModule("varnet", model_overrides=small).model)
        torch.testing.assert_close(sft.eval().reconstruct(batch), given)


def test_a_varnet_preset_module_reloads_from_its_checkpoint(demo_root, tmp_path):
    """The varnet preset's config records architecture="cascaded_varnet"; the module rebuilt
    a DCCNN(**config) from it, so load_from_checkpoint failed on its own checkpoints."""
    small = dict(num_cascades=1, chans=4, pools=1, sens_chans=2, sens_pools=1)
    torch.manual_seed(0)
    module = DCCNNModule("varnet", model_overrides=small, num_log_images=0)
    data = FastMRIDataModule(demo_root, "multicoil", batch_size=1)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "varnet.ckpt")
    reloaded = DCCNNModule.load_from_checkpoint(tmp_path / "varnet.ckpt", weights_only=True)
    assert type(reloaded.model) is type(module.model)
    assert reloaded.model.config == module.model.config
    assert reloaded.hparams["model_config"]["architecture"] == "cascaded_varnet"
    for name, value in module.model.state_dict().items():
        torch.testing.assert_close(reloaded.model.state_dict()[name], value)
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.eval().reconstruct(batch), module.eval().reconstruct(batch)
        )
