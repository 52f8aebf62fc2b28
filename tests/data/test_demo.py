"""Demo data writer: fastMRI layout, consistency of targets with k-space, determinism,
disjoint splits, backends, atomic writes and re-runs."""

from __future__ import annotations

import json
import socket
import sys
import xml.etree.ElementTree as etree

import h5py
import numpy as np
import pytest
from fastmri.data import SliceDataset
from fastmri.data.mri_data import et_query

from sftkd_fastmri.data.demo import (
    FOLDER_SPLITS,
    MANIFEST_NAME,
    TARGET_KEYS,
    TEST_FULL_SPLIT,
    write_demo_data,
)
from sftkd_fastmri.data.ismrmrd import build_ismrmrd_header

# Small, odd, non-square sizes keep every test fast and catch H/W mix-ups.
SMALL = dict(
    image_size=(24, 19),
    readout_oversampling=2,
    num_coils=3,
    volumes_per_split={"train": 2, "val": 1, "test": 1},
    slices_per_volume={"train": 3, "val": 2, "test": 2},
    progress=False,
)
HEIGHT, WIDTH, KSPACE_HEIGHT = 24, 19, 48


def _ifft2c(kspace: np.ndarray) -> np.ndarray:
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes), norm="ortho"), axes)


def _target_from_kspace(kspace: np.ndarray, challenge: str) -> np.ndarray:
    image = _ifft2c(kspace.astype(np.complex128))
    top = (kspace.shape[-2] - HEIGHT) // 2
    image = np.abs(image[..., top : top + HEIGHT, :])
    return np.sqrt((image**2).sum(axis=1)) if challenge == "multicoil" else image


def _read_all(root) -> dict:
    """Every dataset of every file, keyed by (folder, file, dataset)."""
    arrays = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for fname in sorted(folder.glob("*.h5")):
            with h5py.File(fname, "r") as hf:
                for key in hf:
                    arrays[(folder.name, fname.name, key)] = hf[key][()]
    return arrays


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_phantom")
    info = write_demo_data(root, seed=3, backend="phantom", **SMALL)
    return root, info


def test_layout_read_by_slicedataset(phantom_root):
    root, info = phantom_root
    assert info.backend == "phantom"
    assert info.image_size == (HEIGHT, WIDTH) and info.kspace_size == (KSPACE_HEIGHT, WIDTH)
    assert info.num_slices == {"train": 6, "val": 2, "test": 2, TEST_FULL_SPLIT: 2}
    assert (root / MANIFEST_NAME).is_file()
    for challenge in ("singlecoil", "multicoil"):
        for split in FOLDER_SPLITS:
            folder = info.split_dir(challenge, split)
            assert folder == root / f"{challenge}_{split}" and folder.is_dir()
            dataset = SliceDataset(folder, challenge)
            assert len(dataset) == info.num_slices[split]
            coils = (3,) if challenge == "multicoil" else ()
            for i in range(len(dataset)):
                kspace, mask, target, attrs, fname, slice_num = dataset[i]
                assert kspace.shape == (*coils, KSPACE_HEIGHT, WIDTH)
                assert kspace.dtype == np.complex64
                # The header makes fastMRI's phase-encode padding (0, W): no padding.
                assert (attrs["padding_left"], attrs["padding_right"]) == (0, WIDTH)
                assert attrs["encoding_size"] == (KSPACE_HEIGHT, WIDTH, 1)
                assert attrs["recon_size"] == (HEIGHT, WIDTH, 1)
                assert attrs["acquisition"].startswith("AX")
                assert fname.startswith("file_demo_phantom_") and fname.endswith(".h5")
                if split == "test":  # fastMRI test layout: undersampled, mask, no target
                    assert target is None
                    assert mask.shape == (WIDTH,) and mask.dtype == bool
                    assert attrs["acceleration"] == 4 and attrs["num_low_frequency"] >= 1
                    assert np.all(kspace[..., ~mask] == 0)
                    assert np.all(np.abs(kspace[..., mask]) > 0)
                else:
                    assert mask is None
                    assert target.shape == (HEIGHT, WIDTH) and target.dtype == np.float32


def test_targets_and_attrs_consistent_with_kspace(phantom_root):
    root, _ = phantom_root
    for challenge in ("singlecoil", "multicoil"):
        for split in ("train", "val", TEST_FULL_SPLIT):
            for fname in (root / f"{challenge}_{split}").glob("*.h5"):
                with h5py.File(fname, "r") as hf:
                    kspace, target = hf["kspace"][()], hf[TARGET_KEYS[challenge]][()]
                    attrs = dict(hf.attrs)
                    assert "mask" not in hf
                expected = _target_from_kspace(kspace, challenge)
                np.testing.assert_allclose(target, expected, rtol=1e-5, atol=1e-6)
                assert attrs["max"] == pytest.approx(float(target.max()), rel=1e-6)
                assert attrs["norm"] == pytest.approx(np.linalg.norm(target), rel=1e-5)
                # Readout oversampling: the extra field of view is background (noise only).
                image = np.abs(_ifft2c(kspace))
                outside = np.concatenate([image[..., :8, :], image[..., -8:, :]], axis=-2)
                assert outside.max() < 0.1 * image.max()
                # Smooth random phase: the images are genuinely complex.
                complex_image = _ifft2c(kspace)
                assert np.abs(complex_image.imag).max() > 0.2 * np.abs(complex_image).max()


def test_test_split_is_test_full_undersampled(phantom_root):
    root, _ = phantom_root
    for challenge in ("singlecoil", "multicoil"):
        names = sorted(p.name for p in (root / f"{challenge}_test").glob("*.h5"))
        assert names == sorted(p.name for p in (root / f"{challenge}_test_full").glob("*.h5"))
        for name in names:
            with h5py.File(root / f"{challenge}_test" / name, "r") as hf:
                kspace, mask = hf["kspace"][()], hf["mask"][()]
                assert TARGET_KEYS[challenge] not in hf
                num_low = hf.attrs["num_low_frequency"]
            with h5py.File(root / f"{challenge}_test_full" / name, "r") as hf:
                full = hf["kspace"][()]
            np.testing.assert_array_equal(kspace, full * mask)
            pad = (WIDTH - num_low + 1) // 2  # fastMRI's fully sampled centre block
            assert mask[pad : pad + num_low].all()
            assert mask.sum() < WIDTH / 2  # 4x nominal acceleration


def test_splits_come_from_disjoint_slices(phantom_root):
    root, _ = phantom_root
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    slices = {}
    for split in ("train", "val", TEST_FULL_SPLIT):
        slices[split] = set()
        for fname in (root / f"singlecoil_{split}").glob("*.h5"):
            with h5py.File(fname, "r") as hf:
                source = hf.attrs["source_slices"]
            assert list(source) == manifest["source_slices"][fname.name]
            assert np.all(np.diff(source) > 0)  # a contiguous, ordered stack
            slices[split] |= set(source.tolist())
    assert not slices["train"] & slices["val"]
    assert not slices["train"] & slices[TEST_FULL_SPLIT]
    assert not slices["val"] & slices[TEST_FULL_SPLIT]
    assert manifest["complete"] is True


def test_same_seed_identical_different_seed_different(tmp_path, phantom_root):
    root, _ = phantom_root
    again = write_demo_data(tmp_path / "again", seed=3, backend="phantom", **SMALL).root
    other = write_demo_data(tmp_path / "other", seed=4, backend="phantom", **SMALL).root
    reference, same, different = _read_all(root), _read_all(again), _read_all(other)
    assert reference.keys() == same.keys() and len(reference) > 0
    for key, value in reference.items():
        assert np.array_equal(value, same[key]), key
    kspace_keys = [k for k in reference if k[2] == "kspace"]
    assert kspace_keys and all(not np.array_equal(reference[k], different[k]) for k in kspace_keys)


def test_nilearn_backend_is_offline(tmp_path, monkeypatch):
    pytest.importorskip("nilearn")

    def no_network(*args, **kwargs):
        raise AssertionError("the demo data writer must not use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    info = write_demo_data(tmp_path, seed=0, backend="nilearn", challenges=("singlecoil",), **SMALL)
    assert info.backend == "nilearn"
    assert sorted(info.split_dirs) == [f"singlecoil_{s}" for s in sorted(FOLDER_SPLITS)]
    assert not (tmp_path / "multicoil_train").exists()
    files = sorted((tmp_path / "singlecoil_train").glob("*.h5"))
    assert len(files) == SMALL["volumes_per_split"]["train"]
    for fname in files:
        assert fname.name.startswith("file_demo_brain_")
        with h5py.File(fname, "r") as hf:
            target = hf["reconstruction_esc"][()]
        # Anatomy fills a good part of the field of view in every slice.
        assert ((target > 0.2 * target.max()).mean(axis=(1, 2)) > 0.15).all()


def test_auto_backend_falls_back_to_phantom_with_warning(tmp_path, monkeypatch):
    # A None entry in sys.modules makes `import nilearn` raise ImportError.
    monkeypatch.setitem(sys.modules, "nilearn", None)
    monkeypatch.setitem(sys.modules, "nilearn.datasets", None)
    with pytest.warns(UserWarning, match="phantom"):
        info = write_demo_data(tmp_path / "auto", backend="auto", **SMALL)
    assert info.backend == "phantom"
    assert json.loads(info.manifest.read_text())["config"]["backend"] == "phantom"
    with pytest.raises(ImportError, match="demo"):
        write_demo_data(tmp_path / "explicit", backend="nilearn", **SMALL)


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    original = h5py.Group.create_dataset

    def fail_on_target(self, name, *args, **kwargs):
        if name == "reconstruction_esc":  # k-space is already in the file at this point
            raise RuntimeError("simulated crash")
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", fail_on_target)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_demo_data(tmp_path, backend="phantom", challenges=("singlecoil",), **SMALL)
    folder = tmp_path / "singlecoil_train"
    assert folder.is_dir() and list(folder.iterdir()) == []  # no .h5, no temporary file
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["complete"] is False

    monkeypatch.setattr(h5py.Group, "create_dataset", original)
    info = write_demo_data(tmp_path, backend="phantom", challenges=("singlecoil",), **SMALL)
    assert info.files_written == 5 and info.files_kept == 0  # train 2, val 1, test 1 (x2)
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["complete"] is True
    assert len(SliceDataset(folder, "singlecoil")) == 6


def test_an_interrupted_overwrite_resumes_into_the_new_configuration_only(tmp_path, monkeypatch):
    """An overwrite killed midway, then resumed without overwrite, kept the earlier
    configuration's files (same names and shapes) under a manifest of the new one."""
    import sftkd_fastmri.data.demo as demo

    options = dict(backend="phantom", challenges=("multicoil",), **SMALL)
    write_demo_data(tmp_path / "seed1", seed=1, **options)
    clean = _read_all(tmp_path / "seed1")
    root = tmp_path / "data"
    write_demo_data(root, seed=0, **options)
    original, calls = demo._write_h5_atomic, []

    def killed_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(demo, "_write_h5_atomic", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        write_demo_data(root, seed=1, overwrite=True, **options)
    monkeypatch.undo()
    resumed = write_demo_data(root, seed=1, **options)
    assert resumed.files_kept == 2 and resumed.files_written == 3
    after = _read_all(root)
    assert after.keys() == clean.keys()
    assert all(np.array_equal(after[k], clean[k]) for k in clean)  # every file of seed 1


def test_rerun_keeps_files_and_overwrite_replaces(tmp_path):
    options = dict(backend="phantom", challenges=("multicoil",), **SMALL)
    first = write_demo_data(tmp_path, seed=0, **options)
    # train 2 + val 1 + test 1 written to *_test and *_test_full
    assert first.files_written == 5 and first.files_kept == 0
    files = sorted(tmp_path.glob("multicoil_*/*.h5"))
    stamps = [f.stat().st_mtime_ns for f in files]

    again = write_demo_data(tmp_path, seed=0, **options)
    assert again.files_written == 0 and again.files_kept == 5
    assert [f.stat().st_mtime_ns for f in files] == stamps

    # A missing file is written again, the others kept.
    files[0].unlink()
    resumed = write_demo_data(tmp_path, seed=0, **options)
    assert resumed.files_written == 1 and resumed.files_kept == 4

    with pytest.raises(FileExistsError, match="another configuration"):
        write_demo_data(tmp_path, seed=1, **options)
    before = _read_all(tmp_path)
    replaced = write_demo_data(tmp_path, seed=1, overwrite=True, **options)
    assert replaced.files_written == 5
    after = _read_all(tmp_path)
    kspace_keys = [k for k in before if k[2] == "kspace"]
    assert all(not np.array_equal(before[k], after[k]) for k in kspace_keys)

    # Demo files of an earlier configuration are removed by overwrite=True.
    fewer = dict(options, volumes_per_split=1)
    write_demo_data(tmp_path, seed=1, overwrite=True, **fewer)
    assert len(list((tmp_path / "multicoil_train").glob("*.h5"))) == 1

    # Files this writer did not make are never mixed with demo data.
    (tmp_path / "multicoil_val" / "file1000000.h5").write_bytes(b"")
    with pytest.raises(FileExistsError, match="file1000000.h5"):
        write_demo_data(tmp_path, seed=1, overwrite=True, **fewer)
    assert (tmp_path / "multicoil_val" / "file1000000.h5").exists()


def test_demo_files_without_manifest_are_not_trusted(tmp_path):
    write_demo_data(tmp_path, backend="phantom", challenges=("singlecoil",), **SMALL)
    (tmp_path / MANIFEST_NAME).unlink()
    with pytest.raises(FileExistsError, match=MANIFEST_NAME):
        write_demo_data(tmp_path, backend="phantom", challenges=("singlecoil",), **SMALL)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(image_size=(4, 19)), "image_size"),
        (dict(readout_oversampling=0), "readout_oversampling"),
        (dict(contrasts=("T3",)), "contrasts"),
        (dict(challenges=("knee",)), "challenges"),
        (dict(backend="mri"), "backend"),
        (dict(volumes_per_split={"train": 1}), "volumes_per_split"),
        (dict(slices_per_volume=200), "axial positions"),
        (dict(test_center_fraction=1.5), "test_center_fraction"),
    ],
)
def test_invalid_options_raise(tmp_path, options, match):
    kwargs = dict(SMALL, backend="phantom")
    kwargs.update(options)
    with pytest.raises(ValueError, match=match):
        write_demo_data(tmp_path, **kwargs)


@pytest.mark.parametrize("width", [18, 19])
def test_ismrmrd_header_parsed_by_fastmri(width):
    header = build_ismrmrd_header((2 * 24, width, 1), (24, width, 1)).encode()
    root = etree.fromstring(header)
    lims = ["encoding", "encodingLimits", "kspace_encoding_step_1"]
    enc_y = int(et_query(root, ["encoding", "encodedSpace", "matrixSize", "y"]))
    padding_left = enc_y // 2 - int(et_query(root, lims + ["center"]))
    padding_right = padding_left + int(et_query(root, lims + ["maximum"])) + 1
    assert (padding_left, padding_right) == (0, width)
    assert int(et_query(root, ["encoding", "reconSpace", "matrixSize", "x"])) == 24
    with pytest.raises(ValueError, match="encoded_size"):
        build_ismrmrd_header((0, width, 1), (24, width, 1))
