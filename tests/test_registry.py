import pytest
from torch import nn

import densepred
from densepred.registry import UnknownModelError, register_model

ALL_MODELS = [
    "fcn32s",
    "fcn16s",
    "fcn8s",
    "fcn8s_atonce",
    "deeplab_v1_largefov",
    "deeplab_v1_7x7",
    "deeplab_v2_resnet101",
    "deeplab_v2_vgg16",
    "unet",
    "unet_padded",
]


def test_every_issue_model_is_registered():
    assert set(ALL_MODELS) <= set(densepred.list_models())


def test_list_models_filters_with_a_pattern():
    assert densepred.list_models("fcn*") == [
        "fcn16s",
        "fcn32s",
        "fcn8s",
        "fcn8s_atonce",
        "fcn_resnet101",
        "fcn_resnet50",
    ]
    assert densepred.list_models("nothing*") == []


def test_unknown_name_lists_close_matches():
    with pytest.raises(UnknownModelError, match="fcn8s") as err:
        densepred.create_model("fcn8")
    assert "Did you mean" in str(err.value)


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_model("fcn8s", paper="x", output_stride=8, receptive_field=1, default_size=1)(lambda: nn.Identity())


def test_models_command_prints_every_model(capsys):
    from densepred.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ALL_MODELS:
        assert name in out
    assert "404 px" in out and "31.03M" in out
