"""Recipes: typed sections, overrides, clear errors; every shipped recipe is valid."""

import pytest
import yaml

from densepred.config import (
    CONFIG_DIR,
    ConfigError,
    Experiment,
    apply_overrides,
    experiment_from_dict,
    load_experiment,
    resolve_config,
)

SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_the_issue_recipes_are_shipped():
    for name in (
        "synthetic_unet",
        "fcn32s_voc",
        "fcn16s_voc",
        "fcn8s_voc",
        "fcn8s_atonce_voc",
        "deeplab_v1_largefov_voc",
        "deeplab_v2_resnet101_voc",
        "unet_isbi",
        "isbi_unet_cpu",
        "camvid_unet_cpu",
    ):
        assert name in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_load_and_round_trip(name):
    exp = load_experiment(resolve_config(name))
    assert exp.name == name and exp.notes
    again = experiment_from_dict(yaml.safe_load(exp.to_yaml()))
    assert again == exp


def test_paper_hyper_parameters_are_in_the_recipes():
    fcn = load_experiment(resolve_config("fcn32s_voc"))
    assert (fcn.optim.momentum, fcn.optim.lr, fcn.data.batch_size, fcn.train.loss) == (0.99, 1e-10, 1, "ce_sum")
    assert load_experiment(resolve_config("fcn16s_voc")).optim.lr == 1e-12
    assert load_experiment(resolve_config("fcn8s_voc")).optim.lr == 1e-14
    v1 = load_experiment(resolve_config("deeplab_v1_largefov_voc"))
    assert (v1.data.batch_size, v1.optim.lr, v1.optim.head_lr_mult) == (20, 1e-3, 10.0)
    assert (v1.schedule.policy, v1.schedule.step_size, v1.schedule.gamma) == ("step", 2000, 0.1)
    assert v1.train.loss_at_output_stride
    v2 = load_experiment(resolve_config("deeplab_v2_resnet101_voc"))
    assert (v2.schedule.policy, v2.schedule.power, v2.optim.lr, v2.data.batch_size) == ("poly", 0.9, 2.5e-4, 10)
    assert (v2.data.crop, v2.data.scale, v2.train.iterations, v2.model.options["msc"]) == (321, (0.5, 1.5), 20000, True)
    unet = load_experiment(resolve_config("unet_isbi"))
    assert (unet.optim.momentum, unet.data.batch_size, unet.train.loss) == (0.99, 1, "unet_weighted")


def test_overrides_are_typed_by_the_field():
    exp = load_experiment(
        None,
        [
            "optim.lr=1e-3",
            "data.scale=[0.5, 1.5]",
            "model.options.base_channels=8",
            "train.amp=bf16",
            "train.clip_grad_norm=null",
            "name=x",
        ],
    )
    assert exp.optim.lr == 1e-3 and isinstance(exp.optim.lr, float)
    assert exp.data.scale == (0.5, 1.5)
    assert exp.model.options == {"base_channels": 8}
    assert exp.train.amp == "bf16" and exp.train.clip_grad_norm is None and exp.name == "x"


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lrr=1", r"unknown key\(s\) optim.lrr; valid keys in 'optim': .*lr"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("train.amp=fp8", "train.amp must be one of 'auto', 'none', 'bf16', 'fp16'"),
        ("data.batch_size=2.5", "data.batch_size must be a whole number"),
        ("data.batch_size=0", "data.batch_size must be >= 1"),
        ("train.deterministic=maybe", "train.deterministic must be true or false"),
        ("data.scale=[2, 1]", r"data.scale must be \[min, max\]"),
        ("data.scale=[1]", "data.scale must have 2 values"),
        ("model.name=fcn9s", "unknown model 'fcn9s'"),
        ("optimizer.lr=1", "unknown section 'optimizer'"),
        ("lr", "must look like section.key=value"),
        ("eval.mode=slide", "needs eval.tile"),
        ("eval.streams=0", "eval.streams must be >= 1 or null, got 0"),
    ],
)
def test_bad_values_say_what_to_fix(override, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        load_experiment(None, [override])


def test_unknown_top_level_key_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: fcn8s}\nmodle: {}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown top-level key\(s\) modle"):
        load_experiment(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "missing.yaml")
    with pytest.raises(FileNotFoundError, match="shipped: .*synthetic_unet"):
        resolve_config("no_such_recipe")


def test_apply_overrides_does_not_mutate_its_input():
    raw = {"optim": {"lr": 0.1}}
    apply_overrides(raw, ["optim.lr=0.2"])
    assert raw == {"optim": {"lr": 0.1}}
    assert Experiment().validate().optim.lr == 0.01
