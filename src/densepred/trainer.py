"""The trainer: a recipe in, a run folder out (checkpoints, log, curves, final metrics).

``train(exp, run_dir)`` runs the same way alone and under ``torchrun`` (DistributedDataParallel,
gloo on CPU, NCCL on GPU). The loop follows the Caffe recipes the papers used: SGD with
momentum, parameter groups with lr/decay multipliers, ``iter_size`` gradient accumulation,
iteration-based schedules. Everything needed to continue is checkpointed atomically, and in
deterministic mode a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from .atomic import WriteError, write_atomic
from .build import build_dataset, build_model
from .checkpoint import CheckpointManager, git_commit, restore_training_state, training_state
from .config import ConfigError, Experiment, OptimConfig
from .data.errors import DataError
from .data.loader import make_loader
from .data.stats import compute_stats, median_frequency_weights
from .distributed import DistInfo, seed_everything, setup_distributed
from .evaluation import evaluate
from .footprint import ModelTooLarge, check_model_size, physical_memory, training_bytes
from .losses import RecipeLoss, WithWeightMaps
from .models.base import SegmentationModel, input_rule_of, loss_weights_of
from .precision import autocast, machine_info, resolve_amp, resolve_inference_amp
from .sampling import ResumableBatchSampler, SeededSamples
from .schedule import fit_iterations, fitted_schedule, lr_factor

__all__ = ["train", "TrainResult", "NonFiniteLossError", "DataLoaderWorkerError", "param_groups", "lr_factor"]


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN/inf; the last good checkpoint is kept."""


class DataLoaderWorkerError(RuntimeError):
    """A DataLoader worker process died (killed, out of memory); the run can be resumed."""


@dataclass
class TrainResult:
    run_dir: Path
    iterations: int
    metrics: dict[str, Any] = field(default_factory=dict)
    best_miou: float | None = None
    train_seconds: float = 0.0
    checkpoint: Path | None = None
    stopped_early: bool = False
    resolved: dict[str, Any] = field(default_factory=dict)  # precision, machine, budget fit (Experiment.resolved)


def param_groups(model: nn.Module, o: OptimConfig) -> list[dict[str, Any]]:
    """Caffe-style groups: biases at ``bias_lr_mult`` x lr without decay; the classifier at
    ``head_lr_mult`` x lr (DeepLab: 10x); norm-layer scales without decay. Frozen tensors are left out."""
    heads = model.classifier_layers() if isinstance(model, SegmentationModel) else []
    head_ids = {id(p) for layer in heads for p in layer.parameters()}
    norm_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
        for p in m.parameters(recurse=False)
    }
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult = o.head_lr_mult if id(p) in head_ids else 1.0
        decay_mult = 1.0
        if name.endswith("bias"):
            lr_mult, decay_mult = lr_mult * o.bias_lr_mult, o.bias_decay_mult
        elif id(p) in norm_ids:
            decay_mult = 0.0
        groups.setdefault((lr_mult, decay_mult), []).append(p)
    return [
        {"params": ps, "lr": o.lr * lr_m, "weight_decay": o.weight_decay * wd_m, "lr_mult": lr_m}
        for (lr_m, wd_m), ps in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, o)
    # The fused kernels update every parameter in one pass over its memory, where the default on
    # CPU is a Python loop of several ops per tensor: FCN-8s's 134M weights, 2 threads, 0.54 ->
    # 0.10 s per SGD step, 2.6 -> 0.10 s per AdamW step (benchmarks/roofline.py, training lines).
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"]) or None
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, fused=fused)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=o.lr, betas=o.betas, fused=fused)


class _StrideOutput(nn.Module):
    """Route ``forward`` to ``stride_logits`` so DDP sees the call that produces the loss."""

    def __init__(self, model: SegmentationModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        return self.model.stride_logits(x)


def _collate(samples: list[dict]) -> dict:
    """``default_collate``, except that images of different sizes are a clear error, not a stack error."""
    sizes = {tuple(s["image"].shape[-2:]) for s in samples}
    if len(sizes) > 1:
        shown = ", ".join(f"{s['name']} ({s['image'].shape[-1]}x{s['image'].shape[-2]})" for s in samples)
        raise DataError(
            f"cannot batch images of different sizes: {shown}; with data.augment=none whole images are used, "
            "so set data.batch_size=1, or train on crops (data.augment=deeplab and data.crop=<size>)"
        )
    return default_collate(samples)


def _check_recipe_fits(exp: Experiment, model: nn.Module, dataset) -> None:
    """Recipe errors that need the model or the dataset to see, caught before the first iteration."""
    d, t = exp.data, exp.train
    if d.crop is not None and d.augment == "none":
        raise ConfigError(
            f"data.crop={d.crop} has no effect with data.augment=none (whole images are used); "
            "set data.crop=null, or data.augment=deeplab or unet to train on crops"
        )
    if d.crop is not None and input_rule_of(model).kind == "valid":
        try:
            model.output_size(d.crop, d.crop)
        except ValueError as exc:
            raise ConfigError(f"data.crop={d.crop} does not fit {exp.model.name}: {exc}") from None
    if t.class_weights is not None and len(t.class_weights) != dataset.num_classes:
        raise ConfigError(
            f"train.class_weights has {len(t.class_weights)} values but {d.dataset} has {dataset.num_classes} "
            f"classes ({', '.join(dataset.class_names)}); give one weight per class or set train.class_weights=null"
        )


def _check_memory_fits(exp: Experiment, dataset) -> None:
    """Refuse a training step that cannot fit this machine's RAM, from the meta device's count."""
    d = exp.data
    meta = check_model_size(exp, dataset.num_classes, dataset.in_channels)
    height, width = (d.crop, d.crop) if d.crop else dataset.load(0)[0].shape[:2]
    try:
        need, have = training_bytes(meta, d.batch_size, dataset.in_channels, height, width), physical_memory()
    except ValueError:  # a size the model cannot take: the recipe checks after the build name it
        return
    if need > have:
        raise ModelTooLarge(
            f"one training step of {exp.model.name} on {d.batch_size} x {height}x{width} needs about "
            f"{need / 2**30:,.1f} GiB, more than this machine's {have / 2**30:,.1f} GiB; lower data.batch_size "
            "or data.crop, or use smaller model.options (train.memory_check=false skips this check)"
        )


def _grad_norm(model: nn.Module) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _original_message(exc: BaseException) -> str:
    """The message of an exception re-raised from a DataLoader worker, without the worker's traceback."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    name, sep, message = last.partition(": ")
    return message if sep and name.endswith(type(exc).__name__) else last


def _dead_workers(batches: Any) -> list[str]:
    """The loader's worker processes that have exited (``_workers`` is private to PyTorch, hence getattr)."""
    return [f"pid {w.pid}, exit code {w.exitcode}" for w in getattr(batches, "_workers", []) if w.exitcode is not None]


def _worker_death(exc: BaseException, dead_workers: Callable[[], list[str]]) -> str | None:
    """What killed a loader worker, if ``exc`` comes from a dead one; None otherwise.

    A dead worker shows up either as the RuntimeError of PyTorch's SIGCHLD handler, raised
    wherever the main process is, or as a broken connection while a batch was being received,
    possibly before the dead process can be seen to have exited (hence the short wait).
    """
    if "DataLoader worker (pid" in str(exc):
        return str(exc).strip()
    if isinstance(exc, RuntimeError):
        return None
    deadline = time.monotonic() + 2.0
    try:
        while not (dead := dead_workers()) and time.monotonic() < deadline:
            time.sleep(0.05)
    except RuntimeError as signalled:  # the SIGCHLD handler, arriving while we wait
        if "DataLoader worker (pid" not in str(signalled):
            raise
        return str(signalled).strip()
    return f"{'; '.join(dead)}; {type(exc).__name__}: {exc}" if dead else None


@contextmanager
def _explain_stops(
    iteration: Callable[[], int], last_good: Callable[[], str], dead_workers: Callable[[], list[str]]
) -> Iterator[None]:
    """Say where training stopped and how to continue when a data file or a loader worker fails."""
    try:
        yield
    except DataError as exc:
        raise type(exc)(
            f"{_original_message(exc)} (training stopped at iteration {iteration()}; last good checkpoint: "
            f"{last_good()}; once the data is fixed, rerun with --resume to continue)"
        ) from exc
    except (RuntimeError, ConnectionError, EOFError) as exc:
        detail = _worker_death(exc, dead_workers)
        if detail is None:
            raise
        raise DataLoaderWorkerError(
            f"a data loader worker died during iteration {iteration()} ({detail}); last good checkpoint: "
            f"{last_good()}. Rerun with --resume to continue from it; if the system killed the worker for "
            "lack of memory, lower data.workers or data.batch_size"
        ) from exc


def _make_loader(exp: Experiment, dataset, info: DistInfo, start_batch: int) -> DataLoader:
    data: torch.utils.data.Dataset = SeededSamples(dataset)
    if exp.train.loss == "unet_weighted":
        data = WithWeightMaps(data)
    sampler = ResumableBatchSampler(
        len(dataset),
        exp.data.batch_size,
        seed=exp.train.seed,
        rank=info.rank,
        world_size=info.world_size,
        start=start_batch,
    )
    return make_loader(
        data,
        num_workers=exp.data.workers,
        seed=exp.train.seed,
        batch_sampler=sampler,
        collate_fn=_collate,
    )


def _trim_log(path: Path, iteration: int) -> None:
    """Drop the log records past ``iteration`` (and a torn last line): the steps a killed process
    logged after its last checkpoint are run again by the resumed one, and each is logged once."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and int(record.get("iter", 0)) <= iteration:
            kept.append(line + "\n")
    text = "".join(kept).encode()
    write_atomic(path, lambda f: f.write(text), what="training log")


def _log(path: Path, record: dict[str, Any]) -> None:
    try:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise WriteError(
            exc.errno, f"appending to the training log {path} failed ({exc.strerror or exc}); checkpoints are intact"
        ) from exc


def _write_config(run_dir: Path, exp: Experiment) -> None:
    config_text = exp.to_yaml().encode()
    write_atomic(run_dir / "config.yaml", lambda f: f.write(config_text), what="run config")


def _seconds_per_evaluation(model: nn.Module, val_set, exp: Experiment, device: torch.device, info: DistInfo) -> float:
    """What one validation pass will cost, from a timed pass over two images (after a warm one)."""
    count = len(val_set) if exp.eval.max_images is None else min(exp.eval.max_images, len(val_set))
    timed = min(2, count)
    evaluate(model, val_set, dataclasses.replace(exp.eval, max_images=1), device=device, progress=False)
    start = time.perf_counter()
    evaluate(model, val_set, dataclasses.replace(exp.eval, max_images=timed), device=device, progress=False)
    model.train()
    return (time.perf_counter() - start) / timed * math.ceil(count / info.world_size)


# Budget fitting times the steps after the first few (which pay for worker start-up and kernel
# selection), and takes their median: a step that waited on a loader still warming up says
# nothing about the run's pace (seen: a 20-step mean 45% above the steady state, AVX2).
UNTIMED_STEPS, TIMED_STEPS = 10, 20


def train(exp: Experiment, run_dir: str | Path, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train ``exp`` into ``run_dir``; ``resume=True`` continues from its newest good checkpoint.

    With ``train.max_minutes`` the run times its first steps and fits the number of iterations
    to the budget (:mod:`densepred.schedule`); the fitted number is kept in the run's config and
    checkpoints, so a resumed run keeps it.
    """
    run = _Run(exp, Path(run_dir), progress=progress)  # build: data, model, optimiser, loss, loader
    run.start(resume)  # a new run folder, or the state of its newest good checkpoint
    with _explain_stops(lambda: run.it + 1, run.last_good, run.dead_workers):
        while run.it < run.length:
            loss = run.step()  # one optimiser step over train.iter_size batches
            run.after_step(loss)  # budget fit, log, evaluation and checkpoint when due
            if run.stopped:
                break
    return run.finish()


class _Run:
    """One training run, in the steps :func:`train` takes: build, start, step, after_step, finish."""

    def __init__(self, exp: Experiment, run_dir: Path, *, progress: bool) -> None:
        self.exp = exp = copy.deepcopy(exp)  # the run records what it decided in exp.resolved
        t = self.t = exp.train
        self.run_dir, self.progress = run_dir, progress
        self.info, self.device = info, device = setup_distributed(t.device)
        seed_everything(t.seed, t.deterministic)
        self.amp = resolve_amp(t.amp, device)
        eval_amp = resolve_inference_amp(exp.eval.amp, device)
        exp.resolved.update(amp=self.amp, eval_amp=eval_amp, machine=machine_info().to_dict())

        self.train_set = build_dataset(exp, exp.data.train_split, train=True, seed=t.seed)
        self.val_set = build_dataset(exp, exp.data.val_split, train=False)
        if t.class_weights == "median_frequency":  # from the masks alone, the same on every resume
            weights = median_frequency_weights(compute_stats(self.train_set))
            t.class_weights = [round(float(w), 6) for w in weights]
            exp.resolved["class_weights"] = t.class_weights
        if t.memory_check and device.type == "cpu":
            _check_memory_fits(exp, self.train_set)
        model = build_model(exp, self.train_set.num_classes, self.train_set.in_channels).to(device)
        _check_recipe_fits(exp, model, self.train_set)
        if exp.model.sync_bn and info.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if exp.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = build_optimizer(model, exp.optim)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == "fp16" else None
        self.loss_fn = RecipeLoss(
            t,
            self.train_set.ignore_index,
            device,
            crop_target=input_rule_of(model).shrink > 0,
            branch_weights=loss_weights_of(model),
        )
        self.ckpts = CheckpointManager(run_dir / "checkpoints", keep_last=t.keep_last)
        self.log_path = run_dir / "log.jsonl"
        self.it, self.best, self.trained_before, self.budget_fit = 0, None, 0.0, None
        self.metrics: dict[str, Any] = {}
        self.last_ckpt: Path | None = None
        self.stopped = False

    # -- start ------------------------------------------------------------------------------
    def start(self, resume: bool) -> None:
        info, t = self.info, self.t
        if info.is_main:
            self.ckpts.remove_stale_temporaries()  # torn writes of a killed run; the checkpoints are whole
        if resume and (found := self.ckpts.latest()) is not None:
            path, state = found
            point = restore_training_state(state, self.model, self.optimizer, self.scaler)
            self.it, self.best, self.trained_before = point.iteration, point.best_miou, point.train_seconds
            self.budget_fit = point.budget_fit
            if self.budget_fit:
                self.exp.resolved["budget_fit"] = self.budget_fit
            if info.is_main:
                planned = self.budget_fit["iterations"] if self.budget_fit else t.iterations
                print(f"resuming from {path} (iteration {self.it} of {planned})")
                _trim_log(self.log_path, self.it)
        elif info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _write_config(self.run_dir, self.exp)
            self.log_path.unlink(missing_ok=True)
        self.commit = git_commit()
        if info.is_main:
            (self.run_dir / "git_commit.txt").write_text(self.commit + "\n")

        net: nn.Module = _StrideOutput(self.model) if t.loss_at_output_stride else self.model
        if info.enabled:
            net = DistributedDataParallel(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.net = torch.compile(net) if t.compile else net
        self.batches = iter(_make_loader(self.exp, self.train_set, info, start_batch=self.it * t.iter_size))
        self.length = self.budget_fit["iterations"] if self.budget_fit else t.iterations
        self.schedule = fitted_schedule(self.exp.schedule, t.iterations, self.length)
        # Fit the length to the budget once, when enough steps have been timed (not for runs too short to need it).
        self.start_iter = self.it
        self.fit_pending = (
            t.max_minutes is not None
            and self.budget_fit is None
            and self.it + UNTIMED_STEPS + TIMED_STEPS < self.length
        )
        self.bar = tqdm(
            total=self.length, initial=self.it, disable=not (self.progress and info.is_main), desc="train", unit="it"
        )
        self.started = self.tick = time.perf_counter()
        self.tick_it = self.it
        self.images_per_iter = self.exp.data.batch_size * info.world_size * t.iter_size
        if info.is_main:
            _log(
                self.log_path,
                {"iter": self.it, "event": "start", "amp": self.amp, "machine": self.exp.resolved["machine"]},
            )
        self.model.train()

    def elapsed(self) -> float:
        """Seconds of this run so far, earlier (resumed) processes included."""
        return self.trained_before + time.perf_counter() - self.started

    def last_good(self) -> str:
        files = self.ckpts.iteration_files()
        return str(files[-1]) if files else "none written yet"

    def dead_workers(self) -> list[str]:
        return _dead_workers(getattr(self, "batches", None))

    # -- step -------------------------------------------------------------------------------
    def step(self) -> float:
        """Forward and backward over ``iter_size`` batches, then one optimiser step (or a skip of a
        non-finite one); returns the loss."""
        t, info, device, optimizer, scaler = self.t, self.info, self.device, self.optimizer, self.scaler
        self.factor = lr_factor(self.it, self.length, self.schedule)
        for group in optimizer.param_groups:
            group["lr"] = self.exp.optim.lr * group["lr_mult"] * self.factor
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(t.iter_size):
            batch = next(self.batches)
            images = batch["image"].to(device, non_blocking=True)
            if self.exp.model.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            target = batch["mask"].to(device)
            weight = batch["weight"].to(device) if "weight" in batch else None
            sync = nullcontext() if not info.enabled or micro == t.iter_size - 1 else self.net.no_sync()
            with sync:
                with autocast(self.amp, device):
                    output = self.net(images)
                loss = self.loss_fn(output, target, weight) / t.iter_size
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
            loss_sum += float(loss.detach())
        if scaler is not None:
            scaler.unscale_(optimizer)
        bad = self._non_finite(loss_sum)
        if bad is not None:
            where = f"non-finite {bad} at iteration {self.it + 1}"
            if not t.skip_nonfinite:
                raise NonFiniteLossError(
                    f"{where}; stopped. Last good checkpoint: {self.last_good()}. Lower optim.lr, set "
                    f"train.clip_grad_norm, or set train.skip_nonfinite=true to skip such steps"
                )
            optimizer.zero_grad(set_to_none=True)
            if info.is_main:
                _log(self.log_path, {"iter": self.it + 1, "skipped": where})
        elif scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        self.it += 1
        return loss_sum

    def _non_finite(self, loss_sum: float) -> str | None:
        """What is NaN/inf about this step, if anything (clipping the gradients on the way)."""
        grad_norm = None
        if self.t.clip_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.clip_grad_norm))
        elif self.scaler is None:
            # A NaN gradient with a finite loss would poison the weights, and the next checkpoint, silently.
            grad_norm = _grad_norm(self.model)
        if not math.isfinite(loss_sum):
            return f"loss ({loss_sum})"
        if self.scaler is None and grad_norm is not None and not math.isfinite(grad_norm):
            return f"gradient (norm {grad_norm})"  # fp16: the GradScaler skips such steps itself
        return None

    # -- after a step -----------------------------------------------------------------------
    def after_step(self, loss: float) -> None:
        it, t, info = self.it, self.t, self.info
        self._time_for_budget()
        if info.is_main and (it % max(t.log_every, 1) == 0 or it == self.length):
            now = time.perf_counter()
            rate = (it - self.tick_it) * self.images_per_iter / max(now - self.tick, 1e-9)
            self.tick, self.tick_it = now, it
            lr = self.exp.optim.lr * self.factor
            _log(self.log_path, {"iter": it, "loss": loss, "lr": lr, "img_per_s": rate, "time": self.elapsed()})
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
        self.bar.update(1)

        out_of_time = self._out_of_time()
        evaluate_now = (t.eval_every and it % t.eval_every == 0) or it == self.length or out_of_time
        is_best = False
        if evaluate_now:
            self.metrics = self.evaluate()
            if self.best is None or self.metrics["miou"] > self.best:
                self.best, is_best = self.metrics["miou"], True
        if (t.checkpoint_every and it % t.checkpoint_every == 0) or it == self.length or out_of_time:
            self.checkpoint(self.metrics if evaluate_now else None, best=is_best)
        self.stopped = out_of_time

    def _time_for_budget(self) -> None:
        """Time the steps after the first few, then fit the run's length to train.max_minutes."""
        if not self.fit_pending:
            return
        timed = self.it - self.start_iter - UNTIMED_STEPS
        if timed == 0:
            self.step_ends = [time.perf_counter()]
        elif timed > 0:
            self.step_ends.append(time.perf_counter())
        if timed == TIMED_STEPS:
            self.fit_pending = False
            step_s = statistics.median(b - a for a, b in itertools.pairwise(self.step_ends))
            fit = _fit_budget(
                self.exp, self.it, self.elapsed(), step_s, self.model, self.val_set, self.device, self.info
            )
            self.budget_fit = self.exp.resolved["budget_fit"] = fit
            if fit["iterations"] < self.length:
                self.length = fit["iterations"]
                self.schedule = fitted_schedule(self.exp.schedule, self.t.iterations, self.length)
                self.bar.total = self.length
                self.bar.refresh()
            if self.info.is_main:
                _write_config(self.run_dir, self.exp)
                _log(self.log_path, {"iter": self.it, "budget_fit": fit})

    def _out_of_time(self) -> bool:
        """Past train.max_minutes (the fitted length's safety net); every rank stops at the same step."""
        if self.t.max_minutes is None:
            return False
        out = self.elapsed() > 60 * self.t.max_minutes
        if self.info.enabled:  # each rank measures its own clock: agree, or one would wait forever
            flag = torch.tensor([float(out)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out = bool(flag.item())
        return out

    def evaluate(self) -> dict[str, Any]:
        metrics = evaluate(
            self.model, self.val_set, self.exp.eval, device=self.device, dist_info=self.info, progress=False
        )
        if self.info.is_main:
            _log(self.log_path, {"iter": self.it, "split": "val", "time": self.elapsed(), **_scalars(metrics)})
        self.model.train()
        return metrics

    def checkpoint(self, metrics: dict[str, Any] | None, *, best: bool) -> None:
        if self.info.is_main:
            state = training_state(
                model=self.model,
                optimizer=self.optimizer,
                scaler=self.scaler,
                experiment=self.exp,
                dataset=self.train_set,
                commit=self.commit,
                best_miou=self.best,
                train_seconds=self.elapsed(),
                metrics=metrics,
                budget_fit=self.budget_fit,
            )
            self.last_ckpt = self.ckpts.save(state, self.it, best=best)
        if self.info.enabled:
            dist.barrier()

    # -- finish -----------------------------------------------------------------------------
    def finish(self) -> TrainResult:
        self.bar.close()
        seconds = self.elapsed()
        if self.info.is_main:
            summary = {
                "iterations": self.it,
                "train_seconds": seconds,
                "best_miou": self.best,
                **_scalars(self.metrics),
            }
            per_class = _per_class(self.metrics, self.val_set)
            save_atomic_json(self.run_dir / "metrics.json", {**summary, "per_class": per_class})
            from .plots import plot_training_curves

            plot_training_curves(self.log_path, self.run_dir / "curves.png")
        return TrainResult(
            self.run_dir, self.it, self.metrics, self.best, seconds, self.last_ckpt, self.stopped, self.exp.resolved
        )


def _fit_budget(
    exp: Experiment, it: int, elapsed: float, step_s: float, model: nn.Module, val_set, device, info: DistInfo
) -> dict[str, Any]:
    """How many iterations fit ``train.max_minutes``, from the timed steps and a timed evaluation;
    every rank ends up with the same number (the smallest)."""
    t = exp.train
    eval_s = _seconds_per_evaluation(model, val_set, exp, device, info)
    elapsed += eval_s * 1.5  # the timing pass just run (three images, one of them warm-up)
    iterations = fit_iterations(
        budget_s=60 * t.max_minutes,
        elapsed_s=elapsed,
        at_iteration=it,
        requested=t.iterations,
        step_s=step_s,
        eval_s=eval_s,
        eval_every=t.eval_every,
    )
    if info.enabled:
        agreed = torch.tensor([iterations], dtype=torch.int64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        iterations = int(agreed.item())
    return {
        "iterations": iterations,
        "requested": t.iterations,
        "at_iteration": it,
        "step_seconds": round(step_s, 4),
        "eval_seconds": round(eval_s, 3),
        "budget_minutes": t.max_minutes,
    }


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def _per_class(metrics: dict[str, Any], dataset) -> dict[str, dict[str, float]]:
    names = list(getattr(dataset, "class_names", []))
    iou, dice = metrics.get("iou", []), metrics.get("dice", [])
    return {n: {"iou": iou[i], "dice": dice[i]} for i, n in enumerate(names) if i < len(iou) and i < len(dice)}


def save_atomic_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, default=float)
    write_atomic(path, lambda f: f.write(text.encode()), what="results file")
