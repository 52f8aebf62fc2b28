"""FiniteLossCheck: a NaN loss stops training before it reaches the weights."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from sftkd_fastmri.callbacks import FiniteLossCheck, NonFiniteLossError


class _Batch(NamedTuple):
    x: torch.Tensor
    fname: list
    slice_num: torch.Tensor


def _collate(items):
    xs, names, nums = zip(*items)
    return _Batch(torch.stack(xs), list(names), torch.tensor(nums))


class _Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch.x).abs().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _WeightsBeforeEachStep(pl.Callback):
    def __init__(self):
        self.states = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.append({k: v.clone() for k, v in pl_module.state_dict().items()})


def _fit(tmp_path, data, callbacks, module=None):
    module = _Module() if module is None else module
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=2, collate_fn=_collate))
    return module


def test_a_nan_loss_stops_training_and_names_the_slices(tmp_path):
    data = [(torch.ones(2), f"vol{i // 3}.h5", i % 3) for i in range(6)]
    data[3] = (torch.tensor([float("nan"), 1.0]), "vol1.h5", 0)  # second batch
    module, weights = _Module(), _WeightsBeforeEachStep()
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 0, step 1 \(batch: "
                       r"vol0.h5 slice 2, vol1.h5 slice 0\)"):  # fmt: skip
        _fit(tmp_path, data, [FiniteLossCheck(), weights], module)
    # the failing (second) step changed no weight: they are those the first step left
    assert len(weights.states) == 2
    assert any(not torch.equal(v, weights.states[0][k]) for k, v in module.state_dict().items())
    for k, v in module.state_dict().items():
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v, weights.states[1][k], rtol=0, atol=0)
    # without the check the same run ends with NaN weights and no error
    module = _fit(tmp_path, data, [])
    assert torch.isnan(module.layer.weight).any()


def test_finite_losses_pass(tmp_path):
    data = [(torch.ones(2), "v.h5", i) for i in range(4)]
    module = _fit(tmp_path, data, [FiniteLossCheck()])
    assert torch.isfinite(module.layer.weight).all()


def test_under_ddp_every_rank_stops_when_one_ranks_loss_is_not_finite():
    """A rank stopping alone left the others in the gradient all-reduce: a hang under NCCL,
    a "connection closed" error under gloo. Every rank now learns of it in one all-reduce."""
    from types import SimpleNamespace

    reduced = []

    def reduce(flag, reduce_op):
        reduced.append((float(flag), reduce_op))
        return flag + 1.0  # the other rank's loss was NaN

    trainer = SimpleNamespace(
        world_size=2, current_epoch=0, global_step=3, strategy=SimpleNamespace(reduce=reduce)
    )
    check = FiniteLossCheck()
    with pytest.raises(NonFiniteLossError, match="NaN or infinite on another rank at epoch 0"):
        check.on_before_backward(trainer, None, torch.tensor(0.5))
    assert reduced == [(0.0, "sum")]
    trainer.strategy = SimpleNamespace(reduce=lambda flag, reduce_op: flag)  # all finite
    check.on_before_backward(trainer, None, torch.tensor(0.5))
