"""The ZeroMQ bridge for per-TR fMRI values: the schema, real sockets on loopback, and the TR table."""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import pytest

from acquisition.zmq_bridge import (
    MAX_MESSAGE_BYTES,
    REPEAT_LOG_EVERY,
    REPEAT_LOG_FIRST,
    MalformedMessageError,
    SequenceCounter,
    SubscriberNotFoundError,
    TRMessage,
    TRPublisher,
    TRStatus,
    TRSubscriber,
    TRTable,
    check_address,
    decode_tr_message,
    encode_tr_message,
)

ROIS = ("ffa_left", "ffa_right")
WAIT_S = 10.0
LOOPBACK = "tcp://127.0.0.1:0"


def valid_fields(**changes) -> dict:
    fields = {"schema_version": 1, "sequence": 4, "tr_index": 3, "acquisition_time": 12.5,
              "roi_values": [0.25, None], "roi_names": list(ROIS)}
    fields.update(changes)
    return fields


def frame(fields) -> bytes:
    return json.dumps(fields).encode("utf-8")


def poll_until(subscriber, done, timeout_s=WAIT_S) -> list[TRMessage]:
    """Poll until ``done(messages)`` is true; fail after ``timeout_s``."""
    messages: list[TRMessage] = []
    deadline = time.monotonic() + timeout_s
    while not done(messages):
        if time.monotonic() > deadline:
            pytest.fail(f"Timed out after {timeout_s} s with {len(messages)} messages, "
                        f"{subscriber.n_rejected} rejected.")
        messages += subscriber.poll(timeout_s=0.05)
    return messages


@pytest.fixture
def bridge():
    """A bound publisher and a connected subscriber that expects ``ROIS``, already handshaken."""
    publisher = TRPublisher(LOOPBACK)
    subscriber = TRSubscriber(publisher.address, roi_names=ROIS)
    publisher.wait_for_subscribers(1, timeout_s=WAIT_S)
    yield publisher, subscriber
    subscriber.close()
    publisher.close(linger_s=0)


# Schema


def test_encode_decode_round_trip():
    message = TRMessage(sequence=4, tr_index=3, acquisition_time=12.5, roi_values=(0.25, None),
                        roi_names=ROIS)
    data = encode_tr_message(message)
    assert data == (b'{"schema_version":1,"sequence":4,"tr_index":3,"acquisition_time":12.5,'
                    b'"roi_values":[0.25,null],"roi_names":["ffa_left","ffa_right"]}')
    assert decode_tr_message(data, ROIS) == message


def test_decode_converts_numbers_and_names():
    fields = valid_fields(acquisition_time=12, roi_values=[1, -2.5])
    del fields["roi_names"]
    message = decode_tr_message(frame(fields), ROIS)
    assert message.acquisition_time == 12.0
    assert isinstance(message.acquisition_time, float)
    assert message.roi_values == (1.0, -2.5)
    assert message.roi_names is None
    assert decode_tr_message(frame(valid_fields(roi_names=None))).roi_names is None


MALFORMED = [
    (b"\xff\xfe{}", "not_utf8"),
    (b"TR 3: 0.25 0.5", "not_json"),
    (b"", "not_json"),
    (b'{"sequence": 1, "sequence": 2}', "not_json"),
    (b'{"schema_version": 1, "roi_values": [NaN, 1.0]}', "not_json"),
    (b"[" * 100_000 + b"]" * 100_000, "not_json"),
    (b" " * (MAX_MESSAGE_BYTES + 1), "too_large"),
    (b"[1, 2]", "type"),
    (frame(valid_fields(schema_version=2)), "schema_version"),
    (frame(valid_fields(schema_version="1")), "type"),
    (frame(valid_fields(schema_version=True)), "type"),
    (frame(valid_fields(extra=1)), "fields"),
    (frame({key: value for key, value in valid_fields().items() if key != "tr_index"}), "fields"),
    (frame(valid_fields(sequence="4")), "type"),
    (frame(valid_fields(sequence=4.0)), "type"),
    (frame(valid_fields(tr_index=-1)), "value"),
    (frame(valid_fields(tr_index=2**53)), "value"),
    (frame(valid_fields(acquisition_time=None)), "type"),
    (b'{"schema_version":1,"sequence":4,"tr_index":3,"acquisition_time":1e999,"roi_values":[1,2]}', "value"),
    (frame(valid_fields(roi_values={"ffa_left": 1.0})), "type"),
    (frame(valid_fields(roi_values=[0.25, "0.5"])), "type"),
    (frame(valid_fields(roi_values=[0.25, False])), "type"),
    (frame(valid_fields(roi_values=[10**400, 1.0])), "value"),
    (frame(valid_fields(roi_values=[0.25, 0.5, 0.75], roi_names=None)), "roi_mismatch"),
    (frame(valid_fields(roi_names=["ffa_right", "ffa_left"])), "roi_mismatch"),
    (frame(valid_fields(roi_names=["ffa_left"])), "roi_mismatch"),
    (frame(valid_fields(roi_names=["ffa_left", 2])), "type"),
    (frame(valid_fields(roi_names=["ffa_left", ""])), "value"),
]


@pytest.mark.parametrize(("data", "reason"), MALFORMED, ids=[reason for _, reason in MALFORMED])
def test_decode_rejects_malformed(data, reason):
    with pytest.raises(MalformedMessageError) as caught:
        decode_tr_message(data, ROIS)
    assert caught.value.reason == reason
    assert str(caught.value)


def test_decode_version_error_names_versions():
    with pytest.raises(MalformedMessageError, match=r"schema_version 2 is not supported; this receiver reads "
                                                    r"version 1"):
        decode_tr_message(frame({"schema_version": 2, "tr": 3}), ROIS)


def test_decode_without_expected_rois_takes_any_count():
    message = decode_tr_message(frame(valid_fields(roi_values=[1.0, 2.0, 3.0], roi_names=None)))
    assert message.roi_values == (1.0, 2.0, 3.0)


def test_message_rejects_nan():
    with pytest.raises(MalformedMessageError, match=r"roi_values\[1\] must be finite"):
        TRMessage(sequence=0, tr_index=0, acquisition_time=0.0, roi_values=(1.0, float("nan")))


# Addresses


REMOTE_ADVICE = r"set `allow_remote = true` in the \[zmq\] section of the rig file"


@pytest.mark.parametrize("address", [
    "tcp://0.0.0.0:5570", "tcp://*:5570", "tcp://192.168.1.20:5570", "tcp://eth0:5570", "tcp://[::]:5570",
    "tcp://127.0.0.1:5570;10.0.0.2:5570", "epgm://eth0;239.192.1.1:5570", "ws://127.0.0.1:5570",
])
def test_remote_address_rejected(address):
    for open_socket in (TRPublisher, TRSubscriber):
        with pytest.raises(ValueError, match=REMOTE_ADVICE):
            open_socket(address)
    check_address(address, allow_remote=True)


@pytest.mark.parametrize("address", [
    "tcp://127.0.0.1:5570", "tcp://127.0.0.2:5570", "tcp://localhost:5570", "tcp://[::1]:5570",
    "ipc:///tmp/neurosteer-tr", "inproc://tr",
])
def test_local_address_accepted(address):
    check_address(address, allow_remote=False)


def test_address_without_transport_rejected():
    with pytest.raises(ValueError, match="is invalid; write it as tcp://127.0.0.1:PORT"):
        check_address("127.0.0.1:5570", allow_remote=False)


# Sockets on loopback


def test_late_subscriber_loses_no_tr():
    n_trs = 20
    publisher = TRPublisher(LOOPBACK)
    errors = []

    def run_pipeline():
        try:
            publisher.wait_for_subscribers(1, timeout_s=WAIT_S)
            for tr in range(n_trs):
                publisher.send(tr, 100.0 + 2.0 * tr, (float(tr), -float(tr)), ROIS)
        except Exception as err:  # reported by the main thread
            errors.append(err)

    sender = threading.Thread(target=run_pipeline)
    sender.start()
    # The scenario under test: the controller starts 200 ms after the pipeline.
    time.sleep(0.2)
    subscriber = TRSubscriber(publisher.address, roi_names=ROIS)
    messages = poll_until(subscriber, lambda received: len(received) == n_trs)
    sender.join(WAIT_S)
    subscriber.close()
    publisher.close(linger_s=0)

    assert errors == []
    assert [message.tr_index for message in messages] == list(range(n_trs))
    assert [message.sequence for message in messages] == list(range(n_trs))
    table = TRTable(n_trs, len(ROIS), first_tr_time=100.0, tr_s=2.0)
    for message in messages:
        table.add(message, now=table.expected_time(message.tr_index))
    expected = np.column_stack([np.arange(n_trs), -np.arange(n_trs)]).astype(float)
    np.testing.assert_array_equal(table.values(), expected)
    assert subscriber.n_missing == 0
    assert subscriber.n_received == n_trs


def test_subscriber_binds_publisher_connects():
    subscriber = TRSubscriber(LOOPBACK, bind=True, roi_names=ROIS, subscriber_id="controller")
    publisher = TRPublisher(subscriber.address, bind=False)
    ready = []
    waiter = threading.Thread(
        target=lambda: ready.append(publisher.wait_for_subscribers(1, timeout_s=WAIT_S)))
    waiter.start()
    # A bound SUB socket attaches an incoming connection, and so sends its hello, only when it is
    # next used: the controller keeps polling while the pipeline waits.
    deadline = time.monotonic() + WAIT_S
    while waiter.is_alive() and time.monotonic() < deadline:
        assert subscriber.poll(timeout_s=0.05) == []
    waiter.join(WAIT_S)
    assert ready == [("controller",)]

    for tr in range(3):
        publisher.send(tr, float(tr), (1.0, 2.0))
    messages = poll_until(subscriber, lambda received: len(received) == 3)
    subscriber.close()
    publisher.close(linger_s=0)
    assert [message.tr_index for message in messages] == [0, 1, 2]


def test_two_subscribers_both_get_tr_zero():
    publisher = TRPublisher(LOOPBACK)
    subscribers = [TRSubscriber(publisher.address, subscriber_id=name) for name in ("controller", "recorder")]
    assert publisher.wait_for_subscribers(2, timeout_s=WAIT_S) == ("controller", "recorder")
    publisher.send(0, 0.0, (1.0, 2.0))
    received = [poll_until(subscriber, lambda messages: len(messages) == 1) for subscriber in subscribers]
    for subscriber in subscribers:
        subscriber.close()
    publisher.close(linger_s=0)
    assert [messages[0].tr_index for messages in received] == [0, 0]


def test_handshake_timeout_raises():
    publisher = TRPublisher(LOOPBACK)
    started = time.monotonic()
    with pytest.raises(SubscriberNotFoundError,
                       match=r"0 of 1 subscribers sent their hello to .* within 0.3 s"):
        publisher.wait_for_subscribers(1, timeout_s=0.3)
    publisher.close(linger_s=0)
    # One-sided bound: the wait must end near its timeout, not block (5 s allows a busy CI host).
    assert time.monotonic() - started < 5.0


def test_malformed_flood_keeps_every_valid(bridge, caplog):
    publisher, subscriber = bridge
    n_trs = 100
    small_malformed = [data for data, reason in MALFORMED if reason != "too_large"]
    caplog.set_level(logging.WARNING, logger="acquisition.zmq_bridge")
    for tr in range(n_trs):
        for data in small_malformed:
            publisher.send_frames(data)
        publisher.send_frames(encode_tr_message(TRMessage(0, 0, 0.0, (1.0, 2.0))), b"second frame")
        if tr < 3:
            publisher.send_frames(b" " * (MAX_MESSAGE_BYTES + 1))
        publisher.send(tr, 2.0 * tr, (0.5 * tr, None), ROIS)

    # Each TR is preceded by every small case of MALFORMED once and by one two-frame message.
    expected_rejects = {"not_utf8": 100, "not_json": 500, "type": 1000, "schema_version": 100, "fields": 200,
                        "value": 500, "roi_mismatch": 300, "multipart": 100, "too_large": 3}
    n_rejects = sum(expected_rejects.values())
    messages = poll_until(subscriber, lambda received: subscriber.n_rejected == n_rejects
                          and len(received) == n_trs)

    assert [message.tr_index for message in messages] == list(range(n_trs))
    assert [message.roi_values for message in messages] == [(0.5 * tr, None) for tr in range(n_trs)]
    assert subscriber.rejected_by_reason == expected_rejects
    assert subscriber.n_received == n_trs
    assert subscriber.n_missing == 0
    assert subscriber.n_duplicates == 0
    # The first REPEAT_LOG_FIRST (5) of each reason are logged, then every REPEAT_LOG_EVERY-th (1000th).
    assert (REPEAT_LOG_FIRST, REPEAT_LOG_EVERY) == (5, 1000)
    logged: dict[str, int] = {}
    for record in caplog.records:
        text = record.getMessage()
        if text.startswith("Rejected message"):
            reason = text.split(" with reason ")[1].split(" ")[0]
            logged[reason] = logged.get(reason, 0) + 1
    assert logged == {"not_utf8": 5, "not_json": 5, "type": 6, "schema_version": 5, "fields": 5,
                      "value": 5, "roi_mismatch": 5, "multipart": 5, "too_large": 3}


def test_gaps_and_duplicates_counted(bridge, caplog):
    publisher, subscriber = bridge
    sequences = [0, 1, 2, 5, 5, 6, 9, 3]
    caplog.set_level(logging.WARNING, logger="acquisition.zmq_bridge")
    for sequence in sequences:
        publisher.send_frames(encode_tr_message(TRMessage(sequence, sequence, float(sequence), (1.0, 2.0))))
    messages = poll_until(
        subscriber, lambda _: subscriber.n_received + subscriber.n_duplicates == len(sequences))

    assert [message.sequence for message in messages] == [0, 1, 2, 5, 6, 9, 3]
    assert subscriber.n_received == 7
    assert subscriber.n_duplicates == 1
    assert subscriber.n_missing == 3
    assert subscriber.last_sequence == 9
    # Sequences 0 to 9 count as sent. Sequence 3 arrives after 9, and 4, 7 and 8 never arrive.
    assert subscriber.n_received + subscriber.n_missing == 10
    assert subscriber.sequences.missing_ranges == [(4, 5), (7, 9)]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("2 messages missing (sequence 3 to 4)" in text for text in warnings)
    assert any("2 messages missing (sequence 7 to 8)" in text for text in warnings)
    assert any("Sequence 5 arrived" in text and "again" in text for text in warnings)
    assert any("Sequence 3 arrived" in text and "after later ones" in text for text in warnings)


def test_publisher_numbers_messages(bridge):
    publisher, subscriber = bridge
    sent = [publisher.send(tr, float(tr), (1.0, 2.0)) for tr in range(4)]
    assert [message.sequence for message in sent] == [0, 1, 2, 3]
    assert publisher.n_sent == 4
    poll_until(subscriber, lambda received: len(received) == 4)
    assert subscriber.n_received + subscriber.n_missing == publisher.n_sent


# Sequence counting


def test_sequence_counter_invariant_table():
    cases = [
        ([], 0, 0, 0, None),
        ([0], 1, 0, 0, 0),
        ([3], 1, 0, 3, 3),
        ([0, 0, 0], 1, 2, 0, 0),
        ([0, 2, 1, 1], 3, 1, 0, 2),
        ([5, 0, 1, 2, 3, 4], 6, 0, 0, 5),
        ([0, 2**53 - 1, 1], 3, 0, 2**53 - 3, 2**53 - 1),
    ]
    for sequences, n_received, n_duplicates, n_missing, last_sequence in cases:
        counter = SequenceCounter("test")
        for sequence in sequences:
            counter.count(sequence)
        assert counter.n_received == n_received, sequences
        assert counter.n_duplicates == n_duplicates, sequences
        assert counter.n_missing == n_missing, sequences
        assert counter.last_sequence == last_sequence, sequences


# TR table: 2 s TRs, the value for TR 0 expected at t = 100 s, deadline 1.5 TR (3 s) after.


def tr_message(tr_index, value=None) -> TRMessage:
    value = float(tr_index) if value is None else value
    return TRMessage(sequence=tr_index, tr_index=tr_index, acquisition_time=0.0, roi_values=(value, -value))


@pytest.fixture
def table() -> TRTable:
    return TRTable(n_trs=20, n_rois=2, first_tr_time=100.0, tr_s=2.0)


def test_tr_table_schedule_is_fixed(table):
    assert table.expected_time(0) == 100.0
    assert table.expected_time(7) == 114.0
    assert table.deadline(7) == 117.0


def test_tr_table_missing_tr_times_out(table):
    for tr in range(7):
        assert table.add(tr_message(tr), now=table.expected_time(tr) + 0.2).status is TRStatus.ON_TIME
    assert table.expire(now=116.99) == []
    assert table.expire(now=117.0) == []
    assert table.expire(now=117.01) == [7]
    assert table.expire(now=117.5) == []

    assert table.statuses[7] is TRStatus.TIMEOUT
    assert table.statuses[7] == "timeout"
    assert np.isnan(table.values()[7]).all()
    assert table.add(tr_message(8), now=116.2).status is TRStatus.ON_TIME
    assert table.statuses[8] is TRStatus.ON_TIME
    assert table.expected_time(8) == 116.0


def test_tr_table_late_tr_keeps_its_index(table):
    update = table.add(tr_message(12, value=5.0), now=table.expected_time(12) + 3.5)
    assert update.tr_index == 12
    assert update.stored is True
    assert update.status is TRStatus.LATE
    assert update.previous_status is TRStatus.PENDING
    assert update.delay_s == pytest.approx(3.5)
    np.testing.assert_array_equal(table.values()[12], [5.0, -5.0])
    assert table.expected_time(13) == 126.0
    assert table.add(tr_message(13), now=126.1).status is TRStatus.ON_TIME


def test_tr_table_late_after_timeout_reported(table):
    assert table.expire(now=table.expected_time(12) + 3.1) == list(range(13))
    assert table.statuses[12] is TRStatus.TIMEOUT

    update = table.add(tr_message(12, value=5.0), now=table.expected_time(12) + 3.5)
    assert update.stored is True
    assert update.status is TRStatus.LATE
    assert update.previous_status is TRStatus.TIMEOUT
    assert table.statuses[12] is TRStatus.LATE
    np.testing.assert_array_equal(table.values()[12], [5.0, -5.0])
    assert table.statuses[11] is TRStatus.TIMEOUT


def test_tr_table_late_tolerance_boundary(table):
    # late_after_trs = 0.5, so a value up to 1 s after its expected time is on time.
    assert table.add(tr_message(0), now=101.0).status is TRStatus.ON_TIME
    assert table.add(tr_message(1), now=103.01).status is TRStatus.LATE
    # An early value is on time.
    assert table.add(tr_message(2), now=103.0).status is TRStatus.ON_TIME


def test_tr_table_repeat_keeps_first(table):
    table.add(tr_message(4, value=1.0), now=108.0)
    update = table.add(tr_message(4, value=9.0), now=108.5)
    assert update.stored is False
    assert update.status is TRStatus.ON_TIME
    np.testing.assert_array_equal(table.values()[4], [1.0, -1.0])
    assert table.arrival_times[4] == 108.0


def test_tr_table_ignores_tr_outside_run(table):
    update = table.add(tr_message(20), now=140.0)
    assert update.stored is False
    assert update.status is None
    assert table.expire(now=1000.0) == list(range(20))


def test_tr_table_null_roi_is_nan(table):
    message = TRMessage(sequence=0, tr_index=0, acquisition_time=0.0, roi_values=(None, 2.0))
    table.add(message, now=100.0)
    values = table.values()
    assert np.isnan(values[0, 0])
    assert values[0, 1] == 2.0
    assert table.statuses[0] is TRStatus.ON_TIME


def test_tr_table_rejects_wrong_roi_count(table):
    message = TRMessage(sequence=0, tr_index=0, acquisition_time=0.0, roi_values=(1.0,))
    with pytest.raises(ValueError, match="TR 0 has 1 ROI values, but the table has 2"):
        table.add(message, now=100.0)


def test_tr_table_rejects_timeout_before_late():
    with pytest.raises(ValueError, match="cannot time out before it is late"):
        TRTable(n_trs=10, n_rois=1, first_tr_time=0.0, tr_s=2.0, late_after_trs=2.0, timeout_after_trs=1.5)


def test_bridge_timeout_and_late_tr(bridge):
    """TR 7 never arrives and TR 12 arrives 3.5 s late, through real sockets with the clock passed in."""
    publisher, subscriber = bridge
    table = TRTable(n_trs=14, n_rois=2, first_tr_time=100.0, tr_s=2.0)
    arrival_order = [*range(7), *range(8, 12), 13, 12]
    for tr in arrival_order:
        publisher.send(tr, 10.0 + 2.0 * tr, (float(tr), -float(tr)), ROIS)
    messages = poll_until(subscriber, lambda received: len(received) == len(arrival_order))

    delays = {tr: 0.3 for tr in range(14)}
    delays[12] = 3.5
    updates = {}
    timed_out = []
    for message in messages:
        now = table.expected_time(message.tr_index) + delays[message.tr_index]
        timed_out += table.expire(now)
        updates[message.tr_index] = table.add(message, now)
    timed_out += table.expire(now=table.deadline(13) + 0.1)

    assert [message.tr_index for message in messages] == arrival_order
    assert timed_out == [7, 12]
    assert updates[12].status is TRStatus.LATE
    assert updates[12].previous_status is TRStatus.TIMEOUT
    expected_statuses = [TRStatus.ON_TIME] * 14
    expected_statuses[7] = TRStatus.TIMEOUT
    expected_statuses[12] = TRStatus.LATE
    assert table.statuses == expected_statuses
    values = table.values()
    assert np.isnan(values[7]).all()
    np.testing.assert_array_equal(values[12], [12.0, -12.0])
    np.testing.assert_array_equal(values[13], [13.0, -13.0])
    assert table.sequences[12] == 12
    assert subscriber.n_missing == 0
