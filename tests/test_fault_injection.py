"""Faults injected into real dry runs over LSL on loopback.

- The session process is killed with SIGKILL mid-run and resumed with ``neurosteer resume``: the
  resumed file contains every trial exactly once, in the sequence of an uninterrupted run.
- The simulated subject (a separate ``neurosteer simulate`` process) is killed mid-run and started
  again 5 s later with the same source id: the session reports the stall, records the gap, flags
  the trials it hid, and completes.

The simulated subject runs with a very high SNR and the response window inside the plateau of its
responses, so a sentence's response does not depend on the noise or on the sample grid. That is
what lets two dry runs over LSL show the same sequence.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pylsl
import pytest

from loop.cli import main
from loop.report import read_trials
from loop.session import SessionOptions, run_session

from .test_end_to_end import REPO, SPEED, small_experiment

pytestmark = pytest.mark.models

N_TRIALS = 12 + 6 + 6
KILL_AFTER = 15


def repeatable_experiment(tmp_path: Path, unique: str, keep_simulator: bool = True):
    tmp_path.mkdir(parents=True, exist_ok=True)
    experiment, rig = small_experiment(tmp_path, unique)
    text = experiment.read_text().replace("tmin_s = 0.1", "tmin_s = 0.2").replace(
        "tmax_s = 1.1", "tmax_s = 1.0")
    experiment.write_text(text)
    rig_text = rig.read_text().replace("snr = 0.30", "snr = 1.0e6")
    rig.write_text(rig_text)
    if not keep_simulator:
        # The session's rig has no [simulator]: the subject runs as its own process.
        session_rig = rig.with_name("session_rig.toml")
        session_rig.write_text(rig_text.split("[simulator]")[0].replace(
            'kind = "simulated"', 'kind = "ecog"').replace(
            "resolve_timeout_s = 10.0", "resolve_timeout_s = 60.0"))
        return experiment, rig, session_rig
    return experiment, rig


def sequence(path: Path):
    with h5py.File(path, "r") as file:
        trials = read_trials(file)
    return list(zip(trials["trial"].tolist(), trials["condition"].tolist(),
                    trials["stimulus_id"].tolist(), strict=True))


def n_journal_trials(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines()
               if line.startswith('{"record"'))


def wait_for_stream_gone(name: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pylsl.resolve_byprop("name", name, 0, 0.5):
            return
    pytest.fail(f"stream {name!r} still exists {timeout_s:g} s after its session was killed")


def test_killed_session_resumes_with_the_same_sequence(tmp_path):
    experiment, rig = repeatable_experiment(tmp_path / "a", "neurosteer-kill-a")
    uninterrupted = run_session(experiment, rig, SessionOptions(tmp_path / "a" / "sessions",
                                                                speed=SPEED))

    experiment, rig = repeatable_experiment(tmp_path / "b", "neurosteer-kill-b")
    output = tmp_path / "b" / "sessions"
    process = subprocess.Popen(
        [sys.executable, "-m", "loop.cli", "run", str(experiment), "--rig", str(rig),
         "--speed", str(SPEED), "--output", str(output)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        journal = None
        while time.monotonic() < deadline and process.poll() is None:
            journals = list(output.glob("*.journal.jsonl")) if output.exists() else []
            if journals and n_journal_trials(journals[0]) >= KILL_AFTER:
                journal = journals[0]
                break
            time.sleep(0.02)
        assert journal is not None, "the session did not reach the trial to kill it at"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    # The simulated subject notices that its session is gone and stops streaming.
    wait_for_stream_gone("neurosteer-kill-b-data")

    old = next(output.glob("*.h5"))
    old_bytes = old.read_bytes()
    n_before = n_journal_trials(journal)
    assert KILL_AFTER <= n_before < N_TRIALS

    assert main(["resume", str(old)]) == 0
    resumed = next(path for path in output.glob("*_resumed-*.h5"))
    assert sequence(resumed) == sequence(uninterrupted)
    assert [trial for trial, _, _ in sequence(resumed)] == list(range(N_TRIALS))
    with h5py.File(resumed, "r") as file:
        assert file.attrs["status"] == "complete"
        assert file["resumes/n_trials"][()].tolist() == [n_before]
        # The simulated subject's truth covers both parts of the session.
        assert file["simulator/trial"][()].tolist() == list(range(N_TRIALS))
        stream = file["streams/neurosteer-kill-b-data/timestamps"][()]
        gap_start, gap_end = file["gaps/start"][()], file["gaps/end"][()]
    assert np.all(np.diff(stream) > 0)
    # The time between the two parts is one gap, from the killed part's last sample.
    with h5py.File(old, "r") as file:
        last_before_kill = file["streams/neurosteer-kill-b-data/timestamps"][-1]
    assert gap_start.tolist() == [last_before_kill]
    assert gap_end[0] > gap_start[0]
    # The killed session's file is never written to again.
    assert old.read_bytes() == old_bytes


def test_subject_killed_and_restarted(tmp_path):
    experiment, simulator_rig, session_rig = repeatable_experiment(
        tmp_path, "neurosteer-restart", keep_simulator=False)
    output = tmp_path / "sessions"
    command = [sys.executable, "-m", "loop.cli", "simulate", "--rig", str(simulator_rig),
               "--experiment", str(experiment), "--speed", str(SPEED)]
    subjects = [subprocess.Popen([*command, "--log", str(tmp_path / "first.jsonl")], cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    killed_at: list[float] = []

    def kill_and_restart():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            journals = list(output.glob("*.journal.jsonl")) if output.exists() else []
            if journals and n_journal_trials(journals[0]) >= KILL_AFTER:
                break
            time.sleep(0.02)
        killed_at.append(pylsl.local_clock())
        os.kill(subjects[0].pid, signal.SIGKILL)
        time.sleep(5.0)
        subjects.append(subprocess.Popen([*command, "--log", str(tmp_path / "second.jsonl")],
                                         cwd=REPO, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL))

    killer = threading.Thread(target=kill_and_restart, daemon=True)
    killer.start()
    try:
        path = run_session(experiment, session_rig, SessionOptions(output, speed=SPEED))
    finally:
        killer.join(10)
        for subject in subjects:
            if subject.poll() is None:
                subject.terminate()
                subject.wait(10)
    assert killed_at, "the subject was never killed"

    with h5py.File(path, "r") as file:
        assert file.attrs["status"] == "complete"
        trials = read_trials(file)
        kinds = [kind.decode() for kind in file["faults/kind"][()]]
        fault_times = file["faults/time"][()]
        gap_start, gap_end = file["gaps/start"][()], file["gaps/end"][()]
    assert trials["trial"].tolist() == list(range(N_TRIALS))
    assert kinds.count("stream_stalled") == 1
    assert kinds.count("stream_resumed") == 1
    assert kinds.count("stream_gap") == 1
    # The gap starts at the kill and lasts at least the 5 s before the restart.
    assert len(gap_start) == 1
    assert abs(gap_start[0] - killed_at[0]) < 0.1
    assert gap_end[0] - gap_start[0] > 5.0
    # The stall was reported about a second after the last sample.
    stalled_at = fault_times[kinds.index("stream_stalled")]
    assert stalled_at - gap_start[0] < 1.5
    # The trials whose windows the gap hid are flagged, the others scored.
    flagged = ~trials["epoch_ok"]
    assert flagged.sum() == kinds.count("trial_flagged") >= 1
    assert np.isnan(trials["observed"][flagged]).all()
    assert np.isfinite(trials["observed"][~flagged]).all()
