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
    the sample times stay as the sender stamped them plus the measured clock offset).
    """

    def __init__(self, name: str, timeout_s: float = 10.0, max_buffer_s: int = 360) -> None:
        import pylsl

        info = resolve_stream(name, timeout_s)
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
        self._inlet.open_stream(timeout=timeout_s)
        # The first clock-offset estimate blocks for about 0.5 s, so it is taken here. On the first
        # pull inside a trial, it made the second onset of every session late.
        self.clock_offset_s = self._inlet.time_correction(timeout=timeout_s)

    def pull(self, max_samples: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """Return all samples now buffered, as ``(n_samples, n_channels)`` data and their times."""
        data, stamps = self._inlet.pull_chunk(timeout=0.0, max_samples=max_samples)
        if not stamps:
            n_channels = self.description.n_channels
            return np.empty((0, n_channels), np.float32), np.empty(0, np.float64)
        return np.asarray(data, dtype=np.float32), np.asarray(stamps, dtype=np.float64)

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
