"""The roofline benchmark's arithmetic: FLOPs counted from the layers, depthwise ones apart, and
the share of the machine's peaks a measured forward pass reaches."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import roofline  # noqa: E402
from benchmarks.roofline import Flops, layer_flops, recount, roof_share, table, taps_on_image, time_in_turn  # noqa: E402
from benchmarks.speed import _build  # noqa: E402


def test_depthwise_convolutions_are_counted_apart_from_the_dense_layers():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # dense: 8 outputs x 3*9 MACs per pixel
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: 8 outputs x 9 MACs
        nn.Conv2d(8, 8, 3, padding=1, groups=2),  # grouped, not depthwise: 8 outputs x 4*9 MACs
        nn.ConvTranspose2d(8, 4, 2, stride=2),  # each input element scatters 4*2*2
    )
    flops = layer_flops(net, (1, 3, 10, 10))
    pixels = 10 * 10
    assert flops.depthwise == 2 * pixels * 8 * 9
    assert flops.dense == 2 * pixels * (8 * 27 + 8 * 36 + 8 * 16)
    assert flops * 3 == Flops(3 * flops.dense, 3 * flops.depthwise, 3 * flops.on_image)
    assert flops.total == flops.dense + flops.depthwise


@pytest.mark.parametrize(("name", "side", "gflop"), [("deeplab_v2_resnet101", 513, 377.8), ("unet_padded", 572, 476.9)])
def test_the_counts_match_the_issues_hand_counts_of_the_paper_models(name, side, gflop):
    # DeepLab v2 378 GFLOPs at 513, the padded U-Net 477 at 572 (1 in / 2 out): no depthwise layer.
    flops = layer_flops(_build(name), (1, 1 if name.startswith("unet") else 3, side, side))
    assert flops.depthwise == 0 and flops.total / 1e9 == pytest.approx(gflop, abs=0.05)


def test_mobilenet_v3s_depthwise_layers_are_found():
    flops = layer_flops(_build("lraspp_mobilenet_v3_large"), (1, 3, 256, 256))
    assert 0 < flops.depthwise < flops.dense


PEAKS = {"gemm_gflops": 150.0, "conv3x3_gflops": 100.0, "depthwise3x3_gflops": 10.0}


def test_the_roof_holds_depthwise_flops_to_the_depthwise_peak():
    # 2 dense GFLOPs at 100 GFLOP/s and 1 depthwise at 10: 0.12 s allowed, 0.2 s taken.
    assert roof_share({"gflop": 3.0, "gflop_depthwise": 1.0, "seconds": 0.2}, PEAKS) == pytest.approx(0.6)
    # Without depthwise layers (or results that predate their count) the roof is the conv peak.
    assert roof_share({"gflop": 3.0, "seconds": 0.2}, PEAKS) == pytest.approx(3.0 / 0.2 / 100)


def _results(peaks: dict) -> dict:
    row = {"size": 256, "gflop": 3.0, "gflop_depthwise": 1.0}
    machine = {"cpu": "CPU X", "capability": "AVX2", "native_bf16": False, "threads": 2, "torch": "2.13.0"}
    return {
        "machine": machine,
        "peaks": peaks,
        "models": {
            "mobile": {
                "eager 256": {**row, "seconds": 0.4, "gflops": 7.5},
                "default (openvino) 256": {**row, "seconds": 0.2, "gflops": 15.0},
            },
            "dense": {
                "eager 256": {"size": 256, "gflop": 9.0, "gflop_depthwise": 0.0, "seconds": 0.1, "gflops": 90.0},
                "default (onnxruntime) 256": {
                    "size": 256,
                    "gflop": 9.0,
                    "gflop_depthwise": 0.0,
                    "seconds": 0.09,
                    "gflops": 100.0,
                },
            },
        },
    }


def test_the_table_shows_the_roof_beside_the_peak_and_names_the_depthwise_nets():
    text = table(_results(PEAKS))
    assert "depthwise 3x3 240ch@64^2 10 GFLOP/s" in text and "% of roof |" in text
    assert "| mobile | default (openvino) 256 | 3.0 | 0.200 | 15 | 15% | 60% |" in text
    assert "| dense | default (onnxruntime) 256 | 9.0 | 0.090 | 100 | 100% | 100% |" in text
    assert "on 1 of 2 model-size pairs" in text and "Below 85%: mobile 256 (15%)." in text
    # 2 dense GFLOPs at 100 and 1 depthwise at 10 take 0.12 s at best: 3 GFLOPs in 0.12 s is 25% of 100.
    assert "depthwise peak): mobile 256 60% (at the roof: 25% of the conv peak)." in text
    assert "dense 256 100%" not in text


def test_results_from_before_the_depthwise_peak_keep_their_one_column():
    old = {k: v for k, v in PEAKS.items() if k != "depthwise3x3_gflops"}
    text = table(_results(old))
    assert "% of roof" not in text and "| mobile | default (openvino) 256 | 3.0 | 0.200 | 15 | 15% |" in text
    assert "depthwise peak" not in text


def test_variants_take_turns_and_a_burst_costs_only_its_round(monkeypatch):
    # A fake clock: each call advances it by its cost. "a" is slowed by a burst in round one.
    now, log = [0.0], []
    monkeypatch.setattr(roofline, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def call(name: str, costs: list[float]):
        def run() -> None:
            log.append(name)
            now[0] += costs.pop(0) if len(costs) > 1 else costs[0]

        return run

    seconds = time_in_turn({"a": call("a", [10.0, 10.0, 1.0]), "b": call("b", [2.0])}, rounds=2, budget=8.0)
    assert seconds == {"a": 1.0, "b": 2.0}  # a's best round, not its burst
    # warm-ups, then round one (one call each: each passed budget / rounds / 2), then round two
    assert log == ["a", "b", "a", "b", "a", "a", "b"]


def test_rows_timed_beside_the_reference_conv_show_their_share_of_it():
    results = _results(PEAKS)
    for rows in results["models"].values():
        for r in rows.values():
            r["peak_beside_gflops"] = 80.0  # a slow spell: the reference ran at 80 beside these rows
    text = table(results)
    assert "| % of the peak beside |" in text
    assert "| dense | default (onnxruntime) 256 | 9.0 | 0.090 | 100 | 100% | 100% | 125% (80) |" in text
    assert "on 1 of 2 model-size pairs" in text  # the run's best peak stays the headline
    assert "timed beside each row: >= 85% on 1 of 2; below: mobile 256 (19%)." in text


def test_flop_counting_runs_on_the_meta_device_and_leaves_the_model_alone():
    model = _build("unet_padded")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer_flops(model, (1, 1, 64, 64))
    assert all(v.device.type == "cpu" and torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_zero_initialised_score_layers_get_weights_so_the_parity_rule_means_something():
    model = _build("fcn32s")
    kept = {k: v.clone() for k, v in model.state_dict().items() if v.any()}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert model(x).std() == 0  # zero scores: every backend's labels would agree with eager's
        roofline.untrivial(model)
        assert model(x).std() > 0
    assert not model.score_fr.weight.eq(0).all()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in kept.items())  # nothing that was set moves


def test_taps_that_read_only_padding_are_not_counted_on_the_image():
    # Along one axis: 3x3 "same" at 16 loses its two border taps; rate 12 keeps 4 + 16 + 4;
    # rate 24 only the centre; no padding keeps all; stride 2 with padding 1 on 9 -> 5: 4 + 5 + 4.
    assert [taps_on_image(16, 16, 3, 1, 1, 1), taps_on_image(16, 16, 3, 1, 12, 12)] == [46, 24]
    assert [taps_on_image(16, 16, 3, 1, 24, 24), taps_on_image(10, 8, 3, 1, 0, 1)] == [16, 24]
    assert taps_on_image(9, 5, 3, 2, 1, 1) == 13
    atrous = nn.Conv2d(4, 6, 3, padding=24, dilation=24)  # ASPP's rate 24 on a 16x16 map: its centre alone
    flops = layer_flops(atrous, (2, 4, 16, 16))
    assert flops.total == 9 * flops.on_image == 2 * 2 * 16 * 16 * 6 * 4 * 9
    valid = layer_flops(nn.Conv2d(4, 6, 3), (1, 4, 12, 12))
    assert valid.on_image == valid.total


def test_the_table_counts_the_taps_on_the_image_and_recount_adds_them(monkeypatch):
    results = _results(PEAKS)
    assert "taps on the image" not in table(results)  # results from before the count keep their columns
    results["models"]["dense"]["default (onnxruntime) 256"]["gflop_on_image"] = 6.0  # 6 of 9 on the image
    text = table(results)
    assert "| % of conv peak, taps on the image |" in text
    assert "| dense | default (onnxruntime) 256 | 9.0 | 0.090 | 100 | 100% | 100% | 67% |" in text
    assert "taps that reach the image" in text and ">= 85% on 0 of 1; below: dense 256 (67%)." in text
    # --recount: the count follows from the model and the row's size, a training row's multiple included
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=8, dilation=8))
    monkeypatch.setattr(roofline, "_build", lambda name: net)
    monkeypatch.setattr(roofline, "_channels", lambda name: 3)
    forward = layer_flops(net, (1, 3, 8, 8))
    rows = {
        "eager 8": {"size": 8, "gflop": forward.total / 1e9},
        "train step 8": {"size": 8, "gflop": 3 * forward.total / 1e9},
    }
    recounted = recount({"models": {"net": rows}})["models"]["net"]
    assert recounted["eager 8"]["gflop_on_image"] == pytest.approx(forward.on_image / 1e9)
    assert recounted["train step 8"]["gflop_on_image"] == pytest.approx(3 * forward.on_image / 1e9)
    rows["odd"] = {"size": 8, "gflop": 1.5 * forward.total / 1e9}
    with pytest.raises(ValueError, match="no multiple"):
        recount({"models": {"net": rows}})
