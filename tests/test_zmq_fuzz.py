"""Fuzzing the TR message decoder and the sequence counter: any input decodes or raises MalformedMessageError.

Bounded: a fixed number of examples per test (hypothesis), a few seconds in all.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from acquisition.zmq_bridge import (
    MAX_INDEX,
    MalformedMessageError,
    SequenceCounter,
    TRMessage,
    decode_tr_message,
    encode_tr_message,
)

FUZZ = settings(max_examples=300, deadline=None)
ROIS = ("ffa_left", "ffa_right")
REASONS = {"too_large", "multipart", "not_utf8", "not_json", "schema_version", "fields", "type", "value",
           "roi_mismatch"}
FIELDS = ["schema_version", "sequence", "tr_index", "acquisition_time", "roi_values", "roi_names"]

# Values at the edges of the schema: the index range, doubles that overflow, bool posing as int.
edge_values = st.sampled_from([0, 1, -1, 2**53 - 1, 2**53, 0.5, -0.0, 1e308, 10**400, -(10**400), True,
                               False, "", "1", None, [], {}, float("nan"), float("inf")])
json_scalars = st.one_of(
    edge_values, st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=10),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=12,
)


def valid_fields() -> dict:
    return {"schema_version": 1, "sequence": 4, "tr_index": 3, "acquisition_time": 12.5,
            "roi_values": [0.25, None], "roi_names": list(ROIS)}


def assert_decodes_or_rejects(data: bytes, roi_names=None) -> None:
    try:
        message = decode_tr_message(data, roi_names)
    except MalformedMessageError as err:
        assert err.reason in REASONS
        assert str(err)
        return
    assert isinstance(message, TRMessage)
    assert 0 <= message.sequence <= MAX_INDEX
    assert 0 <= message.tr_index <= MAX_INDEX
    assert all(value is None or isinstance(value, float) for value in message.roi_values)
    if roi_names is not None:
        assert len(message.roi_values) == len(roi_names)
    assert decode_tr_message(encode_tr_message(message), roi_names) == message


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes(data):
    assert_decodes_or_rejects(data)


@FUZZ
@given(value=json_values, expect_rois=st.booleans())
def test_random_json(value, expect_rois):
    data = json.dumps(value).encode("utf-8")
    assert_decodes_or_rejects(data, ROIS if expect_rois else None)


@FUZZ
@given(key=st.sampled_from([*FIELDS, "extra"]), value=edge_values | json_values, drop=st.booleans(),
       expect_rois=st.booleans())
def test_mutated_message(key, value, drop, expect_rois):
    fields = valid_fields()
    if drop:
        fields.pop(key, None)
    else:
        fields[key] = value
    data = json.dumps(fields).encode("utf-8")
    assert_decodes_or_rejects(data, ROIS if expect_rois else None)


@FUZZ
@given(key=st.sampled_from(["roi_values", "roi_names"]), index=st.integers(0, 2),
       value=edge_values | json_values, expect_rois=st.booleans())
def test_mutated_list_element(key, index, value, expect_rois):
    fields = valid_fields()
    items = fields[key]
    items[index:index + 1] = [value]
    data = json.dumps(fields).encode("utf-8")
    assert_decodes_or_rejects(data, ROIS if expect_rois else None)


@FUZZ
@given(roi_values=st.lists(st.none() | st.floats(allow_nan=False, allow_infinity=False), max_size=8),
       sequence=st.integers(0, MAX_INDEX), tr_index=st.integers(0, MAX_INDEX),
       acquisition_time=st.floats(allow_nan=False, allow_infinity=False))
def test_valid_message_round_trip(roi_values, sequence, tr_index, acquisition_time):
    message = TRMessage(sequence, tr_index, acquisition_time, tuple(roi_values))
    assert decode_tr_message(encode_tr_message(message)) == message


@FUZZ
@given(sequences=st.lists(st.integers(0, 60), max_size=40))
def test_sequence_counter_invariant(sequences):
    counter = SequenceCounter("fuzz")
    for sequence in sequences:
        counter.count(sequence)
        assert counter.n_received + counter.n_missing == counter.last_sequence + 1
    assert counter.n_received == len(set(sequences))
    assert counter.n_duplicates == len(sequences) - len(set(sequences))
    if sequences:
        assert counter.n_missing == max(sequences) + 1 - len(set(sequences))
