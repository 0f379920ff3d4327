"""U-Net paper facts (Ronneberger et al. 2015) and the padded variant."""

import pytest
import torch
from torch import nn

import densepred
from densepred.models.unet import UNet, unet_output_size, unet_valid_size


def test_paper_unet_572_to_388_with_31_030_658_parameters():
    model = densepred.create_model("unet", num_classes=2, in_channels=1).eval()
    assert sum(p.numel() for p in model.parameters()) == 31_030_658
    with torch.inference_mode():
        assert model(torch.randn(1, 1, 572, 572)).shape == (1, 2, 388, 388)


def test_paper_unet_has_23_convolutional_layers():
    model = densepred.create_model("unet")
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 23  # Sec. 2: "In total the network has 23 convolutional layers."
    assert all(m.padding == (0, 0) for m in convs)  # valid convolutions only
    ups = [m for m in convs if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == 4 and all(m.kernel_size == (2, 2) and m.stride == (2, 2) for m in ups)
    assert model.dropout.p == 0.5


@pytest.mark.parametrize("size,out", [(572, 388), (188, 4), (204, 20), (1100, 916)])
def test_valid_sizes(size, out):
    assert unet_output_size(size) == out
    assert unet_valid_size(size) == (size, out)


def test_invalid_sizes_are_rejected_and_the_nearest_valid_one_is_named():
    assert unet_output_size(573) is None and unet_output_size(100) is None
    assert unet_valid_size(573) == (588, 404)
    assert unet_valid_size(10) == (188, 4)
    model = densepred.create_model("unet").eval()
    with pytest.raises(ValueError, match=r"100 -> 188 \(output 4\)"):
        model(torch.randn(1, 1, 100, 100))
    with pytest.raises(ValueError, match=r"573 -> 588 \(output 404\) or 572 \(output 388\)"):
        model(torch.randn(1, 1, 572, 573))


def _identity_taps(conv: nn.Conv2d, in_index: int = 0) -> None:
    with torch.no_grad():
        conv.weight[0, in_index, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 1.0


def test_crop_and_copy_takes_the_centre_of_the_contracting_map():
    """Wire a U-Net so only the top-level copy carries signal: the output must be the input's
    centre 388x388, i.e. the copied map was cropped symmetrically (Fig. 1, grey arrows)."""
    model = UNet(1, 1, base_channels=1).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    first, last = model.down[0], model.dec[-1]
    _identity_taps(first[0])
    _identity_taps(first[2])
    _identity_taps(last[0], in_index=0)  # channel 0 of the concatenation is the copied map
    _identity_taps(last[2])
    with torch.no_grad():
        model.final.weight.fill_(1.0)
    x = torch.rand(1, 1, 572, 572)  # non-negative, so the ReLUs pass it through
    with torch.inference_mode():
        y = model(x)
    torch.testing.assert_close(y, x[..., 92:480, 92:480])


@pytest.mark.parametrize("size", [(16, 16), (37, 53), (64, 100), (255, 17)])
def test_padded_variant_keeps_the_input_size(size):
    model = densepred.create_model("unet_padded", num_classes=3, in_channels=3, base_channels=8).eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 3, *size)).shape == (1, 3, *size)


def test_padded_variant_width_depth_and_batch_norm():
    model = densepred.create_model("unet_padded", base_channels=16, depth=3, batch_norm=True)
    assert model.depth == 3 and len(model.down) == 4 and model.down[-1][0].out_channels == 128
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with pytest.raises(ValueError, match="at least 8x8"):
        model.eval()(torch.randn(1, 1, 7, 20))
    plain = densepred.create_model("unet_padded", batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())


def test_unet_options_are_validated():
    with pytest.raises(ValueError, match="padded variant only"):
        UNet(2, 1, padding="valid", batch_norm=True)
    with pytest.raises(ValueError, match="padding must be"):
        UNet(2, 1, padding="reflect")
