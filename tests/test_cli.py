"""The command line: inference options generated from EvalConfig (one spelling, one default),
and one exit-code rule for every command group."""

import pytest

from densepred.cli import build_parser, main
from densepred.cli.options import INFERENCE_HELP, inference_options
from densepred.config import EvalConfig
from densepred.crf import PRESETS


def _predict_args(*extra: str):
    return build_parser().parse_args(["predict", "--checkpoint", "c.pt", "in.png", "--out", "o", *extra])


def test_every_inference_option_is_an_eval_config_field():
    assert set(INFERENCE_HELP) <= set(EvalConfig.__dataclass_fields__)


def test_no_option_given_means_the_config_defaults():
    assert inference_options(_predict_args()) == EvalConfig()


def test_options_given_become_the_config():
    args = _predict_args(
        *("--mode", "slide", "--tile", "64", "--scales", "0.5", "1", "--flip", "--fusion", "max"),
        *("--crf", "deeplab_v2", "--crf-param", "w1=5", "--batch-size", "3", "--amp", "none"),
    )
    expected = EvalConfig(
        mode="slide", tile=64, scales=[0.5, 1.0], flip=True, fusion="max", crf="deeplab_v2", crf_params={"w1": 5.0}
    )
    expected.batch_size, expected.amp = 3, "none"
    assert inference_options(args) == expected


def test_base_options_are_kept_where_the_command_line_is_silent():
    base = EvalConfig(mode="slide", tile=128, scales=[0.75, 1.0])
    assert inference_options(_predict_args("--flip"), base) == EvalConfig(
        mode="slide", tile=128, scales=[0.75, 1.0], flip=True
    )


def test_crf_choices_are_the_presets():
    parser = build_parser()
    predict = parser._subparsers._group_actions[0].choices["predict"]  # argparse keeps no public handle
    crf = next(a for a in predict._actions if a.dest == "crf")
    assert crf.choices == sorted(PRESETS)


@pytest.mark.parametrize(
    ("extra", "message"),
    [(("--overlap", "1.5"), "--overlap must be in"), (("--crf-param", "w1"), "must look like name=number")],
)
def test_bad_values_name_the_option(extra, message):
    with pytest.raises(ValueError, match=message):
        inference_options(_predict_args(*extra))


def test_user_errors_exit_2_with_one_line_in_every_group(tmp_path, capsys):
    missing = str(tmp_path / "missing.pt")
    for argv in (
        ["eval", "--checkpoint", missing],
        ["export", "--checkpoint", missing],
        ["heatmap", str(tmp_path / "x.png"), "--checkpoint", missing, "--class", "1"],
        ["data", "stats", str(tmp_path)],
        ["train", "--config", "no_such_recipe"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"densepred {' '.join(argv[:2]) if argv[0] == 'data' else argv[0]}: error:"), err
        assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--port", "99999", "must be between 0 and 65535"),
        ("--max-pixels", "-5", "must be >= 1"),
        ("--max-upload-mb", "-1", "must be >= 0.001"),
        ("--max-upload-mb", "nan", "out of range"),
        ("--concurrency", "0", "must be >= 1"),
        ("--port", "http", "is not an integer"),
    ],
)
def test_serve_numbers_are_range_checked_where_they_are_parsed(option, value, message, capsys):
    """Before: --port 99999 was an OverflowError traceback; negative limits were accepted."""
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--checkpoint", "c.pt", option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and message in err
