"""Read Caffe ``.caffemodel`` files without Caffe, protobuf or a compiled ``caffe.proto``.

Why: the FCN, DeepLab and MSRA ResNet reference weights exist only as ``.caffemodel`` files. Few users can
build Caffe, and the ``caffe_pb2`` modules generated years ago no longer import with current protobuf
releases. Weights need only a small part of the format, so this module decodes the wire format itself.

Format: a ``.caffemodel`` is one serialized proto2 ``caffe.NetParameter``, with no header and no framing.
A message is a run of fields, each a varint tag ``field_number << 3 | wire_type`` and then its value:
wire type 0 a varint, 1 eight little-endian bytes, 2 a varint length and that many bytes (a string, a
nested message or a packed repeated scalar), 5 four little-endian bytes; 3 and 4 (groups) are unused by
``caffe.proto`` and rejected. Fields come in any order and may repeat; unknown ones are skipped. The
fields read (BVLC/caffe ``src/caffe/proto/caffe.proto``)::

    NetParameter      name = 1, layers = 2 (V1LayerParameter, legacy), layer = 100 (LayerParameter)
    LayerParameter    name = 1, type = 2 (string), blobs = 7
    V1LayerParameter  name = 4, type = 5 (enum LayerType), blobs = 6
    BlobProto         num, channels, height, width = 1..4 (int32, legacy 4-D shape), data = 5 (float),
                      shape = 7 (BlobShape: dim = 1, int64), double_data = 8 (double); diff = 6 and
                      double_diff = 9 (gradients) are skipped

Blobs follow Caffe's ``Blob::FromProto``: the legacy 4-D shape wins when any of num/channels/height/width
is set; ``double_data`` is used when it is not empty, ``data`` otherwise; the value count must match the
shape. V1 type enums get the names Caffe's ``UpgradeV1LayerType`` gives them. The file is memory-mapped and
each packed payload is read with one :func:`numpy.frombuffer` and copied once into its array: a 500 MB
file costs 500 MB of arrays (plus reclaimable page cache). Errors name the file and the absolute byte
offset. Protobuf has no framing: a file cut exactly between two top-level fields is a valid, shorter net;
any other cut is an error.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

Buffer = bytes | bytearray | memoryview | mmap.mmap

# V1LayerParameter.LayerType (caffe.proto 1261-1302) -> UpgradeV1LayerType (src/caffe/util/upgrade_proto.cpp).
V1_LAYER_TYPES: dict[int, str] = {
    0: "", 1: "Accuracy", 2: "BNLL", 3: "Concat", 4: "Convolution", 5: "Data", 6: "Dropout",
    7: "EuclideanLoss", 8: "Flatten", 9: "HDF5Data", 10: "HDF5Output", 11: "Im2col", 12: "ImageData",
    13: "InfogainLoss", 14: "InnerProduct", 15: "LRN", 16: "MultinomialLogisticLoss", 17: "Pooling",
    18: "ReLU", 19: "Sigmoid", 20: "Softmax", 21: "SoftmaxWithLoss", 22: "Split", 23: "TanH",
    24: "WindowData", 25: "Eltwise", 26: "Power", 27: "SigmoidCrossEntropyLoss", 28: "HingeLoss",
    29: "MemoryData", 30: "ArgMax", 31: "Threshold", 32: "DummyData", 33: "Slice", 34: "MVN",
    35: "AbsVal", 36: "Silence", 37: "ContrastiveLoss", 38: "Exp", 39: "Deconvolution",
}  # fmt: skip


class CaffeModelError(ValueError):
    """A ``.caffemodel`` that cannot be decoded. ``path`` is the file, ``offset`` the absolute byte offset."""

    def __init__(self, detail: str, path: str = "", offset: int | None = None) -> None:
        super().__init__(f"{path}: {detail}" if path else detail)
        self.detail, self.path, self.offset = detail, path, offset


@dataclass(frozen=True, eq=False)
class CaffeBlob:
    shape: tuple[int, ...]
    data: np.ndarray  # float32, of ``shape``

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CaffeBlob):
            return NotImplemented
        return self.shape == other.shape and bool(np.array_equal(self.data, other.data, equal_nan=True))

    def __repr__(self) -> str:
        return f"CaffeBlob(shape={self.shape})"


@dataclass(frozen=True)
class CaffeLayer:
    name: str
    type: str
    blobs: tuple[CaffeBlob, ...] = ()


@dataclass(frozen=True)
class CaffeNet:
    name: str
    layers: tuple[CaffeLayer, ...]
    legacy: bool = False  # True when the file has V1 ``layers`` (NetParameter field 2)
    source: str = ""  # the file it was read from, for error messages

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The flat dump ``{"{layer_name}.{blob_index}": tensor}``; layers without blobs give no keys."""
        clash = _name_clash(self.layers)
        if clash is not None:
            raise CaffeModelError(_clash_message(self.layers, *clash), self.source)
        out: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            if layer.blobs and f"{layer.name}.0" not in out:
                out.update({f"{layer.name}.{i}": torch.from_numpy(b.data) for i, b in enumerate(layer.blobs)})
        return out


class Field(NamedTuple):
    number: int
    wire: int
    at: int  # absolute offset of the tag
    start: int  # the value (wire type 0) or the payload's first byte
    end: int  # one past the last byte of the field


def _where(buf: Buffer, end: int) -> str:
    return "the end of the file" if end == len(buf) else f"the end of its message (byte {end})"


def _varint(buf: Buffer, path: str, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(pos, min(end, pos + 10)):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & 0xFFFF_FFFF_FFFF_FFFF, i + 1
        shift += 7
    if end - pos >= 10:
        raise CaffeModelError(f"varint at byte {pos} is longer than 10 bytes", path, pos)
    raise CaffeModelError(f"truncated varint at byte {pos} (it runs into {_where(buf, end)})", path, pos)


def _signed(value: int, bits: int) -> int:  # two's complement; an int32 keeps its low 32 bits, as protobuf does
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def iter_fields(buf: Buffer, start: int, end: int, path: str = "<memory>") -> Iterator[Field]:
    """The fields of the message in ``buf[start:end]``, checked against ``end`` but not decoded."""
    pos = start
    while pos < end:
        at = pos
        tag, pos = _varint(buf, path, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise CaffeModelError(f"field number 0 (tag at byte {at}) is not valid", path, at)
        if wire == 0:
            value, pos = _varint(buf, path, pos, end)
            yield Field(number, wire, at, value, pos)
            continue
        if wire == 2:
            size, pos = _varint(buf, path, pos, end)
            kind = "length-delimited"
        elif wire in (1, 5):
            size, kind = (8, "fixed64") if wire == 1 else (4, "fixed32")
        elif wire in (3, 4):
            raise CaffeModelError(f"field {number} at byte {at} is a group (wire type {wire}), unused by caffe.proto",
                                  path, at)  # fmt: skip
        else:
            raise CaffeModelError(f"wire type {wire} is not valid (field {number}, tag at byte {at})", path, at)
        if size > end - pos:
            raise CaffeModelError(f"{kind} field {number} at byte {at} runs past {_where(buf, end)} "
                                  f"(needs {size} bytes, {end - pos} left)", path, at)  # fmt: skip
        yield Field(number, wire, at, pos, pos + size)
        pos += size


def _text(buf: Buffer, f: Field) -> str:
    return bytes(buf[f.start : f.end]).decode("utf-8", "backslashreplace")


def _chunk(path: str, f: Field, width: int) -> tuple[int, int]:
    """(offset, count) of a packed (wire type 2) or single (wire type 1 or 5) float/double payload."""
    if (f.end - f.start) % width:
        raise CaffeModelError(f"packed field {f.number} at byte {f.at} has {f.end - f.start} bytes, "
                              f"not a multiple of {width}", path, f.at)  # fmt: skip
    return f.start, (f.end - f.start) // width


def _gather(buf: Buffer, chunks: list[tuple[int, int]], dtype: str, count: int) -> np.ndarray:
    if len(chunks) == 1:  # the usual case: one packed payload, one copy
        return np.frombuffer(buf, dtype, count, chunks[0][0]).astype(np.float32)
    out = np.empty(count, np.float32)
    i = 0
    for offset, n in chunks:  # several packed payloads, or unpacked values (one per tag: the slow path)
        out[i : i + n] = np.frombuffer(buf, dtype, n, offset)
        i += n
    return out


def _blob(buf: Buffer, path: str, f: Field, what: str) -> CaffeBlob:
    legacy: dict[int, int] = {}
    dims: list[int] = []
    floats: list[tuple[int, int]] = []
    doubles: list[tuple[int, int]] = []
    for g in iter_fields(buf, f.start, f.end, path):
        if g.number in (1, 2, 3, 4) and g.wire == 0:  # num, channels, height, width (caffe.proto 18-21)
            legacy[g.number] = _signed(g.start, 32)
        elif g.number == 7 and g.wire == 2:  # shape (11): BlobShape.dim = 1 (7), packed or not
            for h in iter_fields(buf, g.start, g.end, path):
                if h.number == 1 and h.wire == 0:
                    dims.append(_signed(h.start, 64))
                elif h.number == 1 and h.wire == 2:
                    pos = h.start
                    while pos < h.end:
                        value, pos = _varint(buf, path, pos, h.end)
                        dims.append(_signed(value, 64))
        elif g.number in (5, 8) and g.wire in (2, 5 if g.number == 5 else 1):  # data (12), double_data (14)
            chunk = _chunk(path, g, 4 if g.number == 5 else 8)
            if chunk[1]:
                (floats if g.number == 5 else doubles).append(chunk)
    shape = tuple(legacy.get(n, 0) for n in (1, 2, 3, 4)) if legacy else tuple(dims)
    if any(d < 0 for d in shape):
        raise CaffeModelError(f"{what} at byte {f.at} has a negative dimension in shape {shape}", path, f.at)
    chunks, dtype, kind = (doubles, "<f8", "doubles") if doubles else (floats, "<f4", "floats")
    count, need = sum(n for _, n in chunks), math.prod(shape)
    if count != need:
        raise CaffeModelError(f"{what} at byte {f.at}: blob data has {count} {kind} but shape {shape} "
                              f"needs {need}", path, f.at)  # fmt: skip
    return CaffeBlob(shape, _gather(buf, chunks, dtype, count).reshape(shape))


def _layer(buf: Buffer, path: str, f: Field, v1: bool) -> CaffeLayer:
    name_no, type_no, blobs_no = (4, 5, 6) if v1 else (1, 2, 7)  # caffe.proto 1258/1303/1304, 327/328/345
    name = kind = ""
    blob_fields: list[Field] = []
    for g in iter_fields(buf, f.start, f.end, path):
        if g.number == name_no and g.wire == 2:
            name = _text(buf, g)
        elif g.number == type_no and g.wire == (0 if v1 else 2):
            kind = V1_LAYER_TYPES.get(g.start, f"V1LayerType({g.start})") if v1 else _text(buf, g)
        elif g.number == blobs_no and g.wire == 2:
            blob_fields.append(g)
        elif v1 and g.number == 1 and g.wire == 2:  # V0LayerParameter layer = 1 (caffe.proto 1344)
            raise CaffeModelError(f"layer at byte {f.at} uses the V0 format (Caffe before 2014), not supported; "
                                  "upgrade it with Caffe's upgrade_net_proto_binary", path, g.at)  # fmt: skip
    blobs = tuple(_blob(buf, path, g, f"blob {i} of layer {name!r}") for i, g in enumerate(blob_fields))
    return CaffeLayer(name, kind, blobs)


def _name_clash(layers: tuple[CaffeLayer, ...]) -> tuple[int, int] | None:
    first: dict[str, int] = {}
    for j, layer in enumerate(layers):
        if layer.blobs:
            i = first.setdefault(layer.name, j)
            if layers[i].blobs != layer.blobs:
                return i, j
    return None


def _clash_message(layers: tuple[CaffeLayer, ...], i: int, j: int) -> str:
    return f"layers #{i} and #{j} are both named {layers[j].name!r} and carry different blobs"


def decode_caffemodel(buf: Buffer, path: str = "<memory>") -> CaffeNet:
    """Decode a serialized ``NetParameter``; ``path`` names it in errors."""
    if len(buf) == 0:
        raise CaffeModelError("the file is empty (0 bytes), not a caffemodel (at byte 0)", path, 0)
    name, legacy = "", False
    layers: list[CaffeLayer] = []
    offsets: list[int] = []
    for f in iter_fields(buf, 0, len(buf), path):
        if f.number == 1 and f.wire == 2:  # name (caffe.proto 65)
            name = _text(buf, f)
        elif f.number in (2, 100) and f.wire == 2:  # layers (95, V1) and layer (92), kept in file order
            try:
                layers.append(_layer(buf, path, f, v1=f.number == 2))
            except CaffeModelError as e:
                raise CaffeModelError(f"{e.detail} (in layer #{len(layers)} at byte {f.at})", path, e.offset) from None
            offsets.append(f.at)
            legacy |= f.number == 2
    clash = _name_clash(tuple(layers))
    if clash is not None:
        at = offsets[clash[1]]
        raise CaffeModelError(f"{_clash_message(tuple(layers), *clash)} (the second at byte {at})", path, at)
    return CaffeNet(name, tuple(layers), legacy, path)


def read_caffemodel(path: str | os.PathLike[str]) -> CaffeNet:
    """Read a ``.caffemodel`` through a read-only memory map; blob arrays are copies that outlive it."""
    name = os.fspath(path)
    with open(name, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return decode_caffemodel(b"", name)  # mmap refuses empty files; this raises the usual error
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return decode_caffemodel(mm, name)
        finally:
            try:
                mm.close()
            except BufferError:  # a view still referenced by an error's traceback; unmapped when it goes
                pass
