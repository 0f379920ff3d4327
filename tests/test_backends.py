"""Inference backends: each computes what eager computes, the choice is measured and cached, and
a backend that disagrees with eager is never used."""

from __future__ import annotations

import functools
import json
import sys
import threading
import typing
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import densepred
from densepred import backends
from densepred.backends import BACKENDS, Accelerated, MissingRuntimeError, accelerate, choose_backend, prepare_backend
from densepred.config import EvalConfig
from densepred.inference import predict_logits
from densepred.precision import torch_threads
from slim import HEAVY, slim
from tiny import tiny_checkpoint

OTHERS = tuple(b for b in BACKENDS if b != "eager")  # each checked against eager


def small(name: str) -> torch.nn.Module:
    options = {"unet": {"base_channels": 4}, "unet_padded": {"base_channels": 4}}.get(name, {})
    model = densepred.create_model(name, num_classes=3, in_channels=3, **options).eval()
    torch.manual_seed(0)
    return model


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


def needs(backend: str) -> None:
    """Skip unless ``backend``'s runtime is installed (the dev extra installs every one)."""
    for package in backends.RUNTIMES.get(backend, ((), ""))[0]:
        pytest.importorskip(package)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEPRED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DENSEPRED_BACKEND", "auto")


@pytest.mark.parametrize("backend", OTHERS)
@pytest.mark.parametrize("name", ["deeplab_v1_largefov", "unet_padded"])
def test_each_backend_computes_eagers_logits_at_a_size_it_was_not_prepared_at(name, backend):
    needs(backend)
    model = small(name)
    run = prepare_backend(model, backend, torch.randn(1, 3, 64, 64))
    x = torch.randn(1, 3, 80, 96)
    with torch.inference_mode():
        ours, eager = run(x), model(x)
    # Same math, other kernels (folded batch norm, other summation orders): float32 rounding only.
    torch.testing.assert_close(ours, eager, rtol=1e-3, atol=1e-3 * eager.abs().max().item())
    assert agreement(ours, eager) >= backends.AGREEMENT


# Every registered model on every backend, at small sizes: the 134M-parameter VGG16 nets as their
# slim copies (the same graph), the U-Nets narrow, the rest at full width (their cost is the
# conversion, not the width). The default tier runs graphs the test above does not (FCN's crops
# of padded scores, MobileNetV3's hard-swish and squeeze-excite, the valid U-Net's crop-and-copy);
# the slow tier all of them.
DEFAULT_TIER = ("fcn8s", "lraspp_mobilenet_v3_large", "unet")
NARROW = {"unet": {"base_channels": 8}, "unet_padded": {"base_channels": 8}}
REGISTRY = [
    name if name in DEFAULT_TIER else pytest.param(name, marks=pytest.mark.slow) for name in densepred.list_models()
]


@functools.lru_cache(maxsize=1)  # the cases run model by model: one build per model
def registered(name: str) -> torch.nn.Module:
    model = densepred.create_model(name, num_classes=3, **NARROW.get(name, {}))
    return (slim(model) if name in HEAVY else model).eval()


@pytest.mark.parametrize("backend", OTHERS)
@pytest.mark.parametrize("name", REGISTRY)  # closest: the backends vary fastest, one model at a time
def test_every_backend_labels_every_registered_model_as_eager_does(name, backend):
    needs(backend)
    model = registered(name)
    side = model.input_rule().nearest(64)
    example = torch.randn(1, model.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    # The backends' own check: argmax equal to eager's on >= 99.99 % of the pixels at the
    # prepared size and another, else accelerate raises.
    fast, choice = accelerate(model, backend, example, amp="none")
    assert isinstance(fast, Accelerated) and choice.backend == backend


def test_openvino_computes_float32_on_torchs_threads_for_several_threads_at_once(tmp_path):
    """Float32 is not the plugin's default: on a CPU with native bfloat16 it picks bf16, whose
    labels differ from eager's on 0.3-1.2 % of the pixels (DeepLab-LargeFOV, 256 px, AVX512-BF16 EPYC)."""
    needs("openvino")
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    from densepred.export import export_onnx

    model = small("unet_padded")
    compiled = backends._openvino_compiled(export_onnx(model, tmp_path / "m.onnx", metadata={}))
    assert compiled.get_property(hints.inference_precision) == ov.Type.f32
    assert compiled.get_property(props.inference_num_threads) == torch.get_num_threads()
    run = backends._openvino(compiled)
    inputs = [torch.randn(1, 3, 48 + 16 * (i % 2), 64) for i in range(6)]
    with ThreadPoolExecutor(2) as pool:  # as the web app's inference pool calls it
        outputs = list(pool.map(run, inputs))
    with torch.inference_mode():
        for x, ours in zip(inputs, outputs, strict=True):
            assert agreement(ours, model(x)) >= backends.AGREEMENT


@pytest.mark.parametrize(
    ("backend", "package", "extra"),
    [
        ("onnxruntime", "onnxruntime", "export"),
        ("onnxruntime", "onnx", "export"),
        ("openvino", "openvino", "openvino"),
        ("openvino", "onnx", "openvino"),  # OpenVINO reads the ONNX export
    ],
)
def test_a_forced_backend_without_its_package_is_an_error_naming_it(monkeypatch, backend, package, extra):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` fails as if not installed
    message = f"--backend {backend} needs the {package} package: pip install 'densepred[{extra}]'"
    with pytest.raises(MissingRuntimeError) as error:
        accelerate(small("unet_padded"), backend, torch.randn(1, 3, 64, 64))
    assert str(error.value) == message and error.value.name == package


@pytest.mark.parametrize("backend", backends.CPU_ONLY)
def test_the_cpu_runtimes_refuse_a_model_on_another_device(backend):
    needs(backend)
    with pytest.raises(ValueError, match=f"--backend {backend} runs on the CPU here, but the model is on meta"):
        prepare_backend(few_ops(), backend, torch.empty(1, 3, 64, 64, device="meta"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("run"))


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_the_command_line_names_the_missing_package_and_exits_2(command, checkpoint, monkeypatch, tmp_path, capsys):
    from PIL import Image

    from densepred.cli import main

    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    source = ["--checkpoint", str(checkpoint), "--out", str(tmp_path)]
    argv = {
        "predict": ["predict", *source, str(image), "--backend", "openvino"],
        "eval": ["eval", *source, "eval.backend=openvino"],
    }[command]
    monkeypatch.setitem(sys.modules, "openvino", None)
    capsys.readouterr()
    assert main(argv) == 2
    fix = "--backend openvino needs the openvino package: pip install 'densepred[openvino]'"
    assert capsys.readouterr().err == f"densepred {command}: error: {fix}\n"


def test_the_backend_option_offers_every_backend():
    from densepred.cli import build_parser
    from densepred.cli.options import inference_options

    # The config is a lower layer than the backends: it spells the names, this keeps them equal.
    assert typing.get_args(typing.get_type_hints(EvalConfig)["backend"]) == ("auto", *BACKENDS)
    argv = ["predict", "--checkpoint", "c.pt", "in.png", "--out", "o", "--backend", "openvino"]
    assert inference_options(build_parser().parse_args(argv)).backend == "openvino"


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


def test_auto_measures_the_candidates_and_picks_the_fastest(tmp_path):
    model = small("unet_padded")
    run, choice = choose_backend(model, torch.randn(1, 3, 64, 64), ("eager", "channels_last", "torchscript"))
    # Each candidate timed in the rounds or screened out as clearly slower, none lost.
    assert set(choice.seconds) | set(choice.rejected) == {"eager", "channels_last", "torchscript"}
    assert not choice.cached and all("over 1.5x the fastest" in why for why in choice.rejected.values())
    assert choice.backend == min(choice.seconds, key=choice.seconds.get)
    assert f"backend {choice.backend} (measured" in choice.describe()
    assert (tmp_path / "cache" / "backends.json").is_file()  # $DENSEPRED_CACHE, as the weights


PROBED = ("eager", "channels_last", "torchscript")


def few_ops() -> torch.nn.Module:
    """A two-level 4-channel U-Net without batch norm: the probe's logic, not its kernels, is tested."""
    options = {"base_channels": 4, "depth": 2, "batch_norm": False}
    return densepred.create_model("unet_padded", num_classes=3, in_channels=3, **options).eval()


class Probe:
    """The probe with the test's backends and timings: every candidate runs eager (the real ones
    are checked above), measures ``seconds[backend]``; those in ``wrong`` compute other labels
    (negated logits), those in ``broken`` cannot be prepared."""

    def __init__(self, monkeypatch, seconds: dict[str, float]) -> None:
        self.seconds, self.wrong, self.broken, self.timed = seconds, set(), set(), []
        names = {}

        def prepare(model, backend, example):
            if backend in self.broken:
                raise RuntimeError(f"{backend} cannot run this model")
            eager = real(model, "eager", example)
            run = (lambda x: -eager(x)) if backend in self.wrong else eager
            names[id(run)] = backend
            return run

        def screen(run, x):
            self.timed.append(names[id(run)])
            return self.seconds[names[id(run)]]

        def rounds(runs, x, rounds=3):
            self.finalists = list(runs)
            return {name: self.rounds.get(name, self.seconds[name]) for name in runs}

        real = backends.prepare_backend
        self.rounds, self.finalists = {}, []  # the interleaved rounds' seconds, where they differ from the screen's
        monkeypatch.setattr(backends, "prepare_backend", prepare)
        monkeypatch.setattr(backends, "_seconds_once", screen)
        monkeypatch.setattr(backends, "_interleaved_seconds", rounds)


def test_auto_picks_the_fastest_candidate_that_agrees_with_eager(monkeypatch):
    model, example = few_ops(), torch.randn(1, 3, 64, 64)
    probe = Probe(monkeypatch, {"eager": 1.3, "channels_last": 1.0, "torchscript": 1.2})
    _, choice = choose_backend(model, example, PROBED, use_cache=False)
    assert choice.backend == "channels_last" and choice.seconds == probe.seconds and not choice.rejected
    # The fastest computes something else: never timed, never used; the next fastest wins.
    probe.wrong, probe.timed = {"channels_last"}, []
    _, choice = choose_backend(model, example, PROBED, use_cache=False)
    assert choice.backend == "torchscript" and probe.timed == ["eager", "torchscript"]
    assert "argmax agrees with eager on" in choice.rejected["channels_last"]
    with pytest.raises(ValueError, match="--backend channels_last does not compute what eager does"):
        accelerate(model, "channels_last", example)


def test_a_clearly_slower_candidate_is_dropped_and_the_rounds_decide_between_the_rest(monkeypatch):
    model, example = few_ops(), torch.randn(1, 3, 64, 64)
    probe = Probe(monkeypatch, {"eager": 1.0, "channels_last": 1.2, "torchscript": 1.6})
    probe.rounds = {"channels_last": 0.9}  # the first call was unlucky; the rounds show it faster
    _, choice = choose_backend(model, example, PROBED, use_cache=False)
    assert probe.finalists == ["eager", "channels_last"] and choice.backend == "channels_last"
    assert choice.seconds == {"eager": 1.0, "channels_last": 0.9}
    assert choice.rejected == {"torchscript": f"1600 ms, over {backends.SCREEN}x the fastest"}


def test_the_rounds_call_every_candidate_in_turn_and_keep_each_ones_best(monkeypatch):
    clock, calls = [0.0], []
    # "a" suffers a burst in rounds 1 and 3; its first call, untimed, follows whatever ran before.
    costs = {"a": iter([9.0, 5.0, 1.0, 5.0]), "b": iter([2.0, 3.0, 2.5])}

    def run(name):
        def call(x):
            calls.append(name)
            clock[0] += next(costs[name])

        return call

    monkeypatch.setattr(backends.time, "perf_counter", lambda: clock[0])
    best = backends._interleaved_seconds({"a": run("a"), "b": run("b")}, torch.zeros(1), rounds=3)
    assert calls == ["a"] + ["a", "b"] * 3 and best == {"a": 1.0, "b": 2.0}


def test_the_rounds_time_a_runtime_after_a_call_on_its_own_thread_pool(monkeypatch):
    """Right after another thread pool's call, that pool's spinning workers slow a runtime's:
    where the pool changes, an untimed call comes first. Torch's backends share one pool."""
    clock, calls = [0.0], []
    names = ("eager", "torchscript", "onnxruntime", "openvino")

    def run(name):
        def call(x):
            switched = not calls or (calls[-1] in backends.CPU_ONLY or name in backends.CPU_ONLY) and calls[-1] != name
            calls.append(name)
            clock[0] += 100.0 if switched else 1.0  # what a pool switch would cost a timed call

        return call

    monkeypatch.setattr(backends.time, "perf_counter", lambda: clock[0])
    best = backends._interleaved_seconds({n: run(n) for n in names}, torch.zeros(1), rounds=2)
    assert best == dict.fromkeys(names, 1.0)
    one_round = ["eager", "torchscript", "onnxruntime", "onnxruntime", "openvino", "openvino"]
    assert calls == ["eager", *one_round, "eager", *one_round]


def test_auto_skips_a_runtime_that_is_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    _, choice = choose_backend(few_ops(), torch.randn(1, 3, 64, 64), ("eager", "openvino"), use_cache=False)
    assert choice.backend == "eager" and "needs the openvino package" in choice.rejected["openvino"]


def test_auto_caches_its_choice_and_reuses_it_without_timing(monkeypatch, tmp_path):
    model, example = few_ops(), torch.randn(1, 3, 64, 64)
    probe = Probe(monkeypatch, {"eager": 3.0, "channels_last": 1.0, "torchscript": 2.0})
    choose_backend(model, example, PROBED)
    assert list(json.loads((tmp_path / "cache" / "backends.json").read_text()).values()) == ["channels_last"]
    probe.timed = []
    _, again = choose_backend(model, example, PROBED)
    assert again.cached and again.backend == "channels_last" and probe.timed == []
    assert again.describe() == "backend channels_last (cached choice)"
    # Another runtime installed (or upgraded) is another machine: measured again.
    monkeypatch.setattr(backends, "_runtime_versions", lambda: "openvino=9999.0")
    _, fresh = choose_backend(model, example, PROBED)
    assert not fresh.cached and probe.timed == list(PROBED)


def test_a_choice_cached_by_an_earlier_way_of_timing_is_measured_again(monkeypatch, tmp_path):
    model, example = few_ops(), torch.randn(1, 3, 64, 64)
    probe = Probe(monkeypatch, {"eager": 1.3, "channels_last": 1.0, "torchscript": 1.2})
    monkeypatch.setattr(backends, "PROBE_METHOD", backends.PROBE_METHOD - 1)
    choose_backend(model, example, PROBED)
    monkeypatch.setattr(backends, "PROBE_METHOD", backends.PROBE_METHOD + 1)
    probe.timed = []
    _, choice = choose_backend(model, example, PROBED)
    assert not choice.cached and probe.timed == list(PROBED)


def test_the_probe_runs_eagers_reference_once_and_a_cached_eager_choice_runs_nothing(monkeypatch, tmp_path):
    model, example = few_ops(), torch.randn(1, 3, 64, 64)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape[-2:])))
    Probe(monkeypatch, {"eager": 1.0, "channels_last": 3.0, "torchscript": 2.0})
    _, choice = choose_backend(model, example, PROBED)
    assert choice.backend == "eager"
    # Eager's logits at the two probe sizes once; each other candidate runs both probes to be checked.
    assert len(calls) == 2 + 2 * 2 and len(set(calls)) == 2
    calls.clear()
    _, again = choose_backend(model, example, PROBED)
    assert again.cached and again.backend == "eager" and calls == []


@pytest.mark.parametrize("failure", ["broken", "wrong"])
def test_a_cached_choice_that_stops_working_is_measured_again(failure, monkeypatch, tmp_path):
    model, example = few_ops(), torch.randn(1, 3, 64, 64)
    probe = Probe(monkeypatch, {"eager": 3.0, "channels_last": 1.0, "torchscript": 2.0})
    choose_backend(model, example, PROBED)
    getattr(probe, failure).add("channels_last")  # uninstalled or upgraded since, say
    _, choice = choose_backend(model, example, PROBED)
    assert not choice.cached and choice.backend == "torchscript" and "channels_last" in choice.rejected
    assert list(json.loads((tmp_path / "cache" / "backends.json").read_text()).values()) == ["torchscript"]


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


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_offers_bf16_to_the_probe_only_where_it_is_native(monkeypatch, native):
    """Inference stays float32 by default: bf16 is one more candidate, held to the parity rule."""
    from densepred import precision

    monkeypatch.setattr(precision, "native_bf16", lambda: native)
    offered = []

    def choose(model, example, candidates):
        offered.extend(candidates)
        return None, backends.BackendChoice("eager")

    monkeypatch.setattr(backends, "choose_backend", choose)
    accelerate(few_ops(), "auto", torch.randn(1, 3, 64, 64), amp="auto")
    assert set(offered) == set(BACKENDS) | ({backends.BF16} if native else set())
    # An explicit bf16 is eager autocast, as asked; no probe.
    offered.clear()
    model = few_ops()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without native bf16 an explicit bf16 warns: tested in test_precision
        same, choice = accelerate(model, "auto", torch.randn(1, 3, 64, 64), amp="bf16")
    assert same is model and choice.backend == "eager" and offered == []


def test_the_bf16_candidate_is_used_only_where_its_labels_agree(monkeypatch):
    model, example = few_ops(), torch.randn(1, 3, 64, 64)
    run = prepare_backend(model, backends.BF16, example)
    with torch.inference_mode():
        out = run(example)
    assert out.dtype == torch.float32 and out.shape == (1, 3, 64, 64)
    probe = Probe(monkeypatch, {"eager": 3.0, backends.BF16: 1.0})
    probe.wrong = {backends.BF16}  # say bf16 rounding moved labels: the faster candidate is refused
    _, choice = choose_backend(model, example, ("eager", backends.BF16), use_cache=False)
    assert choice.backend == "eager" and "argmax agrees with eager on" in choice.rejected[backends.BF16]


def test_an_accelerated_model_stays_in_eval_mode_when_a_caller_restores_training():
    model = densepred.create_model("unet_padded", num_classes=3, in_channels=3, base_channels=4).eval()
    wrapped = Accelerated(model, lambda x: backends._eager_output(model, x), "eager")
    wrapped.train()  # what evaluate() does on the way out for a model it found in training mode
    assert not wrapped.training and not any(m.training for m in model.modules())


@pytest.fixture
def two_torch_threads():
    with torch_threads(2):
        yield


@pytest.mark.usefixtures("two_torch_threads")
def test_beside_a_runtimes_own_threads_torch_runs_on_one_thread_and_gets_its_count_back(monkeypatch):
    """While ONNX Runtime or OpenVINO runs the forward, Predictor and evaluate run torch's own
    operations on the calling thread (its OpenMP workers would spin on the runtime's cores), the
    CRF on every thread; the count comes back after, an error included. Eager backends keep every thread."""
    from densepred import prediction
    from densepred.checkpoint import Trained
    from densepred.config import Experiment
    from densepred.evaluation import evaluate
    from densepred.prediction import Predictor

    model, seen = small("unet_padded"), []

    def run(x: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return backends._eager_output(model, x)

    exp = Experiment()
    exp.model.name = "unet_padded"
    trained = Trained(model, exp, 3, ["a", "b", "c"], [(0, 0, 0)] * 3, 3, 255, "imagenet", 0)
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    sample = {"image": torch.randn(3, 40, 48), "mask": torch.zeros(40, 48, dtype=torch.long)}
    dataset = type("Two", (list,), {"num_classes": 3, "ignore_index": 255})([sample, sample])

    def predictor(wrapped: Accelerated, **options) -> Predictor:
        chosen = (wrapped, backends.BackendChoice(wrapped.backend))
        monkeypatch.setattr(prediction, "accelerate", lambda *args: chosen)
        return Predictor(trained, options=EvalConfig(**options))

    cases = {"openvino": 1, "onnxruntime": 1, "onnxruntime int8": 1, "torchscript": 2, "channels_last": 2}
    for backend, threads in cases.items():
        wrapped = Accelerated(model, run, backend)
        assert wrapped.own_threads == (threads == 1)
        p = predictor(wrapped, mode="slide", tile=32, flip=True, batch_size=1)  # several forwards, resizes, sums
        seen.clear()
        assert p.labels(image).shape == image.shape[:2]
        assert set(seen) == {threads} and len(seen) > 2 and torch.get_num_threads() == 2, backend
        seen.clear()
        evaluate(wrapped, dataset, EvalConfig(streams=1), progress=False)  # one image at a time
        assert seen == [threads, threads] and torch.get_num_threads() == 2, backend

    crf_threads = []

    def crf(image, probs, params):  # noqa: ANN001, ANN202
        crf_threads.append(torch.get_num_threads())
        return probs

    monkeypatch.setattr(prediction, "dense_crf_any_channels", crf)
    seen.clear()
    labels, probs = predictor(Accelerated(model, run, "openvino"), crf="deeplab_v2")(image)
    assert seen == [1] and crf_threads == [2] and probs.shape == (3, *image.shape[:2])

    def failing(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the runtime failed")

    with pytest.raises(RuntimeError, match="the runtime failed"):
        predictor(Accelerated(model, failing, "openvino")).labels(image)
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("two_torch_threads")
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_runtime_runs_several_frames_at_once_each_as_the_model_labels_them(backend):
    """ONNX Runtime gives each stream a session of its own on its share of the threads (one
    session's runs would share its pool), OpenVINO a stream of one model compiled with two;
    called at once from a thread each, every stream labels as eager does."""
    needs(backend)
    model, example = small("unet_padded"), torch.randn(1, 3, 48, 64)
    wrapped, _ = accelerate(model, backend, example)
    streams = backends.stream_models(wrapped, example, 2, limit=5)
    assert len(streams) == 2 and all(isinstance(s, Accelerated) and s.backend == backend for s in streams)
    assert all(s._run is not wrapped._run for s in streams)
    assert (streams[0]._run is not streams[1]._run) == (backend == "onnxruntime")
    inputs = [torch.randn(1, 3, 48 + 16 * (i % 2), 64) for i in range(6)]

    def label(k: int) -> torch.Tensor:
        with torch_threads(1), torch.inference_mode():
            return streams[k % 2](inputs[k])

    with ThreadPoolExecutor(2) as pool:
        outputs = list(pool.map(label, range(len(inputs))))
    with torch.inference_mode():
        for x, ours in zip(inputs, outputs, strict=True):
            assert agreement(ours, model(x)) >= backends.AGREEMENT


def test_streams_are_never_more_than_the_frames_and_torchs_backends_share_the_module():
    model, example = few_ops(), torch.randn(1, 3, 32, 32)
    assert backends.stream_models(model, example, 4, limit=3) == [model] * 3
    assert backends.stream_models(model, example, 4, limit=1) == [model]
    assert backends.stream_models(model, example, 1, limit=9) == [model]
    # Measured only for a runtime with its own threads: torch's backends keep one unless asked.
    assert backends.stream_models(model, example, None, limit=9) == [model]
    with pytest.raises(ValueError, match="eval.streams must be >= 1"):
        backends.stream_models(model, example, 0, limit=9)


@pytest.mark.usefixtures("two_torch_threads")
def test_streams_time_every_run_at_once_each_on_its_share_of_the_threads():
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def run(x: torch.Tensor) -> torch.Tensor:
        with lock:
            seen.append((threading.get_ident(), torch.get_num_threads()))
        return x

    assert backends._seconds_per_frame([run, run], torch.zeros(1), calls=2) > 0
    assert len(seen) == 6  # a warm-up and two timed calls each
    assert len({ident for ident, _ in seen}) == 2 and {threads for _, threads in seen} == {1}
    seen.clear()
    backends._seconds_per_frame([run], torch.zeros(1), calls=2)
    assert seen == [(threading.get_ident(), 2)] * 2  # one stream: the caller, all threads


@pytest.mark.usefixtures("two_torch_threads")
def test_auto_streams_are_kept_only_where_they_segment_enough_more_and_the_count_is_cached(monkeypatch, tmp_path):
    model, example = few_ops(), torch.randn(1, 3, 32, 32)
    runtime = Accelerated(model, lambda x: backends._eager_output(model, x), "onnxruntime")
    monkeypatch.setattr(backends, "_streams_of", lambda m, x, n: [m] * n)
    cache = tmp_path / "cache" / "backends.json"
    for per_frame, kept in ({1: 1.0, 2: 0.7}, 2), ({1: 1.0, 2: 0.95}, 1):  # x1.43, then under STREAM_GAIN
        cache.unlink(missing_ok=True)
        timed = []

        def seconds(runs, x, per_frame=per_frame, timed=timed):
            timed.append(len(runs))
            return per_frame[len(runs)]

        monkeypatch.setattr(backends, "_seconds_per_frame", seconds)
        assert len(backends.stream_models(runtime, example, None, limit=8)) == kept
        assert sorted(timed) == [1, 1, 2, 2]  # two rounds, in turn
        assert [v for k, v in json.loads(cache.read_text()).items() if k.endswith("|onnxruntime|streams")] == [
            str(kept)
        ]
        monkeypatch.setattr(backends, "_seconds_per_frame", lambda *a: pytest.fail("timed again"))
        assert len(backends.stream_models(runtime, example, None, limit=8)) == kept
        assert len(backends.stream_models(runtime, example, None, limit=1)) == 1  # one frame: one stream


def test_a_stream_that_labels_otherwise_is_refused(monkeypatch):
    model, example = few_ops(), torch.randn(1, 3, 32, 32)
    runtime = Accelerated(model, lambda x: backends._eager_output(model, x), "onnxruntime")
    wrong = Accelerated(model, lambda x: -backends._eager_output(model, x), "onnxruntime")
    monkeypatch.setattr(backends, "_streams_of", lambda m, x, n: [m] * (n - 1) + [wrong])
    with pytest.raises(ValueError, match="2 streams agree with one on"):
        backends.stream_models(runtime, example, 2, limit=4)
