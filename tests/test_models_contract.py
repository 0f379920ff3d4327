"""Contracts every registered model keeps: shapes, backward, channels, declared facts."""

import pytest
import torch

import densepred
from densepred.models.unet import unet_valid_size
from densepred.zoo import _theoretical_copy, measure_receptive_field, summarize

ALL_MODELS = densepred.list_models()  # contracts run over the whole registry


def _input_for(name: str, batch: int = 1) -> torch.Tensor:
    if name == "unet":
        side = unet_valid_size(188)[0]
        return torch.randn(batch, 1, side, side)
    channels = 1 if name.startswith("unet") else 3
    return torch.randn(batch, channels, 41, 35)  # odd, non-square: exercises every crop


def _build(name: str, num_classes: int = 3):
    in_channels = 1 if name.startswith("unet") else 3
    return densepred.create_model(name, num_classes=num_classes, in_channels=in_channels)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_and_backward(name):
    model = _build(name).train()
    x = _input_for(name, batch=2)
    out = model(x)
    logits = out["fused"] if isinstance(out, dict) else out
    assert logits.shape[:2] == (2, 3)
    if name != "unet":  # valid U-Net is smaller than its input by design
        assert logits.shape[-2:] == x.shape[-2:]
    target = torch.randint(0, 3, (logits.shape[0], *logits.shape[-2:]))
    torch.nn.functional.cross_entropy(logits, target).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_wrong_channel_count_is_a_clear_error(name):
    model = _build(name).eval()
    x = _input_for(name)
    bad = torch.randn(1, x.shape[1] + 1, *x.shape[-2:])
    with pytest.raises(ValueError, match=r"in_channels=\d+ but the input has \d+ channels"):
        model(bad)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_is_a_score_map_for_every_class(name):
    model = _build(name, num_classes=5).eval()
    with torch.inference_mode():
        out = model(_input_for(name))
    assert out.shape[1] == 5 and out.dtype == torch.float32


@pytest.mark.parametrize("name", ALL_MODELS)
def test_state_dict_round_trip(name, tmp_path):
    model = _build(name).eval()
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    twin = _build(name).eval()
    twin.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = _input_for(name)
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
    "unet": (lambda m: m, 1, 188, 16),
    "unet_padded": (lambda m: m, 1, 188, 16),
}


@pytest.mark.parametrize("name", sorted(_RF_PROBES))
def test_declared_receptive_field_is_measured(name):
    probe, in_ch, height, phases = _RF_PROBES[name]
    model = _theoretical_copy(densepred.create_model(name, num_classes=2, in_channels=in_ch))
    width = unet_valid_size(256)[0] if name == "unet" else 256
    rf = measure_receptive_field(probe(model), in_ch, height, width, phases=phases)
    assert rf == densepred.model_entry(name).receptive_field


def test_fcn_receptive_field_is_the_papers():
    assert densepred.model_entry("fcn8s").receptive_field == 404  # FCN Table 1
