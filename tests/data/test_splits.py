"""Held-out test split from a fastMRI split folder: by volume, seeded, disjoint, readable."""

from __future__ import annotations

import json
import os
import re

import h5py
import numpy as np
import pytest
from fastmri.data import SliceDataset

from sftkd_fastmri.cli.main import main
from sftkd_fastmri.data import DataError, holdout_split
from sftkd_fastmri.data.datasets import TARGET_KEYS


def _fake_split(root, n, challenge="singlecoil", split="val"):
    folder = root / f"{challenge}_{split}"
    folder.mkdir(parents=True)
    for i in range(n):
        with h5py.File(folder / f"file{i:03d}.h5", "w") as hf:
            coils = () if challenge == "singlecoil" else (2,)
            hf["kspace"] = np.ones((1, *coils, 2, 2), np.complex64)
            hf["ismrmrd_header"] = b"<ismrmrdHeader/>"
            hf[TARGET_KEYS[challenge]] = np.ones((1, 2, 2), np.float32)
            hf.attrs["max"] = 1.0
    return folder


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    src = _fake_split(tmp_path, 10)
    result = holdout_split(tmp_path, "singlecoil", fraction=0.3, seed=1)
    select = sorted(os.listdir(tmp_path / "singlecoil_val_select"))
    test = sorted(os.listdir(tmp_path / "singlecoil_test_heldout"))
    assert len(test) == 3 and len(select) == 7
    assert set(select).isdisjoint(test)
    assert sorted(select + test) == sorted(os.listdir(src))  # the source is untouched
    assert (tmp_path / "singlecoil_test_heldout" / test[0]).is_symlink()
    assert sorted(result.test) == test
    manifest = json.loads((tmp_path / "holdout_singlecoil_test_heldout.json").read_text())
    assert manifest["test"] == result.test and manifest["seed"] == 1
    # same seed -> same split; another seed -> (here) another split
    other = tmp_path / "again"
    _fake_split(other, 10)
    assert holdout_split(other, "singlecoil", fraction=0.3, seed=1).test == result.test
    assert (
        holdout_split(other, "singlecoil", fraction=0.3, seed=2, overwrite=True).test != result.test
    )


def test_copies_and_existing_targets(tmp_path):
    _fake_split(tmp_path, 3, challenge="multicoil")
    holdout_split(tmp_path, "multicoil", fraction=0.5, mode="copy")
    held = list((tmp_path / "multicoil_test_heldout").iterdir())
    assert len(held) in (1, 2) and not held[0].is_symlink()
    with pytest.raises(FileExistsError, match="overwrite"):
        holdout_split(tmp_path, "multicoil", fraction=0.5)
    holdout_split(tmp_path, "multicoil", fraction=0.5, seed=3, overwrite=True)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary leftovers


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="singlecoil_val"):
        holdout_split(tmp_path, "singlecoil")
    src = _fake_split(tmp_path, 1)
    with pytest.raises(DataError, match="at least 2"):
        holdout_split(tmp_path, "singlecoil")
    (src / "notes.txt").write_text("not a volume")
    with pytest.raises(DataError, match="notes.txt"):
        holdout_split(tmp_path, "singlecoil")
    (src / "notes.txt").unlink()
    _fake_split(tmp_path, 1, split="x")
    cut = tmp_path / "singlecoil_x" / "file000.h5"
    cut.write_bytes(cut.read_bytes()[:200])  # a copy cut short
    (tmp_path / "singlecoil_x" / "file001.h5").write_bytes(
        (tmp_path / "singlecoil_val" / "file000.h5").read_bytes()
    )
    with pytest.raises(DataError, match=f"{re.escape(str(cut))}: "):
        holdout_split(tmp_path, "singlecoil", source="x")
    # fastMRI's test files (no target) cannot give a scored test split
    test = _fake_split(tmp_path, 3, split="test")
    for path in test.iterdir():
        with h5py.File(path, "r+") as hf:
            del hf["reconstruction_esc"]
            hf["mask"] = np.ones(2, np.float32)  # as fastMRI's test files
    with pytest.raises(DataError, match=r"3 of 3 volumes have no target \('reconstruction_esc'\)"):
        holdout_split(tmp_path, "singlecoil", source="test")
    # a volume the reader would refuse is refused before anything is written
    damaged = _fake_split(tmp_path, 3, split="damaged")
    with h5py.File(damaged / "file001.h5", "r+") as hf:
        del hf["kspace"]
    with pytest.raises(DataError, match="file001.h5: missing dataset 'kspace'"):
        holdout_split(tmp_path, "singlecoil", source="damaged")
    with pytest.raises(ValueError, match="fraction"):
        holdout_split(tmp_path, "singlecoil", fraction=1.0)
    # a name with a path in it failed on a temporary folder's path
    for option, name in (("select_name", "sel/x"), ("test_name", "../../escape"), ("source", "")):
        with pytest.raises(ValueError, match=f"{option} must be a plain split name"):
            holdout_split(tmp_path, "singlecoil", **{option: name})
    assert not (tmp_path / "singlecoil_test_heldout").exists()


def test_cli_split_is_read_by_slicedataset(demo_root, tmp_path, capsys):
    # a val folder of links to the demo's training volumes (more volumes than its val split)
    val = tmp_path / "multicoil_val"
    val.mkdir()
    for f in (demo_root / "multicoil_train").iterdir():
        os.symlink(f, val / f.name)
    argv = ["holdout-split", str(tmp_path), "--challenge", "multicoil", "--fraction", "0.25"]
    assert main(argv) == 0
    assert "--test-split test_heldout" in capsys.readouterr().out
    held = SliceDataset(tmp_path / "multicoil_test_heldout", challenge="multicoil")
    kept = SliceDataset(tmp_path / "multicoil_val_select", challenge="multicoil")
    names = lambda ds: {fname.name for fname, _, _ in ds.raw_samples}  # noqa: E731
    assert names(held) and names(kept) and names(held).isdisjoint(names(kept))
    assert len(held) + len(kept) == len(SliceDataset(val, challenge="multicoil"))
    assert main(argv) == 2  # exists already: a clear error, not a trace
    assert "overwrite" in capsys.readouterr().err


def test_hidden_files_are_left_out(tmp_path):
    src = _fake_split(tmp_path, 4)
    (src / ".DS_Store").write_bytes(b"\x00")  # no volume: never copied or linked
    result = holdout_split(tmp_path, "singlecoil", fraction=0.5)
    assert sorted(result.select + result.test) == [f"file{i:03d}.h5" for i in range(4)]
    for name in ("singlecoil_val_select", "singlecoil_test_heldout"):
        assert not any(p.name.startswith(".") for p in (tmp_path / name).iterdir())


def test_linked_split_survives_moving_the_data_folder(tmp_path):
    _fake_split(tmp_path / "a", 4)
    holdout_split(tmp_path / "a", "singlecoil", fraction=0.5)
    os.rename(tmp_path / "a", tmp_path / "b")  # a data folder moved or mounted elsewhere
    for name in ("singlecoil_test_heldout", "singlecoil_val_select"):
        for link in (tmp_path / "b" / name).iterdir():
            assert link.is_symlink() and not os.path.isabs(os.readlink(link))
            with h5py.File(link, "r") as hf:
                assert hf["kspace"].shape == (1, 2, 2)


def test_an_interrupted_overwrite_never_mixes_old_and_new_splits(tmp_path, monkeypatch):
    """The selection folder used to be replaced before the test folder was written: a stop
    in between left a new selection split beside the old test split, sharing volumes."""
    import shutil as shutil_module

    _fake_split(tmp_path, 10)
    first = holdout_split(tmp_path, "singlecoil", fraction=0.3, seed=1)
    real_copy = shutil_module.copy2
    copied = []

    def stopped(src, dst, *args, **kwargs):
        copied.append(dst)
        if len(copied) == 8:  # the test folder's first volume, after the whole selection
            raise KeyboardInterrupt
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil_module, "copy2", stopped)
    with pytest.raises(KeyboardInterrupt):
        holdout_split(tmp_path, "singlecoil", fraction=0.3, seed=2, mode="copy", overwrite=True)
    monkeypatch.undo()
    select = sorted(os.listdir(tmp_path / "singlecoil_val_select"))
    test = sorted(os.listdir(tmp_path / "singlecoil_test_heldout"))
    assert test == sorted(first.test) and select == sorted(first.select)  # the old pair, whole
    assert (tmp_path / "singlecoil_test_heldout" / test[0]).is_symlink()  # not the copies
    manifest = json.loads((tmp_path / "holdout_singlecoil_test_heldout.json").read_text())
    assert manifest["seed"] == 1 and sorted(manifest["test"]) == test
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporaries left


def _renames_failing_at(monkeypatch, failing_calls):
    """Make the split module's ``os.replace`` raise at the given call numbers (1-based)."""
    import sftkd_fastmri.data.splits as splits

    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) in failing_calls:
            raise OSError(f"failure {len(calls)}")
        return real_replace(src, dst)

    monkeypatch.setattr(splits.os, "replace", replace)


def test_a_failure_between_the_two_renames_puts_the_old_pair_back(tmp_path, monkeypatch):
    _fake_split(tmp_path, 10)
    first = holdout_split(tmp_path, "singlecoil", fraction=0.3, seed=1)
    manifest = tmp_path / "holdout_singlecoil_test_heldout.json"
    # Calls 1-3 set the old folders and manifest aside, 4 renames the first new folder in.
    _renames_failing_at(monkeypatch, {5})
    with pytest.raises(OSError, match="failure 5"):
        holdout_split(tmp_path, "singlecoil", fraction=0.3, seed=2, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "singlecoil_test_heldout")) == sorted(first.test)
    assert sorted(os.listdir(tmp_path / "singlecoil_val_select")) == sorted(first.select)
    assert json.loads(manifest.read_text())["seed"] == 1  # describes the folders that stayed
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.parametrize("failing", [1, 2])
def test_a_failure_setting_the_old_splits_aside_leaves_no_hidden_folder(
    tmp_path, monkeypatch, failing
):
    """The hidden holder made for an old folder stayed behind when moving it there failed."""
    _fake_split(tmp_path, 10)
    first = holdout_split(tmp_path, "singlecoil", fraction=0.3, seed=1)
    _renames_failing_at(monkeypatch, {failing})
    with pytest.raises(OSError, match=f"failure {failing}"):
        holdout_split(tmp_path, "singlecoil", fraction=0.3, seed=2, overwrite=True)
    monkeypatch.undo()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert sorted(os.listdir(tmp_path / "singlecoil_test_heldout")) == sorted(first.test)


def test_a_failed_rollback_keeps_the_old_splits_where_the_error_says(tmp_path, monkeypatch):
    _fake_split(tmp_path, 10)
    first = holdout_split(tmp_path, "singlecoil", fraction=0.3, seed=1)
    _renames_failing_at(monkeypatch, {5, 6})  # the second rename-in, then the first undo
    with pytest.raises(OSError, match="could not put the earlier split folders back") as err:
        holdout_split(tmp_path, "singlecoil", fraction=0.3, seed=2, overwrite=True)
    monkeypatch.undo()
    kept = re.search(r"they are kept as (.*): rename", str(err.value)).group(1).split(", ")
    assert len(kept) == 3 and all(not os.path.basename(k).startswith(".") for k in kept)
    folders = [k for k in kept if os.path.isdir(k)]
    contents = sorted(sorted(os.listdir(k)) for k in folders)
    assert contents == sorted([sorted(first.select), sorted(first.test)])  # nothing lost
    (manifest,) = [k for k in kept if not os.path.isdir(k)]
    assert json.loads(open(manifest).read())["seed"] == 1


def test_the_manifest_is_renamed_in_with_the_folders(tmp_path, monkeypatch):
    """The manifest used to be written after both folders were in place: a stop in between
    left it describing the earlier split. Now a failure renaming it in puts the old pair back
    too, so the manifest and the folders always agree."""
    _fake_split(tmp_path, 10)
    first = holdout_split(tmp_path, "singlecoil", fraction=0.3, seed=1)
    manifest = tmp_path / "holdout_singlecoil_test_heldout.json"
    _renames_failing_at(monkeypatch, {6})  # 1-3 set aside, 4-5 the folders in, 6 the manifest
    with pytest.raises(OSError, match="failure 6"):
        holdout_split(tmp_path, "singlecoil", fraction=0.3, seed=2, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "singlecoil_test_heldout")) == sorted(first.test)
    assert json.loads(manifest.read_text())["test"] == first.test
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    second = holdout_split(tmp_path, "singlecoil", fraction=0.3, seed=2, overwrite=True)
    assert json.loads(manifest.read_text())["test"] == second.test
    assert sorted(os.listdir(tmp_path / "singlecoil_test_heldout")) == sorted(second.test)


def test_copying_shows_progress_and_quiet_hides_it(tmp_path, capsys):
    _fake_split(tmp_path, 5)
    holdout_split(tmp_path, "singlecoil", fraction=0.4, mode="copy")
    err = capsys.readouterr().err
    assert "copying volumes" in err and "5/5" in err
    main(["holdout-split", str(tmp_path), "--challenge", "singlecoil", "--copy", "--overwrite"])
    err = capsys.readouterr().err
    assert "copying volumes" in err and "5/5" in err
    args = [str(tmp_path), "--challenge", "singlecoil", "--copy", "--overwrite", "--quiet"]
    main(["holdout-split", *args])
    assert "copying volumes" not in capsys.readouterr().err
    holdout_split(tmp_path, "singlecoil", fraction=0.4, overwrite=True)  # links: no bar
    assert "copying volumes" not in capsys.readouterr().err


def test_cli_names_the_rest_of_a_training_split_after_it(tmp_path, capsys):
    """The rest of a divided split keeps the role of its source: train_select for
    --train-split (it was named val_select whatever the source)."""
    _fake_split(tmp_path, 6, split="train")
    argv = ["holdout-split", str(tmp_path), "--challenge", "singlecoil", "--source", "train"]
    assert main(argv) == 0
    assert "(use --train-split train_select)" in capsys.readouterr().out
    assert (tmp_path / "singlecoil_train_select").is_dir()


def test_overwrite_never_replaces_a_split_it_did_not_write(tmp_path):
    """--overwrite replaces only folders an earlier holdout-split wrote: never a real split
    folder named as a destination, nor one holding other files, nor the source's data."""
    _fake_split(tmp_path, 4, split="val")
    train = _fake_split(tmp_path, 4, split="train")
    before = sorted(os.listdir(train))
    with pytest.raises(FileExistsError, match="not a split folder an earlier holdout-split"):
        holdout_split(tmp_path, "singlecoil", select_name="train", overwrite=True)
    assert sorted(os.listdir(train)) == before and not (train / "file000.h5").is_symlink()
    assert not (tmp_path / "singlecoil_test_heldout").exists()  # nothing written

    holdout_split(tmp_path, "singlecoil", fraction=0.5)  # writes val_select, test_heldout
    stray = tmp_path / "singlecoil_test_heldout" / "notes.h5"
    stray.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="did not write: \\['notes.h5'\\]"):
        holdout_split(tmp_path, "singlecoil", fraction=0.5, seed=1, overwrite=True)
    assert stray.read_bytes() == b"mine"
    stray.unlink()
    holdout_split(tmp_path, "singlecoil", fraction=0.5, seed=1, overwrite=True)  # allowed


def test_overwrite_never_replaces_the_folder_the_source_links_into(tmp_path):
    _fake_split(tmp_path, 6)
    holdout_split(tmp_path, "singlecoil", fraction=0.3, mode="copy")  # val_select: copies
    # val_select divided again by links into it; a third call must not replace val_select
    holdout_split(
        tmp_path,
        "singlecoil",
        source="val_select",
        select_name="val_select_select",
        test_name="t2",
        fraction=0.3,
    )
    copies = tmp_path / "singlecoil_val_select"
    before = sorted(os.listdir(copies))
    with pytest.raises(FileExistsError, match="holds the data of the source"):
        holdout_split(
            tmp_path,
            "singlecoil",
            source="val_select_select",
            select_name="val_select",
            test_name="t3",
            fraction=0.3,
            overwrite=True,
        )
    assert sorted(os.listdir(copies)) == before
    assert not any(p.is_symlink() for p in copies.iterdir())


def test_cli_overwrite_is_explained(capsys):
    with pytest.raises(SystemExit):
        main(["holdout-split", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "another split folder is never replaced" in out


def test_cli_role_hint_follows_the_source_name(tmp_path, capsys):
    _fake_split(tmp_path, 4, split="val_small")
    argv = ["holdout-split", str(tmp_path), "--challenge", "singlecoil", "--source", "val_small"]
    assert main(argv) == 0
    assert "(use --val-split val_small_select)" in capsys.readouterr().out
