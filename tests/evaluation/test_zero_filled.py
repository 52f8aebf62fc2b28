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
