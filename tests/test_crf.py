"""Contracts of the fully-connected CRF (Krähenbühl & Koltun 2011) in :mod:`densepred.crf`."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from densepred import crf
from densepred.crf import (
    EXACT_MAX_PIXELS,
    PRESETS,
    CRFParams,
    GridGaussian,
    RowSums,
    TruncatedGaussian,
    dense_crf,
    dense_crf_exact,
    dense_crf_torch,
)

# The paper's widths scaled to a 24x20 image (theta_alpha 67 px would make it global).
SMALL = replace(PRESETS["deeplab_v2"], theta_alpha=5.0, theta_beta=10.0, theta_gamma=1.0)


def _structured(h: int, w: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    labels = np.zeros((h, w), int)
    for k in range(1, c):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(h // 6, h // 2)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = k
    palette = rng.integers(0, 256, (c, 3))
    image = np.clip(palette[labels] + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    logits = 2.0 * np.eye(c)[labels].transpose(2, 0, 1) + rng.normal(0, 1.5, (c, h, w))
    probs = np.exp(logits) / np.exp(logits).sum(0)
    return image, probs.astype(np.float32)


def _random(h: int, w: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    logits = rng.normal(0, 2.0, (c, h, w))
    return image, (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32)


@pytest.mark.parametrize("kernel", ["auto", "lattice"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_agrees_with_exact_reference_on_structured_inputs(seed, kernel):
    image, probs = _structured(24, 20, 4, seed)
    fast = dense_crf(image, probs, SMALL, bilateral_kernel=kernel)
    exact = dense_crf_exact(image, probs, SMALL)
    assert (fast.argmax(0) == exact.argmax(0)).mean() >= 0.99
    assert np.abs(fast - exact).mean() < 0.01


def test_random_colours_agree_with_exact_reference_on_every_seed():
    """Random colours are the lattice's worst case (its piecewise-linear kernel differs from the
    Gaussian by ~14%, flipping near-tied labels: 97.3-99.8% agreement over seeds 0-31, as
    pydensecrf's 97.5-99.6%). Their features are sparse, so the default kernel sums them exactly
    (truncated at 4 widths): >= 99.79% on every seed 0-31 at 24x20 (the issue asks 99%)."""
    for seed in range(32):
        image, probs = _random(24, 20, 4, seed)
        fast, exact = dense_crf(image, probs, SMALL), dense_crf_exact(image, probs, SMALL)
        assert (fast.argmax(0) == exact.argmax(0)).mean() >= 0.995, seed
        assert np.abs(fast - exact).mean() < 0.001, seed


@pytest.mark.parametrize("preset", ["small", "deeplab_v2", "deeplab_v1_largefov"])
def test_random_colours_agree_with_exact_reference_at_full_size(preset):
    params = SMALL if preset == "small" else PRESETS[preset]
    image, probs = _random(64, 64, 4, 0)  # 4096 pixels, EXACT_MAX_PIXELS; the lattice: 96.4-98.7%
    fast, exact = dense_crf(image, probs, params), dense_crf_exact(image, probs, params)
    assert (fast.argmax(0) == exact.argmax(0)).mean() >= 0.999
    assert np.abs(fast - exact).mean() < 0.001


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lattice_stays_close_to_exact_reference_on_random_colours(seed):
    """The lattice alone (``bilateral_kernel="lattice"``) on its worst case: 97.3-99.8% over
    seeds 0-31, so the bound here is 97%."""
    image, probs = _random(24, 20, 4, seed)
    fast = dense_crf(image, probs, SMALL, bilateral_kernel="lattice")
    exact = dense_crf_exact(image, probs, SMALL)
    assert (fast.argmax(0) == exact.argmax(0)).mean() >= 0.97
    assert np.abs(fast - exact).mean() < 0.01


def test_truncated_kernel_is_the_exact_kernel_within_four_widths():
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.uniform(0, [3, 3, 20, 20, 20], (300, 5))).float()
    groups = torch.arange(2).repeat_interleave(150)  # two images: no pairs across them
    sparse = TruncatedGaussian.build(features, groups, budget=10**6)
    f = features.double()
    kernel = torch.exp(-0.5 * torch.cdist(f, f).square())
    kernel[torch.cdist(f, f) >= 4] = 0
    kernel[groups[:, None] != groups[None]] = 0
    norm = kernel.sum(1, keepdim=True).rsqrt()
    q = torch.rand(300, 3)
    expected = 2.0 * norm * (kernel @ (norm * q.double()))
    np.testing.assert_allclose(sparse.normalised(2.0)(q).numpy(), expected.numpy(), atol=1e-5)
    # over budget: dense features are left to the lattice
    assert TruncatedGaussian.build(features * 0.01, groups, budget=64) is None


def _pydensecrf(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    dcrf = pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf (pip install pydensecrf2) not installed")
    c, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, None)).reshape(c, -1)))
    crf.addPairwiseGaussian(sxy=params.theta_gamma, compat=params.w2)
    crf.addPairwiseBilateral(
        sxy=params.theta_alpha, srgb=params.theta_beta, rgbim=np.ascontiguousarray(image), compat=params.w1
    )
    return np.array(crf.inference(params.iterations)).reshape(c, h, w)


def test_random_colour_gap_is_pydensecrfs_too():
    """Our lattice is as close to the exact kernel as the reference implementation's."""
    ours, theirs = [], []
    for seed in range(8):
        image, probs = _random(24, 20, 4, seed)
        exact = dense_crf_exact(image, probs, SMALL).argmax(0)
        ours.append((dense_crf(image, probs, SMALL, bilateral_kernel="lattice").argmax(0) == exact).mean())
        theirs.append((_pydensecrf(image, probs, SMALL).argmax(0) == exact).mean())
    assert np.mean(ours) >= np.mean(theirs) - 0.002


def test_sparse_rows_match_dense_matrix():
    rng = np.random.default_rng(0)
    dense = (rng.random((7, 5)) < 0.4) * rng.normal(size=(7, 5))
    dense[3] = 0  # an empty row sums to zero
    rows, cols = np.nonzero(dense)
    offsets = np.searchsorted(rows, np.arange(7))
    matrix = RowSums(torch.from_numpy(cols), torch.from_numpy(offsets), torch.from_numpy(dense[rows, cols]).float())
    x = torch.randn(5, 3)
    np.testing.assert_allclose((matrix @ x).numpy(), dense @ x.numpy(), atol=1e-5)


def test_grid_gaussian_is_the_exact_smoothness_kernel():
    n, h, w, theta = 2, 9, 7, 1.3
    grid = GridGaussian(n, h, w, theta, torch.device("cpu"))
    ys, xs = np.mgrid[:h, :w]
    pos = np.stack([xs.ravel(), ys.ravel()], 1) / theta
    kernel = np.exp(-0.5 * ((pos[:, None] - pos[None]) ** 2).sum(-1))
    radius = np.ceil(4 * theta)  # each 1-D pass stops at 4 theta: a square support
    offset = np.abs(pos[:, None] - pos[None]) * theta
    kernel[(offset > radius + 1e-9).any(-1)] = 0
    values = torch.randn(n * h * w, 3)
    out = grid.filter(values).numpy().reshape(n, h * w, 3)
    for k in range(n):
        expected = kernel @ values.numpy().reshape(n, h * w, 3)[k]
        np.testing.assert_allclose(out[k], expected, atol=1e-3)
    # the normalised message folds D^-1/2 and the weight into the 1-D kernels
    d = kernel.sum(1)
    message = grid.normalised(2.0)(values).numpy().reshape(n, h * w, 3)
    expected = 2.0 * (kernel / np.sqrt(d[:, None] * d[None])) @ values.numpy().reshape(n, h * w, 3)[0]
    np.testing.assert_allclose(message[0], expected, atol=1e-4)


def test_smoothness_kernel_alone_is_the_exact_crf():
    """With the appearance kernel off, dense_crf's separable grid filter is the dense reference's
    Gaussian up to its truncation at 4 widths (weights below e^-8)."""
    image, probs = _structured(20, 24, 4, 7)
    for theta in (1.0, 3.0):
        params = replace(PRESETS["deeplab_v2"], w1=0.0, w2=3.0, theta_gamma=theta)
        np.testing.assert_allclose(dense_crf(image, probs, params), dense_crf_exact(image, probs, params), atol=2e-4)


def test_padded_rows_give_the_same_probabilities(monkeypatch):
    """On AVX2 CPUs the filters' rows are padded to a multiple of 8 columns (``_row_width``);
    the padding's q is 0, so the result is the unpadded one, on either bilateral kernel."""
    image, probs = _structured(18, 22, 5, 1)
    for kernel in ("auto", "lattice"):
        plain = dense_crf(image, probs, SMALL, bilateral_kernel=kernel)
        monkeypatch.setattr(crf, "_row_width", lambda classes, device: classes + 3)
        padded = dense_crf(image, probs, SMALL, bilateral_kernel=kernel)
        monkeypatch.undo()
        np.testing.assert_allclose(padded, plain, atol=1e-6)


def test_half_precision_vertices_change_no_label(monkeypatch):
    """The lattice's normalised messages carry float16 vertex values on CPU (half the bytes per
    splat, blur and slice); their rounding moves the probabilities by far less than the
    lattice's own kernel error and moves no label here. The normaliser stays float32."""
    image, probs = _structured(40, 48, 5, 2)
    image = np.clip(image.astype(int) * 3 - 200, 0, 255).astype(np.uint8)  # dense colours: the lattice runs
    features, _ = crf.crf_features(torch.from_numpy(image).permute(2, 0, 1)[None], SMALL)
    message = crf._Lattice(features, torch.zeros(features.shape[0], dtype=torch.int64)).normalised(4.0)
    assert {m.weights.dtype for m in message.args[0]} == {torch.float16}
    q = torch.rand(features.shape[0], 5)
    assert message(q).dtype == torch.float32
    half = dense_crf(image, probs, SMALL, bilateral_kernel="lattice")
    monkeypatch.setattr(crf, "VERTEX_DTYPE", torch.float32)
    single = dense_crf(image, probs, SMALL, bilateral_kernel="lattice")
    exact = crf._Lattice(features, torch.zeros(features.shape[0], dtype=torch.int64)).normalised(4.0)
    assert {m.weights.dtype for m in exact.args[0]} == {torch.float32}
    np.testing.assert_allclose(message(q).numpy(), exact(q).numpy(), rtol=5e-3, atol=1e-4)
    assert np.abs(half - single).max() < 5e-3
    assert (half.argmax(0) == single.argmax(0)).all()


def test_lattice_numbering_does_not_change_the_filter():
    """The lattice numbers its vertices by the pixels' order; permuting the pixels permutes the
    filtered values and nothing else (two images, so that groups stay apart)."""
    image, _ = _structured(16, 20, 4, 3)
    features, _ = crf.crf_features(torch.from_numpy(image).permute(2, 0, 1)[None].repeat(2, 1, 1, 1), SMALL)
    groups = torch.arange(2).repeat_interleave(16 * 20)
    values = torch.rand(features.shape[0], 3)
    perm = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(0))
    out = crf._Lattice(features, groups).filter(values)
    permuted = crf._Lattice(features[perm], groups[perm]).filter(values[perm])
    np.testing.assert_allclose(permuted.numpy(), out[perm].numpy(), rtol=1e-5, atol=1e-5)


def test_matches_finds_every_common_key():
    rng = np.random.default_rng(0)
    for size_a, size_b in ((0, 5), (7, 0), (50, 80), (1000, 300)):
        a = np.unique(rng.integers(0, 400, size_a))
        b = np.unique(rng.integers(0, 400, size_b))
        i, j = crf._matches(torch.from_numpy(a), torch.from_numpy(b))
        common, expected_i, expected_j = np.intersect1d(a, b, assume_unique=True, return_indices=True)
        np.testing.assert_array_equal(i.numpy(), expected_i)
        np.testing.assert_array_equal(j.numpy(), expected_j)


@pytest.mark.parametrize("logits", [False, True])
def test_outputs_are_normalised(logits):
    image, probs = _structured(30, 40, 5, 2)
    out = dense_crf(image, np.log(probs) if logits else probs, PRESETS["deeplab_v2"], logits=logits)
    assert out.shape == probs.shape and out.dtype == np.float32
    assert np.all(out >= 0)
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)


def test_uniform_image_with_confident_unaries_is_unchanged():
    labels = np.zeros((20, 30), int)
    labels[:, 15:] = 1
    labels[5:12, 3:9] = 2
    probs = np.where(np.eye(3)[labels].transpose(2, 0, 1) > 0, 0.98, 0.01).astype(np.float32)
    image = np.full((20, 30, 3), 128, np.uint8)
    out = dense_crf(image, probs, replace(PRESETS["deeplab_v2"], w1=1.0, w2=1.0))
    np.testing.assert_array_equal(out.argmax(0), labels)
    assert np.abs(out - probs).max() < 0.05


@pytest.mark.parametrize("kernel", ["auto", "lattice"])  # "auto" sums these sparse features exactly
def test_batched_torch_matches_single_images(kernel):
    pairs = [_structured(18, 22, 3, s) for s in (3, 4)]
    images = torch.stack([torch.from_numpy(i).permute(2, 0, 1) for i, _ in pairs])
    probs = torch.stack([torch.from_numpy(p) for _, p in pairs])
    batched = dense_crf_torch(images, probs, SMALL, bilateral_kernel=kernel)
    for k, (image, p) in enumerate(pairs):
        np.testing.assert_allclose(batched[k].numpy(), dense_crf(image, p, SMALL, bilateral_kernel=kernel), atol=1e-5)


def test_zero_iterations_returns_unary_softmax():
    image, probs = _structured(10, 12, 3, 5)
    out = dense_crf(image, probs, replace(SMALL, iterations=0))
    np.testing.assert_allclose(out, probs, atol=1e-5)


@pytest.mark.parametrize(
    "field, value",
    [("theta_alpha", -1.0), ("theta_beta", 0.0), ("theta_gamma", -3.0), ("w1", -1.0), ("iterations", -1)],
)
def test_invalid_params_raise(field, value):
    image, probs = _structured(8, 8, 2, 0)
    with pytest.raises(ValueError, match=field):
        dense_crf(image, probs, replace(SMALL, **{field: value}))


def test_unknown_bilateral_kernel_raises():
    image, probs = _structured(8, 8, 2, 0)
    with pytest.raises(ValueError, match="bilateral_kernel"):
        dense_crf(image, probs, SMALL, bilateral_kernel="exact")


def test_shape_mismatch_raises():
    image, probs = _structured(8, 8, 2, 0)
    with pytest.raises(ValueError, match="resize"):
        dense_crf(image[:, :7], probs, SMALL)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        dense_crf(image[..., :2], probs, SMALL)


def test_exact_refuses_large_images():
    side = int(EXACT_MAX_PIXELS**0.5) + 1
    image, probs = np.zeros((side, side, 3), np.uint8), np.full((2, side, side), 0.5, np.float32)
    with pytest.raises(ValueError, match="EXACT_MAX_PIXELS"):
        dense_crf_exact(image, probs, SMALL)


def test_presets_are_valid():
    for params in PRESETS.values():
        params.validate()
    assert PRESETS["deeplab_v2"] == CRFParams(4, 67, 3, 3, 1, 10)


def test_agrees_with_pydensecrf():
    image, probs = _structured(60, 80, 4, 6)
    params = PRESETS["deeplab_v2"]
    ref = _pydensecrf(image, probs, params)
    assert (dense_crf(image, probs, params).argmax(0) == ref.argmax(0)).mean() >= 0.99
