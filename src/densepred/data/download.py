"""Dataset downloads: resumable, sha256-checked, safely extracted, atomically installed.

``download_dataset(name, root)`` leaves either nothing new at ``root/name`` or the complete
dataset there: archives are fetched into ``root/.downloads/*.part`` (resumed with HTTP Range
requests), verified, extracted into a temporary folder inside ``root`` (refusing absolute
paths, ``..`` and links), checked for the expected contents, given a completion marker, and
only then renamed to ``root/name`` in one atomic step.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from ..download import TransferFailed, TransferInterrupted, download_to_part, sha256_file
from .errors import DownloadError, ManualDownloadRequired
from .extract import safe_extract
from .sources import SOURCES, Archive, DatasetSource

__all__ = ["MARKER", "download_dataset", "fetch", "is_downloaded"]

log = logging.getLogger(__name__)
MARKER = ".densepred-complete.json"


def _verify(path: Path, archive: Archive) -> str:
    """The file's sha256; a size or checksum mismatch deletes the file and raises."""
    if archive.size is not None and path.stat().st_size != archive.size:
        got = path.stat().st_size
        path.unlink()
        raise DownloadError(
            f"{archive.url}: got {got} bytes, expected {archive.size}; removed it, run again to re-download"
        )
    digest = sha256_file(path)
    if archive.sha256 is None:
        log.warning(
            "WARNING: no published sha256 for %s; the file is NOT verified (its sha256 is %s)", archive.url, digest
        )
    elif digest != archive.sha256.lower():
        path.unlink()
        raise DownloadError(
            f"{archive.url}: sha256 mismatch: expected {archive.sha256}, got {digest}; the file is corrupt or was "
            "changed upstream. It was removed; run again to re-download"
        )
    return digest


def fetch(
    archive: Archive, folder: str | Path, progress: bool = False, retries: int = 3, timeout: float = 60.0
) -> tuple[Path, str]:
    """Download ``archive`` into ``folder`` (resuming a ``.part`` file), verify it; ``(path, sha256)``.

    An interrupted transfer is resumed up to ``retries`` times; an archive already in ``folder``
    that no longer verifies is deleted, with a warning, and downloaded again.
    """
    if urlparse(archive.url).scheme not in {"http", "https"}:
        raise DownloadError(f"{archive.url}: only http(s) URLs are downloaded")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / archive.filename
    part = final.with_name(final.name + ".part")
    if final.is_file():
        try:
            return final, _verify(final, archive)
        except DownloadError as e:
            log.warning("%s does not verify, downloading it again (%s)", final, e)
    for attempt in range(retries + 1):
        try:
            download_to_part(archive.url, part, progress=progress, timeout=timeout, expected_size=archive.size)
            break
        except TransferFailed as e:
            raise DownloadError(str(e)) from None
        except TransferInterrupted as e:
            if attempt == retries:
                kept = part.stat().st_size if part.exists() else 0
                raise DownloadError(
                    f"{archive.url}: transfer failed {retries + 1} times (last: {e.reason}); {kept} bytes are kept "
                    f"in {part}: run the command again to resume"
                ) from None
            log.info("%s: %s; resuming", archive.url, e.reason)
    digest = _verify(part, archive)
    os.replace(part, final)
    return final, digest


def is_downloaded(name: str, root: str | Path) -> bool:
    """True when ``root/name`` was completed by :func:`download_dataset` (its marker exists)."""
    return (Path(root) / name / MARKER).is_file()


def _source(name: str, sources: Mapping[str, DatasetSource]) -> DatasetSource:
    if name not in sources:
        close = difflib.get_close_matches(name, list(sources), n=3, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise DownloadError(f"no download for {name!r}.{hint} Downloadable: {', '.join(sources)}")
    return sources[name]


def download_dataset(
    name: str,
    root: str | Path,
    progress: bool = True,
    keep_archives: bool = False,
    sources: Mapping[str, DatasetSource] | None = None,
) -> Path:
    """Download, verify and install dataset ``name`` as ``root/name``; returns that folder.

    A dataset already completed is left alone. Cityscapes (no public archive) raises
    :class:`ManualDownloadRequired` whose message says how to get it by hand.
    """
    source = _source(name, SOURCES if sources is None else sources)
    root = Path(root)
    target = root / source.name
    if source.manual is not None:
        raise ManualDownloadRequired(source.manual.format(target=target))
    if is_downloaded(source.name, root):
        log.info("%s is already complete", target)
        return target
    if target.exists():
        raise DownloadError(
            f"{target} exists but is not a finished densepred download (no {MARKER}); it may hold your own "
            "files, so it is left alone: move or delete it, or choose another --root"
        )
    root.mkdir(parents=True, exist_ok=True)
    fetched = [(a, *fetch(a, root / ".downloads", progress)) for a in source.archives]
    for stale in root.glob(f".{source.name}.partial-*"):  # left by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.name}.partial-", dir=root))
    try:
        for archive, path, _ in fetched:
            if archive.extract:
                safe_extract(path, tmp, archive.prefix)
            else:
                shutil.copyfile(path, tmp / archive.filename)
        if source.arrange is not None:
            source.arrange(tmp)
        missing = [e for e in source.expect if not (tmp / e).exists()]
        if missing:
            raise DownloadError(f"{source.name}: the downloaded archives lack {missing}; the source may have changed")
        record = {
            "name": source.name,
            "archives": [{"url": a.url, "sha256": d, "verified": a.sha256 is not None} for a, _, d in fetched],
        }
        # The marker is written inside the temporary folder, so the rename below publishes the
        # data and its marker together: there is never a finished-looking folder without both.
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not keep_archives:
        for _, path, _ in fetched:
            path.unlink(missing_ok=True)
    log.info("%s is ready", target)
    return target
