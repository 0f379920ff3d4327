"""Datasets stored as one image file and one mask file per example."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import Sample, SegmentationDataset, Transform, check_not_empty
from .errors import DataError
from .io import IMAGE_SUFFIXES, check_same_size, image_size, read_image, read_mask
from .labels import IGNORE_INDEX, LabelMap

__all__ = ["SampleFiles", "FileSegmentationDataset", "list_images", "pair_by_stem", "read_split_file", "require_dir"]


@dataclass(frozen=True)
class SampleFiles:
    """The files of one example; ``mask`` is None for an unlabelled split (all pixels ignored)."""

    image: Path
    mask: Path | None
    name: str


def require_dir(path: Path, what: str, hint: str) -> Path:
    """``path`` if it is a directory, else an error saying what was expected there."""
    if not path.is_dir():
        raise DataError(f"{what} not found: {path} is not a directory; {hint}")
    return path


def list_images(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (sorted, hidden files skipped)."""
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in pattern if p.suffix.lower() in suffixes and not p.name.startswith(".") and p.is_file())


def read_split_file(path: Path) -> list[str]:
    """Example ids from a split list (one per line, blank lines skipped)."""
    if not path.is_file():
        raise DataError(f"split list {path} not found; check the dataset root and the split name")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def pair_by_stem(
    images: Sequence[Path],
    mask_for: Callable[[Path], Sequence[Path]],
    where: str,
    name_of: Callable[[Path], str] = lambda p: p.stem,
) -> list[SampleFiles]:
    """Pair each image with the first existing candidate mask path; missing masks are one error listing them."""
    pairs, missing = [], []
    for image in images:
        mask = next((m for m in mask_for(image) if m.is_file()), None)
        if mask is None:
            missing.append(image)
        else:
            pairs.append(SampleFiles(image, mask, name_of(image)))
    if missing:
        shown = ", ".join(str(p) for p in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        tried = ", ".join(str(m) for m in mask_for(missing[0]))
        raise DataError(
            f"{len(missing)} image(s) in {where} have no mask: {shown} (looked for e.g. {tried}); "
            "add the masks or remove those images"
        )
    return pairs


class FileSegmentationDataset(SegmentationDataset):
    """A dataset of :class:`SampleFiles` whose raw mask values go through a :class:`LabelMap`."""

    label_map: LabelMap
    mask_colours: Mapping[tuple[int, int, int], int] | None = None

    def __init__(self, files: Sequence[SampleFiles], where: str, hint: str, transform: Transform | None = None) -> None:
        super().__init__(transform)
        check_not_empty(len(files), where, hint)
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def read_raw_mask(self, path: Path) -> np.ndarray:
        """Raw label values of a mask file (SBD overrides this for its .mat files)."""
        return read_mask(path, self.mask_colours)

    def _mask(self, files: SampleFiles, shape: tuple[int, ...]) -> np.ndarray:
        if files.mask is None:
            return np.full(shape[:2], IGNORE_INDEX, dtype=np.uint8)
        mask = self.label_map(self.read_raw_mask(files.mask), files.mask)
        check_same_size(shape, mask.shape, files.image, files.mask)
        return mask

    def load(self, index: int) -> Sample:
        files = self.files[index]
        image = read_image(files.image, self.in_channels)
        return Sample(image, self._mask(files, image.shape), files.name)

    def load_mask(self, index: int) -> np.ndarray:
        # The image header gives its size without decoding, so statistics stay fast and still check sizes.
        files = self.files[index]
        return self._mask(files, image_size(files.image))
