"""The Python API a notebook user finds in ``densepred``: train, load, evaluate, predict."""

import numpy as np

import densepred
from tiny import TINY


def test_the_top_level_api_trains_loads_evaluates_and_predicts(tmp_path):
    exp = densepred.load_experiment("synthetic_unet", [*TINY, "train.iterations=2"])
    result = densepred.train(exp, tmp_path, progress=False)
    assert isinstance(result, densepred.TrainResult) and result.iterations == 2
    trained = densepred.load_trained(result.checkpoint)
    assert isinstance(trained, densepred.Trained) and trained.class_names[0] == "background"

    from densepred.build import build_dataset

    val = build_dataset(trained.experiment, "val", train=False)
    metrics = densepred.evaluate(trained.model, val, densepred.EvalConfig(max_images=2, amp="none"), progress=False)
    assert 0 <= metrics["miou"] <= 1

    image = val.load(0).image
    (labels,) = densepred.predict(result.checkpoint, [image])
    assert labels.shape == image.shape[:2] and labels.dtype == np.uint8
    assert labels.max() < trained.num_classes
