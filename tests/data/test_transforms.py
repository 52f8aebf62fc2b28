import re
import shutil

import fastmri
import h5py
import numpy as np
import pytest
import torch
from fastmri.data.subsample import RandomMaskFunc
from fastmri.data.transforms import center_crop, to_tensor

from sftkd_fastmri.data import (
    CheckedSliceDataset,
    DataError,
    DCCNNDataTransform,
    FixedMaskFunc,
    create_mask_func,
    crop_readout,
    estimate_sensitivity_maps,
    num_low_frequencies_of,
)


def _complex_image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(h, w, 2, generator=g)


def test_crop_readout_is_exact_and_keeps_unsampled_columns_zero():
    image = torch.zeros(1, 22, 9, 2)
    image[:, 6:16] = _complex_image(10, 9)  # object inside the central 10 rows
    kspace = fastmri.fft2c(image)
    mask = torch.zeros(1, 1, 9, 1)
    mask[..., ::3, :] = 1
    cropped = crop_readout(kspace * mask, 10)
    assert cropped.shape == (1, 10, 9, 2)
    # unsampled columns stay exactly zero: the readout transform of a zero column is zero
    assert torch.count_nonzero(cropped * (1 - mask)) == 0
    expected = fastmri.fft2c(image[:, 6:16]) * mask
    torch.testing.assert_close(cropped, expected, atol=1e-5, rtol=1e-5)


def test_sensitivity_maps_are_normalised():
    coils, h, w = 4, 16, 12
    g = torch.Generator().manual_seed(0)
    kspace = torch.randn(coils, h, w, 2, generator=g)
    mask = torch.ones(1, 1, w, 1)
    sens = estimate_sensitivity_maps(kspace, mask, num_low_frequencies=4)
    power = fastmri.complex_abs_sq(sens).sum(0)
    torch.testing.assert_close(power, torch.ones(h, w), atol=1e-4, rtol=1e-4)


def test_fixed_mask_is_the_same_for_every_slice_and_seeded(tmp_path):
    func = create_mask_func("random", [0.08], [4], fixed=True, seed=3)
    a, n_a = func((1, 30, 64, 2), seed=1)
    b, _ = func((1, 30, 64, 2), seed=2)
    assert torch.equal(a, b) and n_a == 5
    other = create_mask_func("random", [0.08], [4], fixed=True, seed=4)
    assert not torch.equal(a, other((1, 30, 64, 2))[0])
    path = tmp_path / "mask.npy"
    func.save(path, 64)
    loaded = FixedMaskFunc.from_file(path)
    assert torch.equal(loaded((1, 30, 64, 2))[0], a)
    with pytest.raises(ValueError, match="width 64.*63 columns"):
        loaded((1, 30, 63, 2))
    func.save(tmp_path / "plain", 64)  # numpy.save's naming: .npy appended, no temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.npy", "plain.npy"]


def test_mask_settings_and_files_that_cannot_work_are_named(tmp_path):
    """Empty lists failed at the first draw (in a worker); a fraction above 1 in a bare
    assertion of fastMRI's; a .npz archive or text array with numpy's words, no path."""
    for fractions, accelerations, match in (
        ([], [], "at least 1"),
        ([1.5], [4], r"center_fractions: each must lie in \(0, 1\), got 1.5"),
        ([0.08], [0.5], "accelerations: each must be a finite number >= 1, got 0.5"),
    ):
        with pytest.raises(ValueError, match=match):
            create_mask_func("random", fractions, accelerations)
    np.savez(tmp_path / "masks.npz", m=np.ones(8))
    with pytest.raises(ValueError, match=r"masks.npz: a .npz archive \(m\); save the 1-D mask"):
        FixedMaskFunc.from_file(tmp_path / "masks.npz")
    np.save(tmp_path / "words.npy", np.array(["1", "0"]))
    with pytest.raises(ValueError, match="words.npy: a fixed mask holds numbers .* dtype <U1"):
        FixedMaskFunc.from_file(tmp_path / "words.npy")


def test_num_low_frequencies_of():
    mask = np.zeros(20, bool)
    mask[8:13] = True
    mask[::4] = True
    assert num_low_frequencies_of(mask) == 5


def _slice(fake_target=True, coils=None, h=24, w=10, seed=0):
    rng = np.random.default_rng(seed)
    shape = (h, w) if coils is None else (coils, h, w)
    kspace = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    target = np.abs(rng.standard_normal((h // 2, w))).astype(np.float32) if fake_target else None
    attrs = {"max": 3.0, "padding_left": 0, "padding_right": w, "recon_size": (h // 2, w, 1)}
    return kspace, target, attrs


@pytest.mark.parametrize("coils", [None, 3])
def test_sample_layout(coils):
    kspace, target, attrs = _slice(coils=coils)
    transform = DCCNNDataTransform(RandomMaskFunc([0.2], [4]), training=False)
    s = transform(kspace, None, target, attrs, "file_a.h5", 2)
    c = 1 if coils is None else coils
    assert s.masked_kspace.shape == (c, 12, 10, 2)
    assert s.mask.shape == (1, 1, 10, 1) and s.mask.dtype == torch.bool
    assert s.sens_maps.shape == ((c, 12, 10, 2) if coils else (0,))
    assert s.target.shape == s.zero_filled.shape == (12, 10)
    assert s.zero_filled.max() == pytest.approx(1.0)  # normalised by the zero-filled maximum
    torch.testing.assert_close(s.target * s.scale, torch.from_numpy(target))
    assert s.max_value == 3.0 and s.fname == "file_a.h5" and s.slice_num == 2
    assert torch.count_nonzero(s.masked_kspace * ~s.mask) == 0


def test_a_stored_mask_gives_the_num_low_frequencies_fastmri_gives():
    """A test file's stored mask: fastMRI's VarNetDataTransform passes 0 (its VarNet then finds
    a symmetric centre from the mask); a mask function's samples pass its centre columns."""
    from fastmri.data.transforms import VarNetDataTransform

    kspace, _, attrs = _slice(coils=3)
    mask = np.zeros(10, dtype=np.float32)
    mask[[1, 4, 5, 6, 7]] = 1  # a sampled run 4..7 through the centre column, off-centre
    ours = DCCNNDataTransform(None)(kspace, mask, None, attrs, "f.h5", 0)
    theirs = VarNetDataTransform()(kspace, mask, None, attrs, "f.h5", 0)
    assert ours.num_low_frequencies == theirs.num_low_frequencies == 0
    assert torch.equal(ours.mask.reshape(-1), theirs.mask.reshape(-1))
    sampled = DCCNNDataTransform(RandomMaskFunc([0.2], [4]), training=False)(
        kspace, None, None, attrs, "f.h5", 0
    )
    assert sampled.num_low_frequencies == 2  # round(0.2 x 10) centre columns


def test_a_stored_mask_leaves_the_zero_padded_columns_unsampled():
    """A knee test file's mask marks columns of the zero padding around the acquired band
    (its header's padding) as sampled; the training masks and fastMRI's VarNetDataTransform
    leave them unsampled, and so does the transform."""
    from fastmri.data.transforms import VarNetDataTransform

    kspace, _, attrs = _slice(coils=3)
    attrs = {**attrs, "padding_left": 2, "padding_right": 8}
    mask = np.zeros(10, dtype=np.float32)
    mask[[0, 1, 4, 5, 6, 8, 9]] = 1  # every fourth column and the centre, padding included
    ours = DCCNNDataTransform(None)(kspace, mask, None, attrs, "f.h5", 0)
    theirs = VarNetDataTransform()(kspace, mask, None, attrs, "f.h5", 0)
    assert ours.mask.reshape(-1).tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert torch.equal(ours.mask.reshape(-1), theirs.mask.reshape(-1).bool())
    assert torch.count_nonzero(ours.masked_kspace[..., [0, 1, 8, 9], :]) == 0
    single, _, single_attrs = _slice()
    padded = DCCNNDataTransform(None)(single, mask, None, {**single_attrs, **attrs}, "f.h5", 0)
    assert padded.mask.reshape(-1).tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]


def test_validation_masks_fixed_per_volume_training_masks_vary():
    kspace, target, attrs = _slice(w=64)
    val = DCCNNDataTransform(RandomMaskFunc([0.1], [4]), training=False)
    m1 = val(kspace, None, target, attrs, "vol1.h5", 0).mask
    m2 = val(kspace, None, target, attrs, "vol1.h5", 5).mask
    m3 = val(kspace, None, target, attrs, "vol2_other.h5", 0).mask
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    masks = []
    for seed in (0, 0, 1):
        train = DCCNNDataTransform(RandomMaskFunc([0.1], [4]), training=True, seed=seed)
        masks.append([train(kspace, None, target, attrs, "vol1.h5", 0).mask for _ in range(4)])
    # reproducible from the seed, different from call to call, different for another seed
    assert all(torch.equal(a, b) for a, b in zip(masks[0], masks[1]))
    assert len({tuple(m.flatten().tolist()) for m in masks[0]}) > 1
    assert any(not torch.equal(a, b) for a, b in zip(masks[0], masks[2]))


def test_training_masks_differ_per_worker_and_rank(monkeypatch):
    kspace, target, attrs = _slice(w=64)

    class Info:
        def __init__(self, seed):
            self.seed = seed

    def first_mask(worker_seed, rank):
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: Info(worker_seed))
        monkeypatch.setenv("RANK", str(rank))
        t = DCCNNDataTransform(RandomMaskFunc([0.1], [4]), training=True, seed=0)
        return t(kspace, None, target, attrs, "v.h5", 0).mask

    base = first_mask(100, 0)
    assert torch.equal(base, first_mask(100, 0))
    assert not torch.equal(base, first_mask(101, 0))
    assert not torch.equal(base, first_mask(100, 1))


def test_a_spawned_worker_takes_the_rank_of_the_process_that_started_it(monkeypatch):
    """A DataLoader worker started by spawning has no process group, and Lightning's
    launcher sets only LOCAL_RANK, the same on every node: the transform carries its
    parent's rank across the pickle."""
    import pickle

    kspace, target, attrs = _slice(w=64)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: None)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")

    def first_mask(transform):
        return transform(kspace, None, target, attrs, "v.h5", 0).mask

    fresh = DCCNNDataTransform(RandomMaskFunc([0.1], [4]), training=True, seed=0)
    with monkeypatch.context() as parent:  # rank 3 of a process group (node 1, local rank 0)
        parent.setattr(torch.distributed, "is_initialized", lambda: True)
        parent.setattr(torch.distributed, "get_rank", lambda: 3)
        rank3 = first_mask(pickle.loads(pickle.dumps(fresh)))  # the parent's own draw
        sent = pickle.dumps(fresh)
    in_worker = pickle.loads(sent)  # no process group here
    assert torch.equal(first_mask(in_worker), rank3)
    assert not torch.equal(first_mask(pickle.loads(pickle.dumps(fresh))), rank3)  # rank 0


def test_bad_slices_raise_clear_errors():
    kspace, target, attrs = _slice()
    t = DCCNNDataTransform(RandomMaskFunc([0.1], [4]))
    bad = kspace.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataError, match="f.h5 slice 0.*NaN"):
        t(bad, None, target, attrs, "f.h5", 0)
    with pytest.raises(DataError, match="'mask' has 7 entries, k-space has 10"):
        DCCNNDataTransform(None)(kspace, np.ones(7), None, attrs, "f.h5", 0)
    with pytest.raises(DataError, match="no 'mask' dataset"):
        DCCNNDataTransform(None)(kspace, None, None, attrs, "f.h5", 0)
    with pytest.raises(DataError, match=r"must be \(H, W\)"):
        t(kspace[None, None], None, target, attrs, "f.h5", 0)
    # slices that would otherwise train every weight to NaN, or silently wrong inputs
    with pytest.raises(
        DataError, match="f.h5 slice 0: the zero-filled image is all zero or not finite"
    ):
        t(np.zeros_like(kspace), None, target, attrs, "f.h5", 0)
    huge, _, _ = _slice(coils=3)
    huge[:, :, 5] = 1e30  # a centre (always sampled) column: squares overflow float32
    with pytest.raises(DataError, match="f.h5 slice 0: .*too large for float32"):
        t(huge, None, target, attrs, "f.h5", 0)
    with pytest.raises(DataError, match="dtype float32; fastMRI k-space is complex"):
        t(kspace.real.astype(np.float32), None, target, attrs, "f.h5", 0)
    with pytest.raises(DataError, match="'mask' must hold 0/1"):
        DCCNNDataTransform(None)(kspace, np.full(10, 0.5), None, attrs, "f.h5", 0)
    with pytest.raises(DataError, match="at least one sampled column"):
        DCCNNDataTransform(None)(kspace, np.zeros(10), None, attrs, "f.h5", 0)
    with pytest.raises(DataError, match=r"target slice must be a real \(H, W\) image"):
        t(kspace, None, target[0], attrs, "f.h5", 0)
    # a transposed target (the header says 12 x 10) would be cropped to the wrong region
    with pytest.raises(DataError, match="target is 10 x 12, the header's reconSpace.*12 x 10"):
        t(kspace, None, target.T.copy(), attrs, "f.h5", 0)
    # a test file's mask of another layout is another mask, not one to flatten
    with pytest.raises(DataError, match=r"'mask' has shape \(2, 5\); fastMRI test files"):
        DCCNNDataTransform(None)(kspace, np.ones((2, 5)), None, attrs, "f.h5", 0)
    row = DCCNNDataTransform(None)(kspace, np.ones((1, 10)), None, attrs, "f.h5", 0)
    assert row.mask.reshape(-1).shape == (10,)  # (1, W) is the (W,) row
    # without the volume's maximum, PSNR and SSIM would use each slice's own
    no_max = {k: v for k, v in attrs.items() if k != "max"}
    with pytest.raises(DataError, match="f.h5: has a target but no attribute 'max'"):
        t(kspace, None, target, no_max, "f.h5", 0)
    assert t(kspace, None, None, no_max, "f.h5", 0).max_value == 0.0  # no target: no max
    # a stored multi-coil mask without a sampled centre: the maps would be zero, and the error
    # blamed the k-space
    multi, _, wide = _slice(coils=3, w=32)
    edges = np.zeros(32)
    edges[:4] = edges[-4:] = 1
    with pytest.raises(DataError, match="f.h5 slice 0: the mask samples none of the 8 centre"):
        DCCNNDataTransform(None)(multi * edges, edges, None, wide, "f.h5", 0)


def test_target_wider_than_the_kspace_image_is_cropped_as_fastmri_does():
    """fastMRI's brain FLAIR files are narrower than their 320 x 320 targets: the target is
    centre-cropped to the region both cover, as fastMRI's VarNetModule validates
    (center_crop_to_smallest; before: a shape error at the loss)."""
    kspace, target, attrs = _slice()
    wide = np.pad(target, ((0, 0), (3, 3)))  # 6 columns wider than the k-space
    attrs = dict(attrs, recon_size=(*wide.shape, 1))  # the header states the target's size
    sample = DCCNNDataTransform(RandomMaskFunc([0.1], [4]))(kspace, None, wide, attrs, "f", 0)
    assert sample.target.shape == sample.zero_filled.shape == target.shape
    torch.testing.assert_close(sample.target * sample.scale, torch.from_numpy(target).float())


def test_the_output_is_cropped_to_the_target_whatever_the_header_says():
    """fastMRI crops to the target where there is one; real brain headers' reconSpace can
    differ from their 320 x 320 targets, and such files were refused."""
    kspace, target, attrs = _slice()
    other = dict(attrs, recon_size=(6, 8, 1))  # neither the target's size nor its transpose
    t = DCCNNDataTransform(RandomMaskFunc([0.1], [4]))
    assert t(kspace, None, target, other, "f", 0).target.shape == target.shape


def test_a_big_endian_target_is_read_as_any_other():
    """Big-endian float32 is valid HDF5; torch refused it with a byte-order message."""
    kspace, target, attrs = _slice()
    t = DCCNNDataTransform(RandomMaskFunc([0.1], [4]))
    native = t(kspace, None, target, attrs, "f", 0)
    swapped = t(kspace, None, target.astype(">f4"), attrs, "f", 0)
    assert torch.equal(swapped.target, native.target)


def test_kspace_from_target_matches_target():
    """The file's k-space is ignored; the k-space is the centred orthonormal DFT of the real
    target image (numpy, written out here), under-sampled by the mask."""
    kspace, target, attrs = _slice()
    t = DCCNNDataTransform(RandomMaskFunc([0.1], [4]), kspace_from_target=True)
    s = t(kspace, None, target, attrs, "f.h5", 0)
    assert s.masked_kspace.shape == (1, 12, 10, 2)
    spectrum = np.fft.fftshift(
        np.fft.fft2(np.fft.ifftshift(target.astype(np.float64)), norm="ortho")
    )
    sampled = s.mask.reshape(-1).numpy()
    assert 0 < sampled.sum() < sampled.size
    expected = torch.from_numpy(np.stack([spectrum.real, spectrum.imag], -1) * sampled[:, None])
    got = (s.masked_kspace[0] * s.scale).double()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the zero-filled image of a fully sampled target is the target itself
    full = DCCNNDataTransform(FixedMaskFunc(np.ones(10)), kspace_from_target=True)
    f = full(kspace, None, target, attrs, "f.h5", 0)
    torch.testing.assert_close(f.zero_filled * f.scale, torch.from_numpy(target), atol=1e-5, rtol=0)


@pytest.mark.parametrize("challenge", ["singlecoil", "multicoil"])
def test_demo_data_through_checked_dataset(demo_root, challenge):
    t = DCCNNDataTransform(RandomMaskFunc([0.08], [4]))
    ds = CheckedSliceDataset(demo_root / f"{challenge}_val", challenge, transform=t)
    s = ds[0]
    assert s.target.shape == s.zero_filled.shape
    assert s.masked_kspace.shape[-3] == s.target.shape[0]  # readout oversampling removed
    test = CheckedSliceDataset(
        demo_root / f"{challenge}_test",
        challenge,
        transform=DCCNNDataTransform(None),
        require_target=False,
    )
    assert test[0].target.numel() == 0


def test_checked_dataset_names_bad_files(demo_root, tmp_path):
    src = sorted((demo_root / "singlecoil_val").glob("*.h5"))[0]
    folder = tmp_path / "singlecoil_val"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a volume")
    with pytest.raises(DataError, match="notes.txt: not an HDF5 file"):
        CheckedSliceDataset(folder, "singlecoil")
    (folder / "notes.txt").unlink()
    (folder / "extra").mkdir()
    with pytest.raises(DataError, match="extra: a folder inside a split folder"):
        CheckedSliceDataset(folder, "singlecoil")
    (folder / "extra").rmdir()
    (folder / "moved.h5").symlink_to(tmp_path / "elsewhere" / "moved.h5")
    with pytest.raises(DataError, match="moved.h5: a broken link .*elsewhere"):
        CheckedSliceDataset(folder, "singlecoil")
    (folder / "moved.h5").unlink()
    broken = folder / "broken.h5"
    with h5py.File(src, "r") as hin, h5py.File(broken, "w") as hout:
        hout.create_dataset("kspace", data=hin["kspace"][()])
        hout.create_dataset("ismrmrd_header", data=hin["ismrmrd_header"][()])
        hout.attrs.update(dict(hin.attrs))
    with pytest.raises(DataError, match="broken.h5: missing target dataset 'reconstruction_esc'"):
        CheckedSliceDataset(folder, "singlecoil")
    with h5py.File(broken, "a") as h:
        h.create_group("reconstruction_esc")  # a group where the target images belong
    with pytest.raises(DataError, match=r"'reconstruction_esc' must be a \(slices, H, W\) data"):
        CheckedSliceDataset(folder, "singlecoil")
    with h5py.File(broken, "a") as h:
        del h["kspace"]
    with pytest.raises(DataError, match="broken.h5: missing dataset 'kspace'"):
        CheckedSliceDataset(folder, "singlecoil", require_target=False)
    with pytest.raises(DataError, match="does not exist"):
        CheckedSliceDataset(tmp_path / "nowhere", "singlecoil")
    with h5py.File(broken, "a") as h:
        h.create_dataset("kspace", data=np.zeros((2, 0, 4), np.complex64))  # no columns
    with pytest.raises(DataError, match=r"broken.h5: 'kspace' has shape \(2, 0, 4\); every"):
        CheckedSliceDataset(folder, "singlecoil", require_target=False)
    with pytest.raises(DataError, match=r"multicoil data must be \(slices, coils, H, W\)"):
        CheckedSliceDataset(demo_root / "singlecoil_val", "multicoil")


def test_checked_dataset_names_damaged_volumes(demo_root, tmp_path):
    src = sorted((demo_root / "singlecoil_val").glob("*.h5"))[0]
    folder = tmp_path / "singlecoil_val"
    folder.mkdir()
    vol = folder / "v.h5"

    def fresh():
        vol.write_bytes(src.read_bytes())

    fresh()
    vol.write_bytes(src.read_bytes()[: src.stat().st_size // 2])  # a cut-short copy
    with pytest.raises(DataError, match="v.h5: unreadable HDF5 file"):
        CheckedSliceDataset(folder, "singlecoil")
    for value, shown in ((np.nan, "nan"), (0.0, "0.0"), (-1.0, "-1.0"), ("big", "big")):
        fresh()
        with h5py.File(vol, "a") as hf:
            hf.attrs["max"] = value
        with pytest.raises(DataError, match=f"v.h5: attribute 'max' is .*{shown}.*finite number"):
            CheckedSliceDataset(folder, "singlecoil")

    fresh()
    with h5py.File(vol, "a") as hf:
        del hf.attrs["max"]
    # checked even where targets are optional (a folder of test files and targets)
    with pytest.raises(DataError, match="v.h5: missing attribute 'max'"):
        CheckedSliceDataset(folder, "singlecoil", require_target=False)

    def replaced(key, change):
        """A fresh copy whose dataset ``key`` is replaced by ``change(its values)``."""
        fresh()
        with h5py.File(vol, "a") as hf:
            values = hf[key][()]
            del hf[key]
            hf[key] = change(values)

    replaced("reconstruction_esc", lambda target: target[:, 0])  # 2-D
    with pytest.raises(DataError, match=r"'reconstruction_esc' must be a \(slices, H, W\)"):
        CheckedSliceDataset(folder, "singlecoil")
    replaced("kspace", lambda kspace: kspace.real.astype(np.float32))
    with pytest.raises(DataError, match="v.h5: 'kspace' has dtype float32"):
        CheckedSliceDataset(folder, "singlecoil")
    fresh()
    with h5py.File(vol, "a") as hf:
        del hf["kspace"]
        hf.create_group("kspace")
    with pytest.raises(DataError, match="v.h5: 'kspace' is an HDF5 group"):
        CheckedSliceDataset(folder, "singlecoil")


def test_checked_dataset_slice_errors_name_the_path(demo_root, tmp_path):
    src = sorted((demo_root / "singlecoil_val").glob("*.h5"))[0]
    folder = tmp_path / "singlecoil_val"
    folder.mkdir()
    bad = folder / "nan.h5"
    with h5py.File(src, "r") as hin, h5py.File(bad, "w") as hout:
        for key in hin:
            hout.create_dataset(key, data=hin[key][()])
        hout.attrs.update(dict(hin.attrs))
        kspace = hout["kspace"]
        value = kspace[1]
        value[0, 0] = np.nan
        kspace[1] = value
    transform = DCCNNDataTransform(RandomMaskFunc([0.08], [4]))
    ds = CheckedSliceDataset(folder, "singlecoil", transform=transform)
    ds[0]
    with pytest.raises(DataError, match=f"^{re.escape(str(bad))} slice 1: 'kspace' holds NaN"):
        ds[1]
    with h5py.File(bad, "a") as h:  # damaged after the scan
        del h["kspace"]
    with pytest.raises(DataError, match=f"^{re.escape(str(bad))} slice 0: cannot read it"):
        ds[0]
    # a fixed mask of another width than this volume's k-space names the volume too
    bad.unlink()
    good = folder / src.name
    shutil.copy(src, good)
    with h5py.File(src, "r") as hf:
        width = hf["kspace"].shape[-1]
    narrow = FixedMaskFunc(np.ones(width - 2, dtype=bool), source="mask.npy")
    ds = CheckedSliceDataset(folder, "singlecoil", transform=DCCNNDataTransform(narrow))
    with pytest.raises(
        DataError, match=f"^{re.escape(str(good))} slice 0: mask.npy: fixed mask has width"
    ):
        ds[0]
    # a sample rate that keeps no slice says so, rather than "holds no slices"
    for rate in ({"sample_rate": 0.01}, {"volume_sample_rate": 0.01}):
        with pytest.raises(DataError, match=r"=0\.01 keeps no slices of its 1 volume"):
            CheckedSliceDataset(folder, "singlecoil", **rate)


def _reference_sample(kspace, target, sampled, num_low):
    """The transform's outputs recomputed with fastMRI's own functions (2-D centred FFTs,
    complex_mul, rss_complex, center_crop), from the sample's mask."""
    k = to_tensor(kspace).float()
    if k.dim() == 3:
        k = k.unsqueeze(0)
    height, width = target.shape
    if k.shape[-3] > height:  # readout oversampling: crop the image along H
        image = fastmri.ifft2c(k)
        top = (k.shape[-3] - height) // 2
        k = fastmri.fft2c(image[:, top : top + height])
    masked = k * sampled.float()
    coil_images = fastmri.ifft2c(masked)
    if k.shape[0] > 1:
        start = (k.shape[-2] - num_low + 1) // 2
        acs = torch.zeros_like(masked)
        acs[..., start : start + num_low, :] = masked[..., start : start + num_low, :]
        low = fastmri.ifft2c(acs)
        rss = fastmri.rss_complex(low, dim=0)
        sens = low / rss.clamp_min(1e-6 * rss.max()).unsqueeze(0).unsqueeze(-1)
        combined = fastmri.complex_mul(coil_images, fastmri.complex_conj(sens)).sum(0)
    else:
        sens, combined = None, coil_images[0]
    zero_filled = center_crop(fastmri.complex_abs(combined), (height, width))
    return masked, sens, zero_filled


@pytest.mark.parametrize(
    "coils, h, w, training",
    [
        (None, 48, 18, True),
        (None, 47, 17, False),
        (5, 48, 18, False),
        (4, 40, 21, True),
        (3, 37, 16, False),
    ],
)
@pytest.mark.filterwarnings("error::UserWarning")  # read-only input: no torch warning
def test_transform_equals_fastmris_centred_definitions(coils, h, w, training):
    # even and odd sizes, with and without readout oversampling (target height h // 2 or h)
    kspace, _, attrs = _slice(coils=coils, h=h, w=w, seed=h + w)
    kspace.setflags(write=False)  # as from a memory-mapped file
    rng = np.random.default_rng(1)
    height = h // 2 if h % 4 == 0 else h
    target = np.abs(rng.standard_normal((height, w))).astype(np.float32)
    attrs = dict(attrs, recon_size=(height, w, 1))
    transform = DCCNNDataTransform(RandomMaskFunc([0.3], [3]), training=training, seed=5)
    s = transform(kspace, None, target, attrs, "file_b.h5", 1)
    masked, sens, zero_filled = _reference_sample(kspace, target, s.mask, s.num_low_frequencies)
    tol = dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(s.masked_kspace * s.scale, masked, **tol)
    assert torch.count_nonzero(s.masked_kspace * ~s.mask) == 0
    torch.testing.assert_close(s.zero_filled * s.scale, zero_filled, **tol)
    assert s.scale == pytest.approx(float(zero_filled.max()), rel=1e-5)
    if sens is not None:
        torch.testing.assert_close(s.sens_maps, sens, **tol)
