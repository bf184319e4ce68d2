"""LSL ingest: lost samples, receiver CPU and latency of the data inlet under a wide 2 kHz stream.

A sender process (started with "spawn") pushes 256, then 1024 data channels plus one channel
carrying the sample index, at 2 kHz, one sample per push, each stamped with ``pylsl.local_clock()``
when it is pushed. This process is the receiver. Each reader gets its own stream and sender:

- plain pylsl ``pull_chunk`` into Python lists every 50 ms (the baseline);
- ``DataInlet.pull()`` every 50 ms (same schedule as the baseline);
- ``DataInlet.pull(timeout_s=...)`` in a loop, which waits for each new sample (what a
  low-latency session uses; the targets below apply to it);
- mne-lsl's ``StreamLSL`` (acquisition thread and reads every 50 ms), when mne-lsl is installed.

Lost and duplicated samples come from the index channel, and the first data channel is checked
against the values sent. Receiver CPU is this process's CPU time (the read loop plus liblsl's
receive threads) over the wall time of the stream, as % of one core. Latency is the time from the
push to the pull that returned the sample, in LSL clock time.

    python benchmarks/lsl_ingest.py [--seconds 60] [--channels 256 1024] [--readers ...]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from acquisition.lsl import DataInlet, configure_lsl  # noqa: E402

SFREQ = 2000.0
# The sender cycles through this many rows of seeded random data. The receiver regenerates them
# to check the first data channel.
N_PATTERN_ROWS = 4096
PATTERN_SEED = 0
# A float32 channel represents every integer up to 2**24 exactly, which bounds the sample index.
MAX_SAMPLES = 2**24
POLL_PERIOD_S = 0.05
# Maximum wait of one pull of the waiting reader. It only bounds how long the loop takes to stop.
WAIT_TIMEOUT_S = 0.1
MNE_BUFFER_S = 2.0
SETUP_TIMEOUT_S = 30.0
# How long after the last sample is due the receiver keeps reading before it counts the rest lost.
DRAIN_GRACE_S = 5.0

TARGET_CPU_PERCENT = 5.0
TARGET_P50_MS = 1.0
TARGET_P99_MS = 5.0


def pattern(n_channels: int) -> np.ndarray:
    """Return the ``(N_PATTERN_ROWS, n_channels + 1)`` float32 rows the sender cycles through."""
    rng = np.random.default_rng(PATTERN_SEED)
    return rng.standard_normal((N_PATTERN_ROWS, n_channels + 1)).astype(np.float32)


def send(name: str, n_channels: int, n_samples: int, start, received, lag_ms) -> None:
    """Push ``n_samples`` samples at SFREQ once ``start`` is set, then wait for ``received``.

    Runs in the spawned sender process. ``lag_ms`` receives the 99th percentile and the maximum of
    how late each push was against its schedule.
    """
    configure_lsl()
    import pylsl

    info = pylsl.StreamInfo(name, "ECoG", n_channels + 1, SFREQ, pylsl.cf_float32, name + "-src")
    channels = info.desc().append_child("channels")
    for label in [f"C{index:04d}" for index in range(n_channels)] + ["index"]:
        channel = channels.append_child("channel")
        channel.append_child_value("label", label)
        channel.append_child_value("type", "ecog" if label != "index" else "misc")
        channel.append_child_value("unit", "microvolts" if label != "index" else "none")
    outlet = pylsl.StreamOutlet(info)
    rows = pattern(n_channels)
    if not start.wait(SETUP_TIMEOUT_S):
        return

    # One sample per push: the stamp is the push time, so latency starts at the push.
    lags_s = np.empty(n_samples)
    period_s = 1.0 / SFREQ
    started = time.perf_counter()
    for index in range(n_samples):
        due = started + index * period_s
        wait_s = due - time.perf_counter()
        if wait_s > 0:
            time.sleep(wait_s)
        lags_s[index] = time.perf_counter() - due
        sample = rows[index % N_PATTERN_ROWS : index % N_PATTERN_ROWS + 1]
        sample[0, -1] = index
        outlet.push_chunk(sample, pylsl.local_clock())
    lag_ms[0] = np.percentile(lags_s, 99) * 1000
    lag_ms[1] = lags_s.max() * 1000

    # The receiver destroys its inlet first; liblsl logs a broken transmission otherwise.
    received.wait(SETUP_TIMEOUT_S + n_samples / SFREQ)
    del outlet


@dataclass
class Received:
    """Samples one reader received: per sample, the index, first data channel, time and arrival."""

    index: np.ndarray
    first_channel: np.ndarray
    stamps: np.ndarray
    arrivals: np.ndarray
    cpu_s: float
    wall_s: float


class Chunks:
    """The receiver's record of each pull, kept small: two channels per sample and the times."""

    def __init__(self) -> None:
        self.columns: list[np.ndarray] = []
        self.stamps: list[np.ndarray] = []
        self.arrivals: list[float] = []
        self.last_index = -1.0

    def add(self, columns: np.ndarray, stamps: np.ndarray, arrival: float) -> None:
        """Store ``columns`` (``(n_samples, 2)``: first data channel, index) of one pull."""
        self.columns.append(columns)
        self.stamps.append(stamps)
        self.arrivals.append(arrival)
        self.last_index = columns[-1, 1]

    def result(self, cpu_s: float, wall_s: float) -> Received:
        columns = np.concatenate(self.columns) if self.columns else np.empty((0, 2), np.float32)
        lengths = [len(stamps) for stamps in self.stamps]
        return Received(
            index=columns[:, 1].astype(np.int64),
            first_channel=columns[:, 0],
            stamps=np.concatenate(self.stamps) if self.stamps else np.empty(0),
            arrivals=np.repeat(np.array(self.arrivals), lengths),
            cpu_s=cpu_s,
            wall_s=wall_s,
        )


def read_data_inlet(name: str, n_samples: int, start, wait: bool) -> Received:
    """Read with DataInlet: waiting for each new sample, or polled every POLL_PERIOD_S."""
    import pylsl

    inlet = DataInlet(name, timeout_s=SETUP_TIMEOUT_S)
    chunks = Chunks()
    cpu_s, wall_s = time.process_time(), time.perf_counter()
    start.set()
    deadline = wall_s + n_samples / SFREQ + DRAIN_GRACE_S
    next_poll = wall_s
    while chunks.last_index < n_samples - 1 and time.perf_counter() < deadline:
        if wait:
            data, stamps = inlet.pull(timeout_s=WAIT_TIMEOUT_S)
        else:
            next_poll += POLL_PERIOD_S
            time.sleep(max(0.0, next_poll - time.perf_counter()))
            data, stamps = inlet.pull()
        if len(stamps):
            chunks.add(data[:, [0, -1]], stamps, pylsl.local_clock())
    cpu_s, wall_s = time.process_time() - cpu_s, time.perf_counter() - wall_s
    inlet.close()
    return chunks.result(cpu_s, wall_s)


def read_pylsl_lists(name: str, n_samples: int, start) -> Received:
    """Read with a plain pylsl inlet, ``pull_chunk`` into Python lists, every POLL_PERIOD_S."""
    import pylsl

    found = pylsl.resolve_byprop("name", name, 1, SETUP_TIMEOUT_S)
    inlet = pylsl.StreamInlet(found[0], processing_flags=pylsl.proc_clocksync)
    inlet.open_stream(timeout=SETUP_TIMEOUT_S)
    inlet.time_correction(timeout=SETUP_TIMEOUT_S)
    chunks = Chunks()
    cpu_s, wall_s = time.process_time(), time.perf_counter()
    start.set()
    deadline = wall_s + n_samples / SFREQ + DRAIN_GRACE_S
    next_poll = wall_s
    while chunks.last_index < n_samples - 1 and time.perf_counter() < deadline:
        next_poll += POLL_PERIOD_S
        time.sleep(max(0.0, next_poll - time.perf_counter()))
        samples, stamps = inlet.pull_chunk(timeout=0.0, max_samples=1024)
        if stamps:
            arrival = pylsl.local_clock()
            columns = np.array([(sample[0], sample[-1]) for sample in samples], np.float32)
            chunks.add(columns, np.array(stamps), arrival)
    cpu_s, wall_s = time.process_time() - cpu_s, time.perf_counter() - wall_s
    del inlet
    return chunks.result(cpu_s, wall_s)


def read_mne_lsl(name: str, n_samples: int, start) -> Received:
    """Read with mne-lsl's StreamLSL: its thread acquires, this loop reads, every POLL_PERIOD_S.

    New samples are those stamped after the last one read, because StreamLSL keeps a ring buffer
    of the latest ``MNE_BUFFER_S`` seconds.
    """
    import pylsl
    from mne_lsl import set_log_level
    from mne_lsl.stream import StreamLSL

    set_log_level("WARNING")
    stream = StreamLSL(MNE_BUFFER_S, name=name).connect(
        acquisition_delay=POLL_PERIOD_S, processing_flags=["clocksync"], timeout=SETUP_TIMEOUT_S
    )
    chunks = Chunks()
    # StreamLSL's buffer starts as zeros stamped 0.0.
    last_stamp = 0.0
    window_margin = round(POLL_PERIOD_S * SFREQ)
    cpu_s, wall_s = time.process_time(), time.perf_counter()
    start.set()
    deadline = wall_s + n_samples / SFREQ + DRAIN_GRACE_S
    next_poll = wall_s
    while chunks.last_index < n_samples - 1 and time.perf_counter() < deadline:
        next_poll += POLL_PERIOD_S
        time.sleep(max(0.0, next_poll - time.perf_counter()))
        # An acquisition may land between the two calls, so the window grows until it reaches
        # back to the last sample read. Rows read before are dropped by their time stamp.
        n_rows = stream.n_new_samples + window_margin
        while True:
            n_rows = min(n_rows, stream.n_buffer)
            data, stamps = stream.get_data(winsize=n_rows / SFREQ)
            if stamps[0] <= last_stamp or n_rows == stream.n_buffer:
                break
            n_rows *= 2
        arrival = pylsl.local_clock()
        new = stamps > last_stamp
        if new.any():
            chunks.add(data[[0, -1]][:, new].T, stamps[new], arrival)
            last_stamp = stamps[new][-1]
    cpu_s, wall_s = time.process_time() - cpu_s, time.perf_counter() - wall_s
    stream.disconnect()
    return chunks.result(cpu_s, wall_s)


def run(reader: str, n_channels: int, n_samples: int) -> tuple[Received, np.ndarray]:
    """Start a sender for a fresh stream, read it with ``reader`` and return what arrived."""
    context = multiprocessing.get_context("spawn")
    name = f"neurosteer-ingest-{uuid.uuid4().hex[:8]}"
    start, received = context.Event(), context.Event()
    lag_ms = context.Array("d", 2)
    sender = context.Process(target=send, args=(name, n_channels, n_samples, start, received, lag_ms))
    sender.start()
    try:
        if reader == "baseline":
            result = read_pylsl_lists(name, n_samples, start)
        elif reader == "polled":
            result = read_data_inlet(name, n_samples, start, wait=False)
        elif reader == "waiting":
            result = read_data_inlet(name, n_samples, start, wait=True)
        else:
            result = read_mne_lsl(name, n_samples, start)
    finally:
        received.set()
        sender.join(SETUP_TIMEOUT_S)
        if sender.is_alive():
            sender.terminate()
    return result, np.array(lag_ms[:])


READER_NAMES = {
    "baseline": "pylsl pull_chunk to lists, every 50 ms (baseline)",
    "polled": "DataInlet.pull(), every 50 ms",
    "waiting": "DataInlet.pull(timeout_s) per arrival (neurosteer)",
    "mne-lsl": "mne-lsl StreamLSL, every 50 ms",
}


def summarise(result: Received, n_channels: int, n_samples: int) -> dict:
    """Count lost, duplicated and corrupted samples and compute CPU and latency figures."""
    index = result.index
    valid = (index >= 0) & (index < n_samples)
    unique = np.unique(index[valid])
    expected_first = pattern(n_channels)[index[valid] % N_PATTERN_ROWS, 0]
    latency_ms = (result.arrivals - result.stamps) * 1000
    percentiles = np.percentile(latency_ms, [50, 95, 99]) if len(latency_ms) else [np.nan] * 3
    return {
        "received": len(index),
        "lost": n_samples - len(unique),
        "duplicated": int(valid.sum()) - len(unique),
        "corrupted": int((~valid).sum()) + int((result.first_channel[valid] != expected_first).sum()),
        "cpu_percent": 100 * result.cpu_s / result.wall_s,
        "p50_ms": percentiles[0],
        "p95_ms": percentiles[1],
        "p99_ms": percentiles[2],
        "max_ms": latency_ms.max() if len(latency_ms) else np.nan,
    }


def mne_lsl_available() -> bool:
    try:
        import mne_lsl  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="stream length of each run, in s")
    parser.add_argument("--channels", type=int, nargs="+", default=[256, 1024],
                        help="data channels of each configuration (the index channel comes on top)")
    parser.add_argument("--readers", nargs="+", choices=list(READER_NAMES), default=list(READER_NAMES),
                        help="readers to run (default: all, and mne-lsl only when it is installed)")
    args = parser.parse_args()
    n_samples = round(args.seconds * SFREQ)
    if not 1 <= n_samples <= MAX_SAMPLES:
        parser.error(f"--seconds must give 1 to {MAX_SAMPLES} samples at {SFREQ:g} Hz, "
                     f"got {args.seconds:g} s ({n_samples} samples).")

    configure_lsl()
    readers = list(args.readers)
    if "mne-lsl" in readers and not mne_lsl_available():
        readers.remove("mne-lsl")
        print("mne-lsl is not installed, so its run is skipped (pip install mne-lsl to add it).")
    print(f"LSL ingest: {SFREQ:g} Hz for {args.seconds:g} s per run, one sample per push from a "
          f"spawned sender, {os.cpu_count()} CPU cores")

    for n_channels in args.channels:
        print(f"\n{n_channels} data channels + 1 index channel, {n_samples} samples per run "
              f"(load average before: {os.getloadavg()[0]:.2f})")
        print(f"  {'reader':<52} {'received':>8} {'lost':>5} {'dup':>4} {'bad':>4} {'CPU %':>6} "
              f"{'vs base':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7}  "
              "sender p99 lag")
        figures = {}
        for reader in readers:
            result, lag_ms = run(reader, n_channels, n_samples)
            row = summarise(result, n_channels, n_samples)
            figures[reader] = row
            if "baseline" in figures:
                versus = f"{row['cpu_percent'] / figures['baseline']['cpu_percent']:6.2f}x"
            else:
                versus = "-"
            print(f"  {READER_NAMES[reader]:<52} {row['received']:>8} {row['lost']:>5} "
                  f"{row['duplicated']:>4} {row['corrupted']:>4} {row['cpu_percent']:>6.1f} "
                  f"{versus:>7} {row['p50_ms']:>7.2f} {row['p95_ms']:>7.2f} {row['p99_ms']:>7.2f} "
                  f"{row['max_ms']:>7.2f}  {lag_ms[0]:.2f} ms")
        report_ratios(figures)
        print(f"  load average after: {os.getloadavg()[0]:.2f}")
    return 0


def report_ratios(figures: dict) -> None:
    """Print the CPU ratios of mne-lsl to DataInlet and the verdict on the targets."""
    if "mne-lsl" in figures:
        for reader in ("polled", "waiting"):
            if reader in figures:
                ratio = figures["mne-lsl"]["cpu_percent"] / figures[reader]["cpu_percent"]
                print(f"  CPU of mne-lsl / {READER_NAMES[reader]}: {ratio:.2f}x")
    if "waiting" not in figures:
        return
    ours = figures["waiting"]
    missed = []
    if ours["lost"] or ours["duplicated"] or ours["corrupted"]:
        missed.append("samples lost, duplicated or corrupted")
    if ours["cpu_percent"] >= TARGET_CPU_PERCENT:
        missed.append(f"CPU {ours['cpu_percent']:.1f}% (target under {TARGET_CPU_PERCENT:g}%)")
    if not ours["p50_ms"] <= TARGET_P50_MS:
        missed.append(f"p50 {ours['p50_ms']:.2f} ms (target {TARGET_P50_MS:g} ms)")
    if not ours["p99_ms"] <= TARGET_P99_MS:
        missed.append(f"p99 {ours['p99_ms']:.2f} ms (target {TARGET_P99_MS:g} ms)")
    verdict = "met" if not missed else "NOT met: " + "; ".join(missed)
    print(f"  targets for {READER_NAMES['waiting']}: {verdict}")


if __name__ == "__main__":
    sys.exit(main())
