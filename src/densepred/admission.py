"""What a request to the server may cost, and stopping work nobody waits for.

The server admits an image only when the memory its inference needs fits a budget. That need
is known before any pixel is decoded: :class:`MemoryPlanner` counts, on the meta device, the
tensors one inference path creates at two image sizes (memory grows linearly with pixels for
these fully convolutional nets), and scales the count by what a real forward pass was
measured to take at start (the kernels' scratch space and the allocator's slack). An image
whose whole-image inference would not fit its share is run by sliding window, so its memory
grows only by the per-pixel buffers (image, logits, probabilities, mask), not by the network's
activations. :class:`Cancellation` stops inference at the next layer when the client has gone
or the deadline has passed.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from .allocator import glibc_function
from .config import EvalConfig
from .footprint import peak_bytes, physical_memory
from .inference import predict_logits
from .models.base import input_rule_of

T = TypeVar("T")

__all__ = [
    "Cancelled",
    "Cancellation",
    "cancellable_forward",
    "MemoryBudget",
    "MemoryPlanner",
    "Plan",
    "available_memory",
    "kept_memory",
    "return_free_memory",
    "measured_peak",
]

# The factor between the tensors counted on meta and a real forward's resident peak where it
# cannot be measured (measured here on Linux: 1.15-1.55 for a padded U-Net, 256-1024 px).
DEFAULT_OVERHEAD = 1.6


class Cancelled(RuntimeError):
    """Inference stopped on purpose: its client left, or its deadline passed."""


class Cancellation:
    """A flag one request's inference checks before every layer (see :func:`cancellable_forward`)."""

    _current = threading.local()

    def __init__(self, deadline_s: float | None = None) -> None:
        self.deadline = None if deadline_s is None else time.monotonic() + deadline_s
        self.reason: str | None = None

    def cancel(self, reason: str) -> None:
        self.reason = self.reason or reason

    def check(self) -> None:
        if self.reason is None and self.deadline is not None and time.monotonic() > self.deadline:
            self.reason = "deadline"
        if self.reason is not None:
            raise Cancelled(self.reason)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Make this the flag of the calling thread's forward passes."""
        Cancellation._current.token = self
        try:
            yield
        finally:
            Cancellation._current.token = None

    @staticmethod
    def current() -> Cancellation | None:
        return getattr(Cancellation._current, "token", None)


def _check_cancellation(module: nn.Module, args: tuple) -> None:
    token = Cancellation.current()
    if token is not None:
        token.check()


@contextmanager
def cancellable_forward() -> Iterator[None]:
    """While active, every module call of a thread with an active :class:`Cancellation` checks it
    (a global forward pre-hook: a dict lookup per layer, nothing for other threads)."""
    handle = nn.modules.module.register_module_forward_pre_hook(_check_cancellation)
    try:
        yield
    finally:
        handle.remove()


class MemoryBudget:
    """Bytes that admitted requests may hold at once; ``reserve`` says no rather than wait."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"a memory budget must be positive, got {total} bytes")
        self.total, self.reserved, self.high_water = total, 0, 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.reserved + nbytes > self.total:
                return False
            self.reserved += nbytes
            self.high_water = max(self.high_water, self.reserved)
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.reserved -= nbytes


def available_memory() -> int:
    """Bytes the OS can still give (Linux ``MemAvailable``; else physical memory)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return physical_memory()


_MALLOC_TRIM = glibc_function("malloc_trim")


def return_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``; nothing elsewhere).

    Each inference thread has its own malloc arena, which keeps what a request freed; without
    this, two threads taking turns hold the sum of their peaks although never both at once.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measured_peak(fn: Callable[[], object]) -> int | None:
    """The resident-memory peak ``fn()`` adds to the process (Linux, reset through ``clear_refs``),
    or None where the OS cannot say. Only meaningful while nothing else runs in the process."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    except OSError:
        return None
    before = _status_bytes("VmRSS")
    result = fn()
    peak = _status_bytes("VmHWM")
    del result
    return None if before is None or peak is None else max(0, peak - before)


def kept_memory(fn: Callable[[], T]) -> tuple[T, int | None]:
    """``fn()``, and the resident memory the process holds more after it (Linux ``VmRSS``): what
    its result keeps, with what the allocator kept of its work, so an upper bound. None where the
    OS cannot say."""
    gc.collect()
    before = _status_bytes("VmRSS")
    result = fn()
    after = _status_bytes("VmRSS")
    return result, None if before is None or after is None else max(0, after - before)


@dataclass(frozen=True)
class Plan:
    """How one image is run and what memory that takes."""

    options: EvalConfig
    nbytes: int
    path: str  # "whole", "slide 512", "overlap_tile 572": for the response header and errors


@dataclass(frozen=True)
class _Linear:
    fixed: float
    per_pixel: float

    def __call__(self, pixels: int) -> int:
        return int(self.fixed + self.per_pixel * pixels)


def _fit(cost: Callable[[int], int], sides: tuple[int, int]) -> _Linear:
    (a, b), (ca, cb) = sides, (cost(sides[0]), cost(sides[1]))
    slope = max(0.0, (cb - ca) / (b * b - a * a))
    return _Linear(max(0.0, ca - slope * a * a), slope)


class MemoryPlanner:
    """Chooses each image's inference path and its memory, from counts made once at start.

    ``per_request``: the most one request may take; an image whose whole-image inference needs
    more runs by ``tile``-pixel sliding windows instead (models that need valid-size tiles, the
    paper's U-Net, always run by overlap-tile, which is bounded already).
    """

    def __init__(
        self,
        model_on_meta: nn.Module,
        options: EvalConfig,
        *,
        in_channels: int,
        num_classes: int,
        tile: int = 512,
        overhead: float = DEFAULT_OVERHEAD,
    ) -> None:
        self.in_channels, self.num_classes, self.overhead = in_channels, num_classes, overhead
        self.tile = options.tile if options.mode == "slide" and options.tile else tile
        self._meta = model_on_meta
        self.options = options
        tiled_already = options.mode != "whole" or input_rule_of(model_on_meta).kind == "valid"
        self.whole = self._count(options, tiled=tiled_already)
        self.tiled_options: EvalConfig | None = None
        self.tiled: _Linear | None = None
        if not tiled_already:
            self.tiled_options = dataclasses.replace(options, mode="slide", tile=tile, batch_size=1)
            self.tiled = self._count(self.tiled_options, tiled=True)
        # Outside the network, per pixel: the decoded image twice (PIL's and NumPy's), the float
        # input, the argmax (int64) and the mask; with the CRF its probabilities and messages.
        k, c = num_classes, in_channels
        self.buffers_per_pixel = 2 * c + 4 * c + 8 + 1 + (20 * k if options.crf else 0)

    def _count(self, options: EvalConfig, *, tiled: bool = False) -> _Linear:
        """Tensor bytes of ``predict_logits`` with ``options`` (in float32: an upper bound for
        reduced precision) as a linear function of the pixel count."""
        options = dataclasses.replace(options, amp="none")
        # Tiled paths at several tiles per side: the tile's fixed cost and the accumulators' growth.
        sides = (2 * self.tile, 3 * self.tile) if tiled else (256, 384)

        def cost(side: int) -> int:
            x = torch.empty(1, self.in_channels, side, side, device="meta")
            return peak_bytes(lambda: predict_logits(self._meta, x, options))

        return _fit(cost, sides)

    def calibrate(self, model: nn.Module, device: torch.device) -> float:
        """Measure a real forward pass's resident peak against the count (once, before serving;
        CPU only) and keep the larger factor; returns it."""
        if device.type != "cpu":
            return self.overhead
        side = 256
        x = torch.zeros(1, self.in_channels, side, side, device=device)
        options = dataclasses.replace(self.options, amp="none")
        with torch.inference_mode():
            predict_logits(model, x, options)  # the first call's one-time allocations are not the model's
            real = measured_peak(lambda: predict_logits(model, x, options))
        counted = self.whole(side * side) if self.tiled is not None else None
        if counted is None:  # the network runs by tiles anyway: count this very size
            counted = peak_bytes(lambda: predict_logits(self._meta, x.to("meta"), options))
        if real is not None and counted > 0:
            self.overhead = max(self.overhead, real / counted)
        return self.overhead

    def _bytes(self, network: _Linear, pixels: int) -> int:
        return int(self.overhead * network(pixels) + self.buffers_per_pixel * pixels)

    def plan(self, height: int, width: int, per_request: int) -> Plan:
        """The whole-image path when it fits ``per_request`` bytes (or cannot be tiled), else tiles."""
        pixels = height * width
        whole = self._bytes(self.whole, pixels)
        if self.tiled is None or self.tiled_options is None or whole <= per_request or max(height, width) <= self.tile:
            return Plan(self.options, whole, self.options.mode)
        return Plan(self.tiled_options, self._bytes(self.tiled, pixels), f"slide {self.tile}")
