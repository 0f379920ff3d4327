"""densepred.data: segmentation datasets, joint transforms, downloads and statistics.

Every dataset yields ``{"image": float32 (C, H, W), "mask": int64 (H, W), "name": str}`` with
mask values in ``[0, num_classes)`` or 255 (ignored)::

    from densepred.data import create_dataset, deeplab_train
    train = create_dataset("camvid", root="data/camvid", split="train", transform=deeplab_train(crop=321))
    toy = create_dataset("synthetic", split="train", num_images=500, size=128, seed=0)
"""

from .base import Sample, SegmentationDataset, Transform
from .download import download_dataset, is_downloaded
from .errors import DataError, DownloadError, ManualDownloadRequired, UnknownDatasetError
from .factory import DATASETS, create_dataset, dataset_entry, detect_dataset, list_datasets
from .labels import IGNORE_INDEX, LabelMap, bitwise_palette, colorize, downsample_labels
from .loader import make_loader, worker_init
from .normalization import CAFFE_BGR, CAFFE_DEEPLAB, IMAGENET, UNIT, Normalization
from .sources import SOURCES, Archive, DatasetSource
from .stats import DatasetStats, compute_stats, format_stats, median_frequency_weights, save_bar_chart
from .transforms import JointTransform, build_transforms, deeplab_train, eval_transform, unet_train

__all__ = [
    "IGNORE_INDEX",
    "Sample",
    "SegmentationDataset",
    "Transform",
    "create_dataset",
    "list_datasets",
    "dataset_entry",
    "detect_dataset",
    "DATASETS",
    "Normalization",
    "IMAGENET",
    "CAFFE_BGR",
    "CAFFE_DEEPLAB",
    "UNIT",
    "JointTransform",
    "build_transforms",
    "deeplab_train",
    "unet_train",
    "eval_transform",
    "LabelMap",
    "downsample_labels",
    "bitwise_palette",
    "colorize",
    "make_loader",
    "worker_init",
    "Archive",
    "DatasetSource",
    "SOURCES",
    "download_dataset",
    "is_downloaded",
    "DatasetStats",
    "compute_stats",
    "median_frequency_weights",
    "format_stats",
    "save_bar_chart",
    "DataError",
    "DownloadError",
    "ManualDownloadRequired",
    "UnknownDatasetError",
]
