"""A short vision dry run over real LSL on loopback, with the simulated vision subject.

The subject runs in its own process and responds to the image files the onset markers name. The
run is small (48-pixel images, 4 sites, a few synthesis steps), so it checks the wiring, the session
file, the report and the contact sheet. How well control works is measured by the shipped
experiment's dry run, whose figures are in docs/vision.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from acquisition.simulated import log_file_for, read_log
from loop.report import read_trials, write_report
from loop.session import SessionOptions, run_session
from loop.vision_report import summarise_vision

pytestmark = pytest.mark.models

REPO = Path(__file__).resolve().parent.parent
SITES = ["SITE001", "SITE002", "SITE003", "SITE004"]


def small_vision_experiment(tmp_path: Path, unique: str) -> tuple[Path, Path]:
    experiment = (REPO / "experiments" / "vision_population_control.toml").read_text()
    replacements = {
        "image_size = 96": "image_size = 48",
        "calibration_repeats = 2": "calibration_repeats = 1",
        "evaluation_repeats = 3": "evaluation_repeats = 1",
        "n_blocks = 2": "n_blocks = 1",
        "n_steps = 40": "n_steps = 3",
        "n_generations = 2": "n_generations = 1",
        "population_size = 8": "population_size = 4",
        'target_channels = ["SITE001", "SITE002", "SITE003", "SITE004",\n'
        '                   "SITE005", "SITE006", "SITE007", "SITE008"]':
            f"target_channels = {json.dumps(SITES)}",
    }
    for old, new in replacements.items():
        assert old in experiment
        experiment = experiment.replace(old, new)
    rig = (REPO / "hardware_configs" / "simulated_vision.toml").read_text()
    for old, new in {'"neurosteer-sim-vision"': f'"{unique}-data"',
                     '"neurosteer-markers"': f'"{unique}-markers"',
                     "n_sites = 8": "n_sites = 4", "snr = 1.0 ": "snr = 3.0 "}.items():
        assert old in rig
        rig = rig.replace(old, new)
    experiment_path, rig_path = tmp_path / "vision.toml", tmp_path / "vision_rig.toml"
    experiment_path.write_text(experiment)
    rig_path.write_text(rig)
    return experiment_path, rig_path


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("vision_dry_run")
    experiment, rig = small_vision_experiment(tmp_path, "neurosteer-vision-e2e")
    path = run_session(experiment, rig, SessionOptions(tmp_path / "sessions", speed=5.0))
    return path


def test_vision_session_complete(vision_run):
    with h5py.File(vision_run, "r") as file:
        assert file.attrs["status"] == "complete"
        assert file.attrs["stimuli"] == "images"
        trials = read_trials(file)
    # Calibration shows 36 natural images. One block has 4 sites x 2 objectives + 2 references,
    # and one generation 4 + 2 references. Evaluation shows 8 final images, the best evolved one
    # and 36 natural images.
    counts = {phase: int(np.sum(trials["phase"] == phase))
              for phase in ("calibration", "closed_loop", "evolution", "evaluation")}
    assert counts == {"calibration": 36, "closed_loop": 10, "evolution": 6, "evaluation": 45}


def test_every_image_shown_is_stored(vision_run):
    with h5py.File(vision_run, "r") as file:
        trials = read_trials(file)
        stored = set(file["stimuli/stimulus_id"].asstr()[()])
        images = file["stimuli/image"]
        assert images.dtype == np.uint8
        assert images.shape[1:] == (48, 48, 3)
        kinds = file["stimuli/kind"].asstr()[()].tolist()
    assert set(trials["stimulus_id"].tolist()) <= stored
    assert kinds.count("natural") == 36


def test_markers_name_the_image_files(vision_run):
    with h5py.File(vision_run, "r") as file:
        markers = [json.loads(text) for text in file["markers/text"].asstr()[()]]
    onsets = [marker for marker in markers if marker["type"] == "onset"]
    assert len(onsets) == 97
    for marker in onsets:
        image_file = Path(marker["image_file"])
        assert image_file.name == f"{marker['stimulus_id']}.npy"
        assert image_file.is_file()


def test_subject_responded_to_every_onset(vision_run):
    log = read_log(log_file_for(vision_run))
    assert [row["trial"] for row in log] == list(range(97))
    assert not [row for row in log if "error" in row]
    with h5py.File(vision_run, "r") as file:
        assert file["simulator/truth_raw"].shape == (97, 4)
        assert file["simulator/natural/truth_raw"].shape == (36, 4)


def test_report_and_contact_sheet(vision_run):
    summary, sheet, report = write_report(vision_run)
    results, _ = summarise_vision(vision_run)
    assert [result.site for result in results] == SITES
    for result in results:
        assert np.isfinite(result.stretch_observed)
        assert np.isfinite(result.stretch_truth)
        assert np.isfinite(result.natural_best_truth)
        assert 0.0 <= result.one_hot_share_truth <= 1.0
    assert "stretch: the synthesised image beat the best natural image at" in summary
    assert "one-hot population" in summary
    assert sheet.name.endswith("_contact_sheet.png")
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![contact sheet]" in report.read_text(encoding="utf-8")
