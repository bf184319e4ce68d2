"""The session file: one HDF5 file written as the session goes and flushed after every trial.

Runs in the controller process; the control loop calls it between trials, never inside a display
frame. Tables are groups of resizable one-dimensional datasets (one per column), so a session that
stops early leaves every completed row readable. Text is stored as UTF-8, byte for byte as shown.

Each trial also goes, before the HDF5 row, to a journal beside the file: one JSON line per trial,
synced to disk. A crash can leave the HDF5 file unreadable, but not a line already synced; the
journal is what ``neurosteer resume`` falls back on (``loop/recovery.py``). It is removed when a
session completes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

import h5py
import numpy as np

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TEXT = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class TrialRecord:
    """One row of the trial table.

    ``late`` marks an onset more than 20 ms after its due time, ``fallback`` a trial that showed
    the fallback stimulus because the choice came too late, ``epoch_ok`` False a trial whose
    response window overlapped a gap in the stream (its ``observed`` is NaN and the model never
    learned from it), and ``display_lag_s`` the photodiode's
    delay after the onset (NaN without a photodiode channel). ``response_delay_s`` is the time
    from the onset until the response was recorded, and ``trials_ahead`` the trials shown after
    this one by then: how far selection ran ahead of the data.
    """

    trial: int
    phase: str
    block: int
    condition: str
    stimulus_id: str
    text: str
    due: float
    onset: float
    late_s: float
    late: bool
    fallback: bool
    display_lag_s: float
    response_delay_s: float
    trials_ahead: int
    predicted: float
    predicted_sd: float
    observed: float
    epoch_ok: bool
    marker: str

    @classmethod
    def from_row(cls, row) -> TrialRecord:
        """Return the record of a row that has a value for every field (and maybe more keys)."""
        return cls(**{field.name: row[field.name] for field in fields(cls)})


# Fields that may be NaN; JSON has no NaN, so the journal writes them as null.
FLOAT_FIELDS = frozenset(field.name for field in fields(TrialRecord) if field.type == "float")


def _column_dtype(value):
    if isinstance(value, str):
        return TEXT
    if isinstance(value, bool):
        return np.bool_
    if isinstance(value, int):
        return np.int64
    return np.float64


class Table:
    """Append-only columns under one HDF5 group."""

    def __init__(self, group: h5py.Group) -> None:
        self.group = group

    def append(self, row: dict) -> None:
        for name, value in row.items():
            array = np.asarray(value)
            if name not in self.group:
                dtype = _column_dtype(value) if array.ndim == 0 else array.dtype
                self.group.create_dataset(name, shape=(0, *array.shape), maxshape=(None, *array.shape),
                                          dtype=dtype, chunks=(256, *array.shape) if array.ndim == 0
                                          else (64, *array.shape))
            dataset = self.group[name]
            dataset.resize(dataset.shape[0] + 1, axis=0)
            dataset[-1] = value

    def __len__(self) -> int:
        names = list(self.group)
        return self.group[names[0]].shape[0] if names else 0


def journal_path_for(session_file: str | Path) -> Path:
    """Return the path of a session file's trial journal."""
    return Path(session_file).with_suffix(".journal.jsonl")


def _json_safe(value):
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


class SessionRecorder:
    """Writes one session to ``path``; refuses to overwrite an existing file.

    ``copy_from`` is an open session file whose readable groups, all but its trials, start the
    new file (a resumed session, which adds the recovered trials itself).
    """

    def __init__(self, path: Path, copy_from: h5py.File | None = None) -> None:
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(
                f"{self.path} already exists; a session file is never overwritten. Choose "
                "another output folder or move the old file."
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The default (earliest) file format has no "open for write" flag, so a file left by a crash
        # opens without h5clear.
        self.file = h5py.File(self.path, "w")
        self.damage: list[str] = []
        if copy_from is not None:
            self._copy(copy_from)
        self.file.attrs["format_version"] = FORMAT_VERSION
        self.file.attrs["status"] = "running"
        self._trials = Table(self.file.require_group("trials"))
        self._checkpoints = Table(self.file.require_group("checkpoints"))
        self._updates = Table(self.file.require_group("model/updates"))
        self._faults = Table(self.file.require_group("faults"))
        self._markers = Table(self.file.require_group("markers"))
        self._layers = Table(self.file.require_group("model/layer_selection"))
        self._frames = Table(self.file.require_group("display/frames"))
        self._gaps = Table(self.file.require_group("gaps"))
        self._volumes: Table | None = None
        self._image_ids: set[str] = set()
        if "stimuli/image" in self.file:
            self._image_ids = set(self.file["stimuli/stimulus_id"].asstr()[()])
        self._streams: dict[str, tuple[h5py.Dataset, h5py.Dataset]] = {}
        for name, group in self.file.get("streams", {}).items():
            self._streams[name] = (group["data"], group["timestamps"])
        # Called with each fault's kind, e.g. by the terminal progress display.
        self.on_fault = None
        self.journal_path = journal_path_for(self.path)
        self._journal = open(self.journal_path, "a", encoding="utf-8")  # noqa: SIM115

    def _copy(self, source: h5py.File) -> None:
        """Copy every readable object of ``source``; name each unreadable one in ``self.damage``."""
        for key, value in source.attrs.items():
            self.file.attrs[key] = value
        for name in source:
            if name in ("trials", "checkpoints"):
                # The resumed session adds its recovered trials again, to this file and its journal.
                continue
            try:
                source.copy(source[name], self.file, name)
            except Exception:  # noqa: BLE001  any HDF5 damage: tried again value by value
                # HDF5's object copy fails on a file that a crash left with a stale heap index,
                # even where every value still reads. Copy what reads, one dataset at a time.
                if name in self.file:
                    del self.file[name]
                self._copy_values(source[name], self.file, name)

    def _copy_values(self, item, parent: h5py.Group, name: str) -> None:
        """Copy a group or dataset by reading its values; name each unreadable one in ``damage``."""
        try:
            if isinstance(item, h5py.Group):
                group = parent.create_group(name)
                group.attrs.update(dict(item.attrs))
                for child in item:
                    self._copy_values(item[child], group, child)
                return
            values = item[()]
            dataset = parent.create_dataset(
                name, data=values, dtype=item.dtype, maxshape=item.maxshape,
                chunks=item.chunks if item.chunks and values.ndim else None)
            dataset.attrs.update(dict(item.attrs))
        except Exception as err:  # noqa: BLE001  any HDF5 damage: recorded, never raised
            self.damage.append(f"{item.name}: {err}")
            if name in parent:
                del parent[name]

    def write_metadata(self, experiment_text: str, rig_text: str, metadata: dict) -> None:
        """Store both configuration files verbatim and the session's metadata as JSON."""
        config = self.file.create_group("config")
        config.create_dataset("experiment", data=experiment_text, dtype=TEXT)
        config.create_dataset("rig", data=rig_text, dtype=TEXT)
        for key, value in metadata.items():
            self.file.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        self.file.flush()
        self.write_journal_header(experiment_text, rig_text, metadata)

    def write_journal_header(self, experiment_text: str, rig_text: str, metadata: dict) -> None:
        """Start the journal with what a resume needs if the HDF5 file is lost."""
        header = {"metadata": {key: _json_safe(value) for key, value in metadata.items()},
                  "experiment_text": experiment_text, "rig_text": rig_text}
        self._journal.write(json.dumps(header, ensure_ascii=False) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def write_stimuli(self, ids: list[str], texts: list[str], source: str) -> None:
        group = self.file.create_group("stimuli")
        group.attrs["source"] = source
        group.create_dataset("stimulus_id", data=ids, dtype=TEXT)
        group.create_dataset("text", data=texts, dtype=TEXT)

    def add_image(self, stimulus_id: str, image: np.ndarray, label: str, kind: str) -> None:
        """Store one image a vision session may show, once, in ``stimuli/`` (pixels as uint8)."""
        if stimulus_id in self._image_ids:
            return
        self._image_ids.add(stimulus_id)
        Table(self.file.require_group("stimuli")).append(
            {"stimulus_id": stimulus_id, "label": label, "kind": kind,
             "image": np.asarray(image, dtype=np.uint8)})
        self.file.flush()

    def write_array(self, name: str, data, attrs: dict | None = None, dtype=None) -> None:
        """Store one array (or string) under ``name``, replacing an earlier one."""
        if name in self.file:
            del self.file[name]
        if isinstance(data, np.ndarray) and data.dtype.kind == "U":
            data, dtype = data.astype(object), TEXT
        dataset = self.file.create_dataset(name, data=data, dtype=dtype)
        for key, value in (attrs or {}).items():
            dataset.attrs[key] = value

    def add_stream(self, name: str, channel_names: list[str], sfreq: float, source_id: str) -> None:
        """Start recording a stream, or continue one copied from a resumed session's file."""
        if name in self._streams:
            recorded = json.loads(self.file[f"streams/{name}"].attrs["channel_names"])
            if recorded != list(channel_names):
                raise ValueError(
                    f"Stream {name!r} now has channels {channel_names[:4]}... where the session "
                    f"recorded {recorded[:4]}...: it is not the same recording. Connect the "
                    "amplifier the session started with.")
            return
        group = self.file.create_group(f"streams/{name}")
        group.attrs.update({"sfreq": sfreq, "source_id": source_id,
                            "channel_names": json.dumps(channel_names)})
        n_channels = len(channel_names)
        data = group.create_dataset("data", shape=(0, n_channels), maxshape=(None, n_channels),
                                    dtype=np.float32, chunks=(1024, n_channels))
        times = group.create_dataset("timestamps", shape=(0,), maxshape=(None,), dtype=np.float64,
                                     chunks=(4096,))
        self._streams[name] = (data, times)

    def add_chunk(self, name: str, data: np.ndarray, timestamps: np.ndarray) -> None:
        """Append raw samples ``(n_samples, n_channels)`` with their LSL timestamps."""
        if len(timestamps) == 0:
            return
        dataset, times = self._streams[name]
        start = dataset.shape[0]
        dataset.resize(start + len(timestamps), axis=0)
        times.resize(start + len(timestamps), axis=0)
        dataset[start:] = data
        times[start:] = timestamps

    def add_marker(self, timestamp: float, text: str) -> None:
        self._markers.append({"timestamp": timestamp, "text": text})

    def add_trial(self, record: TrialRecord, observed_channels: np.ndarray,
                  checkpoint: dict | None = None) -> None:
        """Append one trial and flush the file, so that a crash keeps it.

        The trial goes to the journal first (synced to disk), then to the HDF5 table.
        ``checkpoint`` is the controller's state after the trial (its random generators), which a
        resumed session checks its replay against.
        """
        row = {field.name: getattr(record, field.name) for field in fields(record)}
        channels = np.asarray(observed_channels, dtype=np.float64)
        line = {"record": {key: _json_safe(value) for key, value in row.items()},
                "observed_channels": [_json_safe(float(value)) for value in channels],
                "checkpoint": checkpoint}
        self._journal.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())
        row["observed_channels"] = channels
        self._trials.append(row)
        if checkpoint is not None:
            self._checkpoints.append({"trial": record.trial,
                                      "state": json.dumps(checkpoint, sort_keys=True)})
        self.file.flush()

    def add_gap(self, stream: str, start: float, end: float) -> None:
        """Record a gap in a stream: the last sample before it and the first after it."""
        self._gaps.append({"stream": stream, "start": start, "end": end})
        self.file.flush()

    def add_resume(self, time: float, from_file: str, n_trials: int, damage: str) -> None:
        """Record where a resumed session took over from its earlier file."""
        table = Table(self.file.require_group("resumes"))
        table.append({"time": time, "from_file": from_file, "n_trials": n_trials,
                      "damage": damage})
        self.file.flush()

    def add_frame_report(self, report) -> None:
        """Append one stimulus's offset and dropped frames (a :class:`FrameReport`)."""
        self._frames.append({"trial": report.trial, "offset": report.offset,
                             "n_dropped_frames": report.n_dropped_frames})

    def add_volume(self, volume) -> None:
        """Append one TR's ROI values as they arrived (a :class:`acquisition.fmri.VolumeRecord`)."""
        if self._volumes is None:
            self._volumes = Table(self.file.create_group("fmri/volumes"))
        self._volumes.append({"tr_index": volume.tr_index, "arrival": volume.arrival,
                              "acquisition_time": volume.acquisition_time,
                              "values": np.asarray(volume.values, dtype=np.float64),
                              "status": volume.status})

    def add_model_update(self, trial: int, kind: str, n_samples: int, alphas: np.ndarray,
                         cv_r: np.ndarray, noise_var: np.ndarray, weights: np.ndarray) -> None:
        self._updates.append({"trial": trial, "kind": kind, "n_samples": n_samples,
                              "alphas": alphas, "cv_r": cv_r, "noise_var": noise_var,
                              "weights": weights.astype(np.float32)})

    def add_layer_selection(self, n_samples: int, layers: np.ndarray, cv_r: np.ndarray,
                            chosen: int) -> None:
        """Append one cross-validated comparison of the candidate layers."""
        self._layers.append({"n_samples": n_samples, "layers": layers, "cv_r": cv_r,
                             "chosen": chosen})

    def add_fault(self, time: float, kind: str, message: str) -> None:
        logger.warning("%s: %s", kind, message)
        self._faults.append({"time": time, "kind": kind, "message": message})
        self.file.flush()
        if self.on_fault is not None:
            self.on_fault(kind)

    @property
    def n_trials(self) -> int:
        return len(self._trials)

    def close(self, status: str = "complete") -> None:
        """Mark the session's final status and close the file; safe to call twice.

        The journal is removed once a session is complete; otherwise it stays for a resume.
        """
        if self.file.id.valid:
            self.file.attrs["status"] = status
            self.file.flush()
            self.file.close()
        if not self._journal.closed:
            self._journal.close()
            if status == "complete":
                self.journal_path.unlink(missing_ok=True)
