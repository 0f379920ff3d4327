"""Inference backends, chosen by what this machine runs fastest, and checked before use.

The same network can run as eager PyTorch (NCHW), eager channels-last (oneDNN's preferred
layout for convolutions), a frozen TorchScript graph (``torch.jit.freeze`` +
``optimize_for_inference`` fold batch norm into the convolutions and pre-pack their weights),
or the ONNX export run by ONNX Runtime (the ``export`` extra) or by OpenVINO (the ``openvino``
extra; compiled in float32, since on a CPU with native bfloat16 it would otherwise run bf16 and
change labels). Which is fastest depends on the model and the CPU, so
:func:`choose_backend` measures: each candidate is prepared, checked for parity with eager on
two input sizes (argmax equal on at least 99.99 % of the pixels: a backend that computes
something else is never used), timed (a first call screens out the clearly slower ones, then
the rest run in turn, round by round, and each keeps its best round), and the fastest wins. The
choice is cached per model architecture, input size, machine and installed runtime versions
(``backends.json`` in the weights cache folder), so later runs skip the timing and only repeat
the parity check.

``eval.backend`` (``--backend``) picks one explicitly, and one whose package is missing is an
error naming the package; ``auto`` measures what is installed and skips the rest. The
environment variable ``DENSEPRED_BACKEND`` replaces ``auto`` (the test suite pins ``eager`` with it).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import json
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .atomic import write_atomic
from .models.base import SegmentationModel, input_rule_of
from .precision import autocast, machine_info, resolve_amp, resolve_inference_amp, torch_threads
from .streams import stream_share

__all__ = [
    "BACKENDS",
    "AGREEMENT",
    "Accelerated",
    "BackendChoice",
    "MissingRuntimeError",
    "prepare_backend",
    "choose_backend",
    "accelerate",
    "probe_input",
    "torch_beside",
    "stream_models",
    "may_stream",
]

BACKENDS = ("eager", "channels_last", "torchscript", "onnxruntime", "openvino")
AGREEMENT = 0.9999  # the share of pixels whose argmax must equal eager's
# The packages a runtime imports, and the extra of ours that installs them.
RUNTIMES = {"onnxruntime": (("onnx", "onnxruntime"), "export"), "openvino": (("onnx", "openvino"), "openvino")}
FLOAT32_ONLY = ("torchscript", "onnxruntime", "openvino")  # reduced precision is eager autocast's
# Eager under bf16 autocast: a candidate of ``auto`` only where the CPU computes bf16 natively
# (``--amp bf16`` forces it); like every candidate, used only if its labels agree with float32's.
BF16 = "bf16"
CPU_ONLY = ("onnxruntime", "openvino")  # as prepared here: their CPU devices
SCREEN = 1.5  # a candidate whose first timed call is this much slower than the fastest's is dropped
# In the cache key: choices made by an earlier way of timing are measured again once (1: one
# candidate after another, which a burst of other work could mislead; 2: a runtime timed straight
# after another thread pool's call, whose spinning workers slowed it).
PROBE_METHOD = 3


class MissingRuntimeError(ImportError, ValueError):
    """A backend whose package is not installed. A ValueError too: the command line reports it
    as a user error (exit 2), with the command that installs it."""


class Accelerated(SegmentationModel):
    """``model`` whose forward pass runs on another backend; its declarations (input rule,
    classes, output stride) are the model's own, so every inference mode works unchanged."""

    def __init__(self, model: nn.Module, run: Callable[[Tensor], Tensor], backend: str) -> None:
        super().__init__()
        self.model, self._run, self.backend = model, run, backend
        self.num_classes, self.in_channels = model.num_classes, model.in_channels
        self.output_stride = model.output_stride

    def input_rule(self):  # noqa: ANN201 - the model's InputRule
        return input_rule_of(self.model)

    def train(self, mode: bool = True) -> Accelerated:
        """Always eval mode: a caller restoring "training" (``evaluate`` does) must not switch the
        wrapped model's batch norms to batch statistics under a prepared backend."""
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x)

    @property
    def own_threads(self) -> bool:
        """Whether the forward runs on a runtime's own thread pool (ONNX Runtime, OpenVINO, int8)."""
        return self.backend.split()[0] in CPU_ONLY

    def streams(self, count: int, example: Tensor) -> list[Accelerated]:
        """``count`` modules computing these logits, to be called at once from a thread each, the
        runtime's threads shared between them (see :func:`stream_models`): ONNX Runtime a session
        each, OpenVINO a model compiled with ``count`` streams, from the export at ``example``."""
        runs = _runtime_runs(self.model, self.backend, example, count)
        return [Accelerated(self.model, run, self.backend) for run in runs]


def torch_beside(model: nn.Module) -> contextlib.AbstractContextManager:
    """Torch's own operations on the calling thread alone while ``model``'s forward runs on a
    runtime's thread pool (:attr:`Accelerated.own_threads`); unchanged otherwise. Every inference
    mode enters it in :func:`~densepred.inference.predict_logits`.

    After a parallel operation (a tile's copy, a slide's sums, a resize) torch's OpenMP workers
    spin for milliseconds before they sleep (libgomp's default wait), on the cores the runtime's
    next forward needs. Around the forward passes, then, not after them: an argmax on one thread
    costs about what the spin does. Measured on a 2-core Zen 2, LR-ASPP on CamVid frames, runs
    in alternation: sliding windows of 321 x1.16 (ONNX Runtime; OpenVINO 97.6 -> 86.6 ms a
    frame), whole frames through ``predict_files``, ``evaluate`` or a loop of ``labels`` as before.
    """
    own = isinstance(model, Accelerated) and model.own_threads
    return torch_threads(1) if own else contextlib.nullcontext()


def _eager_output(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    return out["fused"] if isinstance(out, dict) else out


def prepare_backend(model: nn.Module, backend: str, example: Tensor) -> Callable[[Tensor], Tensor]:
    """A function computing ``model``'s eval-mode logits on ``backend``, prepared with ``example``.

    Raises:
        MissingRuntimeError: the backend's package is not installed (the message names it).
        ValueError: an unknown backend name, or a CPU runtime for a model on another device.
        RuntimeError (and the runtimes' own errors): the backend cannot run this model.
    """
    model = model.eval()
    _require_runtime(backend)
    if backend in CPU_ONLY and example.device.type != "cpu":
        raise ValueError(f"--backend {backend} runs on the CPU here, but the model is on {example.device}; use another")
    if backend == "eager":
        return lambda x: _eager_output(model, x)
    if backend == BF16:

        def bf16(x: Tensor) -> Tensor:
            with autocast("bf16", x.device):
                return _eager_output(model, x).float()

        return bf16
    if backend == "channels_last":
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        return lambda x: _eager_output(cl, x.contiguous(memory_format=torch.channels_last))
    if backend == "torchscript":
        from .export import _tracing

        with _tracing(model):
            traced = torch.jit.trace(_Logits(model), example, check_trace=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        return frozen
    if backend in CPU_ONLY:
        return _runtime_runs(model, backend, example, streams=1)[0]
    raise ValueError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")


def _runtime_runs(model: nn.Module, backend: str, example: Tensor, streams: int) -> list[Callable[[Tensor], Tensor]]:
    """``streams`` functions running ``model`` on a CPU runtime, to be called at once from a thread
    each: ONNX Runtime's each a session on an equal share of torch's threads, OpenVINO's one model
    compiled with as many streams (an infer request per calling thread). Both runtimes read the
    ONNX export (dynamic batch and sides), loaded whole."""
    from .export import INPUT_NAME, export_onnx, onnx_session

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx", metadata={}, example_size=tuple(example.shape[-2:]))
        if backend == "openvino":
            return [_openvino(_openvino_compiled(path, streams))] * streams
        # A session per stream: concurrent runs of one session would share, and wait for, its pool.
        sessions = [onnx_session(path, threads=stream_share(streams)) for _ in range(streams)]

    def runner(session) -> Callable[[Tensor], Tensor]:  # noqa: ANN001 - an onnxruntime.InferenceSession
        return lambda x: torch.from_numpy(session.run(None, {INPUT_NAME: x.detach().cpu().numpy()})[0])

    return [runner(session) for session in sessions]


def _require_runtime(backend: str) -> None:
    packages, extra = RUNTIMES.get(backend, ((), ""))
    for package in packages:
        try:
            importlib.import_module(package)
        except ImportError:
            message = f"--backend {backend} needs the {package} package: pip install 'densepred[{extra}]'"
            raise MissingRuntimeError(message, name=package) from None


def _openvino_compiled(path: Path, streams: int = 1):  # noqa: ANN202 - an openvino.CompiledModel
    """The ONNX file compiled by OpenVINO's CPU plugin in float32 on torch's threads: for latency,
    or with ``streams`` > 1 for throughput, as that many streams sharing the threads, each running
    one infer request at a time (several compiled models, one per stream, each with threads of
    its own, crashed the process later: a segmentation fault in a test after them)."""
    import onnx
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    from .export import scatter_max_unpool

    config = {
        props.inference_num_threads: torch.get_num_threads(),
        hints.performance_mode: hints.PerformanceMode.LATENCY if streams == 1 else hints.PerformanceMode.THROUGHPUT,
        # Explicit: on a CPU with native bfloat16 the plugin's default is bf16, whose labels
        # differ from eager's on 0.3-1.2 % of the pixels (DeepLab-LargeFOV at 256 px, 3 / 21
        # classes, measured on an AVX512-BF16 EPYC): it would never pass the parity check.
        hints.inference_precision: ov.Type.f32,
    }
    if streams > 1:
        config[props.num_streams] = streams
    proto = onnx.load(path)
    if any(node.op_type == "MaxUnpool" for node in proto.graph.node):  # not an OpenVINO operation
        path = path.with_name(f"{path.stem}.scatter.onnx")
        onnx.save(scatter_max_unpool(proto), path)
    core = ov.Core()
    return core.compile_model(core.read_model(path), "CPU", config)


def _openvino(compiled) -> Callable[[Tensor], Tensor]:  # noqa: ANN001 - an openvino.CompiledModel
    local = threading.local()  # one infer request per thread: the web app runs a thread pool

    def run(x: Tensor) -> Tensor:
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        return torch.from_numpy(request.infer([x.detach().contiguous().numpy()])[0])

    return run


class _Logits(nn.Module):
    """``model`` with a tensor output (the fused scores of a dict-returning model), for tracing."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return _eager_output(self.model, x)


@dataclass
class BackendChoice:
    """The backend chosen for a model on this machine, and why."""

    backend: str
    seconds: dict[str, float] = field(default_factory=dict)  # per candidate, at the probe size
    rejected: dict[str, str] = field(default_factory=dict)  # candidate -> why it was not used
    cached: bool = False

    def describe(self) -> str:
        timing = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in self.seconds.items())
        why = "; ".join(f"{k}: {v}" for k, v in self.rejected.items())
        src = "cached choice" if self.cached else "measured" if self.seconds else "not measured"
        return f"backend {self.backend} ({src}{': ' + timing if timing else ''}{'; not used: ' + why if why else ''})"


def _agreement(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return 0.0
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


def _cache_path() -> Path:
    from .weights import default_cache_dir

    return default_cache_dir() / "backends.json"


def _cache_key(model: nn.Module, example: Tensor) -> str:
    shapes = ";".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    arch = hashlib.sha256(f"{type(model).__name__}|{shapes}".encode()).hexdigest()[:16]
    m = machine_info()
    machine = f"{m.cpu_name}|{m.capability}|{m.threads}|{m.torch}|{_runtime_versions()}"
    return f"{arch}|{tuple(example.shape)}|{machine}|probe {PROBE_METHOD}"


def _runtime_versions() -> str:
    """The installed runtimes: installing or upgrading one measures again."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "-"

    packages = sorted({p for needed, _ in RUNTIMES.values() for p in needed})
    return ",".join(f"{p}={installed(p)}" for p in packages)


def _read_cache() -> dict[str, str]:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _eager_references(model: nn.Module, probes: list[Tensor]) -> list[Tensor]:
    """Eager's logits on each probe, computed once for every candidate to be checked against."""
    with torch.inference_mode():
        return [_eager_output(model, x).float() for x in probes]


def _check(run: Callable[[Tensor], Tensor], probes: list[Tensor], references: list[Tensor]) -> str | None:
    """None when ``run`` agrees with eager (``references``) on every probe, else why not."""
    with torch.inference_mode():
        for x, reference in zip(probes, references, strict=True):
            share = _agreement(run(x).float(), reference)
            if share < AGREEMENT:
                return f"argmax agrees with eager on {100 * share:.3f}% of pixels at {tuple(x.shape[-2:])}"
    return None


def _timed_call(run: Callable[[Tensor], Tensor], x: Tensor) -> float:
    """Seconds of one call, finished: CUDA's kernels are waited for, not just launched."""
    start = time.perf_counter()
    run(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start


def _seconds_once(run: Callable[[Tensor], Tensor], x: Tensor) -> float:
    """One call's seconds after a warm-up call: the screen that drops clearly slower candidates."""
    with torch.inference_mode():
        run(x)
        return _timed_call(run, x)


def _interleaved_seconds(runs: dict[str, Callable[[Tensor], Tensor]], x: Tensor, rounds: int = 3) -> dict[str, float]:
    """Each run's best seconds over ``rounds`` in which every run is called once, in turn.

    Timed one after another, a burst of other work on the machine lands on one candidate's
    whole timing and can crown the wrong one for good, since the choice is cached (a probe
    timed that way once kept eager for SegNet, which ONNX Runtime runs 25% faster). In turn,
    a burst slows one round of every candidate, and the best round of each survives it.

    Where the thread pool changes (torch's, ONNX Runtime's, OpenVINO's), an untimed call runs
    first: the previous pool's workers spin for milliseconds after their last task, on the cores
    the next one needs. Timed straight after TorchScript, ONNX Runtime ran LR-ASPP at 360x480 in
    32-36 ms against 27.5 ms after a call of its own, and the probe chose OpenVINO's 29 ms (Zen 2).
    """
    best = dict.fromkeys(runs, float("inf"))
    previous = None
    with torch.inference_mode():
        for _ in range(rounds):
            for name, run in runs.items():
                pool = name if name in CPU_ONLY else "torch"
                if pool != previous:
                    run(x)
                    previous = pool
                best[name] = min(best[name], _timed_call(run, x))
    return best


def _probes(model: nn.Module, example: Tensor) -> list[Tensor]:
    """The example and a second size the model accepts: a backend must handle sizes it was not traced at."""
    rule = input_rule_of(model)
    h, w = example.shape[-2:]
    other = (rule.nearest(h + 16), rule.nearest(w - 8 if w > 24 else w + 8))
    g = torch.Generator().manual_seed(1)
    second = torch.randn(example.shape[0], example.shape[1], *other, generator=g).to(example)
    return [example, second]


def choose_backend(
    model: nn.Module, example: Tensor, candidates: tuple[str, ...] = BACKENDS, *, use_cache: bool = True
) -> tuple[Callable[[Tensor], Tensor], BackendChoice]:
    """The fastest candidate that computes what eager computes, prepared for ``model``."""
    key = _cache_key(model, example)
    cached = _read_cache().get(key) if use_cache else None
    if cached == "eager" and "eager" in candidates:  # the reference itself: nothing to check
        return prepare_backend(model, "eager", example), BackendChoice("eager", cached=True)
    probes = _probes(model, example)
    references = _eager_references(model, probes)
    if cached in candidates:
        try:
            run = prepare_backend(model, cached, example)
            if _check(run, probes, references) is None:
                return run, BackendChoice(cached, cached=True)
        except Exception:  # noqa: BLE001 - a cached choice that no longer works is measured again
            pass
    choice, screened = BackendChoice("eager"), {}
    for name in candidates:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run = prepare_backend(model, name, example)
            problem = None if name == "eager" else _check(run, probes, references)
        except Exception as exc:  # noqa: BLE001 - not installed or cannot run this model: not a candidate
            choice.rejected[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            continue
        if problem:
            choice.rejected[name] = problem
            continue
        screened[name] = (_seconds_once(run, example), run)
        # Only candidates within SCREEN of the fastest are held for the rounds: each holds a
        # copy of the weights (a 134M-parameter net's are half a gigabyte).
        fastest = min(seconds for seconds, _ in screened.values())
        for slow in [k for k, (seconds, _) in screened.items() if seconds > SCREEN * fastest]:
            choice.rejected[slow] = f"{screened.pop(slow)[0] * 1e3:.0f} ms, over {SCREEN}x the fastest"
    finalists = {name: run for name, (_, run) in screened.items()}
    if finalists:
        choice.seconds = _interleaved_seconds(finalists, example)
        choice.backend = min(choice.seconds, key=choice.seconds.get)
    # Eager always qualifies unless the model itself fails.
    best_run = finalists[choice.backend] if finalists else prepare_backend(model, "eager", example)
    if use_cache:
        _write_cache({**_read_cache(), key: choice.backend})
    return best_run, choice


def _write_cache(entries: dict[str, str]) -> None:
    try:
        write_atomic(_cache_path(), lambda f: f.write(json.dumps(entries, indent=1).encode()), what="backend cache")
    except OSError:
        pass  # a read-only cache folder: measure again next time


def probe_input(
    model: nn.Module, channels: int, device: torch.device | str = "cpu", size: tuple[int, int] | None = None
) -> Tensor:
    """A noise batch to choose the backend with: of ``size``, the size of the forward passes the
    work will run (see :func:`densepred.inference.forward_size`), else 128 pixels; each side the
    nearest the model takes.

    The work's own size matters: the fastest backend at 128 pixels is not always the fastest at
    513 (DeepLab-LargeFOV on an AVX2 EPYC: OpenVINO at 128, ONNX Runtime 10% faster at 513).
    """
    rule = input_rule_of(model)
    h, w = size or (128, 128)
    shape = (1, channels, rule.nearest(h), rule.nearest(w))
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)


def accelerate(model: nn.Module, backend: str, example: Tensor, amp: str = "none") -> tuple[nn.Module, BackendChoice]:
    """``model`` on ``backend`` (``auto``: :func:`choose_backend`), as a module the inference
    functions take like the model itself; ``eager`` returns the model unchanged.

    ``amp="auto"`` on a CPU runs float32, and where the CPU computes bf16 natively ``auto`` also
    tries eager bf16 autocast as a candidate, held to the same parity rule. An explicit reduced
    precision (``bf16``/``fp16``, or ``auto`` on CUDA) is eager autocast's: ``auto`` then keeps
    eager, and the float32-only runtimes (TorchScript frozen, ONNX Runtime, OpenVINO) are refused.

    Raises:
        MissingRuntimeError: ``backend`` needs a package that is not installed (the message says
            which, and the ``pip install`` that adds it).
        ValueError: ``backend`` is unknown, cannot run at ``amp``, or computes other labels than eager.
    """
    if backend == "auto":
        backend = os.environ.get("DENSEPRED_BACKEND", "auto")
    precision = resolve_inference_amp(amp, example.device)  # auto on a CPU: float32, bf16 a candidate
    if precision != "none":
        if backend in FLOAT32_ONLY:
            raise ValueError(f"--backend {backend} runs float32, but the precision is {precision}; add --amp none")
        if backend == "auto":
            return model, BackendChoice("eager", rejected={"others": f"{precision} autocast runs eager"})
    if backend == "eager":
        return model, BackendChoice("eager")
    if backend == "auto":
        native_bf16 = amp == "auto" and resolve_amp("auto", example.device) == "bf16"
        run, choice = choose_backend(model, example, BACKENDS + ((BF16,) if native_bf16 else ()))
    else:
        run = prepare_backend(model, backend, example)
        probes = _probes(model, example)
        problem = _check(run, probes, _eager_references(model, probes))
        if problem:
            raise ValueError(f"--backend {backend} does not compute what eager does here ({problem}); use another")
        choice = BackendChoice(backend)
    return (model if choice.backend == "eager" else Accelerated(model, run, choice.backend)), choice


# Several frames at once, each on a share of the cores (:func:`stream_models`), only where that
# segments at least this much more a second: each stream holds its own copy of a runtime's
# weights, and each frame takes longer than alone.
STREAM_GAIN = 1.1


def _seconds_per_frame(runs: list[Callable[[Tensor], Tensor]], x: Tensor, calls: int = 2) -> float:
    """Wall seconds per forward with every run called ``calls`` times at once from a thread of its
    own, each thread on an equal share of torch's threads (one run: on the calling thread)."""
    if len(runs) == 1:
        return min(_timed_call(runs[0], x) for _ in range(calls))
    share = stream_share(len(runs))
    ready = threading.Barrier(len(runs) + 1)

    def work(run: Callable[[Tensor], Tensor]) -> None:
        with torch_threads(share), torch.inference_mode():
            run(x)  # a new session's first call, and the pools' spin-up, untimed
            ready.wait()
            for _ in range(calls):
                run(x)

    with ThreadPoolExecutor(len(runs)) as pool:
        futures = [pool.submit(work, run) for run in runs]
        ready.wait()
        start = time.perf_counter()
        for future in futures:
            future.result()
    return (time.perf_counter() - start) / (calls * len(runs))


def _runtime_streams(model: nn.Module) -> bool:
    """Whether ``model`` runs on a CPU runtime (int8 included), whose streams the runtime sets up
    (:meth:`Accelerated.streams`) and whose count is measured."""
    return isinstance(model, Accelerated) and model.own_threads


def may_stream(model: nn.Module, streams: int | None) -> bool:
    """Whether :func:`stream_models` can return more than one module for ``model``: ``streams``
    asks for several, or leaves the count to a measurement that applies to this backend. Lets a
    caller skip preparing the example where the answer is one anyway."""
    return (streams or 0) > 1 or (streams is None and _runtime_streams(model))


def _streams_of(model: nn.Module, example: Tensor, count: int) -> list[nn.Module]:
    """``count`` modules computing ``model``'s logits, to be called at once from a thread each.
    A runtime makes its own (:meth:`Accelerated.streams`: a session per thread on ONNX Runtime and
    int8, a model compiled with ``count`` streams on OpenVINO); torch's backends run the same
    module, each thread on its own share of the intra-op threads."""
    return model.streams(count, example) if _runtime_streams(model) else [model] * count


def stream_models(
    model: nn.Module, example: Tensor, streams: int | None, limit: int, *, use_cache: bool = True
) -> list[nn.Module]:
    """The modules to segment several frames at once with, one per thread, each thread to run on
    an equal share of torch's threads (``torch_threads``): ``streams`` of them (at most ``limit``),
    or with ``None`` on ONNX Runtime and OpenVINO the count (a power of two up to the threads, at
    most ``limit``) that runs the most forwards a second at ``example``'s size, measured in turn
    with one stream and cached like the backend. torch's backends keep one unless asked.

    A small network keeps two cores only partly busy with one frame: LR-ASPP at 360x480 runs
    28 ms a frame on ONNX Runtime's two threads and 21 ms a frame as two one-thread sessions,
    30 and 21 ms on OpenVINO with one stream and two (2-core Zen 2); DeepLab-LargeFOV and the
    padded U-Net run alike either way, and keep one.
    A stream whose argmax differs from the model's own (on more than 0.01% of pixels) is refused.

    Raises:
        ValueError: ``streams`` below 1.
    """
    if streams is not None and streams < 1:
        raise ValueError(f"eval.streams must be >= 1 or null (measured), got {streams}")
    if example.device.type != "cpu" or limit < 2 or not may_stream(model, streams):
        return [model]
    if streams is not None:
        return _checked_streams(model, example, min(streams, limit))
    key = f"{_cache_key(model.model, example)}|{model.backend}|streams"
    cached = _read_cache().get(key) if use_cache else None
    if cached is not None and cached.isdigit():
        return [model] if int(cached) <= 1 else _checked_streams(model, example, min(int(cached), limit))
    candidates = [n for n in (2, 4, 8, 16, 32, 64) if n <= min(torch.get_num_threads(), limit)]
    chosen = [model]
    if candidates:
        with torch.inference_mode():
            model(example)  # the one stream's pool awake, untimed
        one = fastest = float("inf")
        # One count at a time, each timed in turn with one stream, keeping its best round: only the
        # fastest count's streams so far stay alive beside the next, each holding the weights.
        for n in candidates:
            streams_of_n, seconds = _checked_streams(model, example, n), float("inf")
            for _ in range(2):
                one = min(one, _seconds_per_frame([model], example))
                seconds = min(seconds, _seconds_per_frame(streams_of_n, example))
            if seconds < fastest:
                fastest, best = seconds, streams_of_n
        if one > STREAM_GAIN * fastest:
            chosen = best
    if use_cache:
        _write_cache({**_read_cache(), key: str(len(chosen))})
    return chosen


def _checked_streams(model: nn.Module, example: Tensor, count: int) -> list[nn.Module]:
    models = _streams_of(model, example, count)
    with torch.inference_mode():
        share = _agreement(models[-1](example).float(), model(example).float())
    if share < AGREEMENT:
        raise ValueError(f"{count} streams agree with one on {100 * share:.3f}% of pixels; use eval.streams=1")
    return models
