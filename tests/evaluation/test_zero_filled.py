"""The zero-filled baseline of evaluations and studies is fastMRI's own."""

import fastmri
import h5py
import numpy as np
from fastmri.data.transforms import center_crop, to_tensor

from sftkd_fastmri.evaluation import evaluate_model
from sftkd_fastmri.pl_modules import FastMRIDataModule


def test_multicoil_zero_filled_baseline_is_the_rss_of_the_coil_images(demo_root):
    """It was the networks' input, the coils combined with estimated sensitivities (SENSE),
    up to 10 % away from fastMRI's zero-filled image (the RSS of the coil images)."""
    data = FastMRIDataModule(demo_root, "multicoil", test_split="test")  # the files' masks
    result = evaluate_model(None, data.test_dataloader(), progress=False)
    assert result.reconstructions
    for fname, recon in result.reconstructions.items():
        with h5py.File(demo_root / "multicoil_test" / fname, "r") as hf:
            kspace = to_tensor(hf["kspace"][()])  # (slices, coils, H, W, 2)
            mask = hf["mask"][()].astype(np.float32)
        masked = kspace * to_tensor(mask).reshape(1, 1, 1, -1, 1)
        image = fastmri.rss(fastmri.complex_abs(fastmri.ifft2c(masked)), dim=1)
        want = center_crop(image, recon.shape[-2:]).numpy()
        np.testing.assert_allclose(recon, want, rtol=0, atol=1e-4 * float(want.max()))


def test_evaluation_honours_the_precision_and_gives_the_network_back_as_it_was(demo_root):
    """evaluate --precision was accepted and ignored."""
    import pytest
    import torch

    from sftkd_fastmri.models import create_model

    torch.manual_seed(0)
    model = create_model("dccnn_d3c5", chans=4)
    loader = FastMRIDataModule(demo_root, "singlecoil", test_split="val").test_dataloader()
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    ref = evaluate_model(model, loader, progress=False)
    double = evaluate_model(model, loader, progress=False, precision="64-true")
    mixed = evaluate_model(model, loader, progress=False, precision="bf16-mixed")
    assert set(seen[: len(seen) // 3]) == {torch.float32}
    assert torch.float64 in seen and model.cascades[0].cnn.conv0.weight.dtype == torch.float32
    for a, b in zip(ref.metrics, double.metrics):
        assert b.psnr == pytest.approx(a.psnr, abs=1e-3)
    assert [m.fname for m in mixed.metrics] == [m.fname for m in ref.metrics]
    model.double()  # a 64-true run's network, scored at the default precision
    again = evaluate_model(model, loader, progress=False)
    assert model.cascades[0].cnn.conv0.weight.dtype == torch.float64
    assert again.metrics[0].psnr == pytest.approx(ref.metrics[0].psnr, abs=1e-3)
    with pytest.raises(ValueError, match="evaluation precision 'bf16-true'"):
        evaluate_model(model, loader, progress=False, precision="bf16-true")


def test_a_float64_network_evaluates_at_mixed_precision_as_a_float32_copy(demo_root):
    """A 64-true run's network at bf16-mixed or 16-mixed failed inside its first convolution
    (bfloat16 activations, float64 weights): it runs as a float32 copy under autocast, as
    Lightning's mixed precision runs float32 weights, and is given back as it was."""
    import pytest
    import torch

    from sftkd_fastmri.models import create_model

    torch.manual_seed(0)
    model = create_model("dccnn_d3c5", chans=4)
    loader = FastMRIDataModule(demo_root, "singlecoil", test_split="val").test_dataloader()
    ref = evaluate_model(model, loader, progress=False, precision="bf16-mixed")  # float32
    weights = []
    hook = lambda m, args, out: weights.append(m.weight.dtype)  # noqa: E731
    model.double()
    model.cascades[0].cnn.conv0.register_forward_hook(hook)
    for precision in ("bf16-mixed", "16-mixed"):  # 16-mixed is bfloat16 on a CPU
        result = evaluate_model(model, loader, progress=False, precision=precision)
        assert set(weights) == {torch.float32}
        for a, b in zip(ref.metrics, result.metrics):
            assert b.psnr == pytest.approx(a.psnr, abs=1e-3)
    assert model.cascades[0].cnn.conv0.weight.dtype == torch.float64
