"""``densepred heatmap | features``: what a model's layers and scores look like over an image."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from ..models.base import InputRule, input_rule_of
from ..visualize import (
    check_class,
    class_heatmaps,
    classifier_heatmap,
    default_layers,
    feature_maps,
    plot_feature_grid,
    plot_heatmaps,
)
from ..weights import load_vgg16_classifier
from .options import add_model_source, load_source

__all__ = ["add_commands"]


def _read_resized(path: str | Path, channels: int, size: int | None) -> np.ndarray:
    """The image as uint8 ``(H, W, channels)``, its longer side resized to ``size`` if given."""
    import cv2

    from ..data.io import read_image

    image = read_image(path, channels=channels)
    if size is None:
        return image
    if size < 8:
        raise ValueError(f"--size must be at least 8 pixels, got {size}")
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = cv2.resize(image, new, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return resized.reshape(new[1], new[0], channels)


def _normalise(image: np.ndarray, normalization: str) -> Tensor:
    from ..build import normalization_for

    return normalization_for(normalization, image.shape[-1])(np.ascontiguousarray(image))


def _resolve_class(value: str, names: Sequence[str]) -> int:
    if value.lstrip("-").isdigit():
        index = int(value)
        check_class(index, len(names))
        return index
    if value in names:
        return list(names).index(value)
    folded = [n.lower() for n in names]
    if value.lower() in folded:
        return folded.index(value.lower())
    raise ValueError(f"unknown class {value!r}; the checkpoint's classes are: {', '.join(names)} (or give an id)")


def _mirror_to_valid(image: np.ndarray, rule: InputRule) -> np.ndarray:
    """Mirror-pad the bottom/right so a valid U-Net accepts the image (as overlap-tile does)."""
    import cv2

    height, width = image.shape[:2]
    new_h, new_w = rule.nearest(height), rule.nearest(width)
    if (new_h, new_w) == (height, width):
        return image
    padded = cv2.copyMakeBorder(image, 0, new_h - height, 0, new_w - width, cv2.BORDER_REFLECT_101)
    return padded.reshape(new_h, new_w, image.shape[-1])


def _cmd_heatmap(args: argparse.Namespace) -> int:
    from ..checkpoint import load_released_trained, load_trained
    from ..distributed import resolve_device

    device = resolve_device(args.device)
    stem = Path(args.image).stem
    released = args.weights if not args.classifier else None  # --weights NAME: released weights
    if args.checkpoint or released:
        trained = (
            load_trained(args.checkpoint, device)
            if args.checkpoint
            else load_released_trained(released, device, file=args.weights_file)
        )
        index = _resolve_class(args.class_, trained.class_names)
        name = trained.class_names[index]
        image = _read_resized(args.image, trained.in_channels, args.size)
        x = _normalise(image, trained.normalization).to(device)
        maps = class_heatmaps(trained.model, x, index)
        model_name = trained.experiment.model.name
    else:
        if not args.class_.isdigit():
            raise ValueError(
                f"--class {args.class_!r}: ImageNet class names are not bundled; give the class id 0..999 "
                "(e.g. 281 tabby cat, 340 zebra)"
            )
        index, name = int(args.class_), f"class {int(args.class_)}"
        image = _read_resized(args.image, 3, args.size or 500)  # a bad image fails before a 553 MB load
        classifier = load_vgg16_classifier(args.weights).to(device)
        maps = classifier_heatmap(classifier, _normalise(image, "imagenet").to(device), index)
        model_name = "VGG16 classifier, convolutionalized"
    out = Path(args.out or f"{stem}_heatmap_{name.replace(' ', '_')}.png")
    shown = f"class '{name}' (id {index})" if args.checkpoint or released else f"ImageNet class {index}"
    title = f"{shown}, {model_name}: coarse scores vs dense prediction"
    # A 1000-way softmax is spread thin: the classifier's map gets a scale up to its peak.
    plot_heatmaps(image, maps, out, title=title, class_name=name, vmax=1.0 if args.checkpoint or released else None)
    print(f"wrote {out}")
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    from ..distributed import resolve_device

    device = resolve_device(args.device)
    trained = load_source(args, device)
    model = trained.model
    layers = args.layers or default_layers(model)
    image = _read_resized(args.image, trained.in_channels, args.size)
    if input_rule_of(model).kind == "valid":
        image = _mirror_to_valid(image, input_rule_of(model))
    features = feature_maps(model, _normalise(image, trained.normalization).to(device), layers, args.top_k)
    out = Path(args.out or f"{Path(args.image).stem}_features.png")
    title = (
        f"{trained.experiment.model.name}: the {args.top_k} strongest channels per layer, shallow (fine, edges and "
        "colours) to deep (coarse, parts)"
    )
    plot_feature_grid(image, features, out, title=title)
    print(f"wrote {out}")
    return 0


def _common_arguments(p: argparse.ArgumentParser, out: str, size: str) -> None:
    p.add_argument("image", help="an image file")
    p.add_argument("--out", help=f"output PNG (default: {out})")
    p.add_argument("--size", type=int, help=f"resize the longer side to N pixels (default: {size})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: a GPU if there is one)")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "heatmap",
        help="a class's coarse score grid and dense map over an image (FCN Sec. 3.1: coarse vs dense)",
        description="Show, for one class, the coarse score grid of a convolutionalized classifier or "
        "segmentation model over the image, beside the dense map made from it.",
    )
    _common_arguments(p, "<image>_heatmap_<class>.png", "unchanged; 500 with --classifier")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a densepred training checkpoint (FCN, DeepLab, U-Net)")
    source.add_argument(
        "--classifier", choices=["vgg16"], help="an ImageNet classifier made fully convolutional (needs --weights)"
    )
    p.add_argument(
        "--weights",
        help="released weights by name (fcn8s.voc_caffe); with --classifier: torchvision VGG16 weights "
        "(path, URL, or 'imagenet')",
    )
    p.add_argument("--weights-file", default=None, help="with --weights NAME: a copy of the released file on disk")
    p.add_argument("--class", dest="class_", required=True, help="class name (from the checkpoint) or id")
    p.set_defaults(func=_checked_heatmap)

    p = subparsers.add_parser(
        "features",
        help="the strongest channels of chosen layers, shallow to deep (ZFNet-style feature maps)",
        description="Save a grid of the strongest channels of chosen layers: shallow layers see edges "
        "and colours at full resolution, deep layers parts at a coarse stride.",
    )
    _common_arguments(p, "<image>_features.png", "unchanged")
    add_model_source(p)
    p.add_argument(
        "--layers",
        nargs="+",
        help="module names or unique suffixes, e.g. conv1_2 conv3_3 conv5_3 fc7 (default: per model family)",
    )
    p.add_argument("--top-k", type=int, default=8, help="channels per layer (default 8)")
    p.set_defaults(func=_cmd_features)


def _checked_heatmap(args: argparse.Namespace) -> int:
    if args.classifier and not args.weights:
        raise ValueError("--classifier vgg16 needs --weights PATH (torchvision's vgg16-397923af.pth, or 'imagenet')")
    if args.checkpoint and args.weights:
        raise ValueError("--weights NAME replaces --checkpoint (released weights); give one of them")
    if not (args.checkpoint or args.classifier or args.weights):
        raise ValueError("give --checkpoint CKPT, --weights NAME (released weights) or --classifier vgg16")
    return _cmd_heatmap(args)
