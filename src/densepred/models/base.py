"""The interface every segmentation model keeps, so nothing outside ``models/`` asks a model's type.

Training, inference, export, visualisation, weight loading and the registry-wide tests read
what a model declares here: its output stride, which input sizes it takes and the size of its
output, its coarse score map (the "heat map" of FCN Sec. 3.1, DeepLab's stride-8 scores), the
classifier layers that recipes give their own learning rate, the layers worth showing as
feature maps, and a small input to test it with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["InputRule", "CoarseScores", "SegmentationModel", "input_rule_of", "loss_weights_of"]


@dataclass(frozen=True)
class InputRule:
    """Which input sizes a model takes, and the size of its output.

    - ``any``: every size; the output has the input's size (FCN, DeepLab).
    - ``at_least``: sides ``>= minimum``; output = input (the padded U-Net).
    - ``valid``: sides ``first + step * k`` only; each output side is the input side less
      ``shrink`` (the paper's U-Net: valid convolutions, 572 -> 388; Ronneberger et al. Sec. 2).
    """

    kind: Literal["any", "at_least", "valid"] = "any"
    minimum: int = 1
    first: int = 1
    step: int = 1
    shrink: int = 0

    def fits(self, side: int) -> bool:
        if self.kind == "valid":
            return side >= self.first and (side - self.first) % self.step == 0
        return side >= self.minimum

    def nearest(self, side: int) -> int:
        """The smallest side ``>= side`` the model takes."""
        if self.kind == "valid":
            k = max(0, -(-(side - self.first) // self.step))
            return self.first + self.step * k
        return max(side, self.minimum)

    def example_size(self, preferred: tuple[int, int] = (65, 81)) -> tuple[int, int]:
        """A small non-square size the model takes (height and width cannot be swapped unnoticed)."""
        if self.kind == "valid":
            return self.first, self.first + self.step
        if self.kind == "at_least":
            side = max(32, self.minimum)
            return side, side + self.minimum
        return preferred

    def describe(self) -> dict[str, Any]:
        """The rule in words, for exported files' metadata."""
        if self.kind == "valid":
            return {
                "size_rule": f"each side shrinks by {self.shrink}, centred ({self.shrink // 2} px lost at each border)",
                "input_sizes": f"each side {self.first} + {self.step}*k, k >= 0 (others fail or misalign the crops)",
                "shrink": self.shrink,
            }
        sizes = f"each side >= {self.minimum}" if self.kind == "at_least" else "any"
        return {"size_rule": "same as input", "input_sizes": sizes, "shrink": 0}


@dataclass(frozen=True)
class CoarseScores:
    """A model's class scores before the final upsampling, and where their cells lie.

    Cell ``j`` of the grid is centred on input pixel ``stride * j + offset``.
    """

    logits: Tensor  # (N, classes, h, w)
    stride: int
    offset: float
    note: str  # how the dense output follows from these scores, for figure captions


class SegmentationModel(nn.Module):
    """Base class of densepred's models: ``forward(x) -> (N, num_classes, H', W')`` logits.

    Subclasses set ``num_classes``, ``in_channels`` and ``output_stride`` and override what
    differs from the defaults below (an any-size model whose output is already dense).
    """

    num_classes: int
    in_channels: int
    output_stride: int = 1
    # Why no ImageNet weights apply (None: those of its backbone do); weight loading reads it.
    no_imagenet_weights: str | None = None

    def input_rule(self) -> InputRule:
        return InputRule()

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The output's (H, W) for an input of (H, W); an error names the nearest sizes that fit."""
        rule = self.input_rule()
        bad = [s for s in (height, width) if not rule.fits(s)]
        if bad:
            raise ValueError(
                f"{type(self).__name__} cannot take a {height}x{width} input: sides must be "
                f"{rule.describe()['input_sizes']}; nearest: {rule.nearest(height)}x{rule.nearest(width)}"
            )
        return height - rule.shrink, width - rule.shrink

    def classifier_layers(self) -> list[nn.Module]:
        """The class-scoring layers (recipes may give them their own learning rate)."""
        return []

    def loss_weights(self) -> dict[str, float]:
        """Weights of the training outputs' branches other than ``fused`` (auxiliary heads)."""
        return {}

    def stride_logits(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        """The scores a loss at the output stride sees (DeepLab v1: against labels sub-sampled by 8)."""
        return self(x)

    def coarse_scores(self, x: Tensor) -> CoarseScores:
        """The coarse score map behind the output (a heat map); here the output is already dense."""
        return CoarseScores(self(x), 1, 0.0, f"{type(self).__name__} output: decoded to full resolution")

    def feature_layers(self) -> list[str]:
        """Module names worth showing as feature maps, shallow to deep."""
        raise ValueError(
            f"no default layers for {type(self).__name__}; pass the layer names (see model.named_modules())"
        )

    def weights_root(self) -> nn.Module:
        """The module that pretrained weights load into (a wrapper returns the model inside)."""
        return self

    def example_size(self) -> tuple[int, int]:
        """A small, odd, non-square input size that exercises every crop and resize of the model."""
        rule = self.input_rule()
        return (41, 35) if rule.fits(41) and rule.fits(35) else rule.example_size()

    def example_input(self, batch: int = 1, *, seed: int = 0) -> Tensor:
        """Noise of :meth:`example_size` on the model's device, from its own generator."""
        param = next(self.parameters())
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(batch, self.in_channels, *self.example_size(), generator=generator)
        return noise.to(param.device, param.dtype)


def input_rule_of(model: nn.Module) -> InputRule:
    """The input rule of any module: what a :class:`SegmentationModel` declares, else any size."""
    return model.input_rule() if isinstance(model, SegmentationModel) else InputRule()


def loss_weights_of(model: nn.Module) -> dict[str, float]:
    """The loss weights a model declares for its auxiliary outputs (none for other modules)."""
    return model.loss_weights() if isinstance(model, SegmentationModel) else {}
