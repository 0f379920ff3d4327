"""A tiny protobuf encoder that builds ``.caffemodel`` bytes for the tests.

Written from the protobuf encoding spec and caffe.proto's field numbers, independently of
:mod:`densepred.caffemodel` (it imports nothing from it). ``layer`` and ``v1_layer`` return whole
NetParameter fields (``layer = 100`` and ``layers = 2``), so ``net(name, *fields)`` keeps file order.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


def varint(value: int) -> bytes:
    if value < 0:  # int32/int64 negatives: ten bytes of two's complement
        value += 1 << 64
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def field_varint(number: int, value: int) -> bytes:
    return tag(number, VARINT) + varint(value)


def field_bytes(number: int, payload: bytes | str) -> bytes:
    raw = payload.encode() if isinstance(payload, str) else payload
    return tag(number, LENGTH) + varint(len(raw)) + raw


def field_fixed32(number: int, raw: bytes) -> bytes:
    assert len(raw) == 4
    return tag(number, FIXED32) + raw


def field_fixed64(number: int, raw: bytes) -> bytes:
    assert len(raw) == 8
    return tag(number, FIXED64) + raw


def floats(number: int, values: Iterable[float], *, double: bool = False, packed: bool = True) -> bytes:
    fmt, wire = ("<d", FIXED64) if double else ("<f", FIXED32)
    vals = list(values)
    if packed:
        return field_bytes(number, b"".join(struct.pack(fmt, v) for v in vals))
    return b"".join(tag(number, wire) + struct.pack(fmt, v) for v in vals)


def blob(
    values: Sequence[float],
    shape: Sequence[int] | None = None,
    *,
    legacy: Sequence[int | None] | None = None,  # num, channels, height, width; None leaves one out
    double: bool = False,
    packed: bool = True,
    shape_packed: bool = True,
    extra: bytes = b"",
) -> bytes:
    """A BlobProto payload: shape = 7 (BlobShape.dim = 1), data = 5 or double_data = 8, legacy dims 1..4."""
    out = b""
    for number, dim in zip((1, 2, 3, 4), legacy or (), strict=False):
        if dim is not None:
            out += field_varint(number, dim)
    if shape is not None:
        dims = b"".join(varint(d) for d in shape)
        out += field_bytes(7, field_bytes(1, dims) if shape_packed else b"".join(field_varint(1, d) for d in shape))
    out += floats(8 if double else 5, values, double=double, packed=packed)
    return out + extra


def layer(name: str, type_: str, blobs: Sequence[bytes] = (), extra: bytes = b"") -> bytes:
    """NetParameter.layer (100): LayerParameter name = 1, type = 2, blobs = 7."""
    body = field_bytes(1, name) + field_bytes(2, type_) + extra + b"".join(field_bytes(7, b) for b in blobs)
    return field_bytes(100, body)


def v1_layer(name: str, type_enum: int, blobs: Sequence[bytes] = (), extra: bytes = b"") -> bytes:
    """NetParameter.layers (2): V1LayerParameter name = 4, type = 5 (enum), blobs = 6."""
    body = field_bytes(4, name) + field_varint(5, type_enum) + extra + b"".join(field_bytes(6, b) for b in blobs)
    return field_bytes(2, body)


def net(name: str, *fields: bytes) -> bytes:
    """NetParameter: name = 1, then the given fields in order."""
    return field_bytes(1, name) + b"".join(fields)
