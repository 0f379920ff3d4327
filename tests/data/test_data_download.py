"""Downloads against archives built here and served from a loopback HTTP server."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fakedata import rng_image, rng_mask
from PIL import Image

from densepred.data import SOURCES, Archive, DatasetSource, DownloadError, ManualDownloadRequired, create_dataset
from densepred.data.download import MARKER, download_dataset, fetch, is_downloaded


def tar_bytes(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16  # a symbolic link, as zip -y stores it
            zf.writestr(info, target)
    return buf.getvalue()


PAYLOAD = {"toy/train/a.txt": b"a" * 5000, "toy/train/b.txt": bytes(range(256)) * 40, "toy/README": b"hello"}


def serve(
    http_server,
    path: str,
    data: bytes,
    sha: str | None = "auto",
    prefix: str = "toy",
    expect: tuple[str, ...] = ("train/a.txt",),
) -> dict[str, DatasetSource]:
    http_server.files[path] = data
    digest = hashlib.sha256(data).hexdigest() if sha == "auto" else sha
    archive = Archive(http_server.url(path), digest, size=len(data), prefix=prefix)
    return {"toy": DatasetSource("toy", (archive,), expect, homepage="")}


def no_leftovers(root: Path) -> bool:
    return not list(root.glob(".toy.partial-*")) and not list(root.glob(".downloads/*.part"))


def test_good_tar_archive(http_server, tmp_path):
    sources = serve(http_server, "/toy.tar.gz", tar_bytes(PAYLOAD))
    out = download_dataset("toy", tmp_path, progress=False, sources=sources)
    assert out == tmp_path / "toy"
    assert (out / "train" / "a.txt").read_bytes() == PAYLOAD["toy/train/a.txt"]
    assert (out / "README").read_bytes() == b"hello"
    marker = json.loads((out / MARKER).read_text())
    assert marker["archives"][0]["verified"] is True and is_downloaded("toy", tmp_path)
    assert no_leftovers(tmp_path) and not (tmp_path / ".downloads" / "toy.tar.gz").exists()
    download_dataset("toy", tmp_path, progress=False, sources=sources)  # already complete: no new request
    assert len(http_server.requests) == 1


def test_good_zip_archive_with_prefix_and_kept_archive(http_server, tmp_path):
    data = zip_bytes({"repo-abc/data/toy/" + k.split("/", 1)[1]: v for k, v in PAYLOAD.items()} | {"repo-abc/x": b"no"})
    sources = serve(http_server, "/repo.zip", data, prefix="repo-abc/data/toy")
    out = download_dataset("toy", tmp_path, progress=False, keep_archives=True, sources=sources)
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "README", "train"])
    assert (tmp_path / ".downloads" / "repo.zip").read_bytes() == data


def test_corrupted_archive_sha_mismatch(http_server, tmp_path):
    good = tar_bytes(PAYLOAD)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    sources = serve(http_server, "/toy.tar.gz", bytes(bad), sha=hashlib.sha256(good).hexdigest())
    with pytest.raises(DownloadError, match=r"sha256 mismatch: expected [0-9a-f]{64}, got [0-9a-f]{64}.*removed"):
        download_dataset("toy", tmp_path, progress=False, sources=sources)
    assert not (tmp_path / "toy").exists() and not is_downloaded("toy", tmp_path) and no_leftovers(tmp_path)


def test_interrupted_transfer_resumes_with_range(http_server, tmp_path):
    data = tar_bytes(PAYLOAD)
    sources = serve(http_server, "/toy.tar.gz", data)
    http_server.interrupt("/toy.tar.gz", after=len(data) // 2)
    out = download_dataset("toy", tmp_path, progress=False, sources=sources)
    assert (out / "train" / "b.txt").read_bytes() == PAYLOAD["toy/train/b.txt"]
    assert http_server.requests == [("/toy.tar.gz", None), ("/toy.tar.gz", f"bytes={len(data) // 2}-")]


def test_resume_of_a_part_file_left_by_an_earlier_run(http_server, tmp_path):
    data = tar_bytes(PAYLOAD)
    sources = serve(http_server, "/toy.tar.gz", data)
    (tmp_path / ".downloads").mkdir()
    (tmp_path / ".downloads" / "toy.tar.gz.part").write_bytes(data[:100])
    download_dataset("toy", tmp_path, progress=False, sources=sources)
    assert http_server.requests == [("/toy.tar.gz", "bytes=100-")]


def test_server_ignoring_range_restarts_from_zero(http_server, tmp_path):
    data = tar_bytes(PAYLOAD)
    sources = serve(http_server, "/toy.tar.gz", data)
    http_server.ignore_range.add("/toy.tar.gz")
    (tmp_path / ".downloads").mkdir()
    (tmp_path / ".downloads" / "toy.tar.gz.part").write_bytes(b"stale bytes")
    path, digest = fetch(sources["toy"].archives[0], tmp_path / ".downloads")
    assert path.read_bytes() == data and digest == hashlib.sha256(data).hexdigest()


def test_a_corrupt_archive_left_in_the_folder_is_downloaded_again(http_server, tmp_path, caplog):
    data = tar_bytes(PAYLOAD)
    sources = serve(http_server, "/toy.tar.gz", data)
    (tmp_path / "toy.tar.gz").write_bytes(b"x" * len(data))  # right size, wrong bytes
    with caplog.at_level(logging.WARNING, logger="densepred.data.download"):
        path, _ = fetch(sources["toy"].archives[0], tmp_path)
    assert path.read_bytes() == data and "does not verify, downloading it again" in caplog.text
    assert http_server.requests == [("/toy.tar.gz", None)]


def test_transfer_that_keeps_failing_keeps_the_part_for_the_next_run(http_server, tmp_path):
    data = tar_bytes(PAYLOAD)
    sources = serve(http_server, "/toy.tar.gz", data)
    http_server.interrupt("/toy.tar.gz", after=len(data) // 8, times=None)  # every attempt stops early
    with pytest.raises(DownloadError, match="transfer failed 4 times .* run the command again to resume"):
        download_dataset("toy", tmp_path, progress=False, sources=sources)
    kept = (tmp_path / ".downloads" / "toy.tar.gz.part").stat().st_size
    assert 0 < kept < len(data) and not (tmp_path / "toy").exists()
    http_server.cuts.clear()
    download_dataset("toy", tmp_path, progress=False, sources=sources)  # the next run resumes
    assert http_server.requests[-1] == ("/toy.tar.gz", f"bytes={kept}-") and is_downloaded("toy", tmp_path)


@pytest.mark.parametrize(
    ("kind", "build"),
    [
        ("dotdot tar", lambda: tar_bytes({"toy/train/a.txt": b"a", "toy/../../evil.txt": b"x"})),
        ("absolute tar", lambda: tar_bytes({"toy/train/a.txt": b"a", "/tmp/evil.txt": b"x"})),
        ("symlink tar", lambda: tar_bytes({"toy/train/a.txt": b"a"}, links={"toy/train/link": "/etc/passwd"})),
        ("dotdot zip", lambda: zip_bytes({"toy/train/a.txt": b"a", "toy/../../evil.txt": b"x"})),
        ("symlink zip", lambda: zip_bytes({"toy/train/a.txt": b"a"}, links={"toy/link": "/etc/passwd"})),
    ],
)
def test_unsafe_archives_are_refused(http_server, tmp_path, kind, build):
    root = tmp_path / "root"
    sources = serve(http_server, "/evil.bin", build())
    with pytest.raises(DownloadError, match="outside the extraction folder|symbolic link|is a link"):
        download_dataset("toy", root, progress=False, sources=sources)
    assert not (root / "toy").exists() and not list(tmp_path.rglob("evil.txt")) and no_leftovers(root)


def test_unknown_checksum_warns_and_is_recorded_unverified(http_server, tmp_path, caplog):
    sources = serve(http_server, "/toy.tar.gz", tar_bytes(PAYLOAD), sha=None)
    with caplog.at_level(logging.WARNING, logger="densepred.data.download"):
        out = download_dataset("toy", tmp_path, progress=False, sources=sources)
    assert "NOT verified" in caplog.text
    assert json.loads((out / MARKER).read_text())["archives"][0]["verified"] is False


def test_archive_without_the_expected_content(http_server, tmp_path):
    sources = serve(http_server, "/toy.tar.gz", tar_bytes(PAYLOAD), expect=("train/a.txt", "val"))
    with pytest.raises(DownloadError, match=r"lack \['val'\]"):
        download_dataset("toy", tmp_path, progress=False, sources=sources)
    assert not (tmp_path / "toy").exists() and no_leftovers(tmp_path)


def test_a_foreign_folder_is_left_alone(http_server, tmp_path):
    sources = serve(http_server, "/toy.tar.gz", tar_bytes(PAYLOAD))
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "mine.txt").write_text("keep me")
    with pytest.raises(DownloadError, match="not a finished densepred download"):
        download_dataset("toy", tmp_path, progress=False, sources=sources)
    assert (tmp_path / "toy" / "mine.txt").read_text() == "keep me" and not http_server.requests


def test_http_error_names_the_url(http_server, tmp_path):
    sources = serve(http_server, "/toy.tar.gz", b"")
    del http_server.files["/toy.tar.gz"]
    with pytest.raises(DownloadError, match=r"/toy.tar.gz: HTTP 404"):
        download_dataset("toy", tmp_path, progress=False, sources=sources)


def test_only_http_urls(tmp_path):
    with pytest.raises(DownloadError, match="only http"):
        fetch(Archive("file:///etc/passwd", None), tmp_path)


def test_cityscapes_explains_the_manual_steps(tmp_path):
    with pytest.raises(ManualDownloadRequired, match=r"(?s)cityscapes-dataset.com.*gtFine_trainvaltest.zip"):
        download_dataset("cityscapes", tmp_path)
    assert not list(tmp_path.iterdir())


def test_unknown_download_name_suggests():
    with pytest.raises(DownloadError, match="Did you mean: camvid"):
        download_dataset("camvd", ".")


def test_source_table_is_well_formed():
    assert {"voc", "sbd", "camvid", "isbi2012", "ade20k", "cityscapes"} <= set(SOURCES)
    for source in SOURCES.values():
        assert source.expect and (source.manual or source.archives)
        for archive in source.archives:
            assert archive.url.startswith(("http://", "https://"))
            assert archive.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", archive.sha256)
    assert SOURCES["voc"].archives[0].sha256 and SOURCES["sbd"].archives[0].sha256


def test_isbi_archive_is_arranged_into_the_reader_layout(http_server, tmp_path):
    """The ISBI source (zhixuhao/unet's data/membrane) becomes train/images/NN.png etc."""
    real = SOURCES["isbi2012"]
    top = real.archives[0].prefix
    members = {}
    for i in range(30):
        for sub, array in (
            ("train/image", rng_image(i, channels=1)),
            ("train/label", rng_mask(i, [0, 255])),
            ("test", rng_image(50 + i, channels=1)),
        ):
            buf = io.BytesIO()
            Image.fromarray(array).save(buf, "PNG")
            members[f"{top}/{sub}/{i}.png"] = buf.getvalue()
    members[f"{top}/test/0_predict.png"] = b"model output, dropped"
    members[f"{top}/train/aug/x.png"] = b"augmented, dropped"
    data = zip_bytes(members)
    http_server.files["/unet.zip"] = data
    source = replace(
        real,
        archives=(
            replace(real.archives[0], url=http_server.url("/unet.zip"), sha256=hashlib.sha256(data).hexdigest()),
        ),
    )
    out = download_dataset("isbi2012", tmp_path, progress=False, sources={"isbi2012": source})
    assert sorted(p.name for p in (out / "train" / "images").iterdir())[:3] == ["00.png", "01.png", "02.png"]
    assert not (out / "train" / "aug").exists() and len(list((out / "test" / "images").iterdir())) == 30
    ds = create_dataset("isbi2012", root=out)
    np.testing.assert_array_equal(ds[7]["mask"].numpy(), rng_mask(7, [0, 255]) // 255)
