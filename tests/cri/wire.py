"""The protobuf wire format, as much of it as the CRI messages the tests use: varints,
length-delimited fields (strings, bytes, nested messages, map entries) and a decoder that
keeps every field as a list of raw values.  No generated code, no protobuf package."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

VARINT = 0
FIXED64 = 1
LENGTH = 2
FIXED32 = 5

Fields = dict[int, list[int | bytes]]


def varint(value: int) -> bytes:
    """Base-128, least significant group first; negative int64s as their two's complement."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def integer(number: int, value: int) -> bytes:
    """An int/enum/bool field; proto3 leaves out the default 0."""
    return _key(number, VARINT) + varint(int(value)) if value else b""


def raw(number: int, data: bytes) -> bytes:
    """A length-delimited field: bytes, or a nested message already encoded."""
    return _key(number, LENGTH) + varint(len(data)) + data


def message(number: int, *parts: bytes) -> bytes:
    """A nested message made of encoded fields (always present, even when empty)."""
    return raw(number, b"".join(parts))


def string(number: int, value: str) -> bytes:
    return raw(number, value.encode()) if value else b""


def strings(number: int, values: Iterable[str]) -> bytes:
    """A repeated string field: one entry per value, empty ones included."""
    return b"".join(raw(number, v.encode()) for v in values)


def string_map(number: int, values: Mapping[str, str]) -> bytes:
    """map<string, string>: one entry message (key = 1, value = 2) per pair."""
    return b"".join(message(number, string(1, k), string(2, v)) for k, v in values.items())


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def decode(data: bytes) -> Fields:
    """Every field of one message: number -> raw values (ints, or bytes to decode further)."""
    fields: Fields = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == VARINT:
            value, pos = _read_varint(data, pos)
        elif wire_type == LENGTH:
            size, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        elif wire_type == FIXED64:
            value, pos = int.from_bytes(data[pos : pos + 8], "little"), pos + 8
        elif wire_type == FIXED32:
            value, pos = int.from_bytes(data[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"wire type {wire_type} is not supported")
        fields.setdefault(number, []).append(value)
    return fields


def first_bytes(fields: Fields, number: int) -> bytes:
    values = [v for v in fields.get(number, []) if isinstance(v, bytes)]
    return values[0] if values else b""


def first_str(fields: Fields, number: int) -> str:
    return first_bytes(fields, number).decode()


def first_int(fields: Fields, number: int) -> int:
    """An int32 field as signed (exit codes), 0 when absent."""
    values = [v for v in fields.get(number, []) if isinstance(v, int)]
    value = values[0] if values else 0
    return value - (1 << 64) if value >= 1 << 63 else value


def decoded_map(fields: Fields, number: int) -> dict[str, str]:
    entries = (decode(v) for v in fields.get(number, []) if isinstance(v, bytes))
    return {first_str(e, 1): first_str(e, 2) for e in entries}
