"""Whole-file-or-nothing writers (sftkd_fastmri._io)."""

from __future__ import annotations

import os
import stat

import h5py
import numpy as np
import pytest

from sftkd_fastmri._io import atomic_write_text, save_reconstructions_atomic


def _volumes(value: float, names=("a.h5", "b.h5", "c.h5")):
    return {name: np.full((2, 4, 3), value, dtype=np.float32) for name in names}


def _read(path):
    with h5py.File(path, "r") as hf:
        return hf["reconstruction"][()]


def test_reconstructions_are_written_in_fastmris_format(tmp_path):
    out = save_reconstructions_atomic(_volumes(1.0), tmp_path / "recons")
    assert sorted(p.name for p in out.iterdir()) == ["a.h5", "b.h5", "c.h5"]  # no leftovers
    np.testing.assert_array_equal(_read(out / "b.h5"), np.ones((2, 4, 3), np.float32))


def test_an_interrupted_write_leaves_whole_files_only(tmp_path, monkeypatch):
    out = tmp_path / "recons"
    save_reconstructions_atomic(_volumes(1.0, ("a.h5", "b.h5")), out)
    real_create = h5py.Group.create_dataset
    calls = []

    def failing_create(self, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 2:  # the second file: its dataset is never written
            raise KeyboardInterrupt
        return real_create(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing_create)
    with pytest.raises(KeyboardInterrupt):
        save_reconstructions_atomic(_volumes(2.0), out)
    monkeypatch.undo()
    # no partial file and no staging folder; every file readable, old or new but whole
    assert sorted(p.name for p in out.iterdir()) == ["a.h5", "b.h5"]
    for name in ("a.h5", "b.h5"):
        assert _read(out / name).shape == (2, 4, 3)
    np.testing.assert_array_equal(_read(out / "b.h5"), np.ones((2, 4, 3), np.float32))


def test_atomic_text_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "metrics.json"
    atomic_write_text(path, "old")
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_set_of_files_is_replaced_only_when_every_one_is_written(tmp_path, monkeypatch):
    """A study's report.md / .csv / .json: a failure while writing the last leaves the three
    of the earlier report, not two new files beside an old one."""
    from sftkd_fastmri import _io

    paths = [tmp_path / "report.md", tmp_path / "report.csv", tmp_path / "report.json"]
    _io.atomic_write_texts({p: "old" for p in paths})
    written = []
    original = _io.write_temp_text

    def fail_on_the_json(path, text):
        if str(path).endswith(".json"):
            raise KeyboardInterrupt("stopped")
        written.append(path)
        return original(path, text)

    monkeypatch.setattr(_io, "write_temp_text", fail_on_the_json)
    with pytest.raises(KeyboardInterrupt):
        _io.atomic_write_texts({p: "new" for p in paths})
    assert len(written) == 2  # two were written before the failure ...
    assert [p.read_text() for p in paths] == ["old"] * 3  # ... and none replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    monkeypatch.setattr(_io, "write_temp_text", original)
    _io.atomic_write_texts({p: "new" for p in paths})
    assert [p.read_text() for p in paths] == ["new"] * 3


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_and_folders_get_the_umasks_permissions(tmp_path, umask_022):
    """Temporary names are private (mkstemp: 0600); the renamed outputs must be as readable
    as a plain open() / mkdir() makes them, so other users and services can read results."""
    import torch

    from sftkd_fastmri.data import holdout_split
    from sftkd_fastmri.evaluation import figures
    from sftkd_fastmri.models.checkpoint import atomic_torch_save

    atomic_write_text(tmp_path / "report.md", "x")
    atomic_torch_save({"a": torch.zeros(1)}, tmp_path / "model.pt")
    recons = save_reconstructions_atomic(_volumes(1.0, ("a.h5",)), tmp_path / "recons")
    val = tmp_path / "singlecoil_val"
    val.mkdir()
    for i in range(4):
        with h5py.File(val / f"f{i}.h5", "w") as hf:
            hf["kspace"] = np.ones((1, 2, 2), np.complex64)
            hf["ismrmrd_header"] = b"<ismrmrdHeader/>"
            hf["reconstruction_esc"] = np.ones((1, 2, 2), np.float32)
            hf.attrs["max"] = 1.0
    holdout_split(tmp_path, "singlecoil", fraction=0.5, mode="copy")
    paths = [tmp_path / "report.md", tmp_path / "model.pt", recons / "a.h5"]
    try:
        figures._save(figures._figure(figsize=(1, 1)), tmp_path / "psnr.png", dpi=10)
        paths.append(tmp_path / "psnr.png")
    except ImportError:  # matplotlib is an optional extra
        pass
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    for folder in (tmp_path / "singlecoil_test_heldout", tmp_path / "singlecoil_val_select"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder


def test_the_next_write_removes_what_a_killed_process_left(tmp_path):
    """A process killed with SIGKILL cannot remove its temporary file; the next write of the
    same output removes it, but never one of a live process or of another host."""
    import subprocess
    import sys

    from sftkd_fastmri._io import _owner, make_temp_dir

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that no longer runs
    host = _owner().rsplit("-", 1)[0]
    out = tmp_path / "model.onnx"
    stale = tmp_path / f".model.onnx.{host}-{gone.pid}.abc123.tmp"
    live = tmp_path / f".model.onnx.{host}-{os.getpid()}.def456.tmp"
    elsewhere = tmp_path / f".model.onnx.otherhost-{gone.pid}.ghi789.tmp"
    unrelated = tmp_path / ".model.onnx.notes"
    for p in (stale, live, elsewhere, unrelated):
        p.write_text("")
    atomic_write_text(out, "graph")
    assert out.read_text() == "graph"
    assert not stale.exists()
    assert live.exists() and elsewhere.exists() and unrelated.exists()
    # staging folders too (reconstructions, holdout splits)
    folder = tmp_path / f".partial-{host}-{gone.pid}.xyz"
    (folder / "inner").mkdir(parents=True)
    made = make_temp_dir(tmp_path, ".partial-")
    assert made.is_dir() and not folder.exists()


def test_a_long_output_name_is_written_atomically(tmp_path):
    """A name of 240 bytes is legal; the temporary's name beside it (host, pid, random part
    added) must stay under the file system's 255 bytes, and a stale one is still found."""
    import subprocess
    import sys

    from sftkd_fastmri._io import _owner, _temp_stem, make_temp_file

    out = tmp_path / ("r" * 234 + ".ckpt")
    atomic_write_text(out, "weights")
    assert out.read_text() == "weights" and os.listdir(tmp_path) == [out.name]
    assert len(make_temp_file(out).name.encode()) < 255
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f".{_temp_stem(out.name)}.{_owner().rsplit('-', 1)[0]}-{gone.pid}.x.tmp"
    stale.write_text("")
    atomic_write_text(out, "again")
    assert not stale.exists() and out.read_text() == "again"
