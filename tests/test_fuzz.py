"""Property-based tests (hypothesis) of the code that reads what users and downloads hand us.

For any input, the config parser and overrides, the image / mask readers and the archive
extractor either succeed or raise the project's own error type (ConfigError, DataError,
DownloadError) with a message naming the option or file; never another exception, never a hang.
Example counts are fixed (``max_examples``) and the runs derandomized, so the suite is fast and
repeatable; ``pytest tests/test_fuzz.py --hypothesis-show-statistics`` prints what each test ran.
"""

from __future__ import annotations

import dataclasses
import io
import signal
import tarfile
import tempfile
import typing
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from densepred.config import ConfigError, Experiment, experiment_from_dict, load_experiment
from densepred.data import DataError, DownloadError, LabelMap
from densepred.data.extract import safe_extract
from densepred.data.io import read_image, read_image_stack, read_mask

FUZZ = settings(
    deadline=2000,  # ms per example; decoding a 32x24 image takes a few
    derandomize=True,  # the same examples on every run: a failure reproduces
    database=None,  # nothing written into the source tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@contextmanager
def time_limit(seconds: int):
    """Fail an example that runs away (a decoder loop), instead of hanging the suite."""

    def expire(signum, frame):
        raise TimeoutError(f"example ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------
# Configs

SECTIONS = [f.name for f in dataclasses.fields(Experiment) if f.name not in ("name", "notes", "resolved")]
FIELDS = {
    f"{section}.{f.name}": hint
    for section, cls in ((s, typing.get_type_hints(Experiment)[s]) for s in SECTIONS)
    for f, hint in ((f, typing.get_type_hints(cls)[f.name]) for f in dataclasses.fields(cls))
}
KEYS = [*FIELDS, "name", "notes", "optim", "optim.", ".lr", "optim.lr.x", "model.options.a.b", "foo.bar", "x"]

yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # unbounded: 400-digit integers overflow float()
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["poly", "sgd", "adam", "bf16", "deeplab", "whole", "unet_padded", "synthetic", "deeplab_v2"]),
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=4)
    ),
    max_leaves=8,
)


def _plausible(hint) -> st.SearchStrategy:
    """Values of the field's type, edge cases included, so that many examples get past the parser."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, type(int | None)):
        return st.one_of(st.none(), *(_plausible(a) for a in args if a is not type(None)))
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (list, tuple):
        return st.lists(st.one_of(st.floats(-1, 3), st.integers(0, 3)), max_size=3)
    if origin is dict or hint is dict:
        return st.dictionaries(
            st.sampled_from(["base_channels", "depth", "num_images", "size", "w1"]), st.integers(0, 9)
        )
    if hint is bool:
        return st.booleans()
    if hint is str:
        return st.sampled_from(["unet_padded", "fcn8s", "synthetic", "camvid", "deeplab_v2", "x", ""])
    edge = st.sampled_from([0, 1, -1, 0.5, 1e-12, 10**400, float("inf"), float("nan"), 2**63])
    return st.one_of(st.integers(-3, 1000), st.floats(-1, 10), edge)


def _as_yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


typed_pair = st.sampled_from(sorted(FIELDS)).flatmap(
    lambda k: st.tuples(st.just(k), _plausible(FIELDS[k]).map(_as_yaml))
)
random_pair = st.tuples(
    st.one_of(st.sampled_from(KEYS), st.text(max_size=15)), st.one_of(yaml_values.map(_as_yaml), st.text())
)
overrides = st.lists(st.one_of(typed_pair, typed_pair, random_pair), max_size=4)


@settings(FUZZ, max_examples=400)
@given(overrides)
def test_any_overrides_give_a_valid_experiment_or_a_config_error(pairs):
    try:
        exp = load_experiment(None, [f"{key}={text}" for key, text in pairs])
    except ConfigError as exc:
        assert str(exc).startswith("config: ") and len(str(exc)) > len("config: ")
        event("refused with a ConfigError")
        return
    event("a valid experiment")
    again = experiment_from_dict(yaml.safe_load(exp.to_yaml()))  # what every run folder and checkpoint stores
    assert again.to_yaml() == exp.to_yaml()


WRONG = {
    "number": [[1, 2], {"a": 1}, "abc", True, float("inf"), float("nan")],
    "bool": [2, "maybe", [True], {"a": 1}],
    "str": [[1], {"a": 1}, True],
    "list": [3, "abc", {"a": 1}, True],
    "dict": [3, "abc", [1], True],
    "choice": ["no_such_choice", 3, [1]],
}


def _kind(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, type(int | None)):
        return _kind(next(a for a in args if a is not type(None)))
    if origin is typing.Literal:
        return "choice"
    if origin in (list, tuple):
        return "list"
    if origin is dict or hint is dict:
        return "dict"
    return {bool: "bool", str: "str", int: "number", float: "number"}[hint]


@settings(FUZZ, max_examples=250)
@given(st.sampled_from(sorted(FIELDS)), st.data())
def test_a_wrong_type_names_the_option(key, data):
    value = data.draw(st.sampled_from(WRONG[_kind(FIELDS[key])]))
    section, name = key.split(".")
    with pytest.raises(ConfigError) as err:
        experiment_from_dict({section: {name: value}})
    assert key in str(err.value)


# ---------------------------------------------------------------------------------------------
# Images and masks


def _encoded(fmt: str, array: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


_RGB = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
SEEDS = {
    "png": _encoded("PNG", _RGB),
    "gray.png": _encoded("PNG", _RGB[..., 0]),
    "p.png": (lambda b: (Image.fromarray(_RGB).convert("P").save(b, format="PNG"), b.getvalue())[1])(io.BytesIO()),
    "16.png": _encoded("PNG", _RGB[..., 0].astype(np.uint16) * 257),
    "jpg": _encoded("JPEG", _RGB),
    "tif": _encoded("TIFF", _RGB),
    "lzw.tif": _encoded("TIFF", _RGB, compression="tiff_lzw"),
    "bmp": _encoded("BMP", _RGB),
    "gif": _encoded("GIF", _RGB),
    "webp": _encoded("WEBP", _RGB),
    "ppm": _encoded("PPM", _RGB),
}
mutation = st.tuples(st.sampled_from(["set", "cut", "insert"]), st.floats(0, 1), st.binary(min_size=1, max_size=8))


def _mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for op, where, payload in mutations:
        pos = min(int(where * len(out)), max(len(out) - 1, 0))
        if op == "set":
            out[pos : pos + len(payload)] = payload
        elif op == "cut":
            del out[pos:]
        else:
            out[pos:pos] = payload
    return bytes(out)


def _read_everything(path: Path) -> None:
    """Every reader on ``path``: each returns uint8 pixels / integer labels or raises DataError."""
    for read in (lambda p: read_image(p, 3), lambda p: read_image(p, 1), read_mask, read_image_stack):
        try:
            with time_limit(10):
                out = read(path)
        except DataError as exc:
            assert str(path) in str(exc)
            continue
        for array in out if isinstance(out, list) else [out]:
            assert isinstance(array, np.ndarray) and array.dtype.kind in "ui" and array.ndim in (2, 3)


@settings(FUZZ, max_examples=400)
@given(st.sampled_from(sorted(SEEDS)), st.lists(mutation, min_size=1, max_size=4))
def test_damaged_images_raise_data_errors_naming_the_file(tmp_path, seed, mutations):
    path = tmp_path / f"damaged.{seed.rsplit('.', 1)[-1]}"
    path.write_bytes(_mutate(SEEDS[seed], mutations))
    _read_everything(path)


MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM", b"GIF89a", b"RIFF", b"P6\n", b""]


@settings(FUZZ, max_examples=200)
@given(st.sampled_from(MAGIC), st.binary(max_size=300))
def test_arbitrary_bytes_behind_a_known_signature(tmp_path, magic, body):
    path = tmp_path / "arbitrary.png"
    path.write_bytes(magic + body)
    _read_everything(path)


@settings(FUZZ, max_examples=150)
@given(
    st.integers(1, 20),
    st.sampled_from([np.uint8, np.uint16]),
    st.lists(st.integers(0, 400), min_size=1, max_size=48),
)
def test_mask_values_are_kept_or_the_stray_ones_listed(tmp_path, num_classes, dtype, values):
    raw = np.resize(np.asarray(values, dtype=np.int64), (6, 8))
    if dtype is np.uint8:
        raw = raw.clip(0, 255)
    path = tmp_path / "mask.png"
    Image.fromarray(raw.astype(dtype)).save(path)
    stray = sorted({int(v) for v in np.unique(raw) if v >= num_classes and v != 255})
    try:
        labels = LabelMap.identity(num_classes)(read_mask(path), path)
    except DataError as exc:
        assert stray, exc
        assert f"mask has values [{', '.join(map(str, stray[:20]))}" in str(exc) and str(path) in str(exc)
        return
    assert not stray and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, raw)


# ---------------------------------------------------------------------------------------------
# Archives


def _tar_gz() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("d/a.txt", b"a" * 300), ("d/b.bin", bytes(range(256))), ("d/sub/c.txt", b"c")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("d/a.txt", b"a" * 300)
        zf.writestr("d/sub/c.txt", b"c")
    return buf.getvalue()


ARCHIVES = {"tar.gz": _tar_gz(), "zip": _zip()}


@settings(FUZZ, max_examples=150)
@given(st.sampled_from(sorted(ARCHIVES)), st.lists(mutation, min_size=1, max_size=3))
def test_damaged_archives_raise_download_errors_and_write_only_inside_dest(kind, mutations):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        archive = root / f"a.{kind}"
        archive.write_bytes(_mutate(ARCHIVES[kind], mutations))
        try:
            with time_limit(10):
                safe_extract(archive, root / "dest")
        except DownloadError:
            pass
        outside = {p for p in root.rglob("*")} - {archive, root / "dest"} - set((root / "dest").rglob("*"))
        assert not outside
