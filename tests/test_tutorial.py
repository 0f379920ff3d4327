"""The tutorial (docs/tutorial.md) run at its tiny size, and the facts its text states.

One tiny run (about ten seconds on one core) feeds every check: the lecture's 2,560 = 2,560,
the classifier and its fully convolutional twin agreeing to float32 rounding, the fixed
deconvolution equal to bilinear interpolation, stride 8 finer than stride 32 on boundaries,
the receptive fields, U-Net's tile sizes and overlap-tile, and both editions written with
the measured numbers. The trained nets' numbers are not asserted: a few steps of training
round differently on another CPU or thread count; what is asserted follows from the maths.
"""

import re

import numpy as np
import pytest
import torch

import densepred
from densepred import tutorial as T
from densepred.cli import build_parser
from densepred.models.unet import unet_output_size


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tutorial")
    result = T.run_tutorial(out, size=T.TINY, progress=None)
    return out, result, {s.number: s.facts for s in result.steps}


def test_the_lecture_example_has_2560_weights_both_ways(run):
    f = run[2][2]
    assert f["fc_weights"] == f["conv_weights"] == 4 * 4 * 16 * 10 == 2560
    assert f["fc_params"] == f["conv_params"] == 2570
    assert f["fc_shape"] == "10 x 256" and f["conv_shape"] == "10 x 16 x 4 x 4"
    assert f["total_params"] == f["twin_params"]


def test_classifier_and_its_twin_agree_to_float32_rounding(run):
    f = run[2][2]
    assert f["bound_ratio"] <= 1.0  # every output within twice gamma_n * sum |w x| of the other
    assert f["stride"] == 8 and f["centre"] == 15.5  # the 32x32 window's centre


def test_the_twin_is_the_classifier_on_every_window():
    """Independently of the run: a fresh classifier, its twin at the training size."""
    torch.manual_seed(0)
    classifier = T.small_classifier(10).eval()
    twin = densepred.convolutionalize(classifier, (32, 32)).eval()
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        features = classifier[0](x).flatten(1)
        diff = (classifier(x) - twin(x)[:, :, 0, 0]).abs().double()
    bound = T.dot_rounding_bound(classifier[-1].weight.detach(), classifier[-1].bias.detach(), features)
    assert (diff <= bound).all()
    with torch.no_grad():
        assert twin(torch.randn(1, 3, 64, 96)).shape == (1, 10, 5, 9)  # a grid of windows, stride 8


def test_the_fixed_deconvolution_is_bilinear_interpolation_on_the_interior(run):
    f = run[2][3]
    assert f["interior_diff"] <= f["tolerance"]
    assert f["border_diff"] > 0.1  # at the border they differ, as the text says
    assert f["taps"] == ", ".join(f"{2 * k + 1}/16" for k in range(8))
    assert f["out_size"] == (run[1].steps[0].facts["height"] // 8 + 1) * 8


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_bilinear_deconv_equals_interpolate_for_any_factor(factor):
    x = torch.rand(1, 3, 7, 5)
    up = densepred.BilinearDeconv(3, factor, learnable=False)(x)
    half = factor // 2
    fine = up[..., half : half + 7 * factor, half : half + 5 * factor]
    ref = torch.nn.functional.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    inner = (slice(half, factor * 7 - half), slice(half, factor * 5 - half))
    assert (fine - ref)[..., inner[0], inner[1]].abs().max() <= 16 * T.U32 * float(x.max())


def test_stride_8_is_finer_than_stride_32_on_boundaries(run):
    """FCN-8s' output stride places boundaries better than FCN-32s': with exact class
    frequencies per cell, upsampled by the fixed bilinear layer, on the same scenes."""
    f = run[2][4]
    assert f["ideal8_boundary"] > f["ideal16_boundary"] > f["ideal32_boundary"]
    assert f["ideal8_boundary"] - f["ideal32_boundary"] > 0.1


def test_stride_8_is_exact_on_a_stripe_where_stride_32_fails():
    """A 16 px stripe on the 8 px grid: exact stride-8 scores are 0 or 1 per cell, and the
    bilinear layer puts their 0.5 crossing on the cell border, the stripe's side. At stride 32
    each cell holds a quarter of stripe (no ties): the stripe vanishes."""
    mask = torch.zeros(1, 64, 64, dtype=torch.long)
    mask[0, :, 24:40] = 1
    acc = {s: T.boundary_accuracy(T.ideal_upsampled_labels(mask, 2, s), mask, 2) for s in (32, 8)}
    assert acc[8] == 1.0 and acc[32] == 0.5


def test_every_fcn_was_trained_and_scored(run):
    f = run[2][4]
    for name in ("fcn32s", "fcn16s", "fcn8s"):
        assert 0 <= f[f"{name}_miou"] <= 1 and 0 <= f[f"{name}_boundary_acc"] <= 1
        assert f[f"{name}_full_params"] > 100 * f[f"{name}_params"]


def test_strides_are_measured_shallow_to_deep(run):
    rows = run[2][5]["rows"]
    assert [r[4] for r in rows] == [1, 2, 4, 8, 16, 32]


def test_receptive_fields_are_measured_and_declared(run):
    f = run[2][6]
    assert f["largefov_rf"] == f["largefov_declared"] == 435
    assert f["fc7x7_rf"] == f["fc7x7_declared"] == 419
    assert f["largefov_fc6_span"] == f["fc7x7_fc6_span"] == 25
    assert f["largefov_params"] == 20_505_429 and f["fc7x7_params"] == 134_346_581


def test_unet_tile_sizes_and_overlap_tile(run):
    f = run[2][8]
    assert unet_output_size(572) == 388 and f["shrink"] == 184 and f["margin"] == 92
    assert f["out_tile"] == f["tile"] - 184
    assert f["trace"][-1] == ("final", f["out_tile"])
    assert f["max_diff"] <= f["ulp"]
    assert f["max_weight"] > f["cell_weight"]


def test_both_editions_are_written_with_the_measured_numbers(run):
    out, result, f = run
    en = (out / "tutorial.md").read_text(encoding="utf-8")
    ko = (out / "tutorial.ko.md").read_text(encoding="utf-8")
    for text in (en, ko):
        assert "**2,560**" in text and f"{f[6]['largefov_rf']}px" in text.replace(" px", "px")
        assert not re.search(r"\{[a-z0-9_]+(\[[a-z0-9_]+\])?(:[^}]*)?\}", text)  # no template field left
        for name in ("01_pixels", "04_skips", "08_unet"):
            assert f"(tutorial/{name}.png)" in text
    assert "의미론적 분할(semantic segmentation)" in ko and "전치 합성곱(transposed convolution)" in ko
    assert "수용 영역(receptive field)" in ko and "조건부 무작위장" in ko
    pngs = sorted((out / "tutorial").glob("*.png"))
    assert len(pngs) == 8 and all(p.stat().st_size < 400_000 for p in pngs)
    assert {p.name for p in result.files} >= {"tutorial.md", "tutorial.ko.md", "01_pixels.png"}


def test_boundary_band():
    mask = np.zeros((9, 9), dtype=np.int64)
    mask[:, 5:] = 1
    band = T.boundary_band(mask, 1)
    assert band[:, 3:7].all() and not band[:, :3].any() and not band[:, 7:].any()


def test_render_text_refuses_an_unknown_edition(run):
    with pytest.raises(ValueError, match="editions: en, ko"):
        T.render_text(run[1].steps, "fr", seconds=1.0, machine="x")


def test_the_command_is_registered():
    args = build_parser().parse_args(["tutorial", "--out", "somewhere", "--tiny"])
    assert args.out == "somewhere" and args.tiny and callable(args.func)
