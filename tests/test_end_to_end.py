"""A short dry run over real LSL on loopback, checked trial by trial against the simulated subject.

The simulated subject runs in its own process (spawn) and streams 64 channels at 1000 Hz. It logs the
noise-free response it gave to every onset marker, and the session file must agree with that log.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from acquisition.epochs import ResponseWindow, epoch_response
from acquisition.simulated import log_file_for, read_log
from loop.report import read_trials, summarise, write_report
from loop.session import SessionOptions, run_session

pytestmark = pytest.mark.models

REPO = Path(__file__).resolve().parent.parent
SPEED = 10.0


def small_experiment(tmp_path: Path, unique: str) -> tuple[Path, Path]:
    experiment = (REPO / "experiments" / "language_drive_suppress.toml").read_text()
    replacements = {
        "builtin:pool_gemma3_270m_6w.txt": str(REPO / "tests" / "data" / "pool_small.txt"),
        "n_words = 6": "# no word-count filter",
        "n_trials = 150": "n_trials = 12",
        "n_blocks = 4": "n_blocks = 1",
        "n_drive = 12": "n_drive = 2",
        "n_suppress = 12": "n_suppress = 2",
        "n_baseline = 12": "n_baseline = 2",
        "n_per_condition = 50": "n_per_condition = 2",
        "layers = [6, 9, 12, 15]": "layers = [4, 8]",
    }
    for old, new in replacements.items():
        assert old in experiment
        experiment = experiment.replace(old, new)
    rig = (REPO / "hardware_configs" / "simulated_ecog.toml").read_text()
    rig = rig.replace('"neurosteer-sim-ecog"', f'"{unique}-data"')
    rig = rig.replace('"neurosteer-markers"', f'"{unique}-markers"')
    experiment_path, rig_path = tmp_path / "experiment.toml", tmp_path / "rig.toml"
    experiment_path.write_text(experiment)
    rig_path.write_text(rig)
    return experiment_path, rig_path


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("dry_run")
    experiment, rig = small_experiment(tmp_path, "neurosteer-e2e")
    path = run_session(experiment, rig, SessionOptions(tmp_path / "sessions", speed=SPEED))
    log = read_log(log_file_for(path))
    return path, log


def test_session_complete(dry_run):
    path, _ = dry_run
    with h5py.File(path, "r") as file:
        assert file.attrs["status"] == "complete"
        trials = read_trials(file)
        assert len(trials["trial"]) == 12 + 6 + 6
        assert trials["phase"].tolist() == ["calibration"] * 12 + ["closed_loop"] * 6 + \
            ["evaluation"] * 6
        assert file.attrs["chosen_layer"] in (4, 8)
        assert "model/final_state/weights" in file


def test_no_sentence_repeats(dry_run):
    path, _ = dry_run
    with h5py.File(path, "r") as file:
        texts = read_trials(file)["text"].tolist()
    assert len(set(texts)) == len(texts)


def test_trials_match_simulator_log(dry_run):
    path, log = dry_run
    with h5py.File(path, "r") as file:
        trials = read_trials(file)
        markers = [text.decode() for text in file["markers/text"][()]]
    assert [row["trial"] for row in log] == trials["trial"].tolist()
    for index, row in enumerate(log):
        # The text the subject saw is byte for byte the text recorded.
        assert row["text"].encode("utf-8") == trials["text"][index].encode("utf-8")
        # The subject's clock-corrected onset is the onset the controller stamped.
        assert row["onset"] == pytest.approx(trials["onset"][index], abs=0.002)
        assert json.loads(markers[index])["text"] == trials["text"][index]


def test_responses_epoched_from_recorded_stream(dry_run):
    path, _ = dry_run
    window = ResponseWindow(0.1, 1.1, -0.5, 0.0).scaled(SPEED)
    with h5py.File(path, "r") as file:
        trials = read_trials(file)
        stream = next(iter(file["streams"].values()))
        data, times = stream["data"][()], stream["timestamps"][()]
        channels = file["trials/observed_channels"][()]
    for index, onset in enumerate(trials["onset"]):
        expected = epoch_response(data, times, onset, window, 1000.0)
        np.testing.assert_allclose(channels[index], expected, rtol=1e-6, atol=1e-6)


def test_stream_recorded_without_gaps(dry_run):
    path, _ = dry_run
    with h5py.File(path, "r") as file:
        times = next(iter(file["streams"].values()))["timestamps"][()]
    steps = np.diff(times)
    assert steps.min() > 0
    assert steps.max() < 0.0015
    assert len(times) == pytest.approx((times[-1] - times[0]) * 1000 + 1, abs=1)


def test_observed_responses_carry_the_truth(dry_run):
    path, log = dry_run
    with h5py.File(path, "r") as file:
        channels = file["trials/observed_channels"][()]
    targets = [8, 9, 10, 11, 16, 17, 18, 19, 24, 25]
    amplitudes = np.array([row["amplitudes"] for row in log])
    residual = channels[:, targets] - amplitudes
    # Noise SD per channel and trial is 1/0.3; 240 values put the mean within about 0.22 of 0.
    # A trial epoched at the wrong time would miss its response and leave a mean near -2.
    assert abs(residual.mean()) < 0.9
    assert residual.std() == pytest.approx(1 / 0.3, rel=0.25)


def test_simulator_truth_merged_and_reported(dry_run):
    path, log = dry_run
    with h5py.File(path, "r") as file:
        np.testing.assert_array_equal(file["simulator/truth"][()], [row["truth"] for row in log])
        assert file["simulator/pool_truth"].shape == (40,)
    summaries, _ = summarise(path)
    assert [s.condition for s in summaries] == ["drive", "baseline", "suppress"]
    assert all(s.n == 2 for s in summaries)
    assert all(s.truth_percentile is not None for s in summaries)
    table, figure, report = write_report(path)
    assert figure.stat().st_size > 10_000
    assert "drive > baseline > suppress" in report.read_text()


def test_display_lag_measured_from_photodiode(dry_run):
    path, _ = dry_run
    with h5py.File(path, "r") as file:
        trials = read_trials(file)
        median = file.attrs["display_lag_median_s"]
        n_measured = file.attrs["display_lag_n_trials"]
    # The simulated photodiode lights 12 ms after each onset marker, and the first lit sample is
    # the next one on the 1 kHz grid. The 0.5 ms margins cover the simulator's clock correction.
    assert n_measured == 24
    assert trials["display_lag_s"].min() >= 0.0115
    assert trials["display_lag_s"].max() <= 0.0135
    assert 0.0115 <= median <= 0.0135


def test_frame_reports_cover_every_trial(dry_run):
    path, _ = dry_run
    with h5py.File(path, "r") as file:
        trials = read_trials(file)
        frame_trials = file["display/frames/trial"][()]
        offsets = file["display/frames/offset"][()]
        dropped = file["display/frames/n_dropped_frames"][()]
        assert file.attrs["n_fallbacks"] == 0
        assert file["display/pauses"].shape == (0, 2)
    assert frame_trials.tolist() == trials["trial"].tolist()
    durations = offsets - trials["onset"]
    # 2 s stimuli at speed 10; the headless screen wakes at most a few ms late.
    assert durations.min() >= 0.2
    assert durations.max() < 0.25
    assert dropped.tolist() == [0] * 24
    assert not trials["late"].any()
    assert not trials["fallback"].any()


@pytest.mark.display
def test_dry_run_with_psychopy_window(tmp_path, xvfb_display):
    experiment, rig = small_experiment(tmp_path, "neurosteer-e2e-display")
    path = run_session(experiment, rig, SessionOptions(tmp_path / "sessions", speed=SPEED,
                                                       display=True))
    log = read_log(log_file_for(path))
    with h5py.File(path, "r") as file:
        assert file.attrs["status"] == "complete"
        trials = read_trials(file)
    assert len(trials["trial"]) == 24
    assert [row["text"] for row in log] == trials["text"].tolist()
    # Onsets are flip times. The presenter flips when the next frame is predicted to land at the
    # due time, and Xvfb has no vsync, so an onset may come up to about one 60 Hz frame early.
    early = trials["due"] - trials["onset"]
    assert early.max() < 0.020, f"onset {early.max() * 1000:.1f} ms before its due time"
    assert (trials["onset"] - trials["due"]).max() < 0.5


@pytest.mark.display
def test_unfit_sentences_rejected_before_run(tmp_path, xvfb_display):
    from loop.text_checks import TextCheckError

    experiment, rig = small_experiment(tmp_path, "neurosteer-e2e-unfit")
    # Six words each, as the pool's word-count filter keeps.
    too_wide = "Pneumonoultramicroscopicsilicovolcanoconiosis" * 2 + " is one very long word."
    no_glyph = "The sign said 日本 in red."
    pool = (REPO / "tests" / "data" / "pool_small.txt").read_text(encoding="utf-8")
    pool_path = tmp_path / "pool.txt"
    pool_path.write_text(f"{pool.rstrip()}\n{too_wide}\n{no_glyph}\n", encoding="utf-8")
    text = experiment.read_text().replace(str(REPO / "tests" / "data" / "pool_small.txt"),
                                          str(pool_path))
    experiment.write_text(text)

    with pytest.raises(TextCheckError) as caught:
        run_session(experiment, rig, SessionOptions(tmp_path / "sessions", speed=SPEED,
                                                    display=True))
    assert [text for text, _ in caught.value.problems] == [too_wide, no_glyph]
    assert "more than the wrap width of 759 px (30 deg)" in caught.value.problems[0][1]
    assert caught.value.problems[1][1] == (
        "Font file NotoSans-Regular.ttf has no glyph for '日' (U+65E5 CJK UNIFIED IDEOGRAPH-65E5), "
        "'本' (U+672C CJK UNIFIED IDEOGRAPH-672C).")
    # No session file, and nothing from the simulated subject either.
    assert list((tmp_path / "sessions").iterdir()) == []


class StopSubjectAt:
    """Progress hooks that end the simulated subject's process after a given trial."""

    def __init__(self, trial: int) -> None:
        self.stop_after = trial

    def __call__(self, n_done: int) -> None:
        return None

    def phase(self, name: str, n_trials: int) -> None:
        return None

    def trial(self, record) -> None:
        if record.trial == self.stop_after:
            import multiprocessing

            for child in multiprocessing.active_children():
                if child.name == "neurosteer-simulator":
                    child.terminate()


class PressKeyAt(StopSubjectAt):
    """Progress hooks that press a key in the PsychoPy window after a given trial."""

    def __init__(self, trial: int, key: str) -> None:
        super().__init__(trial)
        self.key = key

    def trial(self, record) -> None:
        if record.trial == self.stop_after:
            from psychopy import event

            # PsychoPy's documented way to emulate a key press (psychopy/event.py, 2026.2).
            event._onPygletKey(self.key, 0, emulated=True)


@pytest.mark.display
def test_end_key_keeps_completed_trials(tmp_path, xvfb_display):
    from loop.errors import SessionAbortedError

    experiment, rig = small_experiment(tmp_path, "neurosteer-e2e-end")
    with pytest.raises(SessionAbortedError, match="operator ended the run") as caught:
        run_session(experiment, rig, SessionOptions(tmp_path / "sessions", speed=SPEED,
                                                    display=True),
                    progress=PressKeyAt(14, "escape"))
    path = next((tmp_path / "sessions").glob("*.h5"))
    assert str(path) in str(caught.value)
    with h5py.File(path, "r") as file:
        assert file.attrs["status"] == "ended_by_operator"
        trials = read_trials(file)
        n_rows = {name: dataset.shape[0] for name, dataset in file["trials"].items()}
        markers = [json.loads(text) for text in file["markers/text"].asstr()[()]]
    # The key is read between trials, so the run ends after trial 14 or the one after it.
    n_trials = len(trials["trial"])
    assert n_trials in (15, 16)
    assert trials["trial"].tolist() == list(range(n_trials))
    assert set(n_rows.values()) == {n_trials}
    assert np.isfinite(trials["observed"]).all()
    assert markers[-1] == {"type": "session_end", "status": "ended_by_operator"}
    onsets = [marker for marker in markers if marker["type"] == "onset"]
    assert [marker["text"] for marker in onsets[:n_trials]] == trials["text"].tolist()


def test_lost_stream_keeps_completed_trials(tmp_path):
    from acquisition.errors import StreamLostError

    experiment, rig = small_experiment(tmp_path, "neurosteer-e2e-lost")
    rig.write_text(rig.read_text().replace("resolve_timeout_s = 10.0",
                                           "resolve_timeout_s = 10.0\nreconnect_timeout_s = 3.0"))
    with pytest.raises(StreamLostError, match="neurosteer resume") as caught:
        run_session(experiment, rig, SessionOptions(tmp_path / "sessions", speed=SPEED),
                    progress=StopSubjectAt(8))
    path = next((tmp_path / "sessions").glob("*.h5"))
    assert caught.value.__notes__ == [
        f"The session stopped after 9 trials; they are kept in {path}. To continue it, run: "
        f"neurosteer resume {path}"]
    with h5py.File(path, "r") as file:
        assert file.attrs["status"] == "aborted"
        trials = read_trials(file)
    assert trials["trial"].tolist() == list(range(9))


def test_inspect_summarises_session(dry_run):
    from loop.inspect_session import inspect_session

    path, _ = dry_run
    text = inspect_session(path)
    lines = text.splitlines()
    assert lines[0] == f"Session file: {path}"
    assert "  status: complete" in lines
    assert "Trials: 24" in lines
    assert "  calibration  calibration     12" in lines
    assert "  evaluation   drive            2" in lines
    assert any(line.startswith("Stream neurosteer-e2e-data: 65 channels at 1000 Hz") for line in lines)
    assert "Model updates: fit 2, online 6" in lines
