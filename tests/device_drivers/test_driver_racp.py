"""Record Access Control Point codec: requests and answers, and every bad answer refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_drivers.gatt import racp
from device_drivers.gatt.errors import EncodeError, MalformedPayload


def test_report_requests_have_the_specified_bytes() -> None:
    assert racp.encode_request(racp.report_all_records()) == bytes([0x01, 0x01])
    assert racp.encode_request(racp.report_records_from(0x0102)) == bytes(
        [0x01, 0x03, 0x01, 0x02, 0x01]
    )
    assert racp.encode_request(racp.report_number_of_records()) == bytes([0x04, 0x01])
    assert racp.encode_request(racp.report_number_of_records(5)) == bytes(
        [0x04, 0x03, 0x01, 0x05, 0x00]
    )
    assert racp.encode_request(racp.delete_all_records()) == bytes([0x02, 0x01])
    assert racp.encode_request(racp.abort()) == bytes([0x03, 0x00])


def test_responses_have_the_specified_bytes() -> None:
    success = racp.ResponseCodeIndication(
        racp.Opcode.REPORT_STORED_RECORDS, racp.ResponseCode.SUCCESS
    )
    assert racp.encode_response(success) == bytes([0x06, 0x00, 0x01, 0x01])
    assert success.succeeded
    none = racp.ResponseCodeIndication(0x01, racp.ResponseCode.NO_RECORDS_FOUND)
    assert not none.succeeded
    assert racp.decode_response(bytes([0x06, 0x00, 0x01, 0x06])) == none
    assert racp.decode_response(bytes([0x05, 0x00, 0x2C, 0x01])) == racp.NumberOfRecords(300)


@given(st.integers(0, 0xFFFF))
def test_sequence_filters_round_trip(sequence: int) -> None:
    request = racp.decode_request(racp.encode_request(racp.report_records_from(sequence)))
    assert request == racp.report_records_from(sequence)
    assert request.sequence_filter() == (sequence,)


@given(
    st.one_of(
        st.builds(racp.NumberOfRecords, st.integers(0, 0xFFFF)),
        st.builds(racp.ResponseCodeIndication, st.integers(0, 255), st.integers(0, 255)),
    )
)
def test_responses_round_trip(response: racp.RacpResponse) -> None:
    assert racp.decode_response(racp.encode_response(response)) == response


@given(st.binary(max_size=8))
def test_any_bytes_decode_to_a_response_or_malformed_payload(data: bytes) -> None:
    outcome: object
    try:
        outcome = racp.decode_response(data)
    except MalformedPayload as exc:
        outcome = exc
    if isinstance(outcome, MalformedPayload):
        assert outcome.characteristic == "0x2A52"
    else:
        assert isinstance(outcome, racp.NumberOfRecords | racp.ResponseCodeIndication)
        assert racp.encode_response(outcome) == data


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x06",
        b"\x06\x00\x01",
        b"\x06\x01\x01\x01",
        b"\x01\x00\x01\x01",
        b"\x05\x00\x01",
        b"\x06\x00\x01\x01\x00",
    ],
    ids=[
        "empty",
        "opcode-only",
        "short-code",
        "operator-not-null",
        "request-opcode",
        "short-count",
        "trailing",
    ],
)
def test_bad_responses_are_malformed(data: bytes) -> None:
    with pytest.raises(MalformedPayload):
        racp.decode_response(data)


@pytest.mark.parametrize("data", [b"", b"\x01"], ids=["empty", "opcode-only"])
def test_short_requests_are_malformed(data: bytes) -> None:
    with pytest.raises(MalformedPayload):
        racp.decode_request(data)


@pytest.mark.parametrize(
    "operand",
    [b"", b"\x02\x01\x00", b"\x01\x01", b"\x01\x01\x00\x02"],
    ids=["empty", "time-filter", "odd-length", "three-bytes"],
)
def test_operands_that_are_not_sequence_filters(operand: bytes) -> None:
    assert racp.RacpRequest(0x01, 0x03, operand).sequence_filter() is None


def test_sequence_numbers_beyond_uint16_cannot_be_encoded() -> None:
    with pytest.raises(EncodeError):
        racp.report_records_from(0x10000)
