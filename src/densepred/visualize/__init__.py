"""Seeing what a dense predictor computes: class heat maps and feature maps.

Heat maps. A classifier whose fully connected layers are read as convolutions "can produce a
heat map" (Long et al. 2015, FCN, Sec. 3.1 and Fig. 2): on an image larger than its training
size it scores one window every ``stride`` pixels (32 for VGG16). :func:`classifier_heatmap`
shows that coarse grid for an ImageNet classifier and the dense map FCN-32s makes of it with a
fixed bilinear deconvolution (Sec. 3.3); :func:`class_heatmaps` shows the same pair for a
trained segmentation model: FCN's stride-32 ``score_fr`` map against its fused output,
DeepLab's stride-8 scores (Chen et al. 2015, Sec. 3.1) against their interpolation. Both give
softmax probabilities, not logits: a probability reads the same for every model and class.

Feature maps. Shallow layers respond to edges and colours, deep layers to parts and whole
objects (Zeiler & Fergus 2014, ZFNet, Sec. 4 and Fig. 2); FCN's skip architecture fuses
"deep, coarse, semantic" with "shallow, fine, appearance" information (FCN Sec. 4.2).
:func:`feature_maps` records chosen layers with forward hooks and keeps their strongest
channels; :func:`plot_feature_grid` shows them one layer per row, shallow rows first.

Modules: :mod:`.heatmaps`, :mod:`.features` and their :mod:`.figures`; ``densepred heatmap``
and ``densepred features`` (:mod:`densepred.cli.visual`) are thin commands over them.
"""

from .features import LayerFeatures, default_layers, feature_maps, resolve_layer
from .figures import plot_feature_grid, plot_heatmaps
from .heatmaps import HeatMaps, check_class, class_heatmaps, classifier_heatmap

__all__ = [
    "HeatMaps",
    "LayerFeatures",
    "check_class",
    "class_heatmaps",
    "classifier_heatmap",
    "default_layers",
    "feature_maps",
    "plot_feature_grid",
    "plot_heatmaps",
    "resolve_layer",
]
