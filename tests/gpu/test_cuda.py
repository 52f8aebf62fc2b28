"""CUDA paths: models, the SFT stage and the distillation callback on a GPU, under mixed
precision. Skipped where no CUDA device is present (CI runs on CPU); run them on a GPU
machine with ``python -m pytest -q tests/gpu``."""

from __future__ import annotations

import copy

import fastmri
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from sftkd_fastmri.callbacks import DistillationCallback
from sftkd_fastmri.models import create_model
from sftkd_fastmri.pl_modules import DCCNNModule, FastMRIDataModule
from sftkd_fastmri.pl_modules.sft_module import SFTModule

from ..sft.test_wrapper import count_cascade_calls

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

KD_LOSSES = dict.fromkeys(("at", "fitnet", "fsp", "sp", "cc", "imitation"), 1.0)


def _trainer(root, **kwargs) -> pl.Trainer:
    defaults = dict(
        default_root_dir=root,
        accelerator="gpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def _batch(coils: int, seed: int = 0):
    """k-space, mask and (for several coils) normalised sensitivity maps, 40 x 36."""
    g = torch.Generator().manual_seed(seed)
    h, w = 40, 36
    image = torch.randn(2, coils, h, w, 2, generator=g)
    mask = torch.zeros(2, 1, 1, w, 1, dtype=torch.bool)
    mask[..., ::3, :] = True
    mask[..., w // 2 - 2 : w // 2 + 2, :] = True
    sens = None
    if coils > 1:
        sens = torch.randn(2, coils, h, w, 2, generator=g)
        sens = sens / fastmri.rss_complex(sens, dim=1)[:, None, ..., None]
    return fastmri.fft2c(image) * mask, mask, sens


def _cuda(*tensors):
    return [None if t is None else t.cuda() for t in tensors]


@pytest.mark.parametrize(
    "coils, preset", [(1, "dccnn_d3c5_paper"), (1, "dccnn_d3c5"), (4, "dccnn_d3c5")]
)
def test_dccnn_on_cuda_matches_cpu(coils, preset):
    """Same weights, same input: CUDA forward and gradients equal the CPU ones (float32);
    1-channel (paper) and 2-channel presets, single- and multi-coil."""
    torch.manual_seed(0)
    model = create_model(preset, chans=8)
    inputs = _batch(coils)
    gpu = copy.deepcopy(model).cuda()
    out_cpu = model(*inputs)
    out_gpu = gpu(*_cuda(*inputs))
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-4, atol=1e-4)
    out_cpu.abs().mean().backward()
    out_gpu.abs().mean().backward()
    for (name, p_cpu), p_gpu in zip(model.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", sorted(KD_LOSSES))
def test_kd_losses_on_cuda_match_cpu(name):
    """Every KD loss and its gradient on CUDA (where FSP, SP and CC sum their long reductions
    in chunks) equal the CPU values, at a 320 x 320 map so that the chunked path is taken."""
    from sftkd_fastmri.kd import create_loss

    g = torch.Generator().manual_seed(0)
    shape = (4, 2, 320, 320) if name == "imitation" else (4, 8, 320, 320)
    student = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2)]
    teacher = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2)]
    n = 1 if name in ("imitation", "at", "sp", "cc", "fitnet") else 2
    values, grads = [], []
    for device in ("cpu", "cuda"):
        s = [x.detach().to(device).requires_grad_() for x in student[:n]]
        loss = create_loss(name).to(device, torch.float64)
        value = loss(s, [x.to(device) for x in teacher[:n]])
        value.backward()
        values.append(value.item())
        grads.append([x.grad.cpu() for x in s])
    assert values[1] == pytest.approx(values[0], rel=1e-9)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("losses", [{"at": 1.0}, {"fsp": 1.0}, {"at": 1.0, "fsp": 1.0}])
def test_deferred_kd_gradients_on_cuda_equal_plain_autograd(losses):
    """float32 on CUDA: AT's and FSP's deferred gradients (fused into the backward pass at the
    student's activations) equal the plain autograd gradients."""
    from sftkd_fastmri.kd import Distiller
    from sftkd_fastmri.kd.deferred import deferred_slot

    torch.manual_seed(0)
    student = create_model("dccnn_d3c5", chans=16).cuda()
    teacher = create_model("dccnn_d5c5", chans=16).cuda()
    kspace, mask, _ = _cuda(*_batch(1))
    target = fastmri.complex_abs(fastmri.ifft2c(kspace))[:, 0]
    grads, tapped = [], []
    for defer in (False, True):
        net = copy.deepcopy(student)
        distiller = Distiller(net, teacher, losses, defer_gradients=defer).attach()
        with distiller.step():
            output = net(kspace, mask)
            kd = distiller()
            capture = distiller._student_capture
            tapped.append(sorted(capture._tap))
            # the tapped CUDA float32 activations really carry a deferred-gradient slot
            assert all(deferred_slot(capture[layer]) is not None for layer in tapped[-1])
        (kd.total + (output - target).abs().mean()).backward()
        distiller.remove_hooks()
        grads.append({n: p.grad for n, p in net.named_parameters() if p.grad is not None})
    assert not tapped[0] and tapped[1]  # the deferred path was really taken
    assert grads[1].keys() == grads[0].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sft_batches_branches_on_cuda_by_default():
    """``batch_branches=None``: one call per student cascade on CUDA, the same outputs as
    the sequential branches on the CPU."""
    from sftkd_fastmri.sft import StudentFriendlyTeacher

    torch.manual_seed(0)
    sft = StudentFriendlyTeacher(
        create_model("dccnn_d5c5", chans=8), create_model("dccnn_d3c5", chans=8)
    )
    inputs = _batch(1)
    want = sft(*inputs)
    gpu = copy.deepcopy(sft).cuda()
    batch_sizes = []
    gpu.student.cascades[4].register_forward_hook(
        lambda m, args, out: batch_sizes.append(args[0].shape[0])
    )
    got = gpu(*_cuda(*inputs))
    assert batch_sizes == [2 * 4]  # the four branches of the last student cascade, stacked
    for g_, w in zip([got.teacher, *got.branches], [want.teacher, *want.branches]):
        torch.testing.assert_close(g_.cpu(), w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_distillation_callback_on_gpu(demo_root, tmp_path, precision):
    """All six KD terms under mixed precision on a GPU: the teacher follows the module to the
    device, stays frozen and untouched, every term is logged and finite, the student learns."""
    pl.seed_everything(0, verbose=False)
    data = FastMRIDataModule(demo_root, "singlecoil", accelerations=(4,), batch_size=2, seed=0)
    module = DCCNNModule("dccnn_d3c5", model_overrides={"chans": 8})
    student_before = copy.deepcopy(module.model.state_dict())
    teacher = create_model("dccnn_d5c5", chans=8)
    teacher_before = copy.deepcopy(teacher.state_dict())
    kd = DistillationCallback(teacher, KD_LOSSES)
    seen = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["teacher_device"] = next(kd.distiller.teacher.parameters()).device.type
            seen["teacher_training"] = kd.distiller.teacher.training
            seen["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}

    trainer = _trainer(tmp_path, precision=precision, callbacks=[kd, Probe()])
    trainer.fit(module, datamodule=data)
    assert seen["teacher_device"] == "cuda" and seen["teacher_training"] is False
    for name in KD_LOSSES:
        assert np.isfinite(seen["metrics"][f"kd/{name}_step"]), name
    assert np.isfinite(trainer.callback_metrics["validation_loss"].item())
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v.cpu(), teacher_before[k], rtol=0, atol=0)
    assert all(p.grad is None for p in teacher.parameters())
    after = module.model.state_dict()
    assert any(not torch.equal(after[k].cpu(), v) for k, v in student_before.items())


@pytest.mark.parametrize("challenge", ["singlecoil", "multicoil"])
def test_sft_stage_on_gpu(demo_root, tmp_path, challenge):
    """SFT training steps (teacher + every student branch) under 16-bit mixed precision."""
    pl.seed_everything(0, verbose=False)
    data = FastMRIDataModule(demo_root, challenge, batch_size=2, seed=0)
    module = SFTModule(
        teacher_overrides={"chans": 8},
        student_overrides={"chans": 8},
        train_first_student_cascade=True,
        batch_branches=challenge == "multicoil",
    )
    teacher_before = copy.deepcopy(module.teacher.state_dict())
    trainer = _trainer(tmp_path, precision="16-mixed")
    trainer.fit(module, datamodule=data)
    logged = trainer.logged_metrics
    for name in ("train/loss", "train/teacher_rec", "train/branch0_rec", "train/imitation"):
        assert torch.isfinite(torch.as_tensor(logged[name])), name
    assert np.isfinite(module.val_metrics["psnr"]) and np.isfinite(
        module.val_metrics["branch4/psnr"]
    )
    after = module.teacher.state_dict()
    assert any(not torch.equal(after[k].cpu(), v.cpu()) for k, v in teacher_before.items())


def test_sft_with_varnets_on_cuda_matches_cpu():
    """fastMRI's VarNet through :class:`CascadedVarNet`: batched branches on CUDA equal the
    sequential branches on the CPU, and the gradients reach the teacher on the GPU."""
    from fastmri.models import VarNet

    from sftkd_fastmri.models import CascadedVarNet
    from sftkd_fastmri.sft import SFTLoss, StudentFriendlyTeacher

    torch.manual_seed(0)
    n = 3

    def varnet(chans):
        return CascadedVarNet(
            VarNet(num_cascades=n, sens_chans=4, sens_pools=2, chans=chans, pools=2)
        )

    sft = StudentFriendlyTeacher(varnet(8), varnet(4))
    masked, mask, _ = _batch(4)
    batch = masked.shape[0]
    want = sft(masked, mask)
    gpu = copy.deepcopy(sft).cuda()
    sizes: dict = {}
    calls, handles = count_cascade_calls(gpu, sizes)
    got = gpu(*_cuda(masked, mask))
    for h in handles:
        h.remove()
    assert len(got.branches) == len(want.branches) == n - 1
    # batched by default on CUDA: one call per student cascade, its active branches stacked
    assert calls[("student", 0)] == 0
    for k in range(1, n):
        assert calls[("student", k)] == 1 and sizes[("student", k)] == [k * batch], k
    for g_, w in zip([got.teacher, *got.branches], [want.teacher, *want.branches]):
        torch.testing.assert_close(g_.cpu(), w, rtol=1e-4, atol=1e-4)
    SFTLoss()(got, torch.rand_like(got.teacher)).total.backward()
    for i in range(n - 1):  # the branches train the teacher blocks they start after
        grads = [p.grad for p in gpu.teacher.cascades[i].parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, i
    for name, p in gpu.teacher.varnet.sens_net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
