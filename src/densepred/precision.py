"""Numeric precision chosen by what the machine computes fast, and the machine described.

bfloat16 halves the bytes a convolution moves, and where the CPU has bf16 dot products
(AVX512-BF16, AMX) oneDNN runs it well past the fp32 peak. Where it has not, PyTorch emulates
bf16 through fp32 conversions, tens of times *slower* than plain fp32. So a recipe does not
say ``bf16``; it says ``auto``, and the machine decides: bf16 on a CPU that computes it
natively, fp16 on CUDA, fp32 everywhere else.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Literal

import torch

__all__ = [
    "Amp",
    "MachineInfo",
    "cpu_name",
    "machine_info",
    "native_bf16",
    "resolve_amp",
    "autocast",
    "bf16_slowdown",
    "torch_threads",
]

Amp = Literal["auto", "none", "bf16", "fp16"]

# x86 flags that mean bf16 dot products in hardware; aarch64 calls them "bf16".
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


@lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none), read once: the
    model, flags and core design of one process's CPU do not change."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags, or None where the OS does not say."""
    info = _cpuinfo()
    flags = info.get("flags") or info.get("Features")
    return set(flags.split()) if flags else None


def cpu_model() -> str:
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or platform.machine() or "unknown CPU"


# Family 0x19's Zen 4 models (its others are Zen 3). Cloud VMs often name every AMD server CPU
# "AMD EPYC", yet a Zen 5 core has twice a Zen 4's fp32 width.
_ZEN4_MODELS = (range(0x10, 0x20), range(0x60, 0x80), range(0xA0, 0xB0))


def cpu_microarchitecture() -> str | None:
    """The CPU's core design where the model name may hide it (AMD: "Zen 4", "Zen 5"), else None."""
    info = _cpuinfo()
    if info.get("vendor_id") != "AuthenticAMD":
        return None
    try:
        family, model = int(info["cpu family"]), int(info["model"])
    except (KeyError, ValueError):
        return None
    if family == 0x17:
        return "Zen 2" if model >= 0x30 else "Zen/Zen+"
    if family == 0x19:
        return "Zen 4" if any(model in r for r in _ZEN4_MODELS) else "Zen 3"
    if family == 0x1A:
        return "Zen 5"
    return f"AMD family {family} model {model}"


@lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware, as PyTorch and oneDNN will use it.

    The CPU must have the instructions *and* the libraries must be allowed to use them:
    ``ATEN_CPU_CAPABILITY=avx2`` or ``ONEDNN_MAX_CPU_ISA=AVX2`` make an AVX-512 machine behave
    as an AVX2 one. Where the flags cannot be read, a short measured probe decides.
    """
    flags = cpu_flags()
    if flags is None:
        return bf16_slowdown() < 1.0
    if not flags & _BF16_FLAGS:
        return False
    if platform.machine().lower() in ("x86_64", "amd64"):
        if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
            return False
        mkldnn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(mkldnn_bf16()) if mkldnn_bf16 is not None else True
    return True


@lru_cache(maxsize=1)
def bf16_slowdown() -> float:
    """Measured time of a bf16-autocast convolution over the same one in fp32 (> 1: bf16 is slower).

    About 0.1 s where bf16 is native; a few tenths of a second where it is emulated.
    """
    conv = torch.nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(1, 32, 48, 48)

    def best(bf16: bool) -> float:
        times = []
        with torch.inference_mode():
            for _ in range(4):
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    conv(x)
                times.append(time.perf_counter() - start)
        return min(times[1:])  # the first call pays for kernel selection

    return best(True) / max(best(False), 1e-9)


_warned: set[str] = set()


def resolve_amp(requested: str, device: torch.device | str = "cpu") -> Literal["none", "bf16", "fp16"]:
    """The precision to run: ``auto`` becomes fp16 on CUDA, bf16 on a CPU with native bf16, else
    none (fp32). An explicit choice is kept, with a warning (once) where it is slow or unsupported."""
    device = torch.device(device)
    if requested == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if device.type == "cpu" and native_bf16() else "none"
    if requested not in ("none", "bf16", "fp16"):
        raise ValueError(f"amp must be one of auto, none, bf16, fp16; got {requested!r}")
    if requested == "bf16" and device.type == "cpu" and not native_bf16() and "bf16" not in _warned:
        _warned.add("bf16")
        warnings.warn(
            f"amp=bf16 on a CPU without native bfloat16 ({cpu_model()}, {torch.backends.cpu.get_cpu_capability()}): "
            f"PyTorch emulates it, measured {bf16_slowdown():.0f}x slower than fp32 here; use amp=auto or none",
            RuntimeWarning,
            stacklevel=2,
        )
    if requested == "fp16" and device.type == "cpu":
        return "none"  # fp16 autocast is a CUDA feature here; on CPU it would run slower than fp32
    return requested  # type: ignore[return-value]


def resolve_inference_amp(requested: str, device: torch.device | str = "cpu") -> Literal["none", "bf16", "fp16"]:
    """The precision inference runs outside the backend probe: as :func:`resolve_amp`, except
    that ``auto`` on a CPU is float32. There bf16 is one more candidate of the probe
    (:func:`densepred.backends.accelerate`), held to its rule: used only where it is faster
    *and* its labels agree with float32's on >= 99.99 % of pixels. Inference stays exact by
    default; training (``train.amp``) takes bf16 wherever it is native."""
    if requested == "auto" and torch.device(device).type == "cpu":
        return "none"
    return resolve_amp(requested, device)


@contextlib.contextmanager
def autocast(amp: str, device: torch.device | str) -> Iterator[None]:
    """Autocast for a *resolved* precision (``none`` runs plain fp32)."""
    device = torch.device(device)
    if amp == "none":
        yield
        return
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    with torch.autocast(device.type, dtype=dtype):
        yield


@dataclass(frozen=True)
class MachineInfo:
    """What a figure was measured on: it holds for this machine alone."""

    cpu: str
    capability: str  # PyTorch's vector ISA: AVX2, AVX512, ... (respects ATEN_CPU_CAPABILITY)
    native_bf16: bool
    cores: int
    threads: int  # torch's intra-op threads
    torch: str
    gpu: str | None
    microarchitecture: str | None = None  # "Zen 5": results of older versions do not say

    @property
    def cpu_name(self) -> str:
        return cpu_name(self.to_dict())

    def line(self) -> str:
        """One line for a table header or a log, e.g. ``AMD EPYC (Zen 5), AVX512 (native bf16), 2 cores, ...``."""
        bf16 = "native bf16" if self.native_bf16 else "no native bf16"
        gpu = f", GPU {self.gpu}" if self.gpu else ""
        return (
            f"{self.cpu_name}, {self.capability} ({bf16}), {self.cores} cores, "
            f"{self.threads} threads, torch {self.torch}{gpu}"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_name(machine: Mapping[str, object]) -> str:
    """A (stored) machine's CPU with its core design where known, e.g. ``AMD EPYC (Zen 5)``."""
    core = machine.get("microarchitecture")
    return f"{machine['cpu']} ({core})" if core else str(machine["cpu"])


def machine_info() -> MachineInfo:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return MachineInfo(
        cpu=cpu_model(),
        capability=torch.backends.cpu.get_cpu_capability(),
        native_bf16=native_bf16(),
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        threads=torch.get_num_threads(),
        torch=str(torch.__version__),
        gpu=gpu,
        microarchitecture=cpu_microarchitecture(),
    )


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` inside, the previous count restored after, an
    error included. The count is OpenMP's, per thread: other threads keep theirs."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
