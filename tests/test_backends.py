"""Inference backends: each computes what eager computes, the choice is measured and cached, and
a backend that disagrees with eager is never used."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import densepred
from densepred import backends
from densepred.backends import Accelerated, accelerate, choose_backend, prepare_backend
from densepred.config import EvalConfig
from densepred.inference import predict_logits


def small(name: str) -> torch.nn.Module:
    options = {"unet": {"base_channels": 4}, "unet_padded": {"base_channels": 4}}.get(name, {})
    model = densepred.create_model(name, num_classes=3, in_channels=3, **options).eval()
    torch.manual_seed(0)
    return model


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEPRED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DENSEPRED_BACKEND", "auto")


@pytest.mark.parametrize("backend", ["channels_last", "torchscript", "onnxruntime"])
@pytest.mark.parametrize("name", ["deeplab_v1_largefov", "unet_padded"])
def test_each_backend_computes_eagers_logits_at_a_size_it_was_not_prepared_at(name, backend):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    model = small(name)
    run = prepare_backend(model, backend, torch.randn(1, 3, 64, 64))
    x = torch.randn(1, 3, 80, 96)
    with torch.inference_mode():
        ours, eager = run(x), model(x)
    # Same math, other kernels (folded batch norm, other summation orders): float32 rounding only.
    torch.testing.assert_close(ours, eager, rtol=1e-3, atol=1e-3 * eager.abs().max().item())
    assert agreement(ours, eager) >= backends.AGREEMENT


def test_the_valid_unet_keeps_its_input_rule_and_overlap_tile_on_another_backend():
    model = small("unet")
    fast, choice = accelerate(model, "torchscript", backends.probe_input(model, 3))
    assert isinstance(fast, Accelerated) and choice.backend == "torchscript"
    assert fast.input_rule() == model.input_rule()
    x = torch.randn(1, 3, 150, 130)
    with torch.inference_mode():
        ours = predict_logits(fast, x, EvalConfig(amp="none"))  # whole: overlap-tile for the valid net
        eager = predict_logits(model, x, EvalConfig(amp="none"))
    assert ours.shape == eager.shape == (1, 3, 150, 130) and agreement(ours, eager) >= backends.AGREEMENT


def test_auto_measures_the_candidates_caches_the_choice_and_reuses_it(tmp_path):
    model = small("unet_padded")
    example = torch.randn(1, 3, 64, 64)
    run, choice = choose_backend(model, example, ("eager", "channels_last", "torchscript"))
    assert set(choice.seconds) == {"eager", "channels_last", "torchscript"} and not choice.cached
    assert choice.backend == min(choice.seconds, key=choice.seconds.get)
    assert (tmp_path / "cache" / "backends.json").is_file()
    _, again = choose_backend(model, example, ("eager", "channels_last", "torchscript"))
    assert again.cached and again.backend == choice.backend and not again.seconds
    assert f"backend {choice.backend} (measured" in choice.describe()


def test_a_backend_that_computes_something_else_is_rejected(monkeypatch):
    model = small("unet_padded")
    real = backends.prepare_backend

    def broken(model, backend, example):
        run = real(model, "eager", example)
        return (lambda x: -run(x)) if backend == "torchscript" else real(model, backend, example)

    monkeypatch.setattr(backends, "prepare_backend", broken)
    _, choice = choose_backend(model, torch.randn(1, 3, 64, 64), ("eager", "torchscript"), use_cache=False)
    assert choice.backend == "eager" and "argmax agrees with eager on" in choice.rejected["torchscript"]
    with pytest.raises(ValueError, match="--backend torchscript does not compute what eager does"):
        accelerate(model, "torchscript", torch.randn(1, 3, 64, 64))


def test_a_backend_that_cannot_run_is_skipped_with_its_reason(monkeypatch):
    model = small("unet_padded")
    real = backends.prepare_backend

    def missing(model, backend, example):
        if backend == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real(model, backend, example)

    monkeypatch.setattr(backends, "prepare_backend", missing)
    _, choice = choose_backend(model, torch.randn(1, 3, 64, 64), ("eager", "onnxruntime"), use_cache=False)
    assert choice.backend == "eager" and "ImportError" in choice.rejected["onnxruntime"]


def test_the_environment_pins_auto_and_eager_is_the_model_itself(monkeypatch):
    model = small("unet_padded")
    monkeypatch.setenv("DENSEPRED_BACKEND", "eager")
    same, choice = accelerate(model, "auto", torch.randn(1, 3, 64, 64))
    assert same is model and choice.backend == "eager"


def test_predictor_labels_are_eagers_whichever_backend_runs(tmp_path):
    from densepred.checkpoint import Trained
    from densepred.config import Experiment
    from densepred.prediction import Predictor

    model = small("unet_padded")
    exp = Experiment()
    exp.model.name = "unet_padded"
    trained = Trained(model, exp, 3, ["a", "b", "c"], [(0, 0, 0)] * 3, 3, 255, "imagenet", 0)
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    eager = Predictor(trained, options=EvalConfig(backend="eager", amp="none"))
    for backend in ("auto", "torchscript", "channels_last"):
        p = Predictor(trained, options=EvalConfig(backend=backend, amp="none"))
        assert (p.labels(image) == eager.labels(image)).mean() >= backends.AGREEMENT, backend
    # Reduced precision is eager autocast's: auto keeps eager, a float32 runtime is refused.
    assert Predictor(trained, options=EvalConfig(backend="auto", amp="bf16")).backend.backend == "eager"
    with pytest.raises(ValueError, match="runs float32"):
        Predictor(trained, options=EvalConfig(backend="torchscript", amp="bf16"))
