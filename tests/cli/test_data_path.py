"""Where the data folder comes from: --data-path, or fastMRI's fastmri_dirs.yaml convention."""

import warnings

import pytest

from sftkd_fastmri.experiment.builders import resolve_data_path


def _dirs_yaml(tmp_path, knee):
    config = tmp_path / "dirs.yaml"
    config.write_text(f"knee_path: {knee}\nbrain_path: /nowhere\nlog_path: {tmp_path}\n")
    return config


def test_data_config_with_dataset_reads_the_folder(tmp_path):
    knee = tmp_path / "knee"
    knee.mkdir()
    config = _dirs_yaml(tmp_path, knee)
    assert resolve_data_path({"data_config": str(config), "dataset": "knee"}) == knee


def test_data_path_wins_and_names_what_is_ignored(tmp_path):
    knee, other = tmp_path / "knee", tmp_path / "other"
    knee.mkdir()
    other.mkdir()
    config = _dirs_yaml(tmp_path, knee)
    cfg = {"data_path": str(other), "data_config": str(config), "dataset": "knee"}
    with pytest.warns(UserWarning, match="--data-config and --dataset ignored"):
        assert resolve_data_path(cfg) == other
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_data_path({"data_path": str(other)}) == other


def test_data_config_errors_name_the_file_and_the_key(tmp_path):
    config = _dirs_yaml(tmp_path, tmp_path)
    with pytest.raises(ValueError, match="needs --dataset"):
        resolve_data_path({"data_config": str(config)})
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        resolve_data_path({"data_config": str(tmp_path / "missing.yaml"), "dataset": "knee"})
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(KeyError, match="empty.yaml: no entry 'knee_path'"):
        resolve_data_path({"data_config": str(empty), "dataset": "knee"})
    with pytest.raises(FileNotFoundError, match="/nowhere does not exist"):
        resolve_data_path({"data_config": str(config), "dataset": "brain"})
    with pytest.raises(ValueError, match="no data"):
        resolve_data_path({})


def test_the_command_prints_the_package_warnings_as_lines(capsys):
    import sftkd_fastmri
    from sftkd_fastmri.cli.main import _own_warnings_as_lines

    own = sftkd_fastmri.experiment.builders.__file__
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with _own_warnings_as_lines():
            warnings.warn_explicit("--dataset ignored", UserWarning, own, 40)
            warnings.warn_explicit("--dataset ignored", UserWarning, own, 90)  # said once
            warnings.warn_explicit("from elsewhere", UserWarning, "/elsewhere/lib.py", 7)
        warnings.warn_explicit("after the command", UserWarning, own, 41)
    # only the package's warning, inside the command, became a line (the others went to
    # Python's usual display, which pytest records)
    assert capsys.readouterr().err == "warning: --dataset ignored\n"
