"""Backbones: feature extractors returning a dict of named maps with declared channels/stride."""

from .resnet import ResNet
from .vgg import VGG16, vgg16_classifier

__all__ = ["ResNet", "VGG16", "vgg16_classifier"]
