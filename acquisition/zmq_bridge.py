"""Per-TR values from a real-time fMRI pipeline over ZeroMQ: the wire schema, both sockets, and the TR table.

``TRPublisher`` runs in the real-time pipeline's process (rt-cloud, OpenNFT, murfi or a replay) and
``TRSubscriber`` and ``TRTable`` run in the controller process. They talk over one ZeroMQ XPUB/SUB
connection, loopback unless the rig file allows remote addresses. A subscriber that joins after
the run started cannot get the messages it missed, so the publisher waits for every expected
subscriber before the first TR.

Wire schema, version 1: every ZeroMQ message is one frame of UTF-8 JSON, at most
``MAX_MESSAGE_BYTES`` long, holding one object with exactly these keys:

- ``schema_version`` (int): 1.
- ``sequence`` (int, 0 to 2**53 - 1): 0 for the publisher's first message, then one more for each
  message it sends, so the receiver can count lost and repeated messages.
- ``tr_index`` (int, 0 to 2**53 - 1): the volume index in the run, counted from 0.
- ``acquisition_time`` (number): when the volume was acquired, in seconds on the sender's clock.
  It is stored as sent, and lateness is judged on the receiver's clock at arrival instead.
- ``roi_values`` (list of numbers or null): one value per ROI. ``null`` marks an ROI the pipeline
  could not compute for this TR. NaN and infinities are invalid, because JSON has no literal for them.
- ``roi_names`` (optional list of distinct, non-empty strings, or null): the ROI names, in the
  order of ``roi_values``. Leaving the key out and sending null mean the same.

Nothing received is unpickled. ``docs/zmq_schema.md`` has an example message and a sender written
with pyzmq alone.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import zmq

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_ADDRESS = "tcp://127.0.0.1:5570"
# About 65,000 ROIs at 16 bytes each; a whole-brain ROI set is far smaller.
MAX_MESSAGE_BYTES = 1 << 20
# Integers above 2**53 lose precision in a JSON reader that stores numbers as doubles (JavaScript, MATLAB).
MAX_INDEX = 2**53 - 1
# Prefix of the subscription that a subscriber sends as its hello. Data frames start with "{", so
# no data frame matches it.
HELLO_PREFIX = b"neurosteer-hello/"
# Queued messages per connection before ZeroMQ drops new ones. This is more TRs than a run has (one
# hour at a TR of 0.5 s is 7,200), so a controller that stops polling for a whole run loses nothing.
HIGH_WATER_MARK = 10_000
# Rejected and repeated messages are logged for the first few of each reason, then once per this many.
REPEAT_LOG_FIRST = 5
REPEAT_LOG_EVERY = 1000

REQUIRED_FIELDS = frozenset({"schema_version", "sequence", "tr_index", "acquisition_time", "roi_values"})
OPTIONAL_FIELDS = frozenset({"roi_names"})


class MalformedMessageError(ValueError):
    """A frame that is not a valid TR message.

    ``reason`` is a short code for counting rejects: ``too_large``, ``multipart``, ``not_utf8``,
    ``not_json``, ``schema_version``, ``fields``, ``type``, ``value`` or ``roi_mismatch``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class SubscriberNotFoundError(RuntimeError):
    """Fewer subscribers than expected sent their hello before the timeout."""


# Schema


@dataclass(frozen=True)
class TRMessage:
    """One TR's ROI values as sent on the wire.

    Construction validates every field and raises MalformedMessageError. ``roi_values`` are floats,
    or None for an ROI the pipeline could not compute. Lists are stored as tuples and integer values
    as floats.
    """

    sequence: int
    tr_index: int
    acquisition_time: float
    roi_values: tuple[float | None, ...]
    roi_names: tuple[str, ...] | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_schema_version(self.schema_version)
        for name in ("sequence", "tr_index"):
            _check_index(name, getattr(self, name))
        acquisition_time = _to_finite_float("acquisition_time", self.acquisition_time)
        object.__setattr__(self, "acquisition_time", acquisition_time)
        object.__setattr__(self, "roi_values", _to_roi_values(self.roi_values))
        if self.roi_names is not None:
            object.__setattr__(self, "roi_names", _to_roi_names(self.roi_names, len(self.roi_values)))


def encode_tr_message(message: TRMessage) -> bytes:
    """Encode a message as the one-frame UTF-8 JSON of the wire schema."""
    fields = {
        "schema_version": message.schema_version,
        "sequence": message.sequence,
        "tr_index": message.tr_index,
        "acquisition_time": message.acquisition_time,
        "roi_values": list(message.roi_values),
    }
    if message.roi_names is not None:
        fields["roi_names"] = list(message.roi_names)
    return json.dumps(fields, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def decode_tr_message(data: bytes, roi_names: Sequence[str] | None = None) -> TRMessage:
    """Decode one frame of the wire schema, or raise MalformedMessageError with the reason.

    With ``roi_names`` (the ROIs this session expects), the message must carry exactly that many
    values and, if it names its ROIs, the same names in the same order. Without it, any number of
    ROI values is accepted.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        raise MalformedMessageError(
            "too_large", f"The message is {len(data)} bytes, more than the {MAX_MESSAGE_BYTES} allowed.")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as err:
        raise MalformedMessageError("not_utf8", f"The message is not UTF-8: {err}.") from err
    try:
        fields = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_reject_duplicate_keys)
    except RecursionError as err:
        raise MalformedMessageError("not_json", "The message is JSON nested too deeply to parse.") from err
    except ValueError as err:
        raise MalformedMessageError("not_json", f"The message is not valid JSON: {err}.") from err

    if not isinstance(fields, dict):
        raise MalformedMessageError("type", f"The message must be a JSON object, got {_show(fields)}.")
    if "schema_version" in fields:
        # Checked before the keys, so that a newer sender gets the version error, not a key error.
        _check_schema_version(fields["schema_version"])
    missing = sorted(REQUIRED_FIELDS - fields.keys())
    unknown = sorted(fields.keys() - REQUIRED_FIELDS - OPTIONAL_FIELDS)
    if missing or unknown:
        raise MalformedMessageError(
            "fields", f"The message has missing keys {missing} and unknown keys {unknown}; "
                      f"the schema has {sorted(REQUIRED_FIELDS)} and optionally {sorted(OPTIONAL_FIELDS)}.")

    message = TRMessage(
        sequence=fields["sequence"],
        tr_index=fields["tr_index"],
        acquisition_time=fields["acquisition_time"],
        roi_values=fields["roi_values"],
        roi_names=fields.get("roi_names"),
        schema_version=fields["schema_version"],
    )
    if roi_names is not None:
        _check_expected_rois(message, tuple(roi_names))
    return message


def _check_schema_version(value: object) -> None:
    if not _is_int(value):
        raise MalformedMessageError("type", f"schema_version must be an integer, got {_show(value)}.")
    if value != SCHEMA_VERSION:
        raise MalformedMessageError(
            "schema_version",
            f"schema_version {value} is not supported; this receiver reads version {SCHEMA_VERSION}. "
            "Update the sender or neurosteer so that they match.")


def _check_expected_rois(message: TRMessage, expected: tuple[str, ...]) -> None:
    if len(message.roi_values) != len(expected):
        raise MalformedMessageError(
            "roi_mismatch", f"TR {message.tr_index} has {len(message.roi_values)} ROI values, but the "
                            f"session expects {len(expected)}: {list(expected)[:10]}.")
    if message.roi_names is not None and message.roi_names != expected:
        raise MalformedMessageError(
            "roi_mismatch", f"TR {message.tr_index} names its ROIs {list(message.roi_names)[:10]}, but "
                            f"the session expects {list(expected)[:10]} in that order.")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON; send null for a missing ROI value")


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    fields = dict(pairs)
    if len(fields) != len(pairs):
        keys = [key for key, _ in pairs]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        raise ValueError(f"the object repeats the keys {repeated}")
    return fields


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: object) -> str:
    """Return the value's type and a short repr, for error messages about untrusted input."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _check_index(name: str, value: object) -> None:
    if not _is_int(value):
        raise MalformedMessageError("type", f"{name} must be an integer, got {_show(value)}.")
    if not 0 <= value <= MAX_INDEX:
        raise MalformedMessageError("value", f"{name} must be between 0 and 2**53 - 1, got {_show(value)}.")


def _to_finite_float(name: str, value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise MalformedMessageError("type", f"{name} must be a number, got {_show(value)}.")
    try:
        number = float(value)
    except OverflowError as err:
        raise MalformedMessageError("value", f"{name} is too large for a float: {_show(value)}.") from err
    if not math.isfinite(number):
        raise MalformedMessageError("value", f"{name} must be finite, got {number}.")
    return number


def _to_roi_values(values: object) -> tuple[float | None, ...]:
    if not isinstance(values, list | tuple):
        raise MalformedMessageError("type", f"roi_values must be a list, got {_show(values)}.")
    return tuple(None if value is None else _to_finite_float(f"roi_values[{index}]", value)
                 for index, value in enumerate(values))


def _to_roi_names(names: object, n_values: int) -> tuple[str, ...]:
    if not isinstance(names, list | tuple):
        raise MalformedMessageError("type", f"roi_names must be a list, got {_show(names)}.")
    for index, name in enumerate(names):
        if not isinstance(name, str):
            raise MalformedMessageError("type", f"roi_names[{index}] must be a string, got {_show(name)}.")
        if not name:
            raise MalformedMessageError("value", f"roi_names[{index}] is empty.")
    if len(names) != n_values:
        raise MalformedMessageError(
            "roi_mismatch", f"roi_names has {len(names)} names for {n_values} roi_values.")
    if len(set(names)) != len(names):
        raise MalformedMessageError("value", "roi_names repeats a name.")
    return tuple(names)


# Addresses


def check_address(address: str, allow_remote: bool) -> None:
    """Raise ValueError unless ``address`` is a ZeroMQ endpoint on this machine or remote use is allowed.

    ``tcp://`` to 127.0.0.0/8, ``::1`` or ``localhost`` and ``ipc://`` or ``inproc://`` stay on
    this machine. Anything else (a wildcard such as ``tcp://*:5570``, an interface name, a LAN
    address, another transport) needs ``allow_remote``. The check applies to both bind and connect.
    """
    if not isinstance(address, str) or "://" not in address:
        raise ValueError(f"ZeroMQ address {address!r} is invalid; write it as tcp://127.0.0.1:PORT.")
    if allow_remote or _is_local_endpoint(address):
        return
    raise ValueError(
        f"ZeroMQ address {address!r} is not on this machine, so other machines could connect "
        "to it or receive from it. Use tcp://127.0.0.1:PORT, or set `allow_remote = true` in the [zmq] "
        "section of the rig file if the pipeline runs on another machine.")


def _is_local_endpoint(address: str) -> bool:
    transport, _, rest = address.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp" or ";" in rest:
        return False
    host, separator, port = rest.rpartition(":")
    if not separator or not port:
        return False
    host = host.removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _open_socket(context: zmq.Context, socket_type: int, address: str, bind: bool, allow_remote: bool):
    check_address(address, allow_remote)
    sock = context.socket(socket_type)
    sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    try:
        if bind:
            sock.bind(address)
        else:
            sock.connect(address)
    except zmq.ZMQError as err:
        sock.close(linger=0)
        verb = "bind to" if bind else "connect to"
        raise OSError(f"Could not {verb} ZeroMQ address {address!r}: {err}. Check the address in the rig "
                      "file and, when binding, that no other process uses the port.") from err
    return sock


# Sockets


class TRPublisher:
    """The sending side: an XPUB socket that numbers each message and waits for its subscribers.

    By default it binds. Each subscriber subscribes to everything and to its own hello prefix, in
    that order, so when the hello reaches :meth:`wait_for_subscribers` the subscriber's filter is
    already in place and every message sent afterwards reaches it.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, *, bind: bool = True, allow_remote: bool = False,
                 context: zmq.Context | None = None) -> None:
        self._socket = _open_socket(context or zmq.Context.instance(), zmq.XPUB, address, bind, allow_remote)
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT) if bind else address
        self.subscribers: set[str] = set()
        self._next_sequence = 0

    @property
    def n_sent(self) -> int:
        """Number of messages :meth:`send` sent, which is also the next sequence number."""
        return self._next_sequence

    def wait_for_subscribers(self, n_subscribers: int = 1, timeout_s: float = 10.0) -> tuple[str, ...]:
        """Block until ``n_subscribers`` have sent their hello; return their ids.

        Raises SubscriberNotFoundError after ``timeout_s``. Call it before the first TR of a run.
        """
        deadline = time.monotonic() + timeout_s
        while len(self.subscribers) < n_subscribers:
            remaining_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
            if remaining_ms == 0 or not self._socket.poll(remaining_ms, zmq.POLLIN):
                raise SubscriberNotFoundError(
                    f"{len(self.subscribers)} of {n_subscribers} subscribers sent their hello to "
                    f"{self.address} within {timeout_s:g} s. Check that the controller is running and "
                    "that both sides use the address in the rig file.")
            self._read_subscriptions()
        logger.info("%d subscribers ready on %s: %s", len(self.subscribers), self.address,
                    sorted(self.subscribers))
        return tuple(sorted(self.subscribers))

    def send(self, tr_index: int, acquisition_time: float, roi_values: Sequence[float | None],
             roi_names: Sequence[str] | None = None) -> TRMessage:
        """Send one TR with the next sequence number and return the message sent."""
        message = TRMessage(
            sequence=self._next_sequence,
            tr_index=tr_index,
            acquisition_time=acquisition_time,
            roi_values=tuple(roi_values),
            roi_names=None if roi_names is None else tuple(roi_names),
        )
        self.send_frames(encode_tr_message(message))
        self._next_sequence += 1
        return message

    def send_frames(self, *frames: bytes) -> None:
        """Send one ZeroMQ message made of ``frames`` as they are, with no sequence number.

        For replaying recorded frames and for testing a receiver with malformed input.
        """
        self._read_subscriptions()
        self._socket.send_multipart(frames, copy=True)

    def _read_subscriptions(self) -> None:
        """Apply the subscription messages queued on the XPUB socket, without blocking."""
        while True:
            try:
                event = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            subscribed, topic = event[:1] == b"\x01", event[1:]
            if not topic.startswith(HELLO_PREFIX):
                continue
            subscriber_id = topic[len(HELLO_PREFIX):].decode("utf-8", errors="replace")
            if subscribed and self._next_sequence > 0:
                self.subscribers.add(subscriber_id)
                logger.warning("Subscriber %s sent its hello on %s after %d messages were sent, so it "
                               "missed them.", subscriber_id, self.address, self._next_sequence)
            elif subscribed:
                self.subscribers.add(subscriber_id)
                logger.info("Subscriber %s sent its hello on %s.", subscriber_id, self.address)
            else:
                self.subscribers.discard(subscriber_id)
                logger.warning("Subscriber %s left %s after %d messages.", subscriber_id, self.address,
                               self._next_sequence)

    def close(self, linger_s: float = 1.0) -> None:
        """Close the socket, waiting up to ``linger_s`` for queued messages to go out."""
        self._socket.close(linger=int(linger_s * 1000))


class SequenceCounter:
    """Counts of the received, repeated and missing sequence numbers of one stream.

    ``n_received + n_missing == last_sequence + 1`` is true after every call to :meth:`count`. A
    number that arrives after a later one fills its gap. Repeats are counted and left out.
    ``source`` names the stream in log messages.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.n_received = 0
        self.n_duplicates = 0
        self.n_missing = 0
        self.last_sequence: int | None = None
        # Sorted, disjoint half-open [start, stop) ranges of the numbers not received, which separate a
        # late arrival from a repeat. Ranges, not single numbers, because one bogus jump to 2**53
        # would otherwise need that many entries.
        self.missing_ranges: list[tuple[int, int]] = []

    def count(self, sequence: int) -> bool:
        """Update the counts for ``sequence``; return False if it was already received."""
        # NOTE: a sender that restarts and counts from 0 again has its messages ignored as repeats
        # until it passes its old last sequence. Open a new TRSubscriber for a restarted sender.
        if self.last_sequence is None or sequence > self.last_sequence:
            expected = 0 if self.last_sequence is None else self.last_sequence + 1
            if sequence > expected:
                self.missing_ranges.append((expected, sequence))
                self.n_missing += sequence - expected
                logger.warning("Sequence gap on %s: %d messages missing (sequence %d to %d).",
                               self.source, sequence - expected, expected, sequence - 1)
            self.last_sequence = sequence
            self.n_received += 1
            return True

        for position, (start, stop) in enumerate(self.missing_ranges):
            if start <= sequence < stop:
                pieces = [(start, sequence), (sequence + 1, stop)]
                kept = [(low, high) for low, high in pieces if low < high]
                self.missing_ranges[position:position + 1] = kept
                self.n_missing -= 1
                self.n_received += 1
                logger.warning("Sequence %d arrived on %s after later ones; it is no longer missing.",
                               sequence, self.source)
                return True

        self.n_duplicates += 1
        if _should_log(self.n_duplicates):
            logger.warning("Sequence %d arrived on %s again (repeat %d); the repeat is ignored.",
                           sequence, self.source, self.n_duplicates)
        return False


class TRSubscriber:
    """The receiving side: a SUB socket that validates, numbers and counts what arrives.

    :meth:`poll` never blocks longer than its timeout and never raises for bad input: a malformed
    message is counted under its reason and logged (rate-limited). Lost and repeated messages are
    found from the sequence numbers by ``sequences``. A rejected message's sequence number is
    unknown, so it shows up as missing once a later message arrives. Messages lost after the last
    one received are not visible here, but :meth:`TRTable.expire` flags their TRs when their
    deadline passes.

    A bound subscriber sends its hello only while its owner calls :meth:`poll`, because libzmq
    (4.3.5, measured) attaches an incoming connection to a SUB socket only when the socket is next
    used. So keep polling while the pipeline waits for the subscriber. A connecting subscriber has
    no such need.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, *, bind: bool = False, allow_remote: bool = False,
                 roi_names: Sequence[str] | None = None, subscriber_id: str | None = None,
                 context: zmq.Context | None = None) -> None:
        self.subscriber_id = subscriber_id or uuid.uuid4().hex
        self.roi_names = None if roi_names is None else tuple(roi_names)
        self._socket = _open_socket(context or zmq.Context.instance(), zmq.SUB, address, bind, allow_remote)
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT) if bind else address
        # Everything first, then the hello. The publisher reads them in this order, so the first
        # subscription is in place by the time the publisher reads the hello.
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.setsockopt(zmq.SUBSCRIBE, HELLO_PREFIX + self.subscriber_id.encode("utf-8"))
        self.sequences = SequenceCounter(self.address)
        self.rejected_by_reason: dict[str, int] = {}

    @property
    def n_received(self) -> int:
        """Number of distinct valid messages received."""
        return self.sequences.n_received

    @property
    def n_duplicates(self) -> int:
        """Number of valid messages left out because their sequence number was already received."""
        return self.sequences.n_duplicates

    @property
    def n_missing(self) -> int:
        """Number of sequence numbers below the last one received that never arrived."""
        return self.sequences.n_missing

    @property
    def last_sequence(self) -> int | None:
        """Highest sequence number received, or None before the first valid message."""
        return self.sequences.last_sequence

    @property
    def n_rejected(self) -> int:
        """Number of malformed messages rejected, all reasons together."""
        return sum(self.rejected_by_reason.values())

    def poll(self, timeout_s: float = 0.0, max_messages: int = 10_000) -> list[TRMessage]:
        """Read what has arrived and return the new valid messages, in arrival order.

        Waits up to ``timeout_s`` for the first message, then reads without waiting until the queue
        is empty or ``max_messages`` (valid or not) were read. Repeated sequence numbers are counted
        and left out.
        """
        if timeout_s > 0 and not self._socket.poll(int(timeout_s * 1000), zmq.POLLIN):
            return []
        messages = []
        for _ in range(max_messages):
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            message = self._decode(frames)
            if message is not None and self.sequences.count(message.sequence):
                messages.append(message)
        return messages

    def _decode(self, frames: list[bytes]) -> TRMessage | None:
        try:
            if len(frames) != 1:
                raise MalformedMessageError(
                    "multipart", f"The message has {len(frames)} frames; the schema sends one.")
            return decode_tr_message(frames[0], self.roi_names)
        except MalformedMessageError as err:
            count = self.rejected_by_reason.get(err.reason, 0) + 1
            self.rejected_by_reason[err.reason] = count
            if _should_log(count):
                logger.warning("Rejected message %d with reason %s from %s: %s", count, err.reason,
                               self.address, err)
            return None

    def close(self) -> None:
        self._socket.close(linger=0)


def _should_log(count: int) -> bool:
    """Return whether the ``count``-th repeat of one kind of warning is logged."""
    return count <= REPEAT_LOG_FIRST or count % REPEAT_LOG_EVERY == 0


# TR table


class TRStatus(StrEnum):
    """The state of one TR in a :class:`TRTable`."""

    PENDING = "pending"
    ON_TIME = "on_time"
    LATE = "late"
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class TRUpdate:
    """Outcome of :meth:`TRTable.add` for one message.

    ``stored`` is False for a repeat of a TR already stored (the first is kept) and for a
    ``tr_index`` outside the run. ``delay_s`` is arrival minus expected time (negative if early).
    """

    tr_index: int
    stored: bool
    status: TRStatus | None
    previous_status: TRStatus | None
    delay_s: float


class TRTable:
    """Per-TR values of one run, stored under each message's own ``tr_index`` on a fixed schedule.

    The value for TR ``i`` is expected at ``first_tr_time + i * tr_s`` on the receiver's clock, so
    ``first_tr_time`` should include the pipeline's usual latency. A message arriving more than
    ``late_after_trs`` TRs after that is flagged late. :meth:`expire` marks a TR as timed out once
    ``timeout_after_trs`` TRs have passed with no message. A late message never moves the schedule
    of the TRs after it. Times are arguments, in seconds, so no method reads a clock.
    """

    def __init__(self, n_trs: int, n_rois: int, first_tr_time: float, tr_s: float,
                 late_after_trs: float = 0.5, timeout_after_trs: float = 1.5) -> None:
        if n_trs < 1 or n_rois < 1:
            raise ValueError(f"n_trs and n_rois must be at least 1, got {n_trs} and {n_rois}.")
        if not tr_s > 0:
            raise ValueError(f"tr_s must be positive, got {tr_s}.")
        if not 0 <= late_after_trs <= timeout_after_trs:
            raise ValueError(
                f"late_after_trs ({late_after_trs}) must be between 0 and timeout_after_trs "
                f"({timeout_after_trs}), because a TR cannot time out before it is late.")
        self.n_trs = n_trs
        self.n_rois = n_rois
        self.first_tr_time = first_tr_time
        self.tr_s = tr_s
        self.late_after_s = late_after_trs * tr_s
        self.timeout_after_s = timeout_after_trs * tr_s
        self.statuses = [TRStatus.PENDING] * n_trs
        self.arrival_times = np.full(n_trs, np.nan)
        self.sequences: list[int | None] = [None] * n_trs
        self._values = np.full((n_trs, n_rois), np.nan)
        # TRs before this index are all past their deadline and no longer PENDING.
        self._first_unexpired = 0

    def expected_time(self, tr_index: int) -> float:
        """Return when the value for ``tr_index`` is expected, on the receiver's clock."""
        return self.first_tr_time + tr_index * self.tr_s

    def deadline(self, tr_index: int) -> float:
        """Return the time after which :meth:`expire` marks ``tr_index`` as timed out."""
        return self.expected_time(tr_index) + self.timeout_after_s

    def values(self) -> np.ndarray:
        """Return a copy of the ``(n_trs, n_rois)`` values, NaN where no value arrived or it was null."""
        return self._values.copy()

    def add(self, message: TRMessage, now: float) -> TRUpdate:
        """Store ``message`` under its ``tr_index`` as it arrives at time ``now``."""
        index = message.tr_index
        if index >= self.n_trs:
            logger.warning("TR %d (sequence %d) is outside this run of %d TRs; it is ignored.",
                           index, message.sequence, self.n_trs)
            return TRUpdate(index, False, None, None, math.nan)
        if len(message.roi_values) != self.n_rois:
            raise ValueError(
                f"TR {index} has {len(message.roi_values)} ROI values, but the table has {self.n_rois}. "
                "Pass the session's roi_names to TRSubscriber so that such messages are rejected.")

        delay_s = now - self.expected_time(index)
        previous = self.statuses[index]
        if previous in (TRStatus.ON_TIME, TRStatus.LATE):
            logger.warning("TR %d arrived again (sequence %d); the first value is kept.",
                           index, message.sequence)
            return TRUpdate(index, False, previous, previous, delay_s)

        status = TRStatus.LATE if delay_s > self.late_after_s else TRStatus.ON_TIME
        self.statuses[index] = status
        self.arrival_times[index] = now
        self.sequences[index] = message.sequence
        self._values[index] = [math.nan if value is None else value for value in message.roi_values]
        if previous is TRStatus.TIMEOUT:
            logger.warning("TR %d arrived %.3f s after its expected time, after it was marked as timed "
                           "out; it is stored as late.", index, delay_s)
        return TRUpdate(index, True, status, previous, delay_s)

    def expire(self, now: float) -> list[int]:
        """Mark every pending TR whose deadline is before ``now`` as timed out; return their indices."""
        expired = []
        while self._first_unexpired < self.n_trs and self.deadline(self._first_unexpired) < now:
            index = self._first_unexpired
            if self.statuses[index] is TRStatus.PENDING:
                self.statuses[index] = TRStatus.TIMEOUT
                expired.append(index)
            self._first_unexpired += 1
        if expired:
            logger.warning("No value arrived for TRs %s before their deadline of %.3f s after the "
                           "expected time.", expired, self.timeout_after_s)
        return expired
