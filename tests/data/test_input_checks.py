"""Input checks of the reader, the mask functions and the transform: settings and volumes
that cannot work are refused early, naming file, key or setting and what is expected."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from sftkd_fastmri.data import (
    CheckedSliceDataset,
    DataError,
    DCCNNDataTransform,
    create_mask_func,
)

NS = "http://www.ismrm.org/ISMRMRD"


def _header(encoded=(32, 16, 1), recon=(16, 16, 1), center=None) -> bytes:
    """An ISMRMRD header as fastMRI parses it; ``center`` of kspace_encoding_step_1 (default
    ``W // 2``, padding (0, W)) and maximum ``W - 1``."""
    center = encoded[1] // 2 if center is None else center
    return f"""<?xml version="1.0"?><ismrmrdHeader xmlns="{NS}"><encoding>
<encodedSpace><matrixSize><x>{encoded[0]}</x><y>{encoded[1]}</y><z>{encoded[2]}</z></matrixSize>
</encodedSpace><reconSpace><matrixSize><x>{recon[0]}</x><y>{recon[1]}</y><z>{recon[2]}</z>
</matrixSize></reconSpace><encodingLimits><kspace_encoding_step_1><minimum>0</minimum>
<maximum>{encoded[1] - 1}</maximum><center>{center}</center></kspace_encoding_step_1>
</encodingLimits></encoding></ismrmrdHeader>""".encode()


def _write(path, coils=None, target=(16, 16), mask=None, header=None, slices=2, h=32, w=16):
    rng = np.random.default_rng(0)
    shape = (slices, h, w) if coils is None else (slices, coils, h, w)
    kspace = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    with h5py.File(path, "w") as hf:
        hf["kspace"] = kspace
        hf["ismrmrd_header"] = header if header is not None else _header((h, w, 1))
        if target is not None:
            key = "reconstruction_esc" if coils is None else "reconstruction_rss"
            hf[key] = rng.random((slices, *target)).astype(np.float32)
            hf.attrs["max"] = 1.0
        if mask is not None:
            hf["mask"] = mask


# -- empty images ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "challenge, key", [("singlecoil", "reconstruction_esc"), ("multicoil", "reconstruction_rss")]
)
def test_a_target_with_an_empty_image_axis_is_refused_at_the_scan(tmp_path, challenge, key):
    """It passed the scan and failed in the transform with torch's bare RuntimeError."""
    _write(tmp_path / "vol.h5", coils=None if challenge == "singlecoil" else 3, target=(0, 16))
    mask_func = create_mask_func("random", [0.25], [2])
    with pytest.raises(DataError, match=rf"vol.h5: '{key}' has shape \(2, 0, 16\); its image"):
        CheckedSliceDataset(tmp_path, challenge, transform=DCCNNDataTransform(mask_func))


@pytest.mark.parametrize("recon", [(0, 0, 1), (16, -1, 1)])
def test_a_header_recon_size_below_one_is_refused_at_the_scan(tmp_path, recon):
    """A test file (no target) is cropped to the header's reconSpace: 0 failed in torch."""
    mask = np.ones(16, np.float32)
    _write(tmp_path / "vol.h5", target=None, mask=mask, header=_header(recon=recon))
    with pytest.raises(
        DataError, match=r"vol.h5: 'ismrmrd_header' gives encoding/reconSpace/matrixSize \(x, y\)"
    ):
        CheckedSliceDataset(tmp_path, "singlecoil", DCCNNDataTransform(None), require_target=False)


def test_a_header_recon_size_below_one_is_refused_from_the_header_cache_too(tmp_path):
    """A cache entry written before the check is checked when it is read."""
    from sftkd_fastmri.data.header_cache import HeaderCache, file_key

    vol = tmp_path / "vol.h5"
    _write(vol, target=None, mask=np.ones(16, np.float32), header=_header(recon=(0, 0, 1)))
    cache = HeaderCache(tmp_path, "singlecoil")
    metadata = {"padding_left": 0, "padding_right": 16, "recon_size": (0, 0, 1)}
    metadata.update(encoding_size=(32, 16, 1))
    cache.store(vol, file_key(vol), metadata, 2, False)
    cache.save()
    with pytest.raises(DataError, match="vol.h5: 'ismrmrd_header' gives encoding/reconSpace"):
        CheckedSliceDataset(tmp_path, "singlecoil", require_target=False, header_cache=True)


class _Failing:
    def __call__(self, kspace, mask, target, attrs, fname, slice_num):
        raise RuntimeError("Invalid number of data points (0) specified")


def test_a_failing_sample_names_file_and_slice_and_chains_the_error(tmp_path):
    _write(tmp_path / "vol.h5")
    dataset = CheckedSliceDataset(tmp_path, "singlecoil", transform=_Failing())
    with pytest.raises(RuntimeError, match=r"vol.h5 slice 1: Invalid number of data") as err:
        dataset[1]
    assert str(tmp_path) in str(err.value)
    assert isinstance(err.value.__cause__, RuntimeError)
    assert str(err.value.__cause__) == "Invalid number of data points (0) specified"


# -- mask settings -----------------------------------------------------------------------------
@pytest.mark.parametrize("mask_type", ["random", "equispaced_fraction", "magic_fraction"])
@pytest.mark.parametrize("fraction, acceleration", [(0.25, 4), (0.5, 4), (0.2, 8)])
def test_a_centre_taking_the_whole_sampling_budget_is_refused(mask_type, fraction, acceleration):
    """fastMRI failed at the first slice (ZeroDivisionError, or numpy's 'high <= 0')."""
    with pytest.raises(
        ValueError,
        match=rf"mask_type '{mask_type}': center_fraction {fraction:g} x acceleration "
        rf"{acceleration:g} = .* leaves no columns to draw.*center_fraction x acceleration < 1",
    ):
        create_mask_func(mask_type, [0.08, fraction], [4, acceleration])


def test_a_wide_centre_is_fine_where_the_acceleration_is_a_spacing():
    for mask_type in ("equispaced", "magic"):  # columns acceleration apart, plus the centre
        mask, _ = create_mask_func(mask_type, [0.5], [4])((1, 16, 1), seed=0)
        assert mask.sum() >= 8
    create_mask_func("random", [0.24], [4])  # 0.96 < 1


def test_a_mask_that_rounds_into_the_whole_budget_of_a_narrow_kspace_is_named(tmp_path):
    """0.24 x 4 < 1, but fastMRI's round(16 x 0.24) = 4 centre columns take all 16 / 4."""
    _write(tmp_path / "vol.h5")
    mask_func = create_mask_func("equispaced_fraction", [0.24], [4])
    dataset = CheckedSliceDataset(tmp_path, "singlecoil", DCCNNDataTransform(mask_func))
    with pytest.raises(
        DataError,
        match=r"vol.h5 slice 0: EquispacedMaskFractionFunc with center_fraction 0.24 and "
        r"acceleration 4 leaves no columns .* 4 centre columns of k-space 16 columns wide",
    ):
        dataset[0]
    wide = tmp_path / "wide"
    wide.mkdir()
    _write(wide / "vol.h5", w=64, target=(16, 64))  # round(64 x 0.24) = 15 < 16
    assert CheckedSliceDataset(wide, "singlecoil", DCCNNDataTransform(mask_func))[0].mask.any()


# -- header padding ----------------------------------------------------------------------------
def _padded_slice(padding_left, padding_right, w=16):
    rng = np.random.default_rng(1)
    kspace = (rng.standard_normal((3, 32, w)) + 1j * rng.standard_normal((3, 32, w))).astype(
        np.complex64
    )
    attrs = {
        "padding_left": padding_left,
        "padding_right": padding_right,
        "recon_size": (16, w, 1),
    }
    return kspace, attrs


def test_a_negative_padding_left_is_clamped_alike_on_both_mask_paths():
    """A header centre right of W // 2 gives a negative padding_left: the acquired band
    begins at column 0. fastMRI's apply_mask sliced with -4 and unsampled every column."""
    mask_func = create_mask_func("random", [0.25], [2])
    kspace, attrs = _padded_slice(-4, 12)
    drawn = DCCNNDataTransform(mask_func)(kspace, None, None, attrs, "f.h5", 0)
    band = DCCNNDataTransform(mask_func)(
        kspace, None, None, {**attrs, "padding_left": 0}, "f.h5", 0
    )
    assert torch.equal(drawn.mask, band.mask)
    columns = drawn.mask.reshape(-1)
    assert columns[:12].any() and not columns[12:].any()
    # the stored-mask path, with the mask the mask function draws for the file: the same
    full, _ = mask_func((1, 32, 16, 2), seed=tuple(map(ord, "f.h5")))
    stored = DCCNNDataTransform(None)(kspace, full.reshape(-1).numpy(), None, attrs, "f.h5", 0)
    assert torch.equal(stored.mask, drawn.mask)
    torch.testing.assert_close(stored.masked_kspace, drawn.masked_kspace)
    torch.testing.assert_close(stored.zero_filled, drawn.zero_filled)


def test_a_padding_band_outside_the_kspace_is_named_on_both_mask_paths():
    kspace, attrs = _padded_slice(20, 30)
    mask_func = create_mask_func("random", [0.25], [2])
    for transform, mask in (
        (DCCNNDataTransform(mask_func), None),
        (DCCNNDataTransform(None), np.ones(16)),
    ):
        with pytest.raises(
            DataError,
            match=r"f.h5 slice 0: the header's encodingLimits/kspace_encoding_step_1 .*"
            r"\[padding_left, padding_right\) = \[20, 30\), none of the 16 k-space columns",
        ):
            transform(kspace, mask, None, attrs, "f.h5", 0)


def test_a_negative_padding_left_from_the_header_reads_on_both_paths(tmp_path):
    """From the file: header centre 12 of 16 columns gives padding (-4, 12)."""
    header = _header(center=12)
    (tmp_path / "drawn").mkdir()
    (tmp_path / "stored").mkdir()
    _write(tmp_path / "drawn" / "vol.h5", header=header)
    _write(tmp_path / "stored" / "vol.h5", target=None, mask=np.ones(16, np.float32), header=header)
    mask_func = create_mask_func("random", [0.25], [2])
    drawn = CheckedSliceDataset(tmp_path / "drawn", "singlecoil", DCCNNDataTransform(mask_func))
    assert drawn.raw_samples[0].metadata["padding_left"] == -4
    columns = drawn[0].mask.reshape(-1)
    assert columns[:12].any() and not columns[12:].any()
    stored = CheckedSliceDataset(
        tmp_path / "stored", "singlecoil", DCCNNDataTransform(None), require_target=False
    )
    assert stored[0].mask.reshape(-1).tolist() == [True] * 12 + [False] * 4
