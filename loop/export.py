"""Export a session file for other tools: BIDS trial events, and continuous data that MNE reads.

Runs wherever the session file is (``neurosteer export``); it only reads the session file and
writes into an output folder. The trial table goes to a BIDS ``events.tsv`` with its JSON sidecar.
Each stream in ``streams/`` (or, for fMRI, the per-TR ROI values) goes to BrainVision (pybv) or FIF
(MNE), every marker an annotation, with a JSON sidecar on timing.

NOTE: a stream is read whole into memory as float64, 1.8 GB per hour of 64 channels at 1 kHz, and
pybv and MNE copy it once more while writing (an estimate from the code, not measured).
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import logging
import math
import re
import tomllib
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np

from loop.report import read_trials

logger = logging.getLogger(__name__)

NA = "n/a"
FORMATS = ("brainvision", "fif")
BIDS_LABEL = re.compile(r"^[A-Za-z0-9]+$")

# A step between two timestamps longer than this (and than two sample periods) that leaves the
# grid behind by a sample or more is a gap: LSL lost samples there, or the stream stalled.
GAP_THRESHOLD_S = 0.1
GAP_DESCRIPTION = "BAD_gap"

# "µ" is the micro sign; "μ" (Greek mu) and "u" are accepted for it.
VOLTS_PER_UNIT = {"V": 1.0, "mV": 1e-3, "µV": 1e-6, "μV": 1e-6, "uV": 1e-6, "nV": 1e-9}
# Channel type of voltage data, by rig kind; "simulated" is the simulated ECoG amplifier.
VOLTAGE_CHANNEL_TYPES = {"ecog": "ecog", "simulated": "ecog", "eeg": "eeg"}
# Rig kinds whose streams come from a real amplifier. LSL amplifier apps mostly send µV, while the
# simulated subject sends arbitrary units.
LIVE_KINDS = ("ecog", "eeg")


class ExportError(RuntimeError):
    """A session file that cannot be exported as requested; the message gives the reason."""


class NoContinuousDataError(ExportError):
    """The session file has no stream with samples and no fMRI volumes."""


# Labels and file names


@dataclass(frozen=True)
class BidsLabels:
    """The BIDS entities of the exported files; ``session`` None leaves ``ses-`` out."""

    subject: str
    session: str | None
    task: str

    @property
    def stem(self) -> str:
        parts = [f"sub-{self.subject}"]
        if self.session:
            parts.append(f"ses-{self.session}")
        parts.append(f"task-{self.task}")
        return "_".join(parts)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _experiment_name(file: h5py.File, session_path: Path) -> str:
    """Return the experiment's name: from the effective settings, the verbatim file, or the file name."""
    if "config/experiment_effective" in file:
        try:
            return json.loads(_text(file["config/experiment_effective"][()]))["experiment"]["name"]
        except (ValueError, KeyError, TypeError):
            pass
    if "config/experiment" in file:
        try:
            return tomllib.loads(_text(file["config/experiment"][()]))["experiment"]["name"]
        except (tomllib.TOMLDecodeError, KeyError, TypeError):
            pass
    # Session files are named <experiment>_<YYYYmmdd-HHMMSS>.h5.
    return re.sub(r"_\d{8}-\d{6}$", "", session_path.stem)


def _check_label(value: str, option: str) -> str:
    if not BIDS_LABEL.match(value):
        raise ValueError(f"{option} {value!r} is not a BIDS label: use letters and digits only "
                         "(no '_', '-' or spaces), e.g. '01'.")
    return value


def bids_labels(file: h5py.File, session_path: Path, subject: str | None = None,
                session: str | None = None, task: str | None = None) -> BidsLabels:
    """Return the BIDS labels: those given, else subject ``01``, the start time and the experiment."""
    if task is None:
        task = re.sub(r"[^A-Za-z0-9]", "", _experiment_name(file, session_path)) or "neurosteer"
    if session is None and "started" in file.attrs:
        session = re.sub(r"[^A-Za-z0-9]", "", _text(file.attrs["started"])) or None
    return BidsLabels(
        subject=_check_label(subject if subject is not None else "01", "subject"),
        session=_check_label(session, "session") if session else None,
        task=_check_label(task, "task"),
    )


def _refuse_existing(data_files: list[Path], texts: dict[Path, str], overwrite: bool) -> None:
    """Raise FileExistsError for an output file that exists, unless ``overwrite``.

    A text file that already contains the same text is no conflict, so a second format can be
    written beside the first.
    """
    if overwrite:
        return
    existing = [path for path in data_files if path.exists()]
    existing += [path for path, text in texts.items()
                 if path.exists() and path.read_text(encoding="utf-8") != text]
    if existing:
        raise FileExistsError(f"{existing[0]} already exists; pass overwrite=True (--overwrite) "
                              "to replace it, or choose another output folder.")


# Time reference: onset 0 is the recording's first sample


@dataclass(frozen=True)
class TimeReference:
    """Onset 0 of the exports: its LSL time, its meaning, and the rate for the ``sample`` column.

    ``sfreq`` is None when there is no recording, so no ``sample`` column.
    """

    first_time: float
    sfreq: float | None
    description: str


def _stream_names(file: h5py.File) -> list[str]:
    """Return the streams that have samples, in name order."""
    streams = file.get("streams", {})
    return sorted(name for name, group in streams.items() if group["timestamps"].shape[0] > 0)


def _fmri_timing(file: h5py.File) -> tuple[float, float]:
    """Return the LSL time of volume 0's pulse and the TR as run (the nominal TR over --speed)."""
    missing = [key for key in ("tr_s", "volume_zero") if key not in file.attrs]
    if missing:
        raise ExportError(f"The session file has fMRI volumes but no {' or '.join(missing)} "
                          "attribute, so the volumes cannot be placed in time.")
    period = float(file.attrs["tr_s"]) / float(file.attrs.get("speed", 1.0))
    return float(file.attrs["volume_zero"]), period


def time_reference(file: h5py.File, stream: str | None = None) -> TimeReference:
    """Return onset 0 of the session's exports: the first sample of ``stream`` (default: the first
    stream with samples), else the first fMRI volume's pulse, else the first marker or trial."""
    names = _stream_names(file)
    if stream is not None and stream not in names:
        raise ValueError(f"stream {stream!r} is not a stream with samples in this session file; "
                         f"it has {names or 'none'}.")
    if names:
        name = stream or names[0]
        group = file["streams"][name]
        first_time = float(group["timestamps"][0])
        return TimeReference(first_time, float(group.attrs["sfreq"]),
                             f"the first sample of stream {name!r} (LSL time {first_time:.6f} s)")
    if "fmri/volumes/tr_index" in file and file["fmri/volumes/tr_index"].shape[0] > 0:
        volume_zero, period = _fmri_timing(file)
        first_volume = int(file["fmri/volumes/tr_index"][()].min())
        first_time = volume_zero + first_volume * period
        return TimeReference(first_time, 1.0 / period,
                             f"the pulse of volume {first_volume}, the first recorded (LSL time "
                             f"{first_time:.6f} s)")
    if "volume_zero" in file.attrs:
        first_time = float(file.attrs["volume_zero"])
        return TimeReference(first_time, None,
                             f"the pulse of volume 0 (LSL time {first_time:.6f} s)")
    if "markers/timestamp" in file and file["markers/timestamp"].shape[0] > 0:
        first_time = float(file["markers/timestamp"][0])
        return TimeReference(first_time, None,
                             f"the session's first marker (LSL time {first_time:.6f} s); the "
                             "session file has no continuous recording")
    return TimeReference(0.0, None, "LSL time 0; the session file has no recording or marker")


# Trial events: events.tsv and its sidecar

# Trial-table columns that lead the events file, after onset, duration, sample and trial_type.
LEADING_COLUMNS = ("trial", "phase", "block", "stimulus_id", "text", "predicted", "predicted_sd",
                   "observed", "late", "fallback", "epoch_ok")
# Trial-table columns written under another name.
RENAMED_COLUMNS = {"text": "stimulus_text", "condition": "trial_type"}
# Columns on the LSL clock, written relative to onset 0 like the onset.
CLOCK_COLUMNS = ("due",)
# The onset marker's JSON repeats the other columns; the onset is written as ``onset``.
LEFT_OUT_COLUMNS = ("onset", "condition", "marker")

CONDITION_LEVELS = {
    "calibration": "Diverse pool sentence shown before the first model fit.",
    "drive": "Sentence the encoding model predicts to raise the target response most.",
    "suppress": "Sentence the encoding model predicts to lower the target response most.",
    "baseline": "Random pool sentence, the reference for drive and suppress.",
}
PHASE_LEVELS = {
    "calibration": "Diverse sentences shown before the first model fit.",
    "closed_loop": "Blocks of drive, suppress and baseline trials, the model refitted as it goes.",
    "evaluation": "Fresh sentences chosen by the final model, one set per condition.",
}
COLUMN_INFO = {
    "onset": {"LongName": "Onset", "Units": "s"},
    "duration": {"LongName": "Stimulus duration",
                 "Description": "Time the stimulus stayed on screen, from its onset marker.",
                 "Units": "s"},
    "sample": {"LongName": "Onset sample",
               "Description": "Index of the onset in the exported continuous recording, from 0."},
    "trial_type": {"LongName": "Condition",
                   "Description": "Why the stimulus was chosen."},
    "trial": {"LongName": "Trial number",
              "Description": "Index of the trial in the session, from 0."},
    "phase": {"LongName": "Phase", "Description": "Phase of the session.", "Levels": PHASE_LEVELS},
    "block": {"LongName": "Block number",
              "Description": "Closed-loop block, from 0; 0 in the other phases."},
    "stimulus_id": {"LongName": "Stimulus identifier",
                    "Description": "Identifier of the sentence in the candidate pool."},
    "stimulus_text": {"LongName": "Stimulus text", "Description": "The text shown, exactly."},
    "predicted": {"LongName": "Predicted response",
                  "Description": "Encoding model's prediction of the target response when the "
                                 "stimulus was chosen, in the units of the recording; n/a before "
                                 "the first model fit."},
    "predicted_sd": {"LongName": "Predictive SD",
                     "Description": "SD of that prediction, in the units of the recording."},
    "observed": {"LongName": "Observed response",
                 "Description": "Mean baseline-corrected response of the target channels (fMRI: "
                                "the online GLM estimate), in the units of the recording; n/a "
                                "when the response could not be measured."},
    "observed_final": {"LongName": "Final fMRI response estimate",
                       "Description": "GLM estimate of the response from every volume of the "
                                      "run; the report uses it in place of observed."},
    "late": {"LongName": "Late onset", "Levels": {
        "true": "The onset came more than 20 ms after its due time.",
        "false": "The onset came on time."}},
    "fallback": {"LongName": "Fallback stimulus", "Levels": {
        "true": "The fallback stimulus was shown, because the choice came too late.",
        "false": "The chosen stimulus was shown."}},
    "epoch_ok": {"LongName": "Response measured", "Levels": {
        "true": "The response window was complete.",
        "false": "The response window overlapped a gap in the recording; observed is n/a."}},
    "due": {"LongName": "Due time",
            "Description": "Time the onset was scheduled for, relative to onset 0.", "Units": "s"},
    "late_s": {"LongName": "Onset delay",
               "Description": "Onset minus due time.", "Units": "s"},
    "display_lag_s": {"LongName": "Display lag",
                      "Description": "Delay of the photodiode's response after the onset; n/a "
                                     "without a photodiode channel.", "Units": "s"},
    "response_delay_s": {"LongName": "Response delay",
                         "Description": "Time from the onset until the response was recorded.",
                         "Units": "s"},
    "trials_ahead": {"LongName": "Trials ahead",
                     "Description": "Trials shown after this one by the time its response was "
                                    "recorded."},
}


def _format_value(value, clock: bool = False) -> str:
    """Format one cell as BIDS requires: n/a for missing values, a dot as decimal separator."""
    if value is None:
        return NA
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return NA
        # Times to the microsecond, well below the LSL clock's precision; other values exactly.
        return f"{float(value):.6f}" if clock else repr(float(value))
    text = str(value)
    return text if text else NA


def _onset_duration(marker_text: str) -> float | None:
    try:
        duration = json.loads(marker_text).get("duration_s")
    except (ValueError, AttributeError):
        return None
    return float(duration) if isinstance(duration, (int, float)) else None


def _final_estimates(file: h5py.File) -> dict[int, float] | None:
    if "fmri/refreshed/observed" not in file:
        return None
    return dict(zip(file["fmri/refreshed/trial"][()].tolist(),
                    file["fmri/refreshed/observed"][()].tolist(), strict=True))


def _events_table(trials: dict[str, np.ndarray], reference: TimeReference,
                  final: dict[int, float] | None) -> tuple[list[str], list[list[str]]]:
    """Return the header and rows of events.tsv, one row per trial."""
    n_trials = len(trials.get("trial", []))
    scalar = [name for name, column in trials.items() if column.ndim == 1]
    leading = [name for name in LEADING_COLUMNS if name in scalar]
    rest = [name for name in scalar if name not in leading and name not in LEFT_OUT_COLUMNS]
    columns = ["onset", "duration"]
    if reference.sfreq is not None:
        columns.append("sample")
    columns += ["trial_type", *[RENAMED_COLUMNS.get(name, name) for name in leading + rest]]
    if final is not None:
        columns.append("observed_final")

    rows = []
    for row in range(n_trials):
        onset = float(trials["onset"][row]) - reference.first_time
        duration = _onset_duration(trials["marker"][row]) if "marker" in trials else None
        cells = [_format_value(onset, clock=True), _format_value(duration, clock=True)]
        if reference.sfreq is not None:
            # An onset before the first sample has no sample.
            sample = round(onset * reference.sfreq)
            cells.append(str(sample) if sample >= 0 else NA)
        cells.append(_format_value(trials["condition"][row]))
        for name in leading + rest:
            value = trials[name][row]
            if name in CLOCK_COLUMNS:
                value = float(value) - reference.first_time
            cells.append(_format_value(value, clock=name in CLOCK_COLUMNS))
        if final is not None:
            cells.append(_format_value(final.get(int(trials["trial"][row]))))
        rows.append(cells)
    return columns, rows


def _events_sidecar(columns: list[str], trials: dict[str, np.ndarray], reference: TimeReference,
                    versions: dict) -> dict:
    """Describe every column of events.tsv, and the software that presented the stimuli."""
    sidecar = {}
    for name in columns:
        info = dict(COLUMN_INFO.get(name, {
            "LongName": name, "Description": f"Column {name!r} of the session file's trial table."}))
        if name == "onset":
            info["Description"] = f"Stimulus onset (LSL clock) relative to {reference.description}."
        if name == "sample" and reference.sfreq is not None:
            info["Description"] += f" The recording has {reference.sfreq:g} samples per second."
        if name == "trial_type":
            conditions = sorted(set(trials.get("condition", [])))
            info["Levels"] = {c: CONDITION_LEVELS.get(c, f"Condition {c!r}.") for c in conditions}
        sidecar[name] = info
    sidecar["StimulusPresentation"] = {
        "OperatingSystem": versions.get("platform", NA),
        "SoftwareName": "neurosteer",
        "SoftwareVersion": versions.get("neurosteer", NA),
    }
    return sidecar


def _tsv_text(columns: list[str], rows: list[list[str]]) -> str:
    # BIDS: tab-separated, and a value that contains a tab is quoted (csv quotes values with
    # quotes, tabs or line breaks, and doubles a quote inside).
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buffer.getvalue()


def _json_text(content: dict) -> str:
    return json.dumps(content, indent=2, ensure_ascii=False) + "\n"


def export_bids_events(session_path: Path | str, out_dir: Path | str, *,
                       subject: str | None = None, session: str | None = None,
                       task: str | None = None, stream: str | None = None,
                       overwrite: bool = False) -> tuple[Path, Path]:
    """Write the trial table as ``sub-<label>[_ses-<label>]_task-<label>_events.tsv`` and its JSON
    sidecar into ``out_dir``; return both paths.

    Onsets and durations are in seconds, onset 0 being the first sample of ``stream`` (see
    :func:`time_reference`), so the file pairs with :func:`export_raw`'s output. Labels default to
    subject ``01``, the session's start time and the experiment's name, letters and digits only.
    """
    session_path, out_dir = Path(session_path), Path(out_dir)
    with h5py.File(session_path, "r") as file:
        labels = bids_labels(file, session_path, subject, session, task)
        trials = read_trials(file) if "trials" in file and len(file["trials"]) else {}
        reference = time_reference(file, stream)
        columns, rows = _events_table(trials, reference, _final_estimates(file))
        versions = json.loads(_text(file.attrs["versions"])) if "versions" in file.attrs else {}
        sidecar = _events_sidecar(columns, trials, reference, versions)

    tsv_path = out_dir / f"{labels.stem}_events.tsv"
    json_path = tsv_path.with_suffix(".json")
    texts = {tsv_path: _tsv_text(columns, rows), json_path: _json_text(sidecar)}
    _refuse_existing([], texts, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, text in texts.items():
        # newline="" keeps the "\n" line ends on every OS.
        path.write_text(text, encoding="utf-8", newline="")
    logger.info("Wrote %d trials to %s.", len(rows), tsv_path)
    return tsv_path, json_path


# Continuous data on a regular grid


@dataclass
class ContinuousData:
    """One continuous recording laid on a regular grid from its first sample.

    ``data`` is ``(n_channels, n_samples)`` in the recording's units, with NaN where no sample was
    recorded. ``gaps`` lists those stretches as (onset, duration) in seconds from the first sample.
    ``max_drift_s`` is the largest difference between a sample's (or a pulse's) LSL time and its
    grid time. It is NaN when no times were recorded.
    """

    name: str
    source: str
    source_id: str
    data: np.ndarray
    channel_names: list[str]
    sfreq: float
    first_time: float
    max_drift_s: float
    gaps: list[tuple[float, float]] = field(default_factory=list)

    @property
    def n_samples(self) -> int:
        return self.data.shape[1]


def place_on_grid(timestamps: np.ndarray, sfreq: float,
                  gap_threshold_s: float = GAP_THRESHOLD_S) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Return each sample's index on the regular grid that starts at the first timestamp, and the
    gaps as (first missing index, number missing).

    Samples follow each other at the nominal rate whatever their timestamps' jitter. Only after a
    step longer than ``gap_threshold_s`` (and two sample periods) do the samples restart at their
    own timestamp's place on the grid, when that leaves at least one sample missing.
    """
    indices = np.arange(len(timestamps))
    gaps = []
    threshold = max(gap_threshold_s, 2.0 / sfreq)
    for start in np.flatnonzero(np.diff(timestamps) > threshold) + 1:
        expected = int(round((timestamps[start] - timestamps[0]) * sfreq))
        n_missing = expected - int(indices[start])
        if n_missing > 0:
            gaps.append((int(indices[start]), n_missing))
            indices[start:] += n_missing
    return indices, gaps


def _stream_data(file: h5py.File, name: str, gap_threshold_s: float) -> ContinuousData:
    group = file["streams"][name]
    timestamps = group["timestamps"][()]
    sfreq = float(group.attrs["sfreq"])
    if sfreq <= 0:
        raise ExportError(f"Stream {name!r} has no nominal sampling rate (sfreq {sfreq:g}); an "
                          "irregular stream cannot be written as a regular recording.")
    indices, gaps = place_on_grid(timestamps, sfreq, gap_threshold_s)
    samples = group["data"][()]
    data = np.full((samples.shape[1], int(indices[-1]) + 1), np.nan)
    data[:, indices] = samples.T
    drift = timestamps - (timestamps[0] + indices / sfreq)
    return ContinuousData(
        name=name, source=f"streams/{name}", source_id=_text(group.attrs.get("source_id", "")),
        data=data, channel_names=json.loads(_text(group.attrs["channel_names"])), sfreq=sfreq,
        first_time=float(timestamps[0]), max_drift_s=float(np.max(np.abs(drift))),
        gaps=[(start / sfreq, n_missing / sfreq) for start, n_missing in gaps])


def _pulse_drift(file: h5py.File, volume_zero: float, period: float) -> float:
    """Return the largest difference between a recorded pulse and its volume's grid time."""
    if "markers/text" not in file:
        return math.nan
    drift = []
    for time, text in zip(file["markers/timestamp"][()], file["markers/text"].asstr()[()],
                          strict=True):
        event = _decode(text)
        volume = event.get("volume")
        if event.get("type") == "pulse" and isinstance(volume, int) and volume >= 0:
            drift.append(abs(time - (volume_zero + volume * period)))
    return max(drift) if drift else math.nan


def _fmri_data(file: h5py.File) -> ContinuousData | None:
    """Return the per-TR ROI values as a recording at the TR, NaN for TRs without values."""
    if "fmri/volumes/tr_index" not in file or file["fmri/volumes/tr_index"].shape[0] == 0:
        return None
    volume_zero, period = _fmri_timing(file)
    tr_index = file["fmri/volumes/tr_index"][()]
    values = np.atleast_2d(file["fmri/volumes/values"][()])
    first = int(tr_index.min())
    data = np.full((values.shape[1], int(tr_index.max()) - first + 1), np.nan)
    data[:, tr_index - first] = values.T
    runs: list[list[int]] = []
    for index in np.flatnonzero(np.all(np.isnan(data), axis=0)):
        if runs and runs[-1][1] == index:
            runs[-1][1] += 1
        else:
            runs.append([int(index), int(index) + 1])
    gaps = [(start * period, (end - start) * period) for start, end in runs]
    if "roi_names" in file.attrs:
        names = json.loads(_text(file.attrs["roi_names"]))
    else:
        names = [f"ROI{index + 1}" for index in range(values.shape[1])]
    return ContinuousData(
        name="fmri", source="fmri/volumes", source_id="", data=data, channel_names=names,
        sfreq=1.0 / period, first_time=volume_zero + first * period,
        max_drift_s=_pulse_drift(file, volume_zero, period), gaps=gaps)


# Markers as annotations


@dataclass(frozen=True)
class MarkerAnnotation:
    """One marker: onset in seconds from the first sample, duration, description and its JSON."""

    onset_s: float
    duration_s: float
    description: str
    text: str


def _decode(text: str) -> dict:
    try:
        event = json.loads(text)
    except ValueError:
        return {}
    return event if isinstance(event, dict) else {}


def describe_marker(event: dict) -> str:
    """Return an annotation's description: the marker's type, then its condition and stimulus id."""
    parts = [str(event.get("type", "marker"))]
    parts += [str(event[key]) for key in ("condition", "stimulus_id") if key in event]
    return "/".join(parts)


def marker_annotations(file: h5py.File, first_time: float) -> list[MarkerAnnotation]:
    """Return every marker of the session file, its onset relative to ``first_time``."""
    if "markers/text" not in file:
        return []
    annotations = []
    for time, text in zip(file["markers/timestamp"][()], file["markers/text"].asstr()[()],
                          strict=True):
        event = _decode(text)
        duration = event.get("duration_s", 0.0)
        duration = float(duration) if isinstance(duration, (int, float)) else 0.0
        annotations.append(MarkerAnnotation(float(time) - first_time, duration,
                                            describe_marker(event), text))
    return annotations


# Writers


@dataclass(frozen=True)
class RawExport:
    """One continuous recording written: its files and what its sidecar reports."""

    path: Path
    sidecar: Path
    source: str
    sfreq: float
    n_samples: int
    n_annotations: int
    n_markers_outside: int
    max_drift_s: float
    gaps: list[tuple[float, float]]


def _channel_setup(recording: ContinuousData, rig_kind: str | None, photodiode: str | None,
                   unit: str | None) -> tuple[list[str], list[str], np.ndarray]:
    """Return each channel's MNE type and unit, and the factor to volts (1 for non-voltage data)."""
    if unit is None:
        unit = "µV" if rig_kind in LIVE_KINDS and recording.source.startswith("streams/") else "a.u."
    unit = "µV" if unit in ("uV", "μV") else unit
    voltage_type = VOLTAGE_CHANNEL_TYPES.get(rig_kind or "", "eeg")
    types, units, scales = [], [], []
    for name in recording.channel_names:
        if unit in VOLTS_PER_UNIT and name != photodiode:
            types.append(voltage_type)
            units.append("µV")
            scales.append(VOLTS_PER_UNIT[unit])
        else:
            # The photodiode and non-voltage data are written as recorded.
            types.append("misc")
            units.append(unit if name != photodiode else "a.u.")
            scales.append(1.0)
    return types, units, np.asarray(scales)[:, None]


def _write_brainvision(path: Path, recording: ContinuousData, units: list[str],
                       annotations: list[MarkerAnnotation]) -> None:
    import pybv

    events = []
    for annotation in annotations:
        onset = min(round(annotation.onset_s * recording.sfreq), recording.n_samples - 1)
        events.append({
            "onset": onset,
            "duration": round(annotation.duration_s * recording.sfreq),
            # A marker file's fields are comma-separated; MNE reads "\1" back as a comma.
            "description": annotation.description.replace(",", r"\1"),
            "type": "Comment",
        })
    with warnings.catch_warnings():
        # Non-voltage units (a.u.) are outside the BrainVision specification, which knows only µV,
        # but MNE reads them back as misc channels, unscaled.
        warnings.filterwarnings("ignore", message="Encountered unsupported non-voltage units")
        pybv.write_brainvision(
            data=recording.data, sfreq=recording.sfreq, ch_names=recording.channel_names,
            fname_base=path.stem, folder_out=path.parent, overwrite=True, events=events,
            resolution=1.0, unit=units, fmt="binary_float32")


def _write_fif(path: Path, recording: ContinuousData, types: list[str],
               annotations: list[MarkerAnnotation]) -> None:
    import mne

    info = mne.create_info(recording.channel_names, recording.sfreq, types, verbose="error")
    raw = mne.io.RawArray(recording.data, info, verbose="error")
    extras = {}
    if "extras" in inspect.signature(mne.Annotations).parameters:
        # MNE 1.10 added per-annotation extras, which FIF stores: the marker's whole JSON.
        extras["extras"] = [{"marker": annotation.text} for annotation in annotations]
    raw.set_annotations(mne.Annotations(
        [annotation.onset_s for annotation in annotations],
        [annotation.duration_s for annotation in annotations],
        [annotation.description for annotation in annotations], **extras))
    # Streams are recorded as float32; fMRI values are float64 and few.
    fmt = "double" if recording.source == "fmri/volumes" else "single"
    raw.save(path, fmt=fmt, overwrite=True, verbose="error")


def _rig_settings(file: h5py.File) -> tuple[str | None, str | None]:
    """Return the rig's kind and its photodiode channel, from the rig file stored in the session."""
    if "config/rig" not in file:
        return None, None
    try:
        rig = tomllib.loads(_text(file["config/rig"][()]))
    except tomllib.TOMLDecodeError:
        return None, None
    kind = rig.get("rig", {}).get("kind")
    photodiode = (rig.get("display") or {}).get("photodiode") or {}
    return kind, photodiode.get("channel")


def _file_suffix(recording: ContinuousData, rig_kind: str | None) -> str:
    if recording.source == "fmri/volumes":
        return "roi"
    return "eeg" if rig_kind == "eeg" else "ieeg"


def _timing_sidecar(recording: ContinuousData, labels: BidsLabels, session_path: Path,
                    units: list[str], markers: list[MarkerAnnotation],
                    inside: list[bool], gap_threshold_s: float) -> dict:
    if recording.source == "fmri/volumes":
        handling = ("One sample per TR, at the TR as run (the nominal TR divided by the dry run's "
                    "speed). Sample 0 is the pulse of the first recorded volume; a TR without "
                    f"values is NaN and annotated {GAP_DESCRIPTION}. MaxTimestampDriftSeconds "
                    "compares each recorded pulse with its volume's grid time.")
    else:
        handling = ("LSL timestamps are irregular. The samples are written as a regular series at "
                    "SamplingFrequency from the first sample's timestamp. After a step between "
                    f"timestamps longer than {gap_threshold_s:g} s that leaves the grid a sample or "
                    "more behind, the samples restart at their timestamp's grid position and the "
                    f"missing ones are NaN, annotated {GAP_DESCRIPTION}. MaxTimestampDriftSeconds "
                    "is the largest difference between a sample's timestamp and its grid time.")
    return {
        "TaskName": labels.task,
        "SamplingFrequency": recording.sfreq,
        "RecordingDuration": recording.n_samples / recording.sfreq,
        "RecordingType": "continuous",
        "SessionFile": str(session_path),
        "Source": recording.source,
        "SourceId": recording.source_id,
        "ChannelUnits": dict(zip(recording.channel_names, units, strict=True)),
        "FirstSampleLSLTime": recording.first_time,
        "TimestampHandling": handling,
        "MaxTimestampDriftSeconds": None if math.isnan(recording.max_drift_s)
        else recording.max_drift_s,
        "Gaps": [{"onset": onset, "duration": duration} for onset, duration in recording.gaps],
        "Markers": [{"onset": marker.onset_s, "duration": marker.duration_s,
                     "description": marker.description, "marker": marker.text,
                     "in_recording": is_inside}
                    for marker, is_inside in zip(markers, inside, strict=True)],
    }


def _log_timing(path: Path, recording: ContinuousData, n_outside: int) -> None:
    logger.info("Wrote %s: %d channels, %d samples at %g Hz.", path,
                len(recording.channel_names), recording.n_samples, recording.sfreq)
    if math.isnan(recording.max_drift_s):
        logger.info("%s: no recorded times to compare with the regular grid.", path)
    else:
        logger.info("%s: timestamps within %.3f ms of the regular grid.", path,
                    recording.max_drift_s * 1e3)
    if recording.max_drift_s > 1.0 / recording.sfreq:
        logger.warning("%s: timestamps drift up to %.3f ms from the regular grid, more than a "
                       "sample period; annotations can be that far off their samples.",
                       path, recording.max_drift_s * 1e3)
    if recording.gaps:
        logger.warning("%s: %d gap(s), %.3f s in all, filled with NaN and annotated %s.", path,
                       len(recording.gaps), sum(duration for _, duration in recording.gaps),
                       GAP_DESCRIPTION)
    if n_outside:
        logger.info("%s: %d marker(s) fall outside the recording; they are kept in the sidecar "
                    "only.", path, n_outside)


def export_raw(session_path: Path | str, out_dir: Path | str, format: str = "brainvision", *,
               subject: str | None = None, session: str | None = None, task: str | None = None,
               unit: str | None = None, gap_threshold_s: float = GAP_THRESHOLD_S,
               overwrite: bool = False) -> list[RawExport]:
    """Write each continuous recording as BrainVision (``.vhdr``, via pybv) or FIF, with every
    marker inside it as an annotation and a JSON sidecar on its timing; return what was written.

    The recordings are the streams in ``streams/``, or, without streams, the per-TR ROI values of
    an fMRI session (one sample per TR). Annotation onsets are the marker times minus the first
    sample's time. ``unit`` is the unit of the stream values: a voltage (``V``, ``mV``, ``µV``,
    ``uV``, ``nV``) makes ECoG or EEG channels in volts for MNE; anything else (``a.u.``) makes
    misc channels written as recorded. By default live rigs are in µV, the simulated subject in
    a.u. Raise NoContinuousDataError when there is nothing continuous to export.
    """
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is not one of {', '.join(FORMATS)}.")
    session_path, out_dir = Path(session_path), Path(out_dir)
    exports = []
    with h5py.File(session_path, "r") as file:
        labels = bids_labels(file, session_path, subject, session, task)
        rig_kind, photodiode = _rig_settings(file)
        names = _stream_names(file)
        if not names and _fmri_data(file) is None:
            raise NoContinuousDataError(
                f"{session_path} has nothing continuous to export: no stream in streams/ has "
                "samples and there are no fMRI volumes (fmri/volumes). The trial events export "
                "on their own.")
        # One recording in memory at a time.
        for name in names or [None]:
            recording = _stream_data(file, name, gap_threshold_s) if name else _fmri_data(file)
            markers = marker_annotations(file, recording.first_time)
            exports.append(_write_recording(
                recording, markers, labels, session_path, out_dir, format, rig_kind, photodiode,
                unit, gap_threshold_s, overwrite, several=len(names) > 1))
    return exports


def _write_recording(recording: ContinuousData, markers: list[MarkerAnnotation],
                     labels: BidsLabels, session_path: Path, out_dir: Path, file_format: str,
                     rig_kind: str | None, photodiode: str | None, unit: str | None,
                     gap_threshold_s: float, overwrite: bool, several: bool) -> RawExport:
    # File names: a stream of several gets its name as the acq- entity.
    stem = labels.stem
    if several:
        stem += "_acq-" + (re.sub(r"[^A-Za-z0-9]", "", recording.name) or "stream")
    stem += "_" + _file_suffix(recording, rig_kind)
    if file_format == "brainvision":
        path = out_dir / f"{stem}.vhdr"
        targets = [path, path.with_suffix(".vmrk"), path.with_suffix(".eeg")]
    else:
        # MNE expects FIF names to end in _eeg.fif, _ieeg.fif or raw.fif.
        path = out_dir / (f"{stem}.fif" if stem.endswith(("_eeg", "_ieeg")) else f"{stem}_raw.fif")
        targets = [path]
    sidecar_path = out_dir / f"{stem}.json"

    # Markers outside the recording stay in the sidecar; MNE drops annotations outside the data.
    duration = recording.n_samples / recording.sfreq
    inside = [0.0 <= marker.onset_s < duration for marker in markers]
    # A stimulus shown at the end of the recording is cut to its end: pybv rejects an annotation
    # that runs past the last sample.
    annotations = [replace(marker, duration_s=min(marker.duration_s, duration - marker.onset_s))
                   for marker, is_inside in zip(markers, inside, strict=True) if is_inside]
    annotations += [MarkerAnnotation(onset, gap, GAP_DESCRIPTION, "") for onset, gap in recording.gaps]
    annotations.sort(key=lambda annotation: annotation.onset_s)

    types, units, volts = _channel_setup(recording, rig_kind, photodiode, unit)
    sidecar = _json_text(_timing_sidecar(recording, labels, session_path, units, markers, inside,
                                         gap_threshold_s))
    _refuse_existing(targets, {sidecar_path: sidecar}, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Voltages to volts, in place: the data are this export's own copy.
    recording.data *= volts
    if file_format == "brainvision":
        _write_brainvision(path, recording, units, annotations)
    else:
        _write_fif(path, recording, types, annotations)
    sidecar_path.write_text(sidecar, encoding="utf-8", newline="")
    n_outside = inside.count(False)
    _log_timing(path, recording, n_outside)
    return RawExport(path=path, sidecar=sidecar_path, source=recording.source,
                     sfreq=recording.sfreq, n_samples=recording.n_samples,
                     n_annotations=len(annotations), n_markers_outside=n_outside,
                     max_drift_s=recording.max_drift_s, gaps=recording.gaps)
