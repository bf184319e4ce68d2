"""LSL streams for a session: the marker outlet, the data inlet, and the liblsl configuration.

Runs in the controller process (marker outlet, data inlet) and in the simulated subject's process
(data outlet, marker inlet). liblsl reads its configuration once, at its first call, so
:func:`configure_lsl` must run before any other pylsl call in each process.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from acquisition.errors import StreamNotFoundError

logger = logging.getLogger(__name__)

LOOPBACK_CONFIG = Path(__file__).with_name("lsl_loopback.cfg")
_configured: Path | None = None


def configure_lsl(config_path: Path | None = LOOPBACK_CONFIG) -> None:
    """Load a liblsl configuration file before the first LSL call of this process.

    ``None`` keeps liblsl's defaults (multicast discovery on the lab network). The file is also put
    in ``LSLAPICFG`` so that processes started from this one inherit it.
    """
    global _configured
    if config_path is None:
        return
    config_path = Path(config_path).resolve()
    if not config_path.is_file():
        raise FileNotFoundError(f"LSL configuration file {config_path} does not exist.")
    if _configured is not None and _configured != config_path:
        raise RuntimeError(
            f"liblsl is already configured from {_configured}; it reads its configuration only "
            f"once per process, so {config_path} cannot take effect. Start a new process."
        )
    os.environ["LSLAPICFG"] = str(config_path)
    import pylsl

    pylsl.set_config_filename(str(config_path))
    _configured = config_path


def encode_marker(event: dict) -> str:
    """Encode a marker as compact JSON, the text on the wire and in the session file."""
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def decode_marker(text: str) -> dict:
    """Decode a marker written by :func:`encode_marker`."""
    event = json.loads(text)
    if not isinstance(event, dict) or "type" not in event:
        raise ValueError(f"Marker is not a JSON object with a 'type' key: {text[:80]!r}")
    return event


class MarkerOutlet:
    """An irregular-rate string outlet for stimulus onsets and session events."""

    def __init__(self, name: str, source_id: str) -> None:
        import pylsl

        info = pylsl.StreamInfo(name, "Markers", 1, pylsl.IRREGULAR_RATE, pylsl.cf_string, source_id)
        self._outlet = pylsl.StreamOutlet(info)

    def push(self, event: dict, timestamp: float) -> str:
        """Send one marker stamped with ``timestamp`` (LSL clock) and return its text."""
        text = encode_marker(event)
        self._outlet.push_sample([text], timestamp)
        return text

    def wait_for_consumers(self, timeout_s: float) -> bool:
        """Return True once some inlet is connected, False after ``timeout_s``."""
        return bool(self._outlet.wait_for_consumers(timeout_s))

    def close(self) -> None:
        self._outlet = None


@dataclass(frozen=True)
class StreamDescription:
    """The properties of a resolved data stream."""

    name: str
    stype: str
    source_id: str
    n_channels: int
    sfreq: float
    channel_names: tuple[str, ...]


def resolve_stream(name: str, timeout_s: float):
    """Return the StreamInfo of the stream called ``name``, or raise StreamNotFoundError."""
    import pylsl

    found = pylsl.resolve_byprop("name", name, 1, timeout_s)
    if not found:
        raise StreamNotFoundError(
            f"No LSL stream named {name!r} appeared within {timeout_s:g} s. Check that the "
            "amplifier software (or `neurosteer simulate`) is running, that the stream name in the "
            "rig file matches, and that both sides use the same LSL configuration."
        )
    return found[0]


class DataInlet:
    """A numeric LSL inlet that returns chunks already mapped to this machine's LSL clock.

    Clock correction comes from liblsl's own post-processing (clock sync and dejitter off, so that
    the sample times stay as the sender stamped them plus the measured clock offset). liblsl writes
    each pull into one reusable buffer in the stream's own sample type, and only the rows pulled
    are copied out, as float32.
    """

    # Rows of the reusable pull buffer (half a second at 2 kHz). A larger backlog takes one liblsl
    # call per buffer's worth of rows.
    PULL_BUFFER_SAMPLES = 1024

    def __init__(self, name: str, timeout_s: float = 10.0, max_buffer_s: int = 360) -> None:
        import pylsl

        info = resolve_stream(name, timeout_s)
        sample_dtype = self._numpy_dtype(info.channel_format(), name)
        self._inlet = pylsl.StreamInlet(
            info, max_buflen=max_buffer_s, processing_flags=pylsl.proc_clocksync
        )
        full = self._inlet.info(timeout=timeout_s)
        self.description = StreamDescription(
            name=full.name(),
            stype=full.type(),
            source_id=full.source_id(),
            n_channels=full.channel_count(),
            sfreq=full.nominal_srate(),
            channel_names=tuple(_channel_names(full)),
        )
        self._buffer = np.empty((self.PULL_BUFFER_SAMPLES, self.description.n_channels), sample_dtype)
        self._inlet.open_stream(timeout=timeout_s)
        # The first clock-offset estimate blocks for about 0.5 s, so it is taken here. On the first
        # pull inside a trial, it made the second onset of every session late.
        self.clock_offset_s = self._inlet.time_correction(timeout=timeout_s)

    def pull(self, max_samples: int = 65536, timeout_s: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Return the buffered samples as ``(n_samples, n_channels)`` float32 data and their times.

        With ``timeout_s > 0`` and nothing buffered, wait up to ``timeout_s`` for the first sample,
        then return it with every sample buffered by then. liblsl's queue waits on a condition
        variable, so the wait takes no CPU. After an empty wait, both arrays have zero rows.
        Samples beyond ``max_samples`` stay buffered for the next pull.

        NOTE: a loop of waiting pulls wakes once per push of the sender. At 2,000 one-sample
        pushes a second that took 27-29% of a core on a 2-core nested virtual machine, against
        5-6% for a pull every 50 ms (``benchmarks/lsl_ingest.py``, 256 and 1024 channels).
        """
        if max_samples < 1:
            raise ValueError(f"max_samples must be at least 1, got {max_samples}.")
        if timeout_s < 0:
            raise ValueError(f"timeout_s must be 0 (no wait) or positive, got {timeout_s}.")

        # Wait for the first sample. liblsl's pull_chunk with a timeout waits until the whole
        # request is filled (pull_chunk_multiplexed in its stream_inlet_impl.h), so the wait
        # requests one sample and the drain below takes the rest.
        stamp_parts = []
        n_rows = 0
        if timeout_s > 0:
            stamps = self._pull_into(0, 1, timeout_s)
            if len(stamps) == 0:
                return self._empty()
            stamp_parts.append(stamps)
            n_rows = 1
            if max_samples == 1 or self._inlet.samples_available() == 0:
                return self._buffer[:1].astype(np.float32), stamps

        # Drain what is buffered, copying the buffer out each time it fills.
        data_parts = []
        n_total = n_rows
        while n_total < max_samples:
            if n_rows == len(self._buffer):
                data_parts.append(self._buffer.astype(np.float32))
                n_rows = 0
            n_request = min(len(self._buffer) - n_rows, max_samples - n_total)
            stamps = self._pull_into(n_rows, n_request, 0.0)
            stamp_parts.append(stamps)
            n_rows += len(stamps)
            n_total += len(stamps)
            if len(stamps) < n_request:
                break
        data_parts.append(self._buffer[:n_rows].astype(np.float32))

        if len(data_parts) == 1:
            data = data_parts[0]
        else:
            data = np.concatenate(data_parts)
        return data, np.concatenate(stamp_parts)

    def _pull_into(self, first_row: int, n_request: int, timeout_s: float) -> np.ndarray:
        """Pull up to ``n_request`` samples into the buffer from ``first_row`` and return their times."""
        rows = self._buffer[first_row:first_row + n_request]
        _, stamps = self._inlet.pull_chunk(timeout=timeout_s, max_samples=n_request, dest_obj=rows)
        return np.asarray(stamps, dtype=np.float64)

    def _empty(self) -> tuple[np.ndarray, np.ndarray]:
        return np.empty((0, self.description.n_channels), np.float32), np.empty(0, np.float64)

    @staticmethod
    def _numpy_dtype(channel_format: int, name: str) -> np.dtype:
        """Return the numpy type of one value of a numeric LSL channel format."""
        import pylsl

        dtypes = {
            pylsl.cf_float32: np.float32,
            pylsl.cf_double64: np.float64,
            pylsl.cf_int8: np.int8,
            pylsl.cf_int16: np.int16,
            pylsl.cf_int32: np.int32,
            pylsl.cf_int64: np.int64,
        }
        if channel_format not in dtypes:
            raise ValueError(
                f"Stream {name!r} has LSL channel format {channel_format}, which is not numeric. "
                "A data inlet needs float, double or integer channels, so check that the rig "
                "file names the data stream, not a marker stream."
            )
        return np.dtype(dtypes[channel_format])

    def close(self) -> None:
        if self._inlet is not None:
            self._inlet.close_stream()
            self._inlet = None


def _channel_names(info) -> list[str]:
    names = []
    channel = info.desc().child("channels").child("channel")
    while not channel.empty():
        names.append(channel.child_value("label"))
        channel = channel.next_sibling()
    if len(names) != info.channel_count():
        names = [f"ch{index:03d}" for index in range(info.channel_count())]
    return names


# A first sample stamped further than this from this machine's LSL clock, in seconds, is on
# another clock base. liblsl's clock is the time since boot and Unix time is about 1.7e9 s, so any
# bound between a few minutes and a few years separates them.
MAX_CLOCK_OFFSET_S = 600.0


def check_clock_base(inlet: DataInlet, now, timeout_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Wait for a stream's first samples; refuse the stream if they are not on the LSL clock.

    ``now`` returns this machine's LSL time (``pylsl.local_clock``). Returns the samples pulled,
    which belong to the recording. Raises StreamNotFoundError when no sample comes within
    ``timeout_s``, and ClockBaseError when the samples are stamped in another clock base (an
    amplifier driver that stamps Unix time, say): their trials would be epoched at the wrong times.
    """
    from acquisition.errors import ClockBaseError

    deadline = now() + timeout_s
    data, times = inlet.pull()
    while len(times) == 0:
        if now() > deadline:
            raise StreamNotFoundError(
                f"Stream {inlet.description.name!r} was found but sent no sample within "
                f"{timeout_s:g} s. Start the acquisition on the amplifier software.")
        data, times = inlet.pull(timeout_s=0.05)
    offset_s = float(times[-1] - now())
    if abs(offset_s) > MAX_CLOCK_OFFSET_S:
        hint = " It looks like Unix time." if 1e9 < times[-1] < 1e10 else ""
        raise ClockBaseError(
            f"Stream {inlet.description.name!r} stamps its samples at {times[-1]:.3f} s, "
            f"{offset_s:+.3g} s from this machine's LSL clock ({now():.3f} s), so its samples are "
            f"on another clock base.{hint} Stamp the samples with pylsl.local_clock() in the "
            "sender (or let the outlet stamp them), and start the session again.")
    return data, times
