"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015) and a padded ("same") variant.

The paper's net (Sec. 2, Fig. 1): a contracting path of unpadded 3x3 convolutions + ReLU and
2x2 max-pooling that doubles the channels (64 ... 1024), an expansive path of 2x2
up-convolutions that halve them, each followed by concatenation with the centre-cropped
feature map of the contracting path ("crop and copy") and two 3x3 convolutions, and a final
1x1 convolution to the classes: 23 convolutional layers. Drop-out layers at the end of the
contracting path (Sec. 3.1). Because every convolution is valid, a 572x572 tile gives a
388x388 map, and only certain input sizes fit the 2x2 poolings: :func:`unet_valid_size` finds
them, and overlap-tile inference (Fig. 2) covers images of any size.

``padding="same"`` is *our variant*, not the paper's: padded convolutions (optionally with
batch norm) so the output has the input's size; width and depth are configurable.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register_model
from ..weights import with_pretrained
from .base import InputRule, SegmentationModel
from .layers import center_crop, check_input

__all__ = ["UNet", "DoubleConv", "unet_output_size", "unet_valid_size"]


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by (batch norm and) ReLU."""

    def __init__(self, in_ch: int, out_ch: int, *, padding: int, batch_norm: bool):
        layers: list[nn.Module] = []
        for cin, cout in ((in_ch, out_ch), (out_ch, out_ch)):
            layers.append(nn.Conv2d(cin, cout, 3, padding=padding, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def unet_output_size(size: int, depth: int = 4) -> int | None:
    """Output side of the valid U-Net for an input side, or ``None`` if the size does not fit.

    A size fits when every map before a 2x2 pooling is even and every map stays positive.
    """
    s = size
    for _ in range(depth):
        s -= 4
        if s <= 0 or s % 2:
            return None
        s //= 2
    s -= 4  # the bottom level's two convolutions
    for _ in range(depth):
        s = 2 * s - 4
    return s if s >= 1 and size >= 1 else None


def unet_valid_size(size: int, depth: int = 4) -> tuple[int, int]:
    """The smallest valid input side ``>= size`` and its output side.

    Valid sides are ``2**depth * b + 2**(depth+3) - 4`` (b = bottom width, e.g. 572 for b=28
    at depth 4), so one step of 16 pixels at depth 4 separates neighbours.
    """
    step = 2**depth
    b = max(1, math.ceil((size - 2 ** (depth + 3) + 4) / step))
    while unet_output_size(step * b + 2 ** (depth + 3) - 4, depth) is None:
        b += 1
    valid = step * b + 2 ** (depth + 3) - 4
    return valid, unet_output_size(valid, depth)  # type: ignore[return-value]


class UNet(SegmentationModel):
    """U-Net with valid (paper) or same (padded variant) convolutions.

    Args:
        num_classes: output channels of the final 1x1 convolution (2 in the paper).
        in_channels: image channels (1 for the paper's EM images).
        padding: ``"valid"`` (paper) or ``"same"`` (our padded variant, output size = input size).
        base_channels: channels of the first level (64); each level doubles them.
        depth: number of poolings (4).
        batch_norm: BN after each convolution (padded variant only; the paper has none).
        dropout: drop-out probability at the end of the contracting path (0.5 in the
            released Caffe model, after the last two levels); 0 disables it.
    """

    def __init__(
        self,
        num_classes: int = 2,
        in_channels: int = 1,
        *,
        padding: Literal["valid", "same"] = "valid",
        base_channels: int = 64,
        depth: int = 4,
        batch_norm: bool = False,
        dropout: float = 0.5,
    ):
        super().__init__()
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' (paper) or 'same' (padded variant), got {padding!r}")
        if depth < 1 or base_channels < 1:
            raise ValueError(f"depth and base_channels must be >= 1, got depth={depth}, base_channels={base_channels}")
        if batch_norm and padding == "valid":
            raise ValueError("batch_norm=True is offered for the padded variant only; use padding='same'")
        self.num_classes, self.in_channels = num_classes, in_channels
        self.padding, self.depth = padding, depth
        pad = 0 if padding == "valid" else 1
        widths = [base_channels * 2**i for i in range(depth + 1)]

        self.down = nn.ModuleList()
        ch = in_channels
        for w in widths:
            self.down.append(DoubleConv(ch, w, padding=pad, batch_norm=batch_norm))
            ch = w
        self.pool = nn.MaxPool2d(2, 2)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.dec = nn.ModuleList(
            DoubleConv(2 * widths[i], widths[i], padding=pad, batch_norm=batch_norm) for i in reversed(range(depth))
        )
        self.final = nn.Conv2d(widths[0], num_classes, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        # Sec. 3: Gaussian with std sqrt(2/N), N = incoming nodes of one neuron (k*k*C_in);
        # a 2x2 stride-2 up-convolution feeds each output from one pixel of each input channel.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            elif isinstance(m, nn.ConvTranspose2d):
                fan_in = m.in_channels
            else:
                continue
            nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    no_imagenet_weights = (
        "U-Net has no ImageNet weights: the paper trains it from scratch (Sec. 3); pass pretrained=None, "
        "or the path of a densepred U-Net checkpoint"
    )

    def classifier_layers(self) -> list[nn.Module]:
        return [self.final]

    def input_rule(self) -> InputRule:
        if self.padding == "same":
            return InputRule("at_least", minimum=2**self.depth)
        first, out = unet_valid_size(1, self.depth)
        # Only unpadded convolutions shrink maps, so every valid size loses the same border.
        return InputRule("valid", first=first, step=2**self.depth, shrink=first - out)

    def feature_layers(self) -> list[str]:
        """The first and the bottom contracting blocks, then the first and last expansive blocks."""
        return ["down.0", f"down.{self.depth}", "dec.0", f"dec.{self.depth - 1}"]

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The output's (H, W) for an input of (H, W); an error names the nearest valid size."""
        if self.padding == "same":
            minimum = 2**self.depth
            if min(height, width) < minimum:
                raise ValueError(
                    f"padded U-Net of depth {self.depth} needs inputs of at least {minimum}x{minimum}, "
                    f"got {height}x{width}"
                )
            return height, width
        out = [unet_output_size(s, self.depth) for s in (height, width)]
        if None in out:
            fixes = []
            for s in (height, width):
                valid, o = unet_valid_size(s, self.depth)
                below = _largest_valid_below(s, self.depth)
                fixes.append(f"{s} -> {valid} (output {o})" + (f" or {below[0]} (output {below[1]})" if below else ""))
            raise ValueError(
                f"U-Net with valid convolutions cannot take a {height}x{width} input: every map before a "
                f"2x2 pooling must be even and positive. Nearest valid sizes: {'; '.join(fixes)}. "
                f"Pad/crop to a valid size, or use overlap-tile inference for any image size."
            )
        return out[0], out[1]  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.in_channels, "UNet")
        self.output_size(*x.shape[-2:])
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i >= self.depth - 1:  # end of the contracting path: the last two levels
                x = self.dropout(x)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
            x = up(x)
            if self.padding == "valid":
                skip = center_crop(skip, *x.shape[-2:])  # crop and copy (Fig. 1, grey arrows)
            else:
                # Odd sizes lose a row in pooling; pad the upsampled map back to the skip's size.
                dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
                x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
            x = dec(torch.cat([skip, x], dim=1))
        return self.final(x)


def _largest_valid_below(size: int, depth: int) -> tuple[int, int] | None:
    for s in range(size - 1, 0, -1):
        o = unet_output_size(s, depth)
        if o is not None:
            return s, o
    return None


_UNET = "Ronneberger et al. 2015, U-Net"


@register_model("unet", paper=_UNET, output_stride=1, receptive_field=204, default_size=572)
def unet(
    *,
    num_classes: int = 2,
    in_channels: int = 1,
    base_channels: int = 64,
    dropout: float = 0.5,
    pretrained: str | None = None,
) -> UNet:
    """The paper's U-Net: valid convolutions, 572x572 -> 388x388, 31,030,658 parameters (1 in, 2 classes).

    ``base_channels`` narrows it (64 in the paper) without changing its geometry.
    """
    model = UNet(num_classes, in_channels, padding="valid", base_channels=base_channels, dropout=dropout)
    return with_pretrained(model, pretrained)


@register_model(
    "unet_padded", paper=_UNET + " (padded variant)", output_stride=1, receptive_field=204, default_size=572
)
def unet_padded(
    *,
    num_classes: int = 2,
    in_channels: int = 1,
    base_channels: int = 64,
    depth: int = 4,
    batch_norm: bool = True,
    dropout: float = 0.0,
    pretrained: str | None = None,
) -> UNet:
    """Padded ("same") U-Net variant: output size = input size for any input >= 2**depth."""
    model = UNet(
        num_classes,
        in_channels,
        padding="same",
        base_channels=base_channels,
        depth=depth,
        batch_norm=batch_norm,
        dropout=dropout,
    )
    return with_pretrained(model, pretrained)
