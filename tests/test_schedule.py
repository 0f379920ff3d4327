"""Schedules laid over a budget-fitted run: the fit itself, the lr reaching its end, resume keeping it."""

import json

import pytest
import torch
import yaml

import densepred.trainer as trainer
from densepred.checkpoint import load_checkpoint
from densepred.config import ScheduleConfig
from densepred.schedule import evaluations_between, fit_iterations, fitted_schedule, lr_factor
from tiny import tiny_experiment


def _brute_force_fit(budget, elapsed, at, requested, step, per_eval, every, margin=0.06):
    best = at + 1
    for n in range(at + 1, requested + 1):
        evals = sum(1 for k in range(at + 1, n) if every and k % every == 0) + 1
        if elapsed + (n - at) * step + evals * per_eval <= budget * (1 - margin):
            best = n
    return best


@pytest.mark.parametrize(
    ("budget", "elapsed", "at", "step", "per_eval", "every"),
    [(270, 3, 8, 0.55, 4.0, 400), (270, 3, 8, 0.2, 4.0, 400), (60, 10, 8, 0.5, 30, 20), (100, 99, 8, 1, 1, 0)],
)
def test_fit_is_the_longest_run_that_ends_within_the_budget(budget, elapsed, at, step, per_eval, every):
    kwargs = dict(budget_s=budget, elapsed_s=elapsed, at_iteration=at, step_s=step, eval_s=per_eval, eval_every=every)
    expected = _brute_force_fit(budget, elapsed, at, 1600, step, per_eval, every)
    assert fit_iterations(requested=1600, **kwargs) == expected


def test_evaluations_counted_as_the_trainer_runs_them():
    assert evaluations_between(0, 1600, 400) == 4  # 400, 800, 1200 and the last (1600)
    assert evaluations_between(8, 1000, 400) == 3  # 400, 800, 1000
    assert evaluations_between(8, 100, 0) == 1  # only the last


def test_fitted_schedule_keeps_warm_up_and_steps_in_proportion():
    s = ScheduleConfig(policy="step", step_size=2000, warmup_iters=50)
    fitted = fitted_schedule(s, requested=6000, fitted=1500)
    assert (fitted.step_size, fitted.warmup_iters) == (500, 12)
    assert fitted_schedule(s, 6000, 6000) is s


def _fixed_fit(monkeypatch, iterations: int) -> None:
    """Substitute the measured fit: the test decides how many iterations 'fit the budget'."""
    monkeypatch.setattr(trainer, "fit_iterations", lambda **kw: min(iterations, kw["requested"]))


BUDGET_RUN = [
    "train.iterations=200",
    "train.max_minutes=60",
    "schedule.policy=poly",
    "schedule.warmup_iters=10",
    "optim.lr=0.01",
    "data.options={num_images: 8, size: 32}",
]


def _lr_log(run_dir) -> dict[int, float]:
    records = [json.loads(s) for s in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["iter"]: r["lr"] for r in records if "lr" in r}


def test_a_budget_fitted_run_anneals_to_the_end_of_its_fitted_length(tmp_path, monkeypatch):
    _fixed_fit(monkeypatch, 40)
    result = trainer.train(tiny_experiment(*BUDGET_RUN), tmp_path, progress=False)
    assert result.iterations == 40 and not result.stopped_early
    lrs = _lr_log(tmp_path)
    schedule = fitted_schedule(ScheduleConfig(policy="poly", warmup_iters=10), 200, 40)
    # The last step runs at the schedule's final value for 40 iterations, not at 1/5 of the way through 200.
    assert lrs[40] == pytest.approx(0.01 * lr_factor(39, 40, schedule))
    assert lrs[40] < 0.01 * lr_factor(39, 200, ScheduleConfig(policy="poly")) / 10
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["resolved"]["budget_fit"]
    assert saved["iterations"] == 40 and saved["requested"] == 200
    assert saved["at_iteration"] == trainer.UNTIMED_STEPS + trainer.TIMED_STEPS
    assert load_checkpoint(result.checkpoint)["budget_fit"]["iterations"] == 40


def test_a_resumed_run_keeps_its_fitted_length_and_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch):
    args = [*BUDGET_RUN, "train.deterministic=true", "train.checkpoint_every=10", "train.keep_last=5"]
    _fixed_fit(monkeypatch, 40)
    trainer.train(tiny_experiment(*args), tmp_path / "clean", progress=False)

    real_lr_factor = trainer.lr_factor

    def crash_at_32(it, total, s):
        if it == 32:
            raise KeyboardInterrupt  # the process dies after the checkpoint of iteration 30 (fitted at 25)
        return real_lr_factor(it, total, s)

    monkeypatch.setattr(trainer, "lr_factor", crash_at_32)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(tiny_experiment(*args), tmp_path / "crashed", progress=False)
    monkeypatch.setattr(trainer, "lr_factor", real_lr_factor)
    _fixed_fit(monkeypatch, 99)  # a refit would now give another length: the resumed run must not refit
    result = trainer.train(tiny_experiment(*args), tmp_path / "crashed", resume=True, progress=False)
    assert result.iterations == 40
    clean = load_checkpoint(tmp_path / "clean" / "checkpoints" / "iter_0000040.pt")["model"]
    resumed = load_checkpoint(tmp_path / "crashed" / "checkpoints" / "iter_0000040.pt")["model"]
    for key in clean:
        assert torch.equal(clean[key], resumed[key]), key


def test_a_run_that_fits_its_budget_keeps_its_length(tmp_path, monkeypatch):
    _fixed_fit(monkeypatch, 1000)
    result = trainer.train(tiny_experiment(*BUDGET_RUN, "train.iterations=60"), tmp_path, progress=False)
    assert result.iterations == 60
