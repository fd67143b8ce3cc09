"""Record Access Control Point (0x2A52), as the Glucose Service 1.0 uses it.

A collector writes a request and the sensor answers with one indication on the same
characteristic; records asked for are sent first, as notifications of the profile's
measurement characteristic (Glucose Measurement 0x2A18, with Context 0x2A34 when flagged).

Request: op code uint8, operator uint8, then an operand whose layout depends on both. For the
Glucose Service the operand of a filtered request is a filter type uint8 (1: sequence number,
2: user facing time) followed by one value (``<=``, ``>=``) or two (within range) of that
type; sequence numbers are uint16.

Answers: ``Number of Stored Records Response`` (op code 5, operator Null, uint16 count), or
``Response Code`` (op code 6, operator Null, the request op code and a :class:`ResponseCode`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from device_drivers.gatt._codec import Reader, Writer

__all__ = [
    "CHARACTERISTIC",
    "FilterType",
    "NumberOfRecords",
    "Opcode",
    "Operator",
    "RacpRequest",
    "ResponseCode",
    "ResponseCodeIndication",
    "abort",
    "decode_request",
    "decode_response",
    "delete_all_records",
    "encode_request",
    "encode_response",
    "report_all_records",
    "report_number_of_records",
    "report_records_from",
]

CHARACTERISTIC = 0x2A52


class Opcode(enum.IntEnum):
    REPORT_STORED_RECORDS = 0x01
    DELETE_STORED_RECORDS = 0x02
    ABORT_OPERATION = 0x03
    REPORT_NUMBER_OF_STORED_RECORDS = 0x04
    NUMBER_OF_STORED_RECORDS_RESPONSE = 0x05
    RESPONSE_CODE = 0x06


class Operator(enum.IntEnum):
    NULL = 0x00
    ALL_RECORDS = 0x01
    LESS_THAN_OR_EQUAL_TO = 0x02
    GREATER_THAN_OR_EQUAL_TO = 0x03
    WITHIN_RANGE_OF = 0x04
    FIRST_RECORD = 0x05
    LAST_RECORD = 0x06


class FilterType(enum.IntEnum):
    SEQUENCE_NUMBER = 0x01
    USER_FACING_TIME = 0x02


class ResponseCode(enum.IntEnum):
    SUCCESS = 0x01
    OP_CODE_NOT_SUPPORTED = 0x02
    INVALID_OPERATOR = 0x03
    OPERATOR_NOT_SUPPORTED = 0x04
    INVALID_OPERAND = 0x05
    NO_RECORDS_FOUND = 0x06
    ABORT_UNSUCCESSFUL = 0x07
    PROCEDURE_NOT_COMPLETED = 0x08
    OPERAND_NOT_SUPPORTED = 0x09


@dataclass(frozen=True, slots=True)
class RacpRequest:
    """A request as written: raw op code and operator (unknown values are kept, so a sensor
    can answer them with the right response code), and the operand bytes after them."""

    opcode: int
    operator: int
    operand: bytes = b""

    def sequence_filter(self) -> tuple[int, ...] | None:
        """The sequence numbers of a sequence-number filter; None if the operand is not one.

        Decoding is lenient on purpose: a sensor answers a bad operand with
        ``INVALID_OPERAND`` rather than failing the write.
        """
        if len(self.operand) < 1 or self.operand[0] != FilterType.SEQUENCE_NUMBER:
            return None
        values = self.operand[1:]
        if len(values) % 2:
            return None
        return tuple(int.from_bytes(values[i : i + 2], "little") for i in range(0, len(values), 2))


@dataclass(frozen=True, slots=True)
class NumberOfRecords:
    count: int


@dataclass(frozen=True, slots=True)
class ResponseCodeIndication:
    request_opcode: int
    code: int

    @property
    def succeeded(self) -> bool:
        return self.code == ResponseCode.SUCCESS


RacpResponse = NumberOfRecords | ResponseCodeIndication


def _sequence_operand(*sequence_numbers: int) -> bytes:
    writer = Writer()
    writer.u8(FilterType.SEQUENCE_NUMBER)
    for number in sequence_numbers:
        writer.u16(number)
    return writer.getvalue()


def report_all_records() -> RacpRequest:
    return RacpRequest(Opcode.REPORT_STORED_RECORDS, Operator.ALL_RECORDS)


def report_last_record() -> RacpRequest:
    """The newest stored record: how a hub learns where the meter's sequence numbers are."""
    return RacpRequest(Opcode.REPORT_STORED_RECORDS, Operator.LAST_RECORD)


def report_records_from(sequence_number: int) -> RacpRequest:
    """Every stored record whose sequence number is ``>= sequence_number``."""
    return RacpRequest(
        Opcode.REPORT_STORED_RECORDS,
        Operator.GREATER_THAN_OR_EQUAL_TO,
        _sequence_operand(sequence_number),
    )


def report_number_of_records(from_sequence: int | None = None) -> RacpRequest:
    """How many records are stored (all, or those with sequence number ``>= from_sequence``)."""
    if from_sequence is None:
        return RacpRequest(Opcode.REPORT_NUMBER_OF_STORED_RECORDS, Operator.ALL_RECORDS)
    return RacpRequest(
        Opcode.REPORT_NUMBER_OF_STORED_RECORDS,
        Operator.GREATER_THAN_OR_EQUAL_TO,
        _sequence_operand(from_sequence),
    )


def delete_all_records() -> RacpRequest:
    return RacpRequest(Opcode.DELETE_STORED_RECORDS, Operator.ALL_RECORDS)


def abort() -> RacpRequest:
    return RacpRequest(Opcode.ABORT_OPERATION, Operator.NULL)


def encode_request(request: RacpRequest) -> bytes:
    writer = Writer()
    writer.u8(request.opcode)
    writer.u8(request.operator)
    writer.raw(request.operand)
    return writer.getvalue()


def decode_request(data: bytes) -> RacpRequest:
    reader = Reader(data, CHARACTERISTIC)
    opcode = reader.u8()
    operator = reader.u8()
    return RacpRequest(opcode, operator, reader.rest())


def encode_response(response: RacpResponse) -> bytes:
    writer = Writer()
    if isinstance(response, NumberOfRecords):
        writer.u8(Opcode.NUMBER_OF_STORED_RECORDS_RESPONSE)
        writer.u8(Operator.NULL)
        writer.u16(response.count)
    else:
        writer.u8(Opcode.RESPONSE_CODE)
        writer.u8(Operator.NULL)
        writer.u8(response.request_opcode)
        writer.u8(response.code)
    return writer.getvalue()


def decode_response(data: bytes) -> RacpResponse:
    """An answer indicated by a sensor; anything else is :class:`MalformedPayload`."""
    reader = Reader(data, CHARACTERISTIC)
    opcode = reader.u8()
    operator = reader.u8()
    if operator != Operator.NULL:
        raise reader.error("operator of a response must be Null", f"got {operator}", offset=1)
    if opcode == Opcode.NUMBER_OF_STORED_RECORDS_RESPONSE:
        result: RacpResponse = NumberOfRecords(reader.u16())
    elif opcode == Opcode.RESPONSE_CODE:
        result = ResponseCodeIndication(reader.u8(), reader.u8())
    else:
        raise reader.error("not a response op code", f"got {opcode}", offset=0)
    if reader.remaining:
        raise reader.error("trailing bytes after the response", f"{reader.remaining} left")
    return result
