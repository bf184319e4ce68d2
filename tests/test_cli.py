"""The neurosteer command: clear errors before a session starts, and reports from a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from loop.cli import main

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = REPO / "experiments" / "language_drive_suppress.toml"
RIG = REPO / "hardware_configs" / "simulated_ecog.toml"


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_unknown_key_one_line(tmp_path, capsys):
    experiment = tmp_path / "experiment.toml"
    experiment.write_text(EXPERIMENT.read_text().replace("iti_s = 1.0", "iti_sec = 1.0"))
    code, err = run(capsys, "run", str(experiment), "--rig", str(RIG), "--output",
                    str(tmp_path / "out"))
    assert code == 2
    assert err.strip() == (f"neurosteer: {experiment}: timing.iti_sec: unknown key; check its "
                           "spelling against docs/experiment_format.md or remove it")
    assert not (tmp_path / "out").exists()


def test_missing_model_path(tmp_path, capsys):
    experiment = tmp_path / "experiment.toml"
    missing = tmp_path / "models" / "gpt2-xl"
    experiment.write_text(EXPERIMENT.read_text().replace('name = "embedded:gemma3-270m"',
                                                         f'name = "{missing}"'))
    code, err = run(capsys, "run", str(experiment), "--rig", str(RIG), "--output",
                    str(tmp_path / "out"))
    assert code == 2
    assert err.startswith(f"neurosteer: {experiment}: model.name: Model '{missing}' was not found")
    assert "Give the path of a local model folder" in err
    assert not (tmp_path / "out").exists()


def test_missing_rig_file(tmp_path, capsys):
    code, err = run(capsys, "run", str(EXPERIMENT), "--rig", str(tmp_path / "nope.toml"))
    assert code == 2
    assert err.strip() == f"neurosteer: {tmp_path / 'nope.toml'}: file not found."


def test_live_rig_without_stream(tmp_path, capsys):
    rig = tmp_path / "rig.toml"
    rig.write_text('[rig]\nname = "bench"\nkind = "ecog"\n[lsl]\n'
                   f'data_stream = "absent-{tmp_path.name}"\nmarker_stream = "m-{tmp_path.name}"\n'
                   "resolve_timeout_s = 0.5\n")
    code, err = run(capsys, "run", str(EXPERIMENT), "--rig", str(rig), "--output",
                    str(tmp_path / "out"))
    assert code == 2
    assert f"No LSL stream named 'absent-{tmp_path.name}' appeared within 0.5 s" in err
    assert list((tmp_path / "out").glob("*.h5")) == []


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["pool", "build", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 0
    assert "usage: neurosteer" in capsys.readouterr().out


def test_relative_model_folder_beside_experiment(tmp_path):
    from loop.session import resolve_model_name

    (tmp_path / "models" / "gpt2-xl").mkdir(parents=True)
    assert resolve_model_name("models/gpt2-xl", tmp_path) == str(tmp_path / "models" / "gpt2-xl")
    assert resolve_model_name("gpt2-xl", tmp_path) == "gpt2-xl"
    assert resolve_model_name("embedded:gemma3-270m", tmp_path) == "embedded:gemma3-270m"
    assert resolve_model_name("/abs/model", tmp_path) == "/abs/model"
