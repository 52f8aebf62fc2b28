"""run_config.json: the files a run starts from are compared by content, not by path."""

import json
import os
import shutil
import warnings

import pytest
import torch

from sftkd_fastmri.experiment.run_record import RUN_CONFIG_FILE, check_run_settings, run_record


def _start(run, cfg):
    run.mkdir()
    (run / RUN_CONFIG_FILE).write_text(json.dumps(run_record(cfg)))


def test_a_moved_or_copied_input_file_resumes_a_replaced_one_does_not(tmp_path):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"weights of the teacher")
    cfg = {"model": "dccnn_d3c5", "lr": 1e-3, "teacher_checkpoint": str(teacher), "methods": {}}
    run = tmp_path / "run"
    _start(run, cfg)
    record = json.loads((run / RUN_CONFIG_FILE).read_text())
    assert set(record["file_digests"]) == {"teacher_checkpoint"}
    check_run_settings(cfg, run)  # unchanged

    moved = tmp_path / "moved" / "teacher.pt"
    moved.parent.mkdir()
    shutil.copy(teacher, moved)
    check_run_settings({**cfg, "teacher_checkpoint": str(moved)}, run)  # same content

    teacher.write_bytes(b"weights of another teacher")  # replaced in place
    with pytest.raises(ValueError, match="teacher.pt' holds other content than when the run"):
        check_run_settings(cfg, run)
    with pytest.raises(ValueError, match="finished run with other settings"):
        check_run_settings(cfg, run, finished=True)
    teacher.unlink()  # gone: compared by path (the stage itself reports the missing file)
    check_run_settings(cfg, run)
    teacher.write_bytes(b"weights of another teacher")
    other = tmp_path / "other.pt"
    other.write_bytes(b"weights of another teacher")
    with pytest.raises(
        ValueError, match=r"teacher_checkpoint: '.*teacher.pt' then, '.*other.pt' now"
    ):
        check_run_settings({**cfg, "teacher_checkpoint": str(other)}, run)


def _volumes(root, seed, names=("a", "b")):
    """Two train and two val "volumes" (bytes standing in for HDF5 files) of ``seed``."""
    for split in ("multicoil_train", "multicoil_val"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for name in names:
            data = torch.Generator().manual_seed(seed * 1000 + ord(name))
            payload = torch.randint(0, 255, (20000,), dtype=torch.uint8, generator=data)
            (root / split / f"{name}.h5").write_bytes(payload.numpy().tobytes())


def test_runs_are_compared_on_their_data_and_precision(tmp_path):
    """The data a run trains on are part of what it is: moved or copied data resume; other
    volumes, or the same names with other content, at the same path or another, are refused
    (a study would otherwise score models of two data sets in one table). So is another
    precision. Neither is compared in a record of an earlier version without a digest."""
    data = tmp_path / "data"
    _volumes(data, seed=0)
    cfg = {"model": "dccnn_d3c5", "challenge": "multicoil", "data_path": str(data)}
    cfg.update(train_split="train", val_split="val", precision="32-true")
    run = tmp_path / "run"
    _start(run, cfg)
    assert json.loads((run / RUN_CONFIG_FILE).read_text())["data_digest"]
    check_run_settings(cfg, run)
    copied = tmp_path / "copied"
    shutil.copytree(data, copied)
    check_run_settings({**cfg, "data_path": str(copied)}, run)  # the same data elsewhere

    with pytest.raises(ValueError, match="precision: '32-true' then, 'bf16-mixed' now"):
        check_run_settings({**cfg, "precision": "bf16-mixed"}, run)
    # one setting, two spellings: Lightning's older names, and an empty mapping for none
    for then, now in (("32", "32-true"), ("bf16", "bf16-mixed"), (16, "16-mixed")):
        spelt = tmp_path / f"run_{then}"
        _start(spelt, {**cfg, "precision": then, "layers": {}, "model_overrides": None})
        same = {**cfg, "precision": now, "layers": None, "model_overrides": {}}
        check_run_settings(same, spelt, stage="distill")  # a KD stage: layers compared
        with pytest.raises(ValueError, match="layers: {} then"):
            check_run_settings({**same, "layers": {"at": []}}, spelt, stage="distill")
    other = tmp_path / "other"
    _volumes(other, seed=1)  # the same names and sizes, other content
    with pytest.raises(ValueError, match=r"data: .* other files .*other'.* now"):
        check_run_settings({**cfg, "data_path": str(other)}, run, finished=True)
    _volumes(data, seed=0, names=("c",))  # a volume added
    with pytest.raises(ValueError, match="data: .*as then"):
        check_run_settings(cfg, run)
    _start(tmp_path / "copied_run", {**cfg, "data_path": str(copied)})
    (copied / "multicoil_val" / "a.h5").write_bytes(b"replaced")
    with pytest.raises(ValueError, match="data: "):
        check_run_settings({**cfg, "data_path": str(copied)}, tmp_path / "copied_run")

    record = json.loads((run / RUN_CONFIG_FILE).read_text())
    del record["data_digest"]
    (run / RUN_CONFIG_FILE).write_text(json.dumps(record))
    check_run_settings({**cfg, "data_path": str(other)}, run)  # an earlier version's record


def test_validation_subsets_and_combined_splits_are_part_of_a_run(tmp_path):
    """A run that selects its checkpoints on a validation subset, or trains on the
    validation split too, is another run; a record written before these options existed
    matches a run that leaves them at their defaults."""
    cfg = {"model": "dccnn_d3c5", "challenge": "singlecoil", "sample_rate": 1.0}
    run = tmp_path / "run"
    _start(run, cfg)  # as an earlier version recorded it: none of the options
    defaults = dict(val_sample_rate=None, val_volume_sample_rate=None, combine_train_val=False)
    check_run_settings({**cfg, **defaults}, run)
    check_run_settings({**cfg, **defaults, "val_sample_rate": 1.0}, run)  # all slices, spelt out
    for key, value in (
        ("val_sample_rate", 0.5),
        ("val_volume_sample_rate", 0.25),
        ("combine_train_val", True),
    ):
        with pytest.raises(ValueError, match=f"{key}: None then, {value!r} now"):
            check_run_settings({**cfg, **defaults, key: value}, run)


def test_a_cpu_run_recorded_as_16_mixed_resumes_as_the_bf16_mixed_it_ran(tmp_path):
    """Lightning ran 16-mixed as bf16-mixed on a CPU while earlier versions recorded
    16-mixed; the commands now record and pass bf16-mixed, and such a record must match."""
    cfg = {"model": "dccnn_d3c5", "precision": "16-mixed", "accelerator": "cpu"}
    run = tmp_path / "run"
    _start(run, cfg)
    check_run_settings({**cfg, "precision": "bf16-mixed"}, run)
    with pytest.raises(ValueError, match="precision: '16-mixed' then, '32-true' now"):
        check_run_settings({**cfg, "precision": "32-true"}, run)
    # accelerator auto: where it ran shows in its checkpoint (a float16 run saves the
    # gradient scaler); without one, nothing says it ran bf16
    auto = {**cfg, "accelerator": "auto"}
    for scaler, matches in ((None, False), ({}, True), ({"scale": 65536.0}, False)):
        folder = tmp_path / f"auto_{scaler}"
        _start(folder, auto)
        if scaler is not None:
            (folder / "checkpoints").mkdir()
            state = {"epoch": 1} if not scaler else {"epoch": 1, "MixedPrecision": scaler}
            torch.save(state, folder / "checkpoints" / "last.ckpt")
        bf16 = {**cfg, "precision": "bf16-mixed"}  # a CPU run now
        if matches:
            check_run_settings(bf16, folder)
        else:
            with pytest.raises(ValueError, match="precision: '16-mixed' then"):
                check_run_settings(bf16, folder)


def test_records_without_digests_compare_paths(tmp_path):
    mask = tmp_path / "mask.npy"
    mask.write_bytes(b"0101")
    copy = tmp_path / "copy.npy"
    shutil.copy(mask, copy)
    cfg = {"model": "dccnn_d3c5", "mask_path": str(mask)}
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_CONFIG_FILE).write_text(json.dumps(cfg))  # an older record: no file_digests
    check_run_settings(cfg, run)
    with pytest.raises(ValueError, match="mask_path: "):
        check_run_settings({**cfg, "mask_path": str(copy)}, run)


def test_a_moved_run_keeps_its_best_score_when_resumed(tmp_path):
    """Lightning forgets the best score of a checkpoint whose folder moved, and would then
    replace best.ckpt with the first validation after the resume, however bad."""
    from sftkd_fastmri.experiment.builders import RunCheckpoint

    old, new = tmp_path / "old" / "checkpoints", tmp_path / "new" / "checkpoints"
    state = {
        "monitor": "validation_loss",
        "best_model_score": torch.tensor(0.25),
        "best_model_path": str(old / "best.ckpt"),
        "current_score": torch.tensor(0.3),
        "dirpath": str(old),
        "best_k_models": {str(old / "best.ckpt"): torch.tensor(0.25)},
        "kth_best_model_path": str(old / "best.ckpt"),
        "kth_value": torch.tensor(0.25),
        "last_model_path": str(old / "last.ckpt"),
    }
    callback = RunCheckpoint(dirpath=new, filename="best", monitor="validation_loss")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "dirpath has changed" from Lightning
        callback.load_state_dict(state)
    assert float(callback.best_model_score) == 0.25
    assert callback.best_model_path == str(new.resolve() / "best.ckpt")
    assert callback.last_model_path == str(new.resolve() / "last.ckpt")
    # the score a later validation must beat to replace best.ckpt (top-1)
    assert callback.best_k_models == {str(new.resolve() / "best.ckpt"): torch.tensor(0.25)}
    assert float(callback.kth_value) == 0.25


def test_run_checkpoint_reads_the_state_plain_lightning_wrote():
    """last.ckpt files written with Lightning's ModelCheckpoint (earlier runs) hold its state
    under ModelCheckpoint's key; a different key would silently drop the best score."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from sftkd_fastmri.experiment.builders import RunCheckpoint

    kwargs = dict(filename="best", monitor="validation_loss", mode="min", save_last=True)
    assert RunCheckpoint(**kwargs).state_key == ModelCheckpoint(**kwargs).state_key


def test_a_checkpoint_saved_again_digests_the_same(tmp_path):
    from sftkd_fastmri.experiment.run_record import _sha256
    from sftkd_fastmri.models import create_model, save_model_checkpoint

    torch.manual_seed(0)
    net = create_model("dccnn_d3c5", chans=4)
    a = save_model_checkpoint(net, tmp_path / "a" / "model.pt")
    b = save_model_checkpoint(net, tmp_path / "b" / "model.pt")
    assert a.read_bytes() == b.read_bytes()  # no temporary name inside the archive
    assert _sha256(a) == _sha256(b) and _sha256(a).startswith("weights:")
    with torch.no_grad():
        net.cascades[0].cnn.conv0.bias.add_(1e-3)
    assert _sha256(save_model_checkpoint(net, tmp_path / "c.pt")) != _sha256(a)


def test_digests_are_remembered_only_for_the_file_as_it_is(tmp_path, monkeypatch):
    """A study digests each input file several times; a file older than the racy window is
    hashed once, and rewriting it (new bytes, even of the same size) is hashed again."""
    from sftkd_fastmri.experiment import run_record as runs

    hashed = []
    real = runs._hash_file
    monkeypatch.setattr(runs, "_hash_file", lambda path: hashed.append(path) or real(path))
    monkeypatch.setattr(runs, "_DIGESTS_SEEN", type(runs._DIGESTS_SEEN)())
    mask = tmp_path / "mask.npy"
    mask.write_bytes(b"0" * 64)
    old = os.stat(mask).st_mtime - 60
    os.utime(mask, (old, old))
    first = runs._sha256(mask)
    assert runs._sha256(mask) == first and len(hashed) == 1
    mask.write_bytes(b"1" * 64)  # same size, new modification time
    os.utime(mask, (old + 1, old + 1))
    assert runs._sha256(mask) != first and len(hashed) == 2
    fresh = tmp_path / "fresh.npy"
    fresh.write_bytes(b"2" * 64)  # just written: within the racy window, never remembered
    runs._sha256(fresh)
    runs._sha256(fresh)
    assert len(hashed) == 4


def test_last_checkpoint_follows_every_epoch_even_when_validation_gets_worse(tmp_path):
    """Lightning 2 writes last.ckpt only when best.ckpt is replaced in the same step; a run
    whose validation stopped improving kept an old last.ckpt and lost epochs when killed."""
    import pytorch_lightning as pl

    from sftkd_fastmri.experiment.builders import build_trainer

    class Worsening(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1)

        val_dataloader = train_dataloader

        def training_step(self, batch, idx):
            return (self.w * batch).sum() + self.w.sum() * 0

        def validation_step(self, batch, idx):
            # rises every epoch: only the first validation is the best
            self.log("validation_loss", float(self.current_epoch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cfg = {"max_epochs": 3, "accumulate_grad_batches": 1, "logger": "none",
           "accelerator": "cpu", "devices": 1, "precision": "32-true", "progress": False,
           "limit_train_batches": 1.0, "limit_val_batches": 1.0}  # fmt: skip
    build_trainer(cfg, tmp_path).fit(Worsening())
    ckpt = tmp_path / "checkpoints"
    last = torch.load(ckpt / "last.ckpt", weights_only=False)
    best = torch.load(ckpt / "best.ckpt", weights_only=False)
    assert best["epoch"] == 0
    assert last["epoch"] == 2 and last["global_step"] == 6
    state = next(v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert float(state["best_model_score"]) == 0.0  # the best score survives in last.ckpt


def test_stage_records_are_relative_also_through_a_linked_folder(tmp_path):
    """Lightning writes checkpoints under the resolved folder: through a linked out_dir the
    best checkpoint was recorded absolute, so a copied stage pointed at the original."""
    import os

    from sftkd_fastmri.experiment import StageResult

    real = tmp_path / "real"
    (real / "checkpoints").mkdir(parents=True)
    link = tmp_path / "link"
    os.symlink(real, link)
    StageResult(
        "train",
        str(link),
        str(real / "checkpoints" / "best.ckpt"),  # as Lightning reports it
        {"model": str(link / "model.pt")},
        epochs=3,
    ).save()
    record = json.loads((real / "done.json").read_text())
    assert record["best_checkpoint"] == "checkpoints/best.ckpt"
    assert record["exports"] == {"model": "model.pt"} and record["out_dir"] == "."
    copy = tmp_path / "copy"
    shutil.copytree(real, copy)
    loaded = StageResult.load(copy)
    assert loaded.best_checkpoint == str(copy / "checkpoints" / "best.ckpt")
    assert loaded.exports["model"] == str(copy / "model.pt") and loaded.epochs == 3


_TINY = ["--challenge", "singlecoil", "--batch-size", "2", "--progress", "false",
         "--accelerator", "cpu", "--model", "dccnn_d3c5", "--model-overrides", "chans=4",
         "--limit-train-batches", "1"]  # fmt: skip


def _train(data, out, *extra):
    from sftkd_fastmri.cli.main import main

    return main(["train", "--data-path", str(data), *_TINY, "--out-dir", str(out), *extra])


def test_a_new_run_leaves_a_folder_that_is_no_run_and_its_own_inputs_alone(
    tiny_demo, tmp_path, capsys
):
    """A folder holding the user's model.pt (no run_config.json) lost it to a new run, even
    when it was the run's --init-checkpoint."""
    from sftkd_fastmri.models import create_model, save_model_checkpoint

    mine = tmp_path / "mine"
    weights = save_model_checkpoint(create_model("dccnn_d3c5", chans=4), mine / "model.pt")
    before = weights.read_bytes()
    assert _train(tiny_demo, mine, "--init-checkpoint", str(weights)) == 2
    assert "mine holds model.pt but no run_config.json: not a run folder" in capsys.readouterr().err
    assert weights.read_bytes() == before and not (mine / RUN_CONFIG_FILE).exists()
    # a run folder of its own: its export may not be the new run's starting point there
    run = tmp_path / "run"
    assert _train(tiny_demo, run, "--max-epochs", "1") == 0
    capsys.readouterr()
    argv = ["--resume", "false", "--init-checkpoint", str(run / "model.pt")]
    assert _train(tiny_demo, run, *argv) == 2
    err = capsys.readouterr().err
    assert "init_checkpoint" in err and "is a file of the earlier run" in err
    assert (run / "model.pt").is_file() and (run / "done.json").is_file()


def test_training_on_that_fails_to_start_keeps_the_finished_run(tiny_demo, tmp_path, capsys):
    """done.json and the deployment exports went before the data and trainer were built: a
    typo in --data-path cost the finished run its marker and exports."""
    run = tmp_path / "run"
    assert _train(tiny_demo, run, "--max-epochs", "1") == 0
    (run / "model.ts.pt").write_bytes(b"a deployment export")
    from sftkd_fastmri.cli.main import main

    argv = ["train", "--data-path", str(tmp_path / "typo"), *_TINY, "--out-dir", str(run),
            "--max-epochs", "2"]  # fmt: skip
    assert main(argv) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (run / "done.json").is_file() and (run / "model.ts.pt").is_file()
    # a run stopped between Lightning's best.ckpt and last.ckpt writes resumes from best.ckpt
    (run / "checkpoints" / "last.ckpt").unlink()
    assert _train(tiny_demo, run, "--max-epochs", "2") == 0
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1  # trained on from the first epoch, not from scratch


def test_out_dir_under_home_is_one_folder(tiny_demo, tmp_path, monkeypatch):
    """Lightning expands '~' for its checkpoints and logs, the run record did not: a literal
    '~' folder got run_config.json and model.pt, and the run never resumed."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert _train(tiny_demo, "~/run", "--max-epochs", "1") == 0
    run = tmp_path / "home" / "run"
    assert (run / RUN_CONFIG_FILE).is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "model.pt").is_file() and not (tmp_path / "~").exists()


def test_checkpoints_are_renamed_into_place(tmp_path, monkeypatch):
    """Lightning's writer staged checkpoints in $TMPDIR and moved them: across file systems
    a copy into last.ckpt, truncated by a stop."""
    from sftkd_fastmri.experiment.builders import AtomicCheckpointIO, build_trainer

    cfg = {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "precision": "32",
           "limit_train_batches": 1, "limit_val_batches": 1, "accumulate_grad_batches": 1,
           "progress": False, "logger": "none"}  # fmt: skip
    assert isinstance(build_trainer(cfg, tmp_path).strategy.checkpoint_io, AtomicCheckpointIO)
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 0}, path)

    def stopped(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 1}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 0}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left


class _Pickled:
    """Not a tensor or plain value: only a full unpickling (running code) reads it."""


def test_a_checkpoint_resumed_from_is_read_with_weights_only(tmp_path):
    """Before Lightning loads a run's checkpoint to resume, it passes a weights_only load: a
    file holding other pickled objects is refused by name instead of unpickled."""
    from sftkd_fastmri.experiment.runs import _safe_resume, _trained_epochs

    plain = tmp_path / "last.ckpt"
    torch.save({"epoch": 2, "state_dict": {"w": torch.zeros(1)}}, plain)
    assert _trained_epochs(plain) == 3
    unsafe = tmp_path / "other.ckpt"
    torch.save({"epoch": 2, "extra": _Pickled()}, unsafe)
    with pytest.raises(ValueError, match="other.ckpt: holds objects other than tensors"):
        _trained_epochs(unsafe)

    class Fit:  # Lightning >= 2.5 takes weights_only in fit
        def fit(self, model, ckpt_path=None, weights_only=None): ...

    class OldFit:
        def fit(self, model, ckpt_path=None): ...

    assert _safe_resume(Fit()) == {"weights_only": True} and _safe_resume(OldFit()) == {}
