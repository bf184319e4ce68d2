"""A readable summary of what a session file contains, for ``neurosteer inspect``.

Runs on any machine with the file; it only reads. Works on files that a crash left unclosed, since
the session writer uses the HDF5 format without an "open for writing" flag.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import h5py

from loop.report import read_trials


def _describe(item) -> str:
    if isinstance(item, h5py.Dataset):
        kind = "text" if h5py.check_string_dtype(item.dtype) is not None else str(item.dtype)
        return f"{kind} {item.shape}"
    return "group"


def inspect_session(path: Path) -> str:
    """Return a multi-line summary: metadata, trials per phase and condition, streams, faults."""
    lines = [f"Session file: {path}"]
    with h5py.File(path, "r") as file:
        attrs = dict(file.attrs)
        for key in ("status", "kind", "display", "started", "seed", "speed", "model_identity",
                    "chosen_layer", "experiment_file", "rig_file", "n_fallbacks",
                    "closed_loop_stopped_after_block", "resumed_from",
                    "display_lag_median_s"):
            if key in attrs:
                lines.append(f"  {key}: {attrs[key]}")
        if attrs.get("status") == "running":
            lines.append("  (status 'running': the session is still running, or it stopped without "
                         "closing its file, after a crash or a kill. Continue a stopped one with "
                         f"neurosteer resume {path})")
        if "versions" in attrs:
            versions = json.loads(attrs["versions"])
            lines.append("  versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))

        trials = read_trials(file) if "trials" in file and len(file["trials"]) else {}
        n_trials = len(trials.get("trial", []))
        lines.append(f"Trials: {n_trials}")
        if n_trials:
            counts = Counter(zip(trials["phase"], trials["condition"], strict=True))
            for (phase, condition), count in sorted(counts.items()):
                lines.append(f"  {phase:<12} {condition:<12} {count:>5}")
            late = int((trials["late_s"] > 0.020).sum())
            lines.append(f"  onsets more than 20 ms late: {late}")
            if "epoch_ok" in trials:
                lines.append(f"  without a response (stream gap): {int((~trials['epoch_ok']).sum())}")
        if "resumes/from_file" in file:
            for from_file, n_resumed in zip(file["resumes/from_file"].asstr()[()],
                                            file["resumes/n_trials"][()], strict=True):
                lines.append(f"Resumed from {from_file} after {n_resumed} trials")
        if "gaps/start" in file:
            for stream, start, end in zip(file["gaps/stream"].asstr()[()], file["gaps/start"][()],
                                          file["gaps/end"][()], strict=True):
                lines.append(f"Gap in stream {stream}: {start:.3f} to {end:.3f} ({end - start:.2f} s)")

        for name, group in file.get("streams", {}).items():
            n_samples = group["timestamps"].shape[0]
            channels = json.loads(group.attrs["channel_names"])
            duration = (group["timestamps"][-1] - group["timestamps"][0]) if n_samples else 0.0
            lines.append(f"Stream {name}: {len(channels)} channels at {group.attrs['sfreq']:g} Hz, "
                         f"{n_samples} samples over {duration:.1f} s")
        if "markers/text" in file:
            lines.append(f"Markers: {file['markers/text'].shape[0]}")
        if "model/updates/trial" in file:
            kinds = Counter(item.decode() if isinstance(item, bytes) else item
                            for item in file["model/updates/kind"][()])
            lines.append("Model updates: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
        if "markers/text" in file:
            pulses = [json.loads(text)["volume"] for text in file["markers/text"].asstr()[()]
                      if '"pulse"' in text]
            if pulses:
                lines.append(f"Scanner pulses: {len(pulses)} (volumes {min(pulses)} to "
                             f"{max(pulses)}; negative ones are dummy scans), in markers/text")
        if "fmri/volumes/status" in file:
            statuses = Counter(file["fmri/volumes/status"].asstr()[()])
            lines.append(f"fMRI volumes: {sum(statuses.values())} ("
                         + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) + ")")
        n_faults = file["faults/kind"].shape[0] if "faults/kind" in file else 0
        lines.append(f"Faults: {n_faults}")
        for index in range(n_faults):
            kind = file["faults/kind"][index].decode()
            message = file["faults/message"][index].decode()
            lines.append(f"  {kind}: {message}")

        lines.append("Contents:")

        def visit(name, item):
            depth = name.count("/")
            if depth <= 2:
                lines.append(f"  {'  ' * depth}{name.rsplit('/', 1)[-1]}: {_describe(item)}")

        file.visititems(visit)
    return "\n".join(lines)
