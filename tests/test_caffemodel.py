"""The standalone .caffemodel reader: wire-format round trips, state_dict and honest errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

import caffe_wire as cw
from densepred.caffemodel import (
    V1_LAYER_TYPES,
    CaffeBlob,
    CaffeLayer,
    CaffeModelError,
    CaffeNet,
    decode_caffemodel,
    iter_fields,
    read_caffemodel,
)


def _values(n: int, seed: int = 0) -> list[float]:
    # float32-exact values, so a round trip compares with ==
    return [float(v) for v in np.random.default_rng(seed).standard_normal(n).astype(np.float32)]


def _write(tmp_path, data: bytes, name: str = "net.caffemodel"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


W, B = _values(54, 1), _values(2, 2)
FC = _values(12, 3)


def _new_style() -> bytes:
    return cw.net(
        "tiny",
        cw.layer("data", "Input", extra=cw.field_bytes(4, "data")),
        cw.layer("conv1", "Convolution", [cw.blob(W, (2, 3, 3, 3)), cw.blob(B, (2,))]),
        cw.layer("relu1", "ReLU"),
        cw.layer("fc", "InnerProduct", [cw.blob(FC, (3, 4))]),
    )


def test_new_style_round_trip(tmp_path):
    net = read_caffemodel(_write(tmp_path, _new_style()))
    assert net.name == "tiny" and not net.legacy
    assert [(layer.name, layer.type, len(layer.blobs)) for layer in net.layers] == [
        ("data", "Input", 0), ("conv1", "Convolution", 2), ("relu1", "ReLU", 0), ("fc", "InnerProduct", 1),
    ]  # fmt: skip
    weight, bias = net.layers[1].blobs
    assert weight.shape == (2, 3, 3, 3) and weight.data.shape == (2, 3, 3, 3) and weight.data.dtype == np.float32
    assert weight.data.ravel().tolist() == W and bias.data.tolist() == B
    assert weight.data.flags.writeable  # a copy, not a view of the (closed) memory map
    assert net.layers[3].blobs[0].data.tolist() == np.array(FC, np.float32).reshape(3, 4).tolist()


def test_state_dict_keys_and_values(tmp_path):
    sd = read_caffemodel(_write(tmp_path, _new_style())).state_dict()
    assert list(sd) == ["conv1.0", "conv1.1", "fc.0"]  # layers without blobs give no keys
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in sd.values())
    assert sd["conv1.0"].shape == (2, 3, 3, 3) and sd["conv1.0"].flatten().tolist() == W
    assert sd["conv1.1"].tolist() == B and sd["fc.0"].shape == (3, 4)


def test_v1_layers_with_enum_types():
    data = cw.net(
        "old",
        cw.v1_layer("conv1", 4, [cw.blob(W, (2, 3, 3, 3)), cw.blob(B, (2,))]),
        cw.v1_layer("up", 39, [cw.blob(_values(4), (1, 1, 2, 2))]),
        cw.v1_layer("fc", 14, [cw.blob(FC, (3, 4))]),
        cw.v1_layer("loss", 21),
        cw.v1_layer("abs", 35),
        cw.v1_layer("future", 999),
    )
    net = decode_caffemodel(data, "old.caffemodel")
    assert net.legacy
    assert [layer.type for layer in net.layers] == [
        "Convolution", "Deconvolution", "InnerProduct", "SoftmaxWithLoss", "AbsVal", "V1LayerType(999)",
    ]  # fmt: skip
    assert list(net.state_dict()) == ["conv1.0", "conv1.1", "up.0", "fc.0"]
    # the whole enum of caffe.proto's V1LayerParameter.LayerType: 0 (NONE) to 39, no gaps
    assert sorted(V1_LAYER_TYPES) == list(range(40)) and V1_LAYER_TYPES[0] == ""


def test_layer_and_layers_both_taken_in_file_order():
    data = cw.net(
        "mixed",
        cw.v1_layer("a", 4, [cw.blob(B, (2,))]),
        cw.layer("b", "Scale", [cw.blob(B, (2,))]),
        cw.v1_layer("c", 18),
    )
    net = decode_caffemodel(data)
    assert [(layer.name, layer.type) for layer in net.layers] == [("a", "Convolution"), ("b", "Scale"), ("c", "ReLU")]
    assert net.legacy


def test_legacy_4d_dims_kept_as_caffe_does():
    net = decode_caffemodel(
        cw.net(
            "legacy",
            cw.v1_layer("fc", 14, [cw.blob(FC, legacy=(1, 1, 3, 4)), cw.blob(B, legacy=(1, 1, 1, 2))]),
            # only num and channels: height and width default to 0, so no values
            cw.layer("empty", "X", [cw.blob([], legacy=(5, 7, None, None))]),
            # legacy dims win over shape when both are present (Blob::FromProto)
            cw.layer("both", "X", [cw.blob(B, (7, 7), legacy=(2, 1, 1, 1))]),
        )
    )
    weight, bias = net.layers[0].blobs
    assert weight.shape == (1, 1, 3, 4) and weight.data.ravel().tolist() == FC
    assert bias.shape == (1, 1, 1, 2) and bias.data.shape == (1, 1, 1, 2)
    assert net.layers[1].blobs[0].shape == (5, 7, 0, 0) and net.layers[1].blobs[0].data.size == 0
    assert net.layers[2].blobs[0].shape == (2, 1, 1, 1)


def test_shape_dims_packed_or_not_and_scalars():
    net = decode_caffemodel(
        cw.net(
            "s",
            cw.layer("a", "X", [cw.blob(W, (2, 3, 3, 3), shape_packed=False), cw.blob([1.5], ()), cw.blob([], (0, 4))]),
        )
    )
    a, scalar, empty = net.layers[0].blobs
    assert a.shape == (2, 3, 3, 3) and a.data.ravel().tolist() == W
    assert scalar.shape == () and scalar.data.shape == () and float(scalar.data) == 1.5
    assert empty.shape == (0, 4) and empty.data.shape == (0, 4)


@pytest.mark.parametrize("packed", [True, False])
def test_double_data_converted_to_float32(packed):
    values = [0.1, -2.5, 1e-3, 3.0]
    net = decode_caffemodel(cw.net("d", cw.layer("a", "X", [cw.blob(values, (2, 2), double=True, packed=packed)])))
    blob = net.layers[0].blobs[0]
    assert blob.data.dtype == np.float32 and blob.data.ravel().tolist() == np.float32(values).tolist()


def test_unpacked_and_split_float_payloads():
    values = _values(10)
    unpacked = cw.blob(values, (2, 5), packed=False)
    # a packed payload in three pieces (a parser must concatenate them), with one unpacked value between
    split = (
        cw.field_bytes(7, cw.field_bytes(1, cw.varint(2) + cw.varint(5)))
        + cw.floats(5, values[:3])
        + cw.floats(5, values[3:4], packed=False)
        + cw.floats(5, values[4:])
        + cw.floats(5, [])
    )
    net = decode_caffemodel(cw.net("u", cw.layer("a", "X", [unpacked, split])))
    for blob in net.layers[0].blobs:
        assert blob.shape == (2, 5) and blob.data.ravel().tolist() == values


def test_unknown_fields_skipped():
    net_state = cw.field_varint(1, 1) + cw.field_bytes(3, "stage") + cw.field_varint(2, 3)  # NetState, nested
    param_spec = cw.field_bytes(1, "shared") + cw.field_fixed32(3, struct.pack("<f", 1.0))
    blob_extra = (
        cw.floats(6, B)  # diff
        + cw.floats(9, B, double=True)  # double_diff
        + cw.field_fixed64(20, b"\xff" * 8)
        + cw.field_bytes(21, cw.field_bytes(1, b"\x00\x01") + cw.field_fixed64(2, bytes(8)))
    )
    layer_extra = (
        cw.field_bytes(3, "data")  # bottom
        + cw.field_bytes(4, "conv1")  # top
        + cw.field_bytes(6, param_spec)  # param (a nested message)
        + cw.field_varint(10, 1)  # phase
        + cw.field_fixed32(5, struct.pack("<f", 1.0))  # loss_weight, unpacked float
        + cw.field_fixed64(1234, struct.pack("<d", 2.0))
        + cw.field_varint(536_870_911, 7)  # the largest field number
        + cw.field_varint(1, -1)  # a known number with a wrong wire type is an unknown field
    )
    data = cw.net(
        "unk",
        cw.field_bytes(3, "data"),  # input
        cw.field_varint(4, 10),  # input_dim
        cw.field_varint(5, 1),  # force_backward
        cw.field_bytes(6, net_state),  # state
        cw.field_fixed64(99, struct.pack("<d", 3.25)),
        cw.field_fixed32(98, b"abcd"),
        cw.layer("conv1", "Convolution", [cw.blob(B, (2,), extra=blob_extra)], extra=layer_extra),
        cw.v1_layer("fc", 14, [cw.blob(B, (2,))], extra=cw.field_bytes(2, "x") + cw.floats(7, [1.0, 2.0])),
    )
    net = decode_caffemodel(data)
    assert net.name == "unk" and [layer.name for layer in net.layers] == ["conv1", "fc"]
    assert net.layers[0].blobs[0].data.tolist() == B == net.layers[1].blobs[0].data.tolist()


def test_duplicate_names():
    same = cw.layer("conv1", "Convolution", [cw.blob(B, (2,))])
    net = decode_caffemodel(cw.net("dup", same, cw.layer("conv1", "ReLU"), same, cw.layer("x", "X")))
    assert list(net.state_dict()) == ["conv1.0"] and len(net.layers) == 4
    other = cw.layer("conv1", "Convolution", [cw.blob([0.0, 1.0], (2,))])
    with pytest.raises(CaffeModelError, match=r"dup\.caffemodel: layers #0 and #2 are both named 'conv1'") as info:
        decode_caffemodel(cw.net("dup", same, cw.layer("relu", "ReLU"), other), "dup.caffemodel")
    assert info.value.offset == len(cw.net("dup", same, cw.layer("relu", "ReLU")))
    # a hand-built net is checked by state_dict
    ones, zeros = CaffeBlob((1,), np.ones(1, np.float32)), CaffeBlob((1,), np.zeros(1, np.float32))
    built = CaffeNet("n", (CaffeLayer("a", "X", (ones,)), CaffeLayer("a", "X", (zeros,))))
    with pytest.raises(CaffeModelError, match="both named 'a'"):
        built.state_dict()


def test_truncated_files(tmp_path):
    fields = [
        cw.field_bytes(1, "tiny"),
        cw.layer("conv1", "Convolution", [cw.blob(W, (2, 3, 3, 3)), cw.blob(B, (2,))]),
        cw.v1_layer("fc", 14, [cw.blob(FC, legacy=(1, 1, 3, 4))]),
    ]
    data = b"".join(fields)
    boundaries = {sum(len(f) for f in fields[:i]) for i in range(len(fields) + 1)}
    cuts = [n for n in range(1, len(data)) if n not in boundaries]
    for cut in cuts[:: max(1, len(cuts) // 40)] + [2, 3, len(data) - 1]:  # ~40 cut points, every kind of field
        path = _write(tmp_path, data[:cut], "cut.caffemodel")
        with pytest.raises(CaffeModelError, match=r"cut\.caffemodel: .*byte \d+") as info:
            read_caffemodel(path)
        assert 0 <= info.value.offset <= cut and info.value.path == str(path)
    # protobuf has no framing: a cut between top-level fields is a valid, shorter net
    assert [layer.name for layer in decode_caffemodel(data[: len(fields[0]) + len(fields[1])]).layers] == ["conv1"]
    with pytest.raises(CaffeModelError, match=r"empty\.caffemodel: the file is empty"):
        read_caffemodel(_write(tmp_path, b"", "empty.caffemodel"))


def test_truncated_messages_name_the_offset():
    layer = cw.layer("conv1", "Convolution", [cw.blob(W, (2, 3, 3, 3))])
    data = cw.field_bytes(1, "t") + layer
    with pytest.raises(CaffeModelError) as info:
        decode_caffemodel(data[:-10], "t.caffemodel")
    at, size = len(cw.field_bytes(1, "t")), len(layer) - len(cw.tag(100, cw.LENGTH) + cw.varint(len(layer)))
    assert str(info.value) == (
        f"t.caffemodel: length-delimited field 100 at byte {at} runs past the end of the file "
        f"(needs {size} bytes, {size - 10} left)"
    )
    assert info.value.offset == at
    with pytest.raises(CaffeModelError, match=r"truncated varint at byte 3 \(it runs into the end of the file\)"):
        decode_caffemodel(b"\x0a\x01a\x80\x80", "t.caffemodel")


def test_wrong_length_inside_a_message():
    body = cw.field_bytes(1, "conv1") + cw.tag(7, cw.LENGTH) + cw.varint(4000) + b"\x00" * 12
    data = cw.field_bytes(100, body)
    with pytest.raises(CaffeModelError) as info:
        decode_caffemodel(data + cw.layer("next", "ReLU"), "w.caffemodel")
    blob_at = len(cw.tag(100, cw.LENGTH) + cw.varint(len(body)) + cw.field_bytes(1, "conv1"))
    assert info.value.offset == blob_at
    assert (
        f"length-delimited field 7 at byte {blob_at} runs past the end of its message (byte {len(data)}) "
        "(needs 4000 bytes, 12 left) (in layer #0 at byte 0)"
    ) in str(info.value)


def test_data_shape_mismatch():
    data = cw.net("m", cw.layer("conv1", "Convolution", [cw.blob(B, (2,)), cw.blob(_values(10), (2, 3, 3, 3))]))
    with pytest.raises(
        CaffeModelError,
        match=r"m\.caffemodel: blob 1 of layer 'conv1' at byte \d+: "
        r"blob data has 10 floats but shape \(2, 3, 3, 3\) needs 54",
    ):
        decode_caffemodel(data, "m.caffemodel")
    with pytest.raises(CaffeModelError, match=r"has 4 doubles but shape \(2,\) needs 2"):
        decode_caffemodel(cw.net("m", cw.layer("a", "X", [cw.blob([1, 2, 3, 4], (2,), double=True)])))
    with pytest.raises(CaffeModelError, match=r"negative dimension in shape \(2, -1\)"):
        decode_caffemodel(cw.net("m", cw.layer("a", "X", [cw.blob([], (2, -1))])))
    with pytest.raises(CaffeModelError, match=r"packed field 5 at byte \d+ has 7 bytes, not a multiple of 4"):
        decode_caffemodel(cw.net("m", cw.layer("a", "X", [cw.field_bytes(5, bytes(7))])))


@pytest.mark.parametrize("wire", [6, 7])
def test_invalid_wire_type(wire):
    data = cw.field_bytes(1, "n") + cw.tag(9, wire) + b"\x00" * 8
    with pytest.raises(
        CaffeModelError, match=rf"x\.caffemodel: wire type {wire} is not valid \(field 9, tag at byte 3\)"
    ):
        decode_caffemodel(data, "x.caffemodel")


@pytest.mark.parametrize("wire", [3, 4])
def test_groups_rejected(wire):
    data = cw.layer("a", "X", extra=cw.tag(11, wire))
    with pytest.raises(CaffeModelError, match=rf"field 11 at byte \d+ is a group \(wire type {wire}\)") as info:
        decode_caffemodel(data, "g.caffemodel")
    assert info.value.offset == len(data) - 1


def test_other_malformed_input():
    with pytest.raises(CaffeModelError, match="field number 0 .* is not valid"):
        decode_caffemodel(b"\x00\x00")
    with pytest.raises(CaffeModelError, match="varint at byte 1 is longer than 10 bytes"):
        decode_caffemodel(b"\x08" + b"\xff" * 11)
    with pytest.raises(CaffeModelError, match="V0 format"):
        decode_caffemodel(cw.v1_layer("a", 4, extra=cw.field_bytes(1, cw.field_bytes(1, "a"))))
    with pytest.raises(CaffeModelError, match=r"fixed64 field 3 at byte 0 runs past the end of the file \(needs 8"):
        decode_caffemodel(cw.tag(3, cw.FIXED64) + b"\x00")


def test_iter_fields_positions():
    data = cw.field_varint(1, 300) + cw.field_bytes(2, "ab") + cw.field_fixed32(3, b"wxyz")
    assert [tuple(f) for f in iter_fields(data, 0, len(data))] == [(1, 0, 0, 300, 3), (2, 2, 3, 5, 7), (3, 5, 7, 8, 12)]


def test_matches_google_protobuf(tmp_path):
    """If protobuf is installed, check the encoder and the reader against it (a caffe.proto subset)."""
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="caffe_subset.proto", package="caffe", syntax="proto2")

    def message(name, *fields):
        m = proto.message_type.add(name=name)
        for fname, number, kind, label, type_name, packed in fields:
            f = m.field.add(name=fname, number=number, type=kind, label=label)
            if type_name:
                f.type_name = type_name
            if packed:
                f.options.packed = True

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("BlobShape", ("dim", 1, F.TYPE_INT64, rep, "", True))
    message(
        "BlobProto",
        ("shape", 7, F.TYPE_MESSAGE, opt, ".caffe.BlobShape", False),
        ("data", 5, F.TYPE_FLOAT, rep, "", True),
        ("double_data", 8, F.TYPE_DOUBLE, rep, "", True),
        *((dim, n, F.TYPE_INT32, opt, "", False) for n, dim in enumerate(("num", "channels", "height", "width"), 1)),
    )
    message(
        "LayerParameter",
        ("name", 1, F.TYPE_STRING, opt, "", False),
        ("type", 2, F.TYPE_STRING, opt, "", False),
        ("blobs", 7, F.TYPE_MESSAGE, rep, ".caffe.BlobProto", False),
    )
    message(
        "V1LayerParameter",
        ("name", 4, F.TYPE_STRING, opt, "", False),
        ("type", 5, F.TYPE_INT32, opt, "", False),  # an enum on the wire is a varint
        ("blobs", 6, F.TYPE_MESSAGE, rep, ".caffe.BlobProto", False),
    )
    message(
        "NetParameter",
        ("name", 1, F.TYPE_STRING, opt, "", False),
        ("layers", 2, F.TYPE_MESSAGE, rep, ".caffe.V1LayerParameter", False),
        ("layer", 100, F.TYPE_MESSAGE, rep, ".caffe.LayerParameter", False),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    NetParameter = message_factory.GetMessageClass(pool.FindMessageTypeByName("caffe.NetParameter"))

    # protobuf writes, the reader reads
    msg = NetParameter(name="pb")
    conv = msg.layer.add(name="conv1", type="Convolution")
    conv.blobs.add(data=W).shape.dim.extend([2, 3, 3, 3])
    conv.blobs.add(double_data=[0.5, 0.25]).shape.dim.append(2)
    old = msg.layers.add(name="fc", type=14)
    old.blobs.add(data=FC, num=1, channels=1, height=3, width=4)
    net = read_caffemodel(_write(tmp_path, msg.SerializeToString()))
    sd = net.state_dict()
    assert [layer.type for layer in net.layers] == ["InnerProduct", "Convolution"]  # layers = 2 is written first
    assert sd["conv1.0"].flatten().tolist() == W and sd["conv1.1"].tolist() == [0.5, 0.25]
    assert sd["fc.0"].shape == (1, 1, 3, 4)

    # the encoder writes, protobuf reads
    parsed = NetParameter.FromString(
        _new_style() + cw.v1_layer("old", 39, [cw.blob(B, legacy=(1, 1, 1, 2), packed=False)])
    )
    assert parsed.name == "tiny" and [layer.name for layer in parsed.layer] == ["data", "conv1", "relu1", "fc"]
    assert list(parsed.layer[1].blobs[0].shape.dim) == [2, 3, 3, 3] and list(parsed.layer[1].blobs[0].data) == W
    assert parsed.layers[0].type == 39 and list(parsed.layers[0].blobs[0].data) == B
    assert (parsed.layers[0].blobs[0].num, parsed.layers[0].blobs[0].width) == (1, 2)
    negative = NetParameter.FromString(cw.net("n", cw.layer("a", "X", [cw.blob([], (2, -1))])))
    assert list(negative.layer[0].blobs[0].shape.dim) == [2, -1]
