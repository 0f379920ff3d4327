"""densepred: semantic segmentation (dense prediction) faithful to FCN, DeepLab and U-Net.

The Python API in a few names::

    model = densepred.create_model("fcn8s", num_classes=21)       # densepred.list_models("fcn*")
    result = densepred.train(densepred.load_experiment("synthetic_unet"), "runs/demo")
    trained = densepred.load_trained(result.checkpoint)             # model, classes, palette, recipe
    metrics = densepred.evaluate(trained.model, dataset, trained.experiment.eval)
    labels = densepred.predict(result.checkpoint, ["photo.png"])    # or densepred.Predictor
"""

from . import models  # noqa: F401  (imports every family, which registers its builders)
from ._version import __version__
from .checkpoint import Trained, load_trained
from .config import EvalConfig, Experiment, load_experiment
from .evaluation import evaluate
from .models.convolutionalize import convolutionalize
from .models.layers import BilinearDeconv, bilinear_kernel
from .prediction import Predictor, predict
from .registry import UnknownModelError, create_model, list_models, model_entry
from .trainer import TrainResult, train

__all__ = [
    "__version__",
    "BilinearDeconv",
    "EvalConfig",
    "Experiment",
    "Predictor",
    "TrainResult",
    "Trained",
    "UnknownModelError",
    "bilinear_kernel",
    "convolutionalize",
    "create_model",
    "evaluate",
    "list_models",
    "load_experiment",
    "load_trained",
    "model_entry",
    "predict",
    "train",
]
