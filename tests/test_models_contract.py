"""Contracts every registered model keeps: shapes, backward, channels, declared facts."""

import functools
import io

import pytest
import torch

import densepred
from densepred.models.unet import unet_valid_size
from densepred.zoo import summarize
from receptive_field import measure_receptive_field, theoretical_copy
from slim import HEAVY, slim

# Contracts run over the whole registry: the 134M-parameter nets as slim copies of the same
# graph by default, and at full size in the slow tier.
# torchvision's 101-layer twins share every module with their 50-layer ones: slow tier only.
TWINS_101 = ("fcn_resnet101", "deeplabv3_resnet101")
ALL_MODELS = [
    *(name for name in densepred.list_models() if name not in HEAVY and name not in TWINS_101),
    *(f"{name}-slim" for name in HEAVY),
    *(pytest.param(name, marks=pytest.mark.slow) for name in (*HEAVY, *TWINS_101)),
]


def _build(name: str, num_classes: int = 3, device: str = "cpu"):
    """The registered model at its builder's own input channels; ``NAME-slim``: its slim copy."""
    registered = name.removesuffix("-slim")
    with torch.device(device):
        model = densepred.create_model(registered, num_classes=num_classes)
    return slim(model) if name.endswith("-slim") else model


@functools.lru_cache(maxsize=1)
def _shared(name: str):
    """The model the contracts below share, one at a time: they run model by model (see
    ``pytest_collection_modifyitems`` in conftest.py), and 20 cached nets would hold GBs."""
    return _build(name)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_and_backward(name):
    model = _shared(name).train()
    model.zero_grad(set_to_none=True)
    x = model.example_input(batch=2)  # declared by the model: small, and a size it takes
    out = model(x)
    logits = out["fused"] if isinstance(out, dict) else out
    assert logits.shape[:2] == (2, 3)
    assert logits.shape[-2:] == model.output_size(*x.shape[-2:])  # the declared input-size rule
    target = torch.randint(0, 3, (logits.shape[0], *logits.shape[-2:]))
    torch.nn.functional.cross_entropy(logits, target).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    model.zero_grad(set_to_none=True)  # the gradients would double the cached model's memory


@pytest.mark.parametrize("name", ALL_MODELS)
def test_wrong_channel_count_is_a_clear_error(name):
    model = _shared(name).eval()
    x = model.example_input()
    bad = torch.randn(1, x.shape[1] + 1, *x.shape[-2:])
    with pytest.raises(ValueError, match=r"in_channels=\d+ but the input has \d+ channels"):
        model(bad)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_state_dict_round_trip(name):
    model = _shared(name).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    twin = _build(name, device="meta").eval()  # no init cost: every tensor comes from the file
    twin.load_state_dict(torch.load(buffer, weights_only=True), strict=True, assign=True)
    x = model.example_input()
    with torch.inference_mode():
        torch.testing.assert_close(model(x), twin(x))


def test_meta_device_parameter_count_matches_a_real_build():
    # `densepred models` counts on the meta device; check that it is the real count.
    real = sum(p.numel() for p in densepred.create_model("deeplab_v1_largefov").parameters())
    assert summarize("deeplab_v1_largefov").params == real


# The measured field of each family's deepest score map is what the registry declares.
# FCN: 404 is the paper's Table 1 figure for FCN-VGG16.
_RF_PROBES = {
    "fcn32s": (lambda m: lambda x: m.classifier_scores(m.backbone(x)["pool5"]), 3, 32, 1),
    "deeplab_v1_largefov": (lambda m: m.coarse_logits, 3, 33, 1),
    "deeplab_v2_vgg16": (lambda m: m.coarse_logits, 3, 33, 1),
    "deeplab_v2_resnet101": (lambda m: m.coarse_logits, 3, 33, 1),
    "segnet": (lambda m: lambda x: m.encoder(x)[0], 3, 32, 1),  # pool5, the deepest encoder map
    "unet": (lambda m: m, 1, 188, 16),
    "unet_padded": (lambda m: m, 1, 188, 16),
}
# The field does not depend on width: probe narrow U-Nets and slim VGG16 nets of the registered geometry.
_NARROW = {"unet": dict(base_channels=8), "unet_padded": dict(base_channels=8)}
# ResNet-101's batch-normed bottlenecks cannot be slimmed: its full-width probe runs in the slow tier.
_RF_SLOW = {"deeplab_v2_resnet101"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in _RF_SLOW else []) for n in sorted(_RF_PROBES)]
)
def test_declared_receptive_field_is_measured(name):
    probe, in_ch, height, phases = _RF_PROBES[name]
    model = densepred.create_model(name, num_classes=2, in_channels=in_ch, **_NARROW.get(name, {}))
    model = theoretical_copy(slim(model) if name in HEAVY else model)
    width = unet_valid_size(256)[0] if name == "unet" else 256
    rf = measure_receptive_field(probe(model), in_ch, height, width, phases=phases)
    assert rf == densepred.model_entry(name).receptive_field


def test_fcn_receptive_field_is_the_papers():
    assert densepred.model_entry("fcn8s").receptive_field == 404  # FCN Table 1
