"""Learning-rate schedules over iterations, and fitting a run's length to a time budget.

The papers' schedules are laid over a fixed number of iterations (DeepLab v2's poly over
20k, v1's steps every 2k). A CPU run with ``train.max_minutes`` may not get that far; stopped
early, the poly lr would still be high and the net would not have annealed. So the trainer
times its first steps, fits the number of iterations that fits the budget
(:func:`fit_iterations`) and lays the schedule over that number (:func:`fitted_schedule`).
"""

from __future__ import annotations

import dataclasses
import math

from .config import ScheduleConfig

__all__ = ["lr_factor", "fit_iterations", "fitted_schedule", "evaluations_between"]


def lr_factor(it: int, total: int, s: ScheduleConfig) -> float:
    """Multiplier of the base lr at iteration ``it`` (0-based) of ``total``."""
    if s.policy == "poly":  # DeepLab v2: (1 - iter/max_iter)^power
        factor = (1 - it / total) ** s.power
    elif s.policy == "step":  # DeepLab v1: x gamma every step_size iterations
        factor = s.gamma ** (it // s.step_size)
    elif s.policy == "cosine":
        factor = s.min_lr_factor + (1 - s.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * it / total))
    else:
        factor = 1.0
    if it < s.warmup_iters:  # linear warm-up from warmup_factor to 1
        factor *= s.warmup_factor + (1 - s.warmup_factor) * it / s.warmup_iters
    return factor


def fitted_schedule(s: ScheduleConfig, requested: int, fitted: int) -> ScheduleConfig:
    """The schedule of ``requested`` iterations compressed onto ``fitted``: warm-up and lr steps
    keep their place as a fraction of the run (poly and cosine follow from the total itself)."""
    if fitted >= requested:
        return s
    ratio = fitted / requested
    return dataclasses.replace(
        s,
        warmup_iters=round(s.warmup_iters * ratio),
        step_size=max(1, round(s.step_size * ratio)),
    )


def evaluations_between(start: int, end: int, eval_every: int) -> int:
    """Evaluations the trainer runs in iterations ``(start, end]``: every ``eval_every``-th and the last."""
    periodic = (end - 1) // eval_every - start // eval_every if eval_every and end > start else 0
    return max(periodic, 0) + 1


def fit_iterations(
    *,
    budget_s: float,
    elapsed_s: float,
    at_iteration: int,
    requested: int,
    step_s: float,
    eval_s: float,
    eval_every: int,
    margin: float = 0.06,
) -> int:
    """The largest run length ``n <= requested`` whose remaining steps and evaluations end within
    ``budget_s`` (less a ``margin`` for checkpoints and noise), at least one more iteration."""

    def ends_in_time(n: int) -> bool:
        more = (n - at_iteration) * step_s + evaluations_between(at_iteration, n, eval_every) * eval_s
        return elapsed_s + more <= budget_s * (1 - margin)

    lo, hi = at_iteration + 1, requested
    if ends_in_time(hi):
        return requested
    while lo < hi:  # the cost grows with n: binary search for the last n that fits
        mid = (lo + hi + 1) // 2
        if ends_in_time(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
