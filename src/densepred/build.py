"""Turning an :class:`~densepred.config.Experiment` into datasets and a model.

Shared by training, evaluation and prediction so that each builds exactly what the recipe
(or the checkpoint's saved recipe) says.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Experiment
from .data import (
    CAFFE_BGR,
    CAFFE_DEEPLAB,
    IMAGENET,
    UNIT,
    Normalization,
    SegmentationDataset,
    create_dataset,
    deeplab_train,
    eval_transform,
    unet_train,
)
from .footprint import check_model_size
from .models.layers import FrozenBatchNorm2d
from .registry import create_model

__all__ = ["NORMALIZATIONS", "normalization_for", "build_dataset", "build_model", "freeze_batch_norm"]

NORMALIZATIONS = {"imagenet": IMAGENET, "caffe": CAFFE_BGR, "caffe_deeplab": CAFFE_DEEPLAB, "unit": UNIT}


def normalization_for(name: str | Normalization, channels: int) -> Normalization:
    """The recipe's normalisation for images of ``channels`` channels (or a released net's own).

    ImageNet statistics are per RGB channel, so gray images are scaled to [0, 1] instead;
    Caffe's BGR mean needs RGB images.
    """
    if isinstance(name, Normalization):
        return name
    if name in ("caffe", "caffe_deeplab") and channels != 3:
        raise ValueError(f"data.normalization=caffe needs RGB images; these have {channels} channel(s)")
    return UNIT if name == "imagenet" and channels != 3 else NORMALIZATIONS[name]


def build_dataset(exp: Experiment, split: str, *, train: bool, seed: int | None = None) -> SegmentationDataset:
    """The recipe's dataset for ``split``, with training augmentation or the evaluation transform."""
    d = exp.data
    name, root = d.dataset, d.root
    if not train and d.val_dataset:
        name, root = d.val_dataset, d.val_root or d.root
    probe = create_dataset(name, root, split=split, **d.options)
    norm = normalization_for(d.normalization, probe.in_channels)
    if not train or d.augment == "none":
        transform = eval_transform(norm)
    elif d.augment == "deeplab":
        transform = deeplab_train(
            crop=d.crop or 321, scale=d.scale, flip=d.flip, normalization=norm, channels=probe.in_channels, seed=seed
        )
    else:
        transform = unet_train(crop=d.crop, flip=d.flip, normalization=norm, channels=probe.in_channels, seed=seed)
    probe.transform = transform
    return probe


def freeze_batch_norm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d with its statistics (Caffe ``use_global_stats``)."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                if child.affine:
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                if child.running_mean is not None:
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
            setattr(model, name, frozen.to(child.weight.device if child.affine else "cpu"))
        else:
            freeze_batch_norm(child)
    return model


def build_model(exp: Experiment, num_classes: int, in_channels: int) -> nn.Module:
    """The recipe's model, after its size was checked on the meta device (nothing allocated).

    Inside ``with torch.device("meta")`` (loading a checkpoint) the checked meta model is it.
    """
    m = exp.model
    model = check_model_size(exp, num_classes, in_channels)
    if torch.get_default_device().type != "meta":
        model = create_model(
            m.name, num_classes=num_classes, in_channels=in_channels, pretrained=m.pretrained, **m.options
        )
    if m.freeze_bn:
        freeze_batch_norm(model)
    return model
