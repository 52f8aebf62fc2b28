"""ifft2c_columns: fastMRI's centred inverse FFT of k-space kept on some columns."""

from __future__ import annotations

import fastmri
import pytest
import torch

from sftkd_fastmri.data.fourier import ifft2c_columns


@pytest.mark.parametrize("shape", [(3, 16, 12), (2, 15, 12), (1, 16, 11), (4, 9, 7)])
@pytest.mark.parametrize("columns", [[0, 1, 2], [4, 5, 6, 7], [1, 3, 10], []])
def test_equals_fastmri_ifft2c_of_the_kept_columns(shape, columns):
    g = torch.Generator().manual_seed(sum(shape))
    kspace = torch.randn(*shape, 2, generator=g)
    cols = torch.tensor([c for c in columns if c < shape[-1]], dtype=torch.long)
    kept = torch.zeros_like(kspace)
    kept[..., cols, :] = kspace[..., cols, :]
    expected = fastmri.ifft2c(kept)
    got = ifft2c_columns(torch.view_as_complex(kspace), cols)
    torch.testing.assert_close(torch.view_as_real(got), expected, atol=1e-6, rtol=1e-5)
