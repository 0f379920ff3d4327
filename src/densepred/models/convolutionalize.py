"""Convolutionalization (Long et al. 2015, Sec. 3.1): a classifier becomes a dense predictor.

"Fully connected layers can also be viewed as convolutions with kernels that cover their
entire input regions." The first fully connected layer after the feature map becomes a
``k x k`` convolution whose kernel is the feature map's size at the training input; later
ones become 1x1 convolutions. Weights are reshaped, not retrained: at the training size the
net computes exactly what the classifier did, and on a larger image it slides, yielding a
spatial map of class scores, the "heat map".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["convolutionalize"]


@torch.no_grad()
def convolutionalize(
    classifier: nn.Sequential, input_size: Sequence[int], in_channels: int | None = None
) -> nn.Sequential:
    """Turn ``classifier`` (features ..., ``nn.Flatten``, ``nn.Linear`` ...) into a fully conv net.

    Args:
        classifier: an ``nn.Sequential`` whose layers before the first ``nn.Flatten`` are
            convolutional (any modules) and whose later layers are ``nn.Linear`` and
            element-wise modules (ReLU, Dropout, ...).
        input_size: ``(H, W)`` the classifier was trained at; fixes the size of the feature
            map that the first fully connected layer saw.
        in_channels: image channels (found from the first convolution when omitted).

    Returns:
        An ``nn.Sequential`` with the same parameters (counts and values) whose output is
        ``(N, classes, h, w)``: ``1 x 1`` at ``input_size``, larger for larger inputs.
    """
    if not isinstance(classifier, nn.Sequential):
        raise TypeError(f"convolutionalize expects an nn.Sequential, got {type(classifier).__name__}")
    layers = list(classifier)
    flat = [i for i, m in enumerate(layers) if isinstance(m, nn.Flatten)]
    if not flat:
        raise ValueError("the classifier has no nn.Flatten: nothing marks where the fully connected layers begin")
    head_start = flat[0]
    features = nn.Sequential(*layers[:head_start])
    if in_channels is None:
        first = next((m for m in features.modules() if isinstance(m, nn.Conv2d)), None)
        if first is None:
            raise ValueError("cannot infer in_channels: no nn.Conv2d before nn.Flatten; pass in_channels=")
        in_channels = first.in_channels
    height, width = (int(s) for s in input_size)
    param = next(classifier.parameters())
    was_training = classifier.training
    features.eval()
    probe = torch.zeros(1, in_channels, height, width, dtype=param.dtype, device=param.device)
    channels, fh, fw = features(probe).shape[1:]
    classifier.train(was_training)

    converted: list[nn.Module] = []
    in_features = channels * fh * fw
    kernel: tuple[int, int] = (fh, fw)
    for m in layers[head_start + 1 :]:
        if isinstance(m, nn.Flatten):
            raise ValueError("a second nn.Flatten after the first is not supported")
        if not isinstance(m, nn.Linear):
            converted.append(m)  # element-wise modules work unchanged on maps
            continue
        if m.in_features != in_features:
            raise ValueError(
                f"fully connected layer expects {m.in_features} inputs but the feature map at input_size "
                f"{height}x{width} has {in_features} ({channels}x{fh}x{fw}); pass the training input_size"
            )
        conv = nn.Conv2d(in_features // (kernel[0] * kernel[1]), m.out_features, kernel, bias=m.bias is not None)
        conv = conv.to(device=m.weight.device, dtype=m.weight.dtype)
        # Flatten orders (C, H, W) row-major, which is exactly a conv weight's (C_in, kH, kW).
        conv.weight.copy_(m.weight.view(conv.weight.shape))
        if m.bias is not None:
            conv.bias.copy_(m.bias)
        converted.append(conv)
        in_features, kernel = m.out_features, (1, 1)
    return nn.Sequential(*layers[:head_start], *converted)
