"""Safe extraction of tar and zip archives: no absolute paths, no ``..``, no links."""

from __future__ import annotations

import re
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .errors import DownloadError

__all__ = ["safe_extract"]

_CHUNK = 1 << 20


def _member_path(name: str, prefix: str) -> PurePosixPath | None:
    """Safe relative path of an archive member under ``prefix`` (None: outside it); unsafe names raise."""
    clean = name.replace("\\", "/")
    parts = [p for p in clean.split("/") if p not in ("", ".")]
    if clean.startswith("/") or re.match(r"[A-Za-z]:", clean) or ".." in parts:
        raise DownloadError(f"archive member {name!r} points outside the extraction folder; refusing the archive")
    pre = [p for p in prefix.split("/") if p]
    if parts[: len(pre)] != pre:
        return None
    return PurePosixPath(*parts[len(pre) :])


def _write_member(dest: Path, rel: PurePosixPath, data: BinaryIO) -> None:
    target = dest.joinpath(*rel.parts)
    if not target.resolve().is_relative_to(dest.resolve()):  # defence in depth: no links exist here
        raise DownloadError(f"archive member {rel} resolves outside {dest}; refusing the archive")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        shutil.copyfileobj(data, out, _CHUNK)


def safe_extract(path: str | Path, dest: str | Path, prefix: str = "") -> int:
    """Extract the regular files and folders of a tar (any compression) or zip ``path`` into ``dest``.

    Absolute paths, ``..`` components, links and device files are refused (the caller discards
    ``dest``). Only members under ``prefix`` are written, with ``prefix`` removed. Returns the
    number of files written.
    """
    path, dest = Path(path), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = 0
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                rel = _member_path(info.filename, prefix)
                if rel is None or not rel.parts:
                    continue
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise DownloadError(f"{path}: member {info.filename!r} is a symbolic link; refusing the archive")
                if info.is_dir():
                    dest.joinpath(*rel.parts).mkdir(parents=True, exist_ok=True)
                    continue
                with zf.open(info) as data:
                    _write_member(dest, rel, data)
                written += 1
        return written
    try:
        tar = tarfile.open(path, "r:*")
    except tarfile.TarError as e:
        raise DownloadError(f"{path}: neither a zip nor a readable tar archive ({e})") from None
    with tar:
        for member in tar:  # one sequential pass: fast even for compressed tars
            rel = _member_path(member.name, prefix)
            if rel is None or not rel.parts:
                continue
            if member.isdir():
                dest.joinpath(*rel.parts).mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                data = tar.extractfile(member)
                assert data is not None  # regular files always have data
                _write_member(dest, rel, data)
                written += 1
            else:
                kind = "link" if member.issym() or member.islnk() else "special file"
                raise DownloadError(f"{path}: member {member.name!r} is a {kind}; refusing the archive")
    return written
