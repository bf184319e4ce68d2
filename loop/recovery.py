"""Recover a stopped session's state from its file and journal, for ``neurosteer resume``.

Runs in the ``neurosteer resume`` process before the session starts again. The old session file is
opened read-only and never written. A trial counts as completed when it is in the journal (one
JSON line per trial, synced to disk before the HDF5 row) or when every column of its HDF5 row
exists. The source with more completed trials is used, and the other must agree with it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from loop.errors import ResumeError
from loop.recording import FLOAT_FIELDS, journal_path_for

logger = logging.getLogger(__name__)


@dataclass
class RecoveredSession:
    """The state a stopped session left: its settings, its completed trials and any damage found."""

    path: Path
    metadata: dict
    experiment_text: str
    rig_text: str
    status: str
    # One dict per completed trial: the trial table's columns, "observed_channels" and
    # "checkpoint" (the controller's state after it, or None).
    trials: list[dict] = field(default_factory=list)
    source: str = "session file"
    damage: list[str] = field(default_factory=list)
    file_readable: bool = True

    @property
    def n_trials(self) -> int:
        return len(self.trials)

    def damage_summary(self) -> str:
        return "; ".join(self.damage) if self.damage else "none"


def _decode(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_journal(path: Path) -> tuple[dict | None, list[dict], list[str]]:
    """Return a journal's header, its complete trial lines and the damage found in it."""
    header, trials, damage = None, [], []
    if not path.is_file():
        return header, trials, damage
    lines = path.read_bytes().split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if number == len(lines):
                # The crash cut the last line while it was written: that trial never completed.
                damage.append(f"{path.name}: its last line was cut by the crash and is ignored")
                continue
            raise ResumeError(
                f"{path}: line {number} is not valid JSON, so the journal was changed after the "
                "session wrote it. Restore the original file.") from None
        if "metadata" in entry:
            header = entry
        else:
            record = entry["record"]
            record = {key: (float("nan") if value is None and key in FLOAT_FIELDS else value)
                      for key, value in record.items()}
            channels = np.array([np.nan if value is None else value
                                 for value in entry["observed_channels"]], dtype=np.float64)
            trials.append(record | {"observed_channels": channels,
                                    "checkpoint": entry.get("checkpoint")})
    return header, trials, damage


def _file_trials(file: h5py.File, damage: list[str]) -> list[dict]:
    if "trials" not in file or not len(file["trials"]):
        return []
    group = file["trials"]
    lengths = {name: dataset.shape[0] for name, dataset in group.items()}
    n_rows = min(lengths.values())
    if max(lengths.values()) != n_rows:
        damage.append(f"trials: the crash cut row {n_rows} while it was written; it is dropped")
    columns = {name: dataset[:n_rows] for name, dataset in group.items()}
    checkpoints = {}
    if "checkpoints/trial" in file and "checkpoints/state" in file:
        n_checkpoints = min(file["checkpoints/trial"].shape[0], file["checkpoints/state"].shape[0])
        for trial, state in zip(file["checkpoints/trial"][:n_checkpoints],
                                file["checkpoints/state"][:n_checkpoints], strict=True):
            checkpoints[int(trial)] = json.loads(_decode(state))
    trials = []
    for row in range(n_rows):
        record = {name: _decode(values[row]) for name, values in columns.items()
                  if name != "observed_channels"}
        trials.append(record | {"observed_channels": np.asarray(columns["observed_channels"][row],
                                                                dtype=np.float64),
                                "checkpoint": checkpoints.get(int(record["trial"]))})
    return trials


def recover_session(path: Path | str) -> RecoveredSession:
    """Read what a stopped session left in ``path`` and its journal; never write to either.

    Raises ResumeError when nothing usable is left, or when the session already completed.
    """
    path = Path(path)
    journal = journal_path_for(path)
    if not path.exists() and not journal.exists():
        raise ResumeError(f"{path} does not exist, and neither does its journal {journal.name}.")
    header, journal_trials, damage = read_journal(journal)

    file_trials: list[dict] = []
    metadata, experiment_text, rig_text, status = {}, "", "", "unknown"
    readable = True
    try:
        with h5py.File(path, "r") as file:
            metadata = {key: _decode(value) for key, value in file.attrs.items()}
            status = str(metadata.pop("status", "unknown"))
            try:
                experiment_text = _decode(file["config/experiment"][()])
                rig_text = _decode(file["config/rig"][()])
            except (KeyError, OSError) as err:
                damage.append(f"config: unreadable ({err})")
            try:
                file_trials = _file_trials(file, damage)
            except (KeyError, OSError, ValueError) as err:
                damage.append(f"trials: unreadable ({err})")
    except (OSError, ValueError) as err:
        readable = False
        damage.append(f"{path.name}: the file cannot be opened ({err})")

    if status == "complete":
        raise ResumeError(f"{path} is a complete session; there is nothing to resume.")
    if header is not None:
        metadata = {**header["metadata"], **metadata}
        experiment_text = experiment_text or header["experiment_text"]
        rig_text = rig_text or header["rig_text"]
    if not experiment_text or not rig_text:
        raise ResumeError(
            f"{path}: neither the session file nor its journal {journal.name} holds the "
            "session's experiment and rig files, so the session cannot be resumed. Its trials, "
            "if any, can still be read with `neurosteer inspect`.")

    trials, source = file_trials, "session file"
    if len(journal_trials) > len(file_trials):
        trials, source = journal_trials, "journal"
        if readable:
            damage.append(f"trials: the journal holds {len(journal_trials)} trials and the "
                          f"session file {len(file_trials)}; the journal's are used")
    shorter = file_trials if source == "journal" else journal_trials
    for position, row in enumerate(shorter):
        other = trials[position]
        if (int(row["trial"]), row["stimulus_id"]) != (int(other["trial"]), other["stimulus_id"]):
            raise ResumeError(
                f"{path}: trial {row['trial']} shows {row['stimulus_id']!r} in one record and "
                f"{other['stimulus_id']!r} in the other (session file and journal). One of them "
                "belongs to another session; move the wrong journal away and resume again.")
    return RecoveredSession(path=path, metadata=metadata, experiment_text=experiment_text,
                            rig_text=rig_text, status=status, trials=trials, source=source,
                            damage=damage, file_readable=readable)


def resumed_path(path: Path, stamp: str) -> Path:
    """Return the path of the file that continues ``path``: a new file, never the old one."""
    stem = path.stem.split("_resumed-")[0]
    return path.with_name(f"{stem}_resumed-{stamp}.h5")
