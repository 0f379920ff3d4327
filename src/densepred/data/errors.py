"""Exceptions for bad data: every message names the file or value at fault and the fix."""

from __future__ import annotations

__all__ = ["DataError", "UnknownDatasetError", "DownloadError", "ManualDownloadRequired"]


class DataError(ValueError):
    """A dataset file or layout that cannot be used as it is (bad mask value, size mismatch, ...)."""


class UnknownDatasetError(DataError):
    """A dataset name that is not registered."""


class DownloadError(RuntimeError):
    """A download that failed or did not verify; nothing was marked complete."""


class ManualDownloadRequired(DownloadError):
    """The dataset has no public archive; the message says how to get it by hand."""
