"""Tests of ``neurosteer validate``: every problem of an experiment and a rig in one run, and the plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from loop.cli import main
from loop.validate import format_plan, validate

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = REPO / "experiments" / "language_drive_suppress.toml"
RIG = REPO / "hardware_configs" / "simulated_ecog.toml"
FMRI_EXPERIMENT = REPO / "experiments" / "language_drive_suppress_fmri.toml"
FMRI_RIG = REPO / "hardware_configs" / "simulated_fmri.toml"
SMALL_POOL = REPO / "tests" / "data" / "pool_small.txt"


def edited(tmp_path: Path, source: Path, name: str, **replacements: str) -> Path:
    text = source.read_text(encoding="utf-8")
    for old, new in replacements.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_files_pass_with_plan():
    result = validate(EXPERIMENT, RIG)
    assert result.problems == []
    assert [(phase, n) for phase, n, _ in result.plan] == [
        ("instructions", 0), ("calibration", 150), ("closed-loop block 1", 36),
        ("closed-loop block 2", 36), ("closed-loop block 3", 36), ("closed-loop block 4", 36),
        ("evaluation", 150)]
    seconds = dict((phase, s) for phase, _, s in result.plan)
    # 3 s per trial (2 s stimulus, 1 s mean interval), then the 2 s rest and one interval.
    assert seconds["instructions"] == 5.0
    assert seconds["calibration"] == 150 * 3.0 + 2.0 + 1.0
    assert seconds["closed-loop block 1"] == 36 * 3.0 + 2.0 + 1.0
    table = format_plan(result, speed=10.0)
    assert table.splitlines()[-2] == f"{'total':<22} {444:>6} {'2 min 15.5 s':>10}"


def test_fmri_plan_waits_for_responses():
    result = validate(FMRI_EXPERIMENT, FMRI_RIG)
    assert result.problems == []
    seconds = dict((phase, s) for phase, _, s in result.plan)
    # 4 s per trial, then the 4 s rest, one 2 s interval and the 12 s until the last response.
    assert seconds["calibration"] == 150 * 4.0 + 4.0 + 2.0 + 12.0


def test_vision_plan_counts_images():
    result = validate(REPO / "experiments" / "vision_population_control.toml",
                      REPO / "hardware_configs" / "simulated_vision.toml")
    assert result.problems == []
    # Calibration shows 36 natural images twice. A block has 8 sites x 2 objectives + 2
    # references, and a generation 8 + 2 references. Evaluation shows 16 final images, the best
    # evolved one and 36 natural images, 3 times each.
    assert [(phase, n) for phase, n, _ in result.plan] == [
        ("instructions", 0), ("calibration", 72), ("synthesis block 1", 18),
        ("synthesis block 2", 18), ("evolution generation 1", 10),
        ("evolution generation 2", 10), ("evaluation", 159)]


def test_vision_experiment_on_language_rig_rejected():
    result = validate(REPO / "experiments" / "vision_population_control.toml", RIG)
    assert result.problems == [
        f"{RIG}: simulator: this simulated subject responds to sentences, and "
        "vision_population_control.toml shows images. Use a rig with a [vision_simulator] table, "
        "e.g. hardware_configs/simulated_vision.toml."]


def test_language_experiment_on_vision_rig_rejected():
    rig = REPO / "hardware_configs" / "simulated_vision.toml"
    result = validate(EXPERIMENT, rig)
    assert result.problems == [
        f"{rig}: vision_simulator: this simulated subject responds to images, and "
        "language_drive_suppress.toml shows sentences. Use a rig with a [simulator] table, e.g. "
        "hardware_configs/simulated_ecog.toml."]


def test_targets_that_do_not_respond_flagged(tmp_path):
    experiment = edited(tmp_path, EXPERIMENT, "experiment.toml", **{
        '"ECOG009", "ECOG010", "ECOG011", "ECOG012", "ECOG017"': '"ECOG030", "ECOG031"',
        '"ECOG018", "ECOG019", "ECOG020", "ECOG025", "ECOG026"]': ']'})
    result = validate(experiment, RIG)
    assert result.problems == [
        f"{experiment}: response.target_channels: ['ECOG030', 'ECOG031'] do not respond in the "
        "simulated subject of simulated_ecog.toml, whose responsive channels "
        "(simulator.target_channels) are ECOG009..ECOG026, so a dry run would show no control. "
        "Change simulator.target_channels in the rig, or the targets."]


def test_every_problem_listed(tmp_path):
    experiment = edited(
        tmp_path, FMRI_EXPERIMENT, "experiment.toml",
        **{"builtin:pool_gemma3_270m_6w.txt": str(SMALL_POOL),
           'target_channels = ["language"]': 'target_channels = ["visual"]',
           "estimable_after_s = 12.0": "estimable_after_s = 4.0",
           "stimulus_duration_s = 2.0": "stimulus_duration_s = 1.0", "iti_s = 2.0": "iti_s = 0.5",
           "iti_jitter_s = 1.0": "iti_jitter_s = 0.25"})
    result = validate(experiment, FMRI_RIG)
    assert result.problems == [
        f"{experiment}: pool.file: 40 sentences, but the plan shows 324 different ones. Use a "
        "larger pool, or fewer trials.",
        f"{experiment}: response.target_channels: ['visual'] are not ROIs of the rig's "
        "zmq.roi_names ['language', 'control'].",
        f"{experiment}: response.estimable_after_s: 4 s is too early for TR 2 s; the HRF peaks "
        "about 5 s after onset, so use at least 8 s.",
        f"{experiment}: timing: onsets can come 1.25 s apart, less than one TR (2 s in {FMRI_RIG}), "
        "so trials would share volumes too closely to separate. Lengthen timing.iti_s or shorten "
        "the jitter.",
    ]


def test_both_invalid_files_listed(tmp_path):
    experiment = edited(tmp_path, EXPERIMENT, "experiment.toml",
                        **{"n_blocks = 4": "n_blocks = 4\nn_blocs = 5"})
    rig = edited(tmp_path, RIG, "rig.toml", **{"sfreq = 1000.0": "sfreq = -1.0"})
    result = validate(experiment, rig)
    assert len(result.problems) == 2
    assert result.problems[0].startswith(f"{experiment}: closed_loop.n_blocs: unknown key")
    assert result.problems[1].startswith(f"{rig}: simulator.sfreq: Input should be greater than 0")
    assert result.plan == []


def test_command_exit_code_and_output(tmp_path, capsys):
    assert main(["validate", str(EXPERIMENT), "--rig", str(RIG)]) == 0
    assert "no problems found" in capsys.readouterr().out

    rig = edited(tmp_path, RIG, "rig.toml", **{"target_channels = [8,": "target_channels = [80,"})
    assert main(["validate", str(EXPERIMENT), "--rig", str(rig)]) == 2
    error = capsys.readouterr().err
    assert error.strip().splitlines()[0] == "1 problem(s):"
    assert "target_channels [80] are outside 0..63" in error


@pytest.mark.display
def test_display_check_names_unfit_sentence(tmp_path, xvfb_display):
    pool = tmp_path / "pool.txt"
    too_wide = "Pneumonoultramicroscopicsilicovolcanoconiosis" * 2 + " is one very long word."
    pool.write_text(SMALL_POOL.read_text(encoding="utf-8").rstrip() + f"\n{too_wide}\n",
                    encoding="utf-8")
    experiment = edited(tmp_path, EXPERIMENT, "experiment.toml",
                        **{"builtin:pool_gemma3_270m_6w.txt": str(pool), "n_trials = 150": "n_trials = 10",
                           "n_per_condition = 50": "n_per_condition = 2", "n_blocks = 4": "n_blocks = 0"})
    result = validate(experiment, RIG, display=True)
    assert len(result.problems) == 1
    assert result.problems[0].startswith(f"{experiment}: presentation: sentence {too_wide!r}: It is ")
