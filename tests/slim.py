"""Slim copies of the 134M-parameter VGG16 nets for the default test tier.

FCN-32s/16s/8s and DeepLab's 7x7 fc6 hold 540 MB of weights and cost seconds per pass on a
CPU. Their graph (kernels, strides, dilations, paddings, crops) does not depend on the widths,
so the default tier checks a copy with 1/16 of the channels, and the full-size nets run in the
``slow`` tier (``bash run.sh test -m slow``).
"""

from __future__ import annotations

from torch import nn

HEAVY = ("fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce", "deeplab_v1_7x7")


def slim(model: nn.Module, divisor: int = 16) -> nn.Module:
    """``model`` with 1/``divisor`` of every hidden convolution's channels, in place.

    Image and class channels keep their widths (no hidden width is 3 or 5). Batch-norm-free
    nets only; He init keeps activations at the scale of the full net's.
    """
    keep = {model.in_channels, model.num_classes}
    for parent in list(model.modules()):
        for attr, conv in list(parent.named_children()):
            if isinstance(conv, nn.Conv2d):
                cin, cout = (c if c in keep else c // divisor for c in (conv.in_channels, conv.out_channels))
                thin = type(conv)(cin, cout, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
                nn.init.kaiming_normal_(thin.weight, nonlinearity="relu")
                nn.init.uniform_(thin.bias, -0.1, 0.1)
                setattr(parent, attr, thin)
    return model
