"""Building blocks shared by the model families: the backbone contract, FCN's deconvolution, and
convolutions that run as explicit GEMMs or on polyphase sub-grids where oneDNN's kernels are slow."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FeatureSpec",
    "Backbone",
    "bilinear_kernel",
    "BilinearDeconv",
    "AtrousConv2d",
    "Im2colConv2d",
    "DilatedDepthwiseConv2d",
    "RateClippedConv2d",
    "FrozenBatchNorm2d",
    "GlobalAveragePool",
    "global_average_pool",
    "in_layout_of",
    "is_channels_last",
    "being_traced",
    "center_crop",
    "crop",
    "check_input",
    "centre_geometry",
    "square_value",
]


@dataclass(frozen=True)
class FeatureSpec:
    """What a backbone promises about one named feature map."""

    channels: int
    stride: int


class Backbone(nn.Module):
    """A feature extractor: ``forward(x) -> {name: feature map}`` with keys of ``feature_info``.

    ``feature_info`` declares each key's channels and stride; a contract test checks the
    declaration against real outputs for every backbone, so heads can read channels from it
    instead of typing them by hand.
    """

    feature_info: dict[str, FeatureSpec]
    in_channels: int

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def feature_layers(self) -> list[str]:
        """Module names worth showing as feature maps, shallow to deep."""
        return list(self.feature_info)


def bilinear_kernel(channels: int, kernel_size: int) -> Tensor:
    """Weights of a ``channels -> channels`` transposed convolution that upsamples bilinearly.

    The FCN reference initialisation (Long et al. 2015, Sec. 3.3): a separable triangle filter
    on the diagonal, zeros between different channels.
    """
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float64)
    filt1d = 1 - (og - center).abs() / factor
    filt = filt1d[:, None] * filt1d[None, :]
    weight = torch.zeros(channels, channels, kernel_size, kernel_size, dtype=torch.float64)
    weight[range(channels), range(channels)] = filt
    return weight.float()


class BilinearDeconv(nn.ConvTranspose2d):
    """FCN's "deconvolution": a stride-``factor`` transposed convolution initialised to bilinear.

    ``learnable=False`` freezes it (the final upsampling of FCN, Sec. 4.3: "fixed to bilinear
    interpolation"); ``learnable=True`` starts bilinear and is trained (FCN's 2x layers).
    Kernel ``2 * factor`` as in the reference nets (4 for x2, 16 for x8, 32 for x16, 64 for x32).
    No bias, as in the reference prototxt.
    """

    def __init__(self, channels: int, factor: int, *, learnable: bool) -> None:
        super().__init__(channels, channels, kernel_size=2 * factor, stride=factor, bias=False)
        self.factor = factor
        self.learnable = learnable
        self.reset_parameters()
        self.weight.requires_grad_(learnable)

    def reset_parameters(self) -> None:
        if hasattr(self, "factor"):  # nn.ConvTranspose2d.__init__ calls this before factor exists
            with torch.no_grad():
                self.weight.copy_(bilinear_kernel(self.in_channels, self.kernel_size[0]))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", learnable={self.learnable}"


def _weight_grad(grad: Tensor, columns: Callable[[int], Tensor]) -> Tensor:
    """A convolution's weight gradient as (O, C*kh*kw), the flattened weight's shape: the sum over
    images ``n`` of ``grad[n]`` (O, L) times ``columns(n)`` (C*kh*kw, L, unfold's row order)
    transposed, one GEMM each; written by the first, not zeroed and added to."""
    grad_w = torch.mm(grad[0], columns(0).t())
    for n in range(1, grad.shape[0]):
        grad_w.addmm_(grad[n], columns(n).t())
    return grad_w


def _check_plain_geometry(conv: nn.Conv2d) -> None:
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"{type(conv).__name__} supports groups=1 and explicit zero padding only")


class _GemmWeightGradConv(torch.autograd.Function):
    """A convolution whose weight gradient is one explicit im2col GEMM per image."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, conv: nn.Conv2d) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conv = conv
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        conv: nn.Conv2d = ctx.conv
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad, conv.stride, conv.padding, conv.dilation)
        if ctx.needs_input_grad[1]:
            # one image's columns at a time bounds the memory
            def columns(n: int) -> Tensor:
                return F.unfold(x[n : n + 1], weight.shape[-2:], conv.dilation, conv.padding, conv.stride)[0]

            grad_w = _weight_grad(grad.reshape(*grad.shape[:2], -1), columns).view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


class AtrousConv2d(nn.Conv2d):
    """A dilated ``nn.Conv2d`` (same parameters, same forward) trained through an explicit GEMM.

    oneDNN 3.x on AVX2 answers the weight gradient of a large dilated kernel with its reference
    loop: DeepLab-7x7's fc6 (7x7, dilation 4, 512 -> 4096) took 300 s of a 308 s training step
    at 256 px, where the same sums as one im2col GEMM take about a second. The forward and the
    input gradient stay oneDNN's; only training on CPU takes the GEMM, so traced graphs and GPUs
    see a plain convolution.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _check_plain_geometry(self)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled() and x.device.type == "cpu" and self.weight.requires_grad:
            return _GemmWeightGradConv.apply(x, self.weight, self.bias, self)
        return super().forward(x)


def being_traced() -> bool:
    """Whether this forward is being recorded for an export (TorchScript or ONNX), where a layer
    must write the operation that holds at every input size, not a shortcut for this one."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _same_padding(layer: str, kernel_size: int, dilation: int) -> int:
    """The padding that keeps a stride-1 map's size: an odd kernel's half, dilated."""
    if kernel_size % 2 == 0:
        raise ValueError(f"{layer} needs an odd kernel, got {kernel_size}")
    return dilation * (kernel_size // 2)


def _trains_on_cpu(x: Tensor, weight: Tensor) -> bool:
    """Whether this call records a CPU training graph that a layer's own backward may serve:
    gradients wanted, eager (not traced for an export), not under autocast."""
    return (
        torch.is_grad_enabled()
        and x.device.type == "cpu"
        and (x.requires_grad or weight.requires_grad)
        and not (being_traced() or torch.is_autocast_enabled("cpu"))
    )


def _reached_taps_weight_grad(x: Tensor, grad: Tensor, kernel: tuple[int, int], dilation: int) -> Tensor:
    """The weight gradient of a stride-1 "same" dilated convolution, one GEMM per tap over the
    output pixels whose input pixel that tap reads inside the map (the rest read zeros)."""
    (_, cin, h, w), cout = x.shape, grad.shape[1]
    x_rows = x.permute(0, 2, 3, 1).contiguous()  # channels-last: a view where x already is
    g_rows = grad.permute(0, 2, 3, 1).contiguous()
    out = x.new_zeros(*kernel, cout, cin)
    for a in range(kernel[0]):
        dy = dilation * (a - kernel[0] // 2)
        top, bottom = max(0, -dy), min(h, h - dy)
        for b in range(kernel[1]):
            dx = dilation * (b - kernel[1] // 2)
            left, right = max(0, -dx), min(w, w - dx)
            if top >= bottom or left >= right:
                continue
            g = g_rows[:, top:bottom, left:right].reshape(-1, cout)
            torch.mm(g.t(), x_rows[:, top + dy : bottom + dy, left + dx : right + dx].reshape(-1, cin), out=out[a, b])
    return out.permute(2, 3, 0, 1)


class _SameAtrousConv(torch.autograd.Function):
    """A stride-1 "same" dilated convolution (groups 1) whose backward reads only the map.

    oneDNN's backward runs every tap over the zero padding, which at ASPP's rates is most of the
    filter; its forward skips it. The input gradient is the forward kernel on the upstream
    gradient with the filter flipped and its channels swapped (a stride-1 "same" convolution's
    adjoint); the weight gradient one GEMM per tap over the pixels it reaches. Channels-last on a
    2-core Zen 2, ASPP's rate-12 branch, 960 -> 256 channels on 8 x 16 x 16 (DeepLab v3
    MobileNetV3 at 256 px): backward 132 -> 38 ms; 2048 -> 256 on a 65 x 65 map (ResNet-101 at
    513 px, output stride 8): 894 -> 434 ms.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int) -> Tensor:  # noqa: ANN001
        kh, kw = weight.shape[-2:]
        ctx.save_for_backward(x, weight)
        ctx.dilation, ctx.has_bias = dilation, bias is not None
        ctx.padding = (dilation * (kh // 2), dilation * (kw // 2))
        return F.conv2d(x, weight, bias, 1, ctx.padding, dilation)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            adjoint = weight.flip(-2, -1).transpose(0, 1)
            grad_x = F.conv2d(grad, adjoint, None, 1, ctx.padding, ctx.dilation)
        if ctx.needs_input_grad[1]:
            grad_w = _reached_taps_weight_grad(x, grad, weight.shape[-2:], ctx.dilation)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


class RateClippedConv2d(nn.Conv2d):
    """A stride-1 "same" atrous ``nn.Conv2d`` (same parameters, same result) that runs only the
    taps that can reach the map: a tap ``rate * k`` pixels off-centre reads only padding once
    ``rate * k`` is at least the map's side, and "in the extreme case when the rate value is
    close to the feature map size, the 3x3 filter [...] degenerates to a simple 1x1 filter"
    (DeepLab v3, Sec. 3.3). ASPP's rates 24 and 36 on a 16x16 map (256-pixel crops at output
    stride 16): forward and backward 85 -> 20 ms (960 -> 256 channels, batch 8, 2-core Zen 2),
    where oneDNN's backward runs every tap over the zeros. Channels-last, a tap that reaches part
    of the map trains through :class:`_SameAtrousConv`, whose backward reads only that part
    (channels-first, oneDNN's own backward is as fast: 19.3 s a DeepLab v3 ResNet-101 step at 513
    either way). Traced graphs (exports) keep the whole filter, so they stay right at every size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, rate: int, bias: bool = True) -> None:
        padding = _same_padding(type(self).__name__, kernel_size, rate)
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, dilation=rate, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if being_traced():
            return super().forward(x)
        rate, half = self.dilation[0], self.kernel_size[0] // 2
        # taps per side whose offset stays inside the map, per axis
        keep_h, keep_w = (min(half, (side - 1) // rate) for side in x.shape[-2:])
        weight = self.weight[:, :, half - keep_h : half + keep_h + 1, half - keep_w : half + keep_w + 1]
        if (keep_h or keep_w) and is_channels_last(x) and _trains_on_cpu(x, weight):
            return _SameAtrousConv.apply(x, weight, self.bias, rate)
        return F.conv2d(x, weight, self.bias, 1, (rate * keep_h, rate * keep_w), self.dilation, self.groups)


class _PolyphaseDepthwiseConv(torch.autograd.Function):
    """A stride-1 "same" dilated depthwise convolution whose gradients avoid oneDNN's dilated
    depthwise backward: the input gradient is the forward kernel on the upstream gradient with
    the taps flipped, and the weight gradient an undilated one on the d x d polyphase sub-grids
    (stacked as a batch), where ``x[d*i + r]`` meets tap ``a`` only through ``x[d*(i + a) + r]``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int, padding: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.dilation, ctx.padding, ctx.has_bias = dilation, padding, bias is not None
        return F.conv2d(x, weight, bias, 1, padding, dilation, x.shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        d, channels = ctx.dilation, x.shape[1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, weight.flip(-2, -1), None, 1, ctx.padding, d, channels)
        if ctx.needs_input_grad[1]:
            h, w = grad.shape[-2:]
            grow = (0, -w % d, 0, -h % d)  # to a multiple of d: the zeros add nothing
            xg, gg = (F.pad(t, grow) if any(grow) else t for t in (x, grad))
            phases = [(r, s) for r in range(d) for s in range(d)]
            xs = torch.cat([xg[:, :, r::d, s::d] for r, s in phases])
            gs = torch.cat([gg[:, :, r::d, s::d] for r, s in phases])
            grad_w = torch.nn.grad.conv2d_weight(xs, weight.shape, gs, 1, ctx.padding // d, 1, channels)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


class DilatedDepthwiseConv2d(nn.Conv2d):
    """A dilated depthwise ``nn.Conv2d`` (stride 1, "same" padding; same parameters, same forward)
    whose training on CPU avoids oneDNN's dilated depthwise backward.

    MobileNetV3's dilated last stage (LR-ASPP, DeepLab v3): oneDNN 3.x computes the weight
    gradient of a 5x5, dilation-2 depthwise layer by a slow path, 66 ms for 960 channels on an
    8 x 16 x 16 batch where its forward takes 1 ms (2-core Zen 2). Forward and both gradients
    here: 79 -> 17 ms. Inference (no gradients), traced graphs, GPUs and autocast see a plain
    convolution.
    """

    def __init__(self, channels: int, kernel_size: int, dilation: int, bias: bool = False) -> None:
        padding = _same_padding(type(self).__name__, kernel_size, dilation)
        super().__init__(channels, channels, kernel_size, 1, padding, dilation, channels, bias)

    def forward(self, x: Tensor) -> Tensor:
        if _trains_on_cpu(x, self.weight):
            return _PolyphaseDepthwiseConv.apply(x, self.weight, self.bias, self.dilation[0], self.padding[0])
        return super().forward(x)


def _output_side(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class _Im2colConv(torch.autograd.Function):
    """A convolution as GEMMs on im2col columns: forward, input gradient and weight gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, geometry: tuple) -> Tensor:
        stride, padding, dilation = geometry
        n, _, h, w = x.shape
        out_channels, (kh, kw) = weight.shape[0], weight.shape[-2:]
        out_h = _output_side(h, kh, stride[0], padding[0], dilation[0])
        out_w = _output_side(w, kw, stride[1], padding[1], dilation[1])
        # (N, C*kh*kw, L): the row order of the flattened (O, C, kh, kw) weight
        cols = F.unfold(x, (kh, kw), dilation, padding, stride)
        # written through a flat view into the map, so what is returned is no view (the ReLU
        # after fc6 works in place, which autograd forbids on a custom function's view)
        out = x.new_empty(n, out_channels, out_h, out_w)
        flat = out.view(n, out_channels, -1)
        torch.matmul(weight.reshape(out_channels, -1), cols, out=flat)
        if bias is not None:
            flat += bias[:, None]
        ctx.save_for_backward(cols, weight)
        ctx.geometry, ctx.input_size, ctx.has_bias = geometry, (h, w), bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        cols, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        n, out_channels = grad.shape[:2]
        grad = grad.reshape(n, out_channels, -1)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_cols = torch.matmul(weight.reshape(out_channels, -1).t(), grad)
            grad_x = F.fold(grad_cols, ctx.input_size, weight.shape[-2:], dilation, padding, stride)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(grad, cols.__getitem__).view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2))
        return grad_x, grad_w, grad_b, None


class Im2colConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters, same result) that runs on CPU as im2col GEMMs.

    For a large kernel on a small map: FCN's fc6 (7x7, 512 -> 4096) sees a 9x9 window grid at
    256 px and 16x16 at 500, too few positions for oneDNN's direct kernels to fill their
    register blocks (30-60 GFLOP/s on AVX2), while the same sums as one GEMM with a
    25,088-long inner dimension run at 130-170. Forward and both gradients take the GEMMs;
    traced graphs, GPUs, autocast (whose low-precision convolution is the fast path where it is
    on) and maps whose columns would pass ``max_columns_bytes`` see a plain convolution.
    """

    max_columns_bytes = 128 << 20

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _check_plain_geometry(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.dim() == 4 and not (torch.jit.is_tracing() or torch.is_autocast_enabled("cpu")):
            n, c, h, w = x.shape
            (kh, kw), s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
            positions = _output_side(h, kh, s[0], p[0], d[0]) * _output_side(w, kw, s[1], p[1], d[1])
            if n * c * kh * kw * positions * x.element_size() <= self.max_columns_bytes:
                return _Im2colConv.apply(x, self.weight, self.bias, (s, p, d))
        return super().forward(x)


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (Caffe ``use_global_stats``).

    DeepLab v2 trains ResNet-101 with frozen BN because batches of 10 at 321x321 are too small
    to estimate statistics (Chen et al. 2017, Sec. 4.1). Buffers only, so nothing is trained.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.num_features = num_features
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class _BroadcastGradMean(torch.autograd.Function):
    """Global average pooling whose gradient is the upstream one spread as a stride-0 view.

    PyTorch's pooling backward writes a dense channels-first map. Where the pooled tensor also
    feeds another layer (squeeze-and-excite, LR-ASPP's head, ASPP's image pooling), autograd then
    adds a channels-first gradient into a channels-last one: 3.1 ms for 8 x 960 x 16 x 16 on a
    2-core Zen 2, where the broadcast sum takes a fraction. The same numbers either way."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001 - autograd's context
        ctx.shape = x.shape
        return F.adaptive_avg_pool2d(x, 1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        height, width = ctx.shape[-2:]
        return (grad / (height * width)).expand(ctx.shape)


def global_average_pool(x: Tensor) -> Tensor:
    """``F.adaptive_avg_pool2d(x, 1)``; in training, with a gradient that keeps the layout of the
    layers around it (traced graphs keep PyTorch's own operation)."""
    if x.requires_grad and torch.is_grad_enabled() and not being_traced():
        return _BroadcastGradMean.apply(x)
    return F.adaptive_avg_pool2d(x, 1)


class GlobalAveragePool(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d(1)`` through :func:`global_average_pool`."""

    def __init__(self) -> None:
        super().__init__(1)

    def forward(self, x: Tensor) -> Tensor:
        return global_average_pool(x)


def crop(x: Tensor, offset: int, height: int, width: int) -> Tensor:
    """``x[..., offset:offset+height, offset:offset+width]``: Caffe's Crop layer (FCN)."""
    return x[:, :, offset : offset + height, offset : offset + width]


def in_layout_of(t: Tensor, x: Tensor) -> Tensor:
    """``t`` in ``x``'s memory layout (channels-last or not): a map upsampled from 1x1 comes out
    channels-first whatever its input's layout, and concatenated with channels-last maps it
    would turn the whole concatenation, and the gradient the layers before receive, channels-first."""
    return t.contiguous(memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format)


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` is a 4-D map laid out channels-last (and not also channels-first: C or H*W of 1)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def center_crop(x: Tensor, height: int, width: int) -> Tensor:
    """The centre ``height x width`` window of ``x``: U-Net's crop before copy."""
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[:, :, top : top + height, left : left + width]


def check_input(x: Tensor, in_channels: int, model: str) -> None:
    """A clear error for inputs that are not ``(N, in_channels, H, W)``."""
    if x.dim() != 4:
        raise ValueError(f"{model} expects a 4-D batch (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(
            f"{model} was built for in_channels={in_channels} but the input has {x.shape[1]} "
            f"channels (shape {tuple(x.shape)}); build it with in_channels={x.shape[1]} or "
            f"convert the images"
        )


def square_value(value: int | tuple[int, ...]) -> int:
    """The one value of a square kernel size, stride, padding or dilation."""
    if isinstance(value, tuple):
        if len(set(value)) != 1:
            raise ValueError(f"non-square kernels, strides or paddings are not supported here, got {value}")
        return value[0]
    return value


def centre_geometry(modules: Iterable[nn.Module]) -> tuple[float, float]:
    """``(stride, offset)`` of a chain of layers: output cell ``j`` is centred on input pixel
    ``stride * j + offset``.

    Caffe's ``coord_map``, from which FCN's reference nets derive their crop offsets (Long et al.
    2015, Sec. 3.3 and the released ``net.py``): a window of size ``k``, stride ``s``, padding
    ``p`` and dilation ``d`` maps ``x_in = s * x_out + (k - 1) / 2 * d - p``. ``nn.Sequential``
    is followed into; element-wise layers (ReLU, dropout, batch norm) leave positions alone.
    """
    stride, offset = 1.0, 0.0
    for m in modules:
        if isinstance(m, nn.Sequential):
            a, b = centre_geometry(m)
        elif isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k, s, p = square_value(m.kernel_size), square_value(m.stride), square_value(m.padding)
            d = square_value(getattr(m, "dilation", 1))
            a, b = s, (k - 1) / 2 * d - p
        elif isinstance(m, (nn.ReLU, nn.Dropout, nn.BatchNorm2d, nn.Identity)):
            a, b = 1, 0.0
        else:
            raise ValueError(
                f"cannot follow the geometry of a {type(m).__name__} layer (not a conv, pool or element-wise)"
            )
        offset, stride = offset + stride * b, stride * a
    return stride, offset
