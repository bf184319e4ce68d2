"""Export to BIDS events, BrainVision and FIF, read back with the csv module and MNE."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

mne = pytest.importorskip("mne")
pytest.importorskip("pybv")

from acquisition.fmri import VolumeRecord  # noqa: E402
from acquisition.lsl import encode_marker  # noqa: E402
from loop.cli import main  # noqa: E402
from loop.export import (  # noqa: E402
    GAP_DESCRIPTION,
    NoContinuousDataError,
    export_bids_events,
    export_raw,
    place_on_grid,
)
from loop.recording import SessionRecorder, TrialRecord  # noqa: E402
from loop.report import read_trials  # noqa: E402

SFREQ = 250.0
FIRST_TIME = 1000.0
CHANNELS = ["ECOG001", "ECOG002", "PHOTO"]
EXPERIMENT_TEXT = '[experiment]\nname = "lang_test"\n'
STARTED = "2025-03-04T10:11:12"
STEM = "sub-01_ses-20250304T101112_task-langtest"
CONDITIONS = ["calibration", "drive", "suppress", "baseline"]
TEXTS = ["The cat sat on the mat.", 'She said "yes", then\tleft.', "Ünïcödé text, with commas",
         "Plain words again today"]


def rig_text(kind: str) -> str:
    return (f'[rig]\nname = "test"\nkind = "{kind}"\n\n[display.photodiode]\nchannel = "PHOTO"\n')


def onset_marker(trial: int) -> str:
    return encode_marker({"type": "onset", "trial": trial, "condition": CONDITIONS[trial],
                          "stimulus_id": f"s{trial}", "text": TEXTS[trial], "duration_s": 0.5})


def trial_record(trial: int, onset: float) -> TrialRecord:
    return TrialRecord(
        trial=trial, phase="calibration" if trial == 0 else "closed_loop", block=trial // 2,
        condition=CONDITIONS[trial], stimulus_id=f"s{trial}", text=TEXTS[trial], due=onset - 0.001,
        onset=onset, late_s=0.001, late=trial == 2, fallback=trial == 3,
        display_lag_s=math.nan if trial == 0 else 0.012, response_delay_s=1.3 + trial,
        trials_ahead=trial % 2, predicted=math.nan if trial == 0 else 0.5 * trial,
        predicted_sd=0.25, observed=1.0 / 3.0 + trial, epoch_ok=trial != 1,
        marker=onset_marker(trial))


def build_session(path: Path, kind: str = "simulated", n_samples: int = 2500,
                  gap: tuple[int, int] | None = None, seed: int = 0) -> dict:
    """Write a small session file: one jittered stream, markers in and outside it, four trials.

    ``gap`` drops samples [start, start + n) from the stream, as a lost stretch.
    """
    rng = np.random.default_rng(seed)
    data = rng.normal(0.0, 20.0, (n_samples, len(CHANNELS))).astype(np.float32)
    # Timestamps jitter by up to 0.8 ms around the nominal grid, and run 20 ppm fast.
    times = FIRST_TIME + np.arange(n_samples) / SFREQ * (1 + 20e-6)
    times += rng.uniform(-0.0008, 0.0008, n_samples)
    times[0] = FIRST_TIME
    if gap is not None:
        keep = np.ones(n_samples, bool)
        keep[gap[0]:gap[0] + gap[1]] = False
        data, times = data[keep], times[keep]
    recorder = SessionRecorder(path)
    recorder.write_metadata(EXPERIMENT_TEXT, rig_text(kind),
                            {"started": STARTED, "speed": 1.0,
                             "versions": {"neurosteer": "0.1.0", "platform": "Linux-test"}})
    recorder.add_stream("sim-ecog", CHANNELS, SFREQ, "src-1")
    recorder.add_chunk("sim-ecog", data[:1000], times[:1000])
    recorder.add_chunk("sim-ecog", data[1000:], times[1000:])
    markers = [(FIRST_TIME - 0.5, encode_marker({"type": "waiting", "note": "before"}))]
    onsets = [FIRST_TIME + 1.0 + 2.1 * trial + 0.0013 for trial in range(4)]
    for trial, onset in enumerate(onsets):
        markers.append((onset, onset_marker(trial)))
        recorder.add_marker(onset, onset_marker(trial))
        recorder.add_trial(trial_record(trial, onset), np.zeros(len(CHANNELS)))
    end = (times[-1] + 1.0, encode_marker({"type": "session_end", "status": "complete"}))
    recorder.add_marker(*markers[0])
    recorder.add_marker(*end)
    recorder.close()
    return {"data": data, "times": times, "markers": [*markers, end], "onsets": onsets}


@pytest.fixture
def session(tmp_path):
    path = tmp_path / "lang_test_20250304-101112.h5"
    return path, build_session(path)


def read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def parse(cell: str) -> float:
    return math.nan if cell == "n/a" else float(cell)


def inside_markers(recorded: dict, n_samples: int) -> list[tuple[float, str]]:
    duration = n_samples / SFREQ
    return sorted((time - FIRST_TIME, text) for time, text in recorded["markers"]
                  if 0 <= time - FIRST_TIME < duration)


# events.tsv


def test_events_tsv_equals_trial_table(session, tmp_path):
    path, recorded = session
    tsv, _ = export_bids_events(path, tmp_path / "out")
    rows = read_tsv(tsv)
    with h5py.File(path) as file:
        trials = read_trials(file)
    assert len(rows) == 4
    for index, row in enumerate(rows):
        assert parse(row["onset"]) == pytest.approx(trials["onset"][index] - FIRST_TIME, abs=1e-6)
        assert parse(row["duration"]) == 0.5
        assert int(row["sample"]) == round((trials["onset"][index] - FIRST_TIME) * SFREQ)
        assert row["trial_type"] == trials["condition"][index]
        assert int(row["trial"]) == trials["trial"][index]
        assert row["phase"] == trials["phase"][index]
        assert int(row["block"]) == trials["block"][index]
        assert row["stimulus_id"] == trials["stimulus_id"][index]
        assert row["stimulus_text"] == trials["text"][index]
        for name in ("predicted", "predicted_sd", "observed", "late_s", "display_lag_s",
                     "response_delay_s"):
            np.testing.assert_equal(parse(row[name]), trials[name][index])
        for name in ("late", "fallback", "epoch_ok"):
            assert row[name] == ("true" if trials[name][index] else "false")
        assert int(row["trials_ahead"]) == trials["trials_ahead"][index]
        assert parse(row["due"]) == pytest.approx(trials["due"][index] - FIRST_TIME, abs=1e-6)


def test_events_columns_in_bids_order(session, tmp_path):
    path, _ = session
    tsv, _ = export_bids_events(path, tmp_path / "out")
    header = tsv.read_text(encoding="utf-8").splitlines()[0].split("\t")
    assert header[:4] == ["onset", "duration", "sample", "trial_type"]
    assert header[4:15] == ["trial", "phase", "block", "stimulus_id", "stimulus_text", "predicted",
                            "predicted_sd", "observed", "late", "fallback", "epoch_ok"]
    assert "marker" not in header
    assert "observed_channels" not in header


def test_missing_values_written_na(session, tmp_path):
    path, _ = session
    tsv, _ = export_bids_events(path, tmp_path / "out")
    first = read_tsv(tsv)[0]
    assert first["predicted"] == "n/a"
    assert first["display_lag_s"] == "n/a"
    assert all(cell != "" for row in read_tsv(tsv) for cell in row.values())


def test_tab_in_text_is_quoted(session, tmp_path):
    path, _ = session
    tsv, _ = export_bids_events(path, tmp_path / "out")
    lines = tsv.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5
    assert '"She said ""yes"", then\tleft."' in lines[2]
    assert read_tsv(tsv)[1]["stimulus_text"] == TEXTS[1]


def test_events_sidecar_describes_columns(session, tmp_path):
    path, _ = session
    tsv, sidecar_path = export_bids_events(path, tmp_path / "out")
    sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    header = tsv.read_text(encoding="utf-8").splitlines()[0].split("\t")
    for column in header:
        assert sidecar[column]["LongName"]
        assert sidecar[column].get("Description") or sidecar[column].get("Levels")
    assert sorted(sidecar["trial_type"]["Levels"]) == sorted(CONDITIONS)
    assert sidecar["onset"]["Units"] == "s"
    assert "the first sample of stream 'sim-ecog'" in sidecar["onset"]["Description"]
    assert set(sidecar["late"]["Levels"]) == {"true", "false"}
    assert sidecar["StimulusPresentation"]["SoftwareVersion"] == "0.1.0"


def test_default_file_names_follow_bids(session, tmp_path):
    path, _ = session
    tsv, sidecar = export_bids_events(path, tmp_path / "out")
    assert tsv.name == f"{STEM}_events.tsv"
    assert sidecar.name == f"{STEM}_events.json"


def test_labels_from_options(session, tmp_path):
    path, _ = session
    tsv, _ = export_bids_events(path, tmp_path / "out", subject="P07", session="2", task="lang")
    assert tsv.name == "sub-P07_ses-2_task-lang_events.tsv"


def test_invalid_label_rejected(session, tmp_path):
    path, _ = session
    with pytest.raises(ValueError, match=r"subject 'p_07' is not a BIDS label"):
        export_bids_events(path, tmp_path / "out", subject="p_07")


def test_existing_events_not_overwritten(session, tmp_path):
    path, _ = session
    tsv, _ = export_bids_events(path, tmp_path / "out")
    # The same text again is no conflict.
    assert export_bids_events(path, tmp_path / "out")[0] == tsv
    tsv.write_text("edited by hand\n", encoding="utf-8")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        export_bids_events(path, tmp_path / "out")
    assert tsv.read_text(encoding="utf-8") == "edited by hand\n"
    export_bids_events(path, tmp_path / "out", overwrite=True)
    assert tsv.read_text(encoding="utf-8").startswith("onset\tduration\t")


def test_existing_recording_not_overwritten(session, tmp_path):
    path, _ = session
    [first] = export_raw(path, tmp_path / "out", "fif")
    with pytest.raises(FileExistsError, match=rf"{first.path.name} already exists"):
        export_raw(path, tmp_path / "out", "fif")
    # The other format goes beside it, sharing the same timing sidecar.
    [second] = export_raw(path, tmp_path / "out", "brainvision")
    assert second.sidecar == first.sidecar


# BrainVision and FIF


def test_brainvision_round_trip(session, tmp_path):
    path, recorded = session
    [written] = export_raw(path, tmp_path / "out", "brainvision")
    assert written.path.name == f"{STEM}_ieeg.vhdr"
    raw = mne.io.read_raw_brainvision(written.path, preload=True, ignore_marker_types=True,
                                      verbose="error")
    assert raw.ch_names == CHANNELS
    assert raw.info["sfreq"] == SFREQ
    # Simulated streams are in arbitrary units: misc channels, written as recorded.
    assert raw.get_channel_types() == ["misc"] * 3
    np.testing.assert_array_equal(raw.get_data(), recorded["data"].T.astype(np.float64))
    expected = inside_markers(recorded, raw.n_times)
    assert len(raw.annotations) == len(expected) == 4
    for annotation, (onset, text) in zip(raw.annotations, expected, strict=True):
        # The marker file stores onsets in whole samples.
        assert abs(annotation["onset"] - onset) <= 0.5 / SFREQ + 1e-9
        event = json.loads(text)
        assert annotation["description"] == f"onset/{event['condition']}/{event['stimulus_id']}"
        assert annotation["duration"] == pytest.approx(0.5)


def test_fif_round_trip(session, tmp_path):
    path, recorded = session
    [written] = export_raw(path, tmp_path / "out", "fif")
    assert written.path.name == f"{STEM}_ieeg.fif"
    raw = mne.io.read_raw_fif(written.path, preload=True, verbose="error")
    assert raw.ch_names == CHANNELS
    assert raw.info["sfreq"] == SFREQ
    np.testing.assert_array_equal(raw.get_data(), recorded["data"].T.astype(np.float64))
    expected = inside_markers(recorded, raw.n_times)
    annotations = mne.read_annotations(written.path)
    assert len(annotations) == len(raw.annotations) == 4
    np.testing.assert_allclose(annotations.onset, [onset for onset, _ in expected], atol=1e-9)
    assert [extra["marker"] for extra in annotations.extras] == [text for _, text in expected]
    assert list(annotations.description) == [
        f"onset/{CONDITIONS[trial]}/s{trial}" for trial in range(4)]


def test_voltage_channels_in_volts(tmp_path):
    path = tmp_path / "live.h5"
    recorded = build_session(path, kind="ecog")
    [fif] = export_raw(path, tmp_path / "out", "fif")
    [vhdr] = export_raw(path, tmp_path / "out", "brainvision")
    for raw in (mne.io.read_raw_fif(fif.path, preload=True, verbose="error"),
                mne.io.read_raw_brainvision(vhdr.path, preload=True, verbose="error")):
        ecog = raw.get_data(picks=["ECOG001", "ECOG002"])
        # Live streams are in µV, and MNE stores volts. Exact within float32.
        np.testing.assert_allclose(ecog * 1e6, recorded["data"][:, :2].T, rtol=1e-6)
        np.testing.assert_array_equal(raw.get_data(picks=["PHOTO"])[0], recorded["data"][:, 2])
    fif_raw = mne.io.read_raw_fif(fif.path, verbose="error")
    assert fif_raw.get_channel_types() == ["ecog", "ecog", "misc"]
    sidecar = json.loads(fif.sidecar.read_text(encoding="utf-8"))
    assert sidecar["ChannelUnits"] == {"ECOG001": "µV", "ECOG002": "µV", "PHOTO": "a.u."}


def test_timing_sidecar_reports_drift(session, tmp_path, caplog):
    path, recorded = session
    with caplog.at_level(logging.INFO, logger="loop.export"):
        [written] = export_raw(path, tmp_path / "out", "fif")
    sidecar = json.loads(written.sidecar.read_text(encoding="utf-8"))
    times = recorded["times"]
    drift = np.max(np.abs(times - (times[0] + np.arange(len(times)) / SFREQ)))
    assert sidecar["MaxTimestampDriftSeconds"] == pytest.approx(drift, abs=1e-12)
    assert written.max_drift_s == pytest.approx(drift, abs=1e-12)
    assert sidecar["SamplingFrequency"] == SFREQ
    assert sidecar["FirstSampleLSLTime"] == FIRST_TIME
    assert "regular series" in sidecar["TimestampHandling"]
    assert f"timestamps within {drift * 1e3:.3f} ms of the regular grid" in caplog.text


def test_markers_outside_kept_in_sidecar(session, tmp_path):
    path, _ = session
    [written] = export_raw(path, tmp_path / "out", "brainvision")
    sidecar = json.loads(written.sidecar.read_text(encoding="utf-8"))
    outside = [marker for marker in sidecar["Markers"] if not marker["in_recording"]]
    assert [marker["description"] for marker in outside] == ["waiting", "session_end"]
    assert outside[0]["onset"] == pytest.approx(-0.5)
    assert json.loads(outside[1]["marker"]) == {"type": "session_end", "status": "complete"}
    assert written.n_markers_outside == 2
    assert len(sidecar["Markers"]) == 6


def test_gap_filled_with_nan(tmp_path, caplog):
    path = tmp_path / "gap.h5"
    recorded = build_session(path, gap=(1200, 100))
    with caplog.at_level(logging.WARNING, logger="loop.export"):
        [written] = export_raw(path, tmp_path / "out", "fif")
    raw = mne.io.read_raw_fif(written.path, preload=True, verbose="error")
    data = raw.get_data()
    assert raw.n_times == 2500
    assert np.isnan(data[:, 1200:1300]).all()
    np.testing.assert_array_equal(data[:, :1200], recorded["data"][:1200].T)
    np.testing.assert_array_equal(data[:, 1300:], recorded["data"][1200:].T)
    gaps = [a for a in raw.annotations if a["description"] == GAP_DESCRIPTION]
    assert len(gaps) == 1
    assert gaps[0]["onset"] == pytest.approx(1200 / SFREQ)
    assert gaps[0]["duration"] == pytest.approx(100 / SFREQ)
    # The samples after the gap keep their place: drift stays within the jitter and rate error.
    assert written.max_drift_s < 0.002
    assert "1 gap(s), 0.400 s in all, filled with NaN" in caplog.text


def test_grid_ignores_jitter():
    times = 5.0 + np.arange(10) / 100.0 + np.array([0, 3, -3, 4, 0, -4, 2, 0, 1, 0]) * 1e-3
    indices, gaps = place_on_grid(times, 100.0)
    np.testing.assert_array_equal(indices, np.arange(10))
    assert gaps == []


# fMRI


def build_fmri_session(path: Path, with_volumes: bool = True) -> dict:
    recorder = SessionRecorder(path)
    recorder.write_metadata(EXPERIMENT_TEXT, rig_text("simulated_fmri"),
                            {"started": STARTED, "speed": 2.0})
    recorder.file.attrs.update({"tr_s": 2.0, "n_dummy_scans": 2, "volume_zero": 500.0,
                                "roi_names": json.dumps(["language", "control"])})
    period = 1.0  # 2 s TR at speed 2
    for volume in range(-2, 8):
        recorder.add_marker(500.0 + volume * period + 0.0004 * (volume % 3),
                            encode_marker({"type": "pulse", "volume": volume}))
    values = {}
    if with_volumes:
        for tr_index in range(8):
            if tr_index == 5:
                continue  # a TR whose values never came
            values[tr_index] = np.array([100.0 + tr_index / 3.0, 99.0 - tr_index / 7.0])
            recorder.add_volume(VolumeRecord(tr_index, 500.0 + tr_index + 1.4,
                                             500.0 + tr_index, values[tr_index], "on_time"))
    recorder.add_marker(502.3, onset_marker(1))
    recorder.add_trial(trial_record(1, 502.3), np.zeros(2))
    recorder.close()
    return values


def test_fmri_volumes_at_tr(tmp_path):
    path = tmp_path / "fmri.h5"
    values = build_fmri_session(path)
    [written] = export_raw(path, tmp_path / "out", "fif")
    assert written.path.name == f"{STEM}_roi_raw.fif"
    raw = mne.io.read_raw_fif(written.path, preload=True, verbose="error")
    assert raw.ch_names == ["language", "control"]
    assert raw.info["sfreq"] == 1.0
    data = raw.get_data()
    for tr_index, expected in values.items():
        np.testing.assert_array_equal(data[:, tr_index], expected)
    assert np.isnan(data[:, 5]).all()
    onsets = {a["description"]: a["onset"] for a in raw.annotations}
    assert onsets["onset/drive/s1"] == pytest.approx(2.3)
    assert onsets[GAP_DESCRIPTION] == pytest.approx(5.0)
    assert written.max_drift_s == pytest.approx(0.0008)
    tsv, _ = export_bids_events(path, tmp_path / "out")
    [row] = read_tsv(tsv)
    assert parse(row["onset"]) == pytest.approx(2.3)
    assert row["sample"] == "2"


def test_fmri_without_volumes_says_so(tmp_path):
    path = tmp_path / "fmri.h5"
    build_fmri_session(path, with_volumes=False)
    with pytest.raises(NoContinuousDataError, match="nothing continuous to export"):
        export_raw(path, tmp_path / "out", "brainvision")
    tsv, sidecar = export_bids_events(path, tmp_path / "out")
    assert parse(read_tsv(tsv)[0]["onset"]) == pytest.approx(2.3)
    assert "the pulse of volume 0" in json.loads(sidecar.read_text())["onset"]["Description"]


def test_unknown_format_rejected(session, tmp_path):
    path, _ = session
    with pytest.raises(ValueError, match="format 'edf' is not one of brainvision, fif"):
        export_raw(path, tmp_path / "out", "edf")


# Command line


def test_cli_exports_events_and_fif(session, tmp_path, capsys):
    path, _ = session
    out = tmp_path / "cli"
    code = main(["export", str(path), "--out", str(out), "--format", "fif", "--subject", "07",
                 "--session", "1", "--task", "lang"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "sub-07_ses-1_task-lang_events.json", "sub-07_ses-1_task-lang_events.tsv",
        "sub-07_ses-1_task-lang_ieeg.fif", "sub-07_ses-1_task-lang_ieeg.json"]
    assert str(out / "sub-07_ses-1_task-lang_ieeg.fif") in capsys.readouterr().out


def test_cli_default_folder_brainvision(session, capsys):
    path, _ = session
    assert main(["export", str(path)]) == 0
    out = path.with_name(f"{path.stem}_export")
    assert (out / f"{STEM}_ieeg.vhdr").is_file()
    assert (out / f"{STEM}_ieeg.eeg").is_file()
    assert (out / f"{STEM}_events.tsv").is_file()


def test_cli_fmri_without_volumes(tmp_path, capsys):
    path = tmp_path / "fmri.h5"
    build_fmri_session(path, with_volumes=False)
    assert main(["export", str(path), "--out", str(tmp_path / "out")]) == 0
    output = capsys.readouterr().out
    assert "No continuous data written:" in output
    assert "nothing continuous to export" in output


def test_cli_missing_file(tmp_path, capsys):
    code = main(["export", str(tmp_path / "none.h5")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"neurosteer: {tmp_path / 'none.h5'}: session file not found.")


def test_cli_bad_label(session, tmp_path, capsys):
    path, _ = session
    assert main(["export", str(path), "--out", str(tmp_path / "o"), "--task", "a-b"]) == 2
    assert "task 'a-b' is not a BIDS label" in capsys.readouterr().err


def test_two_streams_two_recordings(tmp_path):
    path = tmp_path / "two.h5"
    recorder = SessionRecorder(path)
    recorder.write_metadata(EXPERIMENT_TEXT, rig_text("simulated"), {"started": STARTED})
    recorder.add_stream("sim-ecog", ["ECOG001"], 100.0, "a")
    recorder.add_chunk("sim-ecog", np.ones((300, 1), np.float32), 10.0 + np.arange(300) / 100.0)
    recorder.add_stream("gaze 1", ["x", "y"], 50.0, "b")
    recorder.add_chunk("gaze 1", np.zeros((100, 2), np.float32), 11.0 + np.arange(100) / 50.0)
    recorder.add_marker(11.5, onset_marker(1))
    recorder.close()
    written = export_raw(path, tmp_path / "out", "fif")
    assert [export.path.name for export in written] == [f"{STEM}_acq-gaze1_ieeg.fif",
                                                        f"{STEM}_acq-simecog_ieeg.fif"]
    onsets = [mne.read_annotations(export.path).onset[0] for export in written]
    # Each recording's annotations count from its own first sample.
    assert onsets == [pytest.approx(0.5), pytest.approx(1.5)]


def test_unit_option_overrides_rig(tmp_path):
    path = tmp_path / "live.h5"
    recorded = build_session(path, kind="ecog")
    [written] = export_raw(path, tmp_path / "out", "fif", unit="mV")
    raw = mne.io.read_raw_fif(written.path, preload=True, verbose="error")
    np.testing.assert_allclose(raw.get_data(picks=["ECOG001"])[0] * 1e3, recorded["data"][:, 0],
                               rtol=1e-6)
    [misc] = export_raw(path, tmp_path / "misc", "fif", unit="a.u.")
    assert mne.io.read_raw_fif(misc.path, verbose="error").get_channel_types() == ["misc"] * 3


def test_stimulus_at_recording_end_cut_to_it(tmp_path):
    # The last onset comes 0.2 s before the last sample, and its stimulus lasts 0.5 s.
    last_onset = 1.0 + 2.1 * 3 + 0.0013
    n_samples = int(round((last_onset + 0.2) * SFREQ))
    path = tmp_path / "lang_test_20250304-101112.h5"
    build_session(path, n_samples=n_samples)
    [written] = export_raw(path, tmp_path / "out", "brainvision")
    raw = mne.io.read_raw_brainvision(written.path, preload=False, verbose="error")
    durations = [annotation["duration"] for annotation in raw.annotations
                 if annotation["description"].startswith("Comment/onset/")]
    assert durations[:3] == pytest.approx([0.5, 0.5, 0.5])
    assert durations[3] == pytest.approx(0.2, abs=2.0 / SFREQ)
