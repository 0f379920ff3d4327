"""Precision by what the machine does fast: the bf16 lookup, amp=auto's choice, the warning, the record."""

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
import yaml

from densepred import precision
from densepred.cli.train import run_summary
from densepred.precision import machine_info, native_bf16, resolve_amp, resolve_inference_amp
from densepred.trainer import train
from tiny import tiny_experiment


@pytest.fixture
def fresh_lookup():
    native_bf16.cache_clear()
    precision._warned.clear()
    yield
    native_bf16.cache_clear()
    precision._warned.clear()


def _cpu(monkeypatch, flags, capability="AVX512", onednn_bf16=True, machine="x86_64"):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16, raising=False)
    monkeypatch.setattr(precision.platform, "machine", lambda: machine)


@pytest.mark.parametrize(
    ("flags", "capability", "onednn", "expected"),
    [
        ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", True, True),  # e.g. AMD Zen 4, Intel Cooper Lake
        ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, "AVX512", True, True),  # Sapphire Rapids
        ({"avx2", "avx512f"}, "AVX512", True, False),  # Skylake-X: AVX-512 without bf16 dot products
        ({"avx2", "fma"}, "AVX2", False, False),  # Zen 2/3: AVX2 only
        ({"avx2", "avx512f", "avx512_bf16"}, "AVX2", True, False),  # ATEN_CPU_CAPABILITY=avx2
        ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", False, False),  # ONEDNN_MAX_CPU_ISA=AVX2
    ],
)
def test_native_bf16_follows_the_cpu_and_what_the_libraries_may_use(
    monkeypatch, fresh_lookup, flags, capability, onednn, expected
):
    _cpu(monkeypatch, flags, capability, onednn)
    assert native_bf16() is expected


def test_native_bf16_on_arm_reads_the_bf16_feature(monkeypatch, fresh_lookup):
    _cpu(monkeypatch, {"fp", "asimd", "bf16"}, capability="DEFAULT", machine="aarch64")
    assert native_bf16() is True


def test_without_cpu_flags_a_measured_probe_decides(monkeypatch, fresh_lookup):
    _cpu(monkeypatch, None)
    monkeypatch.setattr(precision, "bf16_slowdown", lambda: 30.0)
    assert native_bf16() is False
    native_bf16.cache_clear()
    monkeypatch.setattr(precision, "bf16_slowdown", lambda: 0.6)
    assert native_bf16() is True


@pytest.mark.parametrize("native", [True, False])
def test_auto_picks_bf16_only_where_it_is_native(monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda: native)
    assert resolve_amp("auto", "cpu") == ("bf16" if native else "none")
    assert resolve_amp("none", "cpu") == "none"


def test_auto_is_fp16_on_cuda():
    assert resolve_amp("auto", "cuda") == "fp16"  # a device object, no GPU needed to decide
    assert resolve_inference_amp("auto", "cuda") == "fp16"


@pytest.mark.parametrize("native", [True, False])
def test_inference_auto_is_float32_on_a_cpu_and_explicit_choices_are_kept(monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda: native)
    assert resolve_inference_amp("auto", "cpu") == "none"
    assert resolve_inference_amp("none", "cpu") == "none"
    if native:
        assert resolve_inference_amp("bf16", "cpu") == "bf16"


def test_explicit_bf16_without_native_support_warns_once_with_the_measured_slowdown(monkeypatch, fresh_lookup):
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    monkeypatch.setattr(precision, "bf16_slowdown", lambda: 42.0)
    with pytest.warns(RuntimeWarning, match=r"amp=bf16 on a CPU without native bfloat16 .* measured 42x slower"):
        assert resolve_amp("bf16", "cpu") == "bf16"  # kept: the user asked for it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_amp("bf16", "cpu")  # once per process


def test_explicit_bf16_with_native_support_is_silent(monkeypatch, fresh_lookup):
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_amp("bf16", "cpu") == "bf16"


def test_the_probe_measures_a_ratio():
    ratio = precision.bf16_slowdown()
    assert ratio > 0 and ratio == precision.bf16_slowdown()  # measured once, cached


def test_machine_line_names_cpu_capability_threads_and_torch():
    info = machine_info()
    line = info.line()
    assert info.capability in line and f"{info.threads} threads" in line and info.torch in line
    assert ("native bf16" in line) and (info.cpu in line)


@pytest.mark.parametrize(
    ("vendor", "family", "model", "core"),
    [
        ("AuthenticAMD", "26", "2", "Zen 5"),  # both are "AMD EPYC" on a cloud VM, yet differ twofold in fp32
        ("AuthenticAMD", "25", "17", "Zen 4"),  # Genoa, 0x11
        ("AuthenticAMD", "25", "1", "Zen 3"),  # Milan
        ("AuthenticAMD", "23", "49", "Zen 2"),  # Rome, 0x31
        ("AuthenticAMD", "27", "0", "AMD family 27 model 0"),  # a family this table has not met
        ("GenuineIntel", "6", "143", None),  # Intel's model names already say which core
    ],
)
def test_the_machine_names_the_core_design_that_a_generic_model_name_hides(monkeypatch, vendor, family, model, core):
    fields = {"vendor_id": vendor, "cpu family": family, "model": model, "model name": "AMD EPYC"}
    monkeypatch.setattr(precision, "_cpuinfo", lambda: fields)
    info = machine_info()
    assert info.microarchitecture == core
    assert info.line().startswith(f"AMD EPYC ({core})," if core else "AMD EPYC,")
    # A training run's last line names it too.
    result = SimpleNamespace(resolved={"amp": "bf16", "machine": info.to_dict()}, iterations=3, train_seconds=1.0)
    assert f"on {info.line().split(',')[0]}, {info.capability}, " in run_summary(result)
    # Results stored before the field existed still name their CPU.
    assert precision.cpu_name({"cpu": "AMD EPYC", "capability": "AVX2"}) == "AMD EPYC"


@pytest.mark.parametrize("native", [True, False])
def test_a_run_records_the_precision_it_chose_and_the_cpu(tmp_path, monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda: native)
    train(tiny_experiment("train.amp=auto", "eval.amp=auto", "train.iterations=2"), tmp_path, progress=False)
    expected = "bf16" if native else "none"
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())["resolved"]
    # Inference stays float32 on a CPU: bf16 is only a candidate of the backend probe there.
    assert resolved["amp"] == expected and resolved["eval_amp"] == "none"
    assert resolved["machine"]["capability"] == torch.backends.cpu.get_cpu_capability()
    start = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start"
    assert start["amp"] == expected and start["machine"]["native_bf16"] is native
