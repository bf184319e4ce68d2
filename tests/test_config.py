"""Experiment and rig validation: every problem named with its file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from loop.config import load_experiment, load_rig
from loop.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = REPO / "experiments" / "language_drive_suppress.toml"
RIG = REPO / "hardware_configs" / "simulated_ecog.toml"


def write(tmp_path, text, name="experiment.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def shipped_with(tmp_path, old, new):
    text = EXPERIMENT.read_text(encoding="utf-8").replace(
        "builtin:pool_gemma3_270m_6w.txt", str(REPO / "tests" / "data" / "pool_small.txt"))
    assert old in text
    return write(tmp_path, text.replace(old, new))


def test_shipped_files_validate():
    experiment = load_experiment(EXPERIMENT)
    rig = load_rig(RIG)
    assert experiment.experiment.name == "language_drive_suppress"
    assert experiment.model.layers == [6, 9, 12, 15]
    assert rig.simulator.snr == 0.30
    assert len(rig.simulator.target_channels) == len(experiment.response.target_channels)


def test_unknown_key_named_with_file(tmp_path):
    path = shipped_with(tmp_path, "n_blocks = 4", "n_blocks = 4\nn_blocs = 5")
    with pytest.raises(ConfigError) as caught:
        load_experiment(path)
    assert str(caught.value) == (f"{path}: closed_loop.n_blocs: unknown key; check its spelling "
                                 "against docs/experiment_format.md or remove it")


def test_wrong_type_named_with_value(tmp_path):
    path = shipped_with(tmp_path, "n_trials = 150", 'n_trials = "many"')
    with pytest.raises(ConfigError) as caught:
        load_experiment(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: calibration.n_trials: ")
    assert "'many'" in message
    assert len(message.splitlines()) == 1


def test_every_error_listed(tmp_path):
    path = shipped_with(tmp_path, "seed = 1", 'seed = "one"\ncolour = 3')
    path.write_text(path.read_text().replace("exploration = 1.0", "exploration = -2"))
    with pytest.raises(ConfigError) as caught:
        load_experiment(path)
    lines = str(caught.value).splitlines()
    keys = sorted(line.split(": ")[1] for line in lines)
    assert keys == ["encoding.exploration", "experiment.colour", "experiment.seed"]


def test_missing_pool_file(tmp_path):
    path = shipped_with(tmp_path, "n_words = 6", "n_words = 6")
    path.write_text(path.read_text().replace(str(REPO / "tests" / "data" / "pool_small.txt"),
                                             "no_such_pool.txt"))
    with pytest.raises(ConfigError, match=r"pool\.file: file .*no_such_pool\.txt not found"):
        load_experiment(path)


def test_invalid_toml_reports_line(tmp_path):
    path = write(tmp_path, "[experiment]\nname = \n")
    with pytest.raises(ConfigError, match=rf"{path}: invalid TOML: .*line 2"):
        load_experiment(path)


def test_not_utf8_reports_byte(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("[experiment]\nname = \"caf\xe9\"\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not valid UTF-8 at byte 24 \(line 2\)"):
        load_experiment(path)


def test_window_must_end_before_next_onset(tmp_path):
    path = shipped_with(tmp_path, "tmax_s = 1.1", "tmax_s = 2.9")
    with pytest.raises(ConfigError, match="must end before the next onset"):
        load_experiment(path)


def test_rig_target_channel_out_of_range(tmp_path):
    text = RIG.read_text().replace("target_channels = [8,", "target_channels = [80,")
    path = write(tmp_path, text, "rig.toml")
    with pytest.raises(ConfigError, match=r"simulator: .*target_channels \[80\] are outside"):
        load_rig(path)


def test_simulated_rig_needs_simulator(tmp_path):
    path = write(tmp_path, '[rig]\nname = "x"\nkind = "simulated"\n', "rig.toml")
    with pytest.raises(ConfigError, match=r"needs a \[simulator\] \(sentences\) or a "
                                          r"\[vision_simulator\] \(images\) table"):
        load_rig(path)


def test_shipped_fmri_files_validate():
    experiment = load_experiment(REPO / "experiments" / "language_drive_suppress_fmri.toml")
    simulated = load_rig(REPO / "hardware_configs" / "simulated_fmri.toml")
    scanner = load_rig(REPO / "hardware_configs" / "scanner_3t.toml")
    assert experiment.response.target_channels == ["language"]
    assert simulated.is_fmri and scanner.is_fmri
    assert simulated.scanner.tr_s == scanner.scanner.tr_s == 2.0
    assert scanner.scanner.trigger == "key"
    assert scanner.zmq.address == "tcp://127.0.0.1:5570"


def test_rsvp_words_must_fit_stimulus(tmp_path):
    path = shipped_with(tmp_path, "word_duration_s = 0.3", "word_duration_s = 0.4")
    path.write_text(path.read_text().replace('mode = "sentence"', 'mode = "rsvp"'))
    with pytest.raises(ConfigError) as caught:
        load_experiment(path)
    assert str(caught.value) == (
        f"{path}: (top level): presentation.word_duration_s: in rsvp mode 6 words of 0.4 s need "
        "2.4 s, longer than timing.stimulus_duration_s (2 s). Set word_duration_s to at most "
        "0.333 s, or lengthen the stimulus")


def test_fmri_rig_needs_scanner_and_zmq(tmp_path):
    path = write(tmp_path, '[rig]\nname = "x"\nkind = "fmri"\n', "rig.toml")
    with pytest.raises(ConfigError, match=r"needs the tables \[scanner\], \[zmq\]"):
        load_rig(path)


def test_remote_zmq_address_rejected(tmp_path):
    text = (REPO / "hardware_configs" / "simulated_fmri.toml").read_text()
    path = write(tmp_path, text.replace("tcp://127.0.0.1:5571", "tcp://192.0.2.1:5571"), "rig.toml")
    with pytest.raises(ConfigError) as caught:
        load_rig(path)
    assert str(caught.value).startswith(
        f"{path}: zmq: ZeroMQ address 'tcp://192.0.2.1:5571' is not on this machine")
    assert "set `allow_remote = true` in the [zmq] section" in str(caught.value)


def test_display_without_geometry_rejected(tmp_path):
    text = RIG.read_text().replace("monitor_width_cm = 53.0\n", "")
    path = write(tmp_path, text, "rig.toml")
    with pytest.raises(ConfigError) as caught:
        load_rig(path)
    assert str(caught.value) == (
        f"{path}: display: the monitor is not described: set monitor_width_cm, or monitor_name to "
        "a monitor saved in PsychoPy's Monitor Center (visual angles depend on them)")


def test_settings_are_frozen():
    experiment = load_experiment(EXPERIMENT)
    with pytest.raises(Exception, match="frozen"):
        experiment.timing.iti_s = 3.0


def test_format_page_matches_schema():
    from loop.schema_docs import DOCS_PAGE, render

    assert DOCS_PAGE.read_text(encoding="utf-8") == render(), (
        "docs/experiment_format.md is out of date: run python -m loop.schema_docs")
