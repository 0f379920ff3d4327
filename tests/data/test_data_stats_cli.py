"""Statistics (frequencies, median-frequency weights, chart) and the `densepred data` commands."""

from __future__ import annotations

import numpy as np
import pytest
from fakedata import make_camvid, save

from densepred.cli import main
from densepred.data import compute_stats, create_dataset, format_stats, median_frequency_weights, save_bar_chart


def run_cli(*argv: str) -> int:
    return main(list(argv))


def small_camvid(root):
    """Two 2x4 label maps whose statistics are easy to count by hand."""
    masks = [np.array([[0, 0, 0, 1], [0, 0, 11, 11]], np.uint8), np.array([[2, 2, 2, 2], [2, 2, 1, 1]], np.uint8)]
    for i, m in enumerate(masks):
        save(root / "train" / f"{i}.png", np.zeros((2, 4, 3), np.uint8))
        save(root / "trainannot" / f"{i}.png", m)
    return root


def test_stats_counts_and_median_frequency_weights(tmp_path):
    stats = compute_stats(create_dataset("camvid", root=small_camvid(tmp_path)))
    assert stats.num_images == 2 and stats.image_sizes == {(2, 4): 2} and stats.ignored_pixels == 2
    np.testing.assert_array_equal(stats.pixel_counts[:3], [5, 3, 6])
    np.testing.assert_array_equal(stats.present_pixels[:3], [8, 16, 8])
    # freq = pixels / pixels of the images where the class occurs: 5/8, 3/16, 6/8; median 5/8.
    np.testing.assert_allclose(median_frequency_weights(stats)[:3], [1.0, (5 / 8) / (3 / 16), (5 / 8) / (6 / 8)])
    assert median_frequency_weights(stats)[3:].sum() == 0  # absent classes get no weight
    report = format_stats(stats)
    assert "ignored: 2 (12.50 %)" in report and "4x2: 2" in report


def test_bar_chart_is_written(tmp_path):
    stats = compute_stats(create_dataset("synthetic", split="val", num_images=4, size=32))
    path = save_bar_chart(stats, tmp_path / "charts" / "freq.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_cli_stats_detects_the_layout(tmp_path, capsys):
    root = make_camvid(tmp_path / "camvid")
    assert run_cli("data", "stats", str(root), "--chart", str(tmp_path / "c.png"), "--no-progress") == 0
    out = capsys.readouterr().out
    assert "dataset: camvid" in out and "median-freq weight" in out and "pedestrian" in out
    assert (tmp_path / "c.png").exists()


def test_cli_stats_reads_a_folder_without_split_sub_folders_whole(tmp_path, capsys):
    (tmp_path / "classes.yaml").write_text("classes: [background, cell]\n")
    for i in range(3):
        save(tmp_path / "images" / f"{i}.png", np.zeros((4, 4, 3), np.uint8))
        save(tmp_path / "masks" / f"{i}.png", np.full((4, 4), i % 2, np.uint8))
    assert run_cli("data", "stats", str(tmp_path), "--dataset", "folder", "--no-progress") == 0
    out = capsys.readouterr().out
    assert "split: all" in out and "images: 3" in out
    assert run_cli("data", "stats", str(tmp_path), "--dataset", "folder", "--split", "train", "--no-progress") == 2
    assert "pass split='all'" in capsys.readouterr().err  # a split named explicitly must exist


def test_cli_stats_synthetic_and_errors(tmp_path, capsys):
    assert run_cli("data", "stats", "--dataset", "synthetic", "--split", "val", "--limit", "3", "--no-progress") == 0
    assert "images: 3" in capsys.readouterr().out
    assert run_cli("data", "stats", str(tmp_path), "--no-progress") == 2  # a user error, as in every command
    assert "no known layout" in capsys.readouterr().err


def test_cli_download_cityscapes_prints_instructions(tmp_path, capsys):
    assert run_cli("data", "download", "cityscapes", "--root", str(tmp_path)) == 1
    assert "cityscapes-dataset.com" in capsys.readouterr().out


def test_cli_download_unknown_name(tmp_path, capsys):
    assert run_cli("data", "download", "vocc", "--root", str(tmp_path)) == 2
    assert "Did you mean: voc" in capsys.readouterr().err


def test_cli_list(capsys):
    assert run_cli("data", "list") == 0
    out = capsys.readouterr().out
    assert "synthetic" in out and "built in" in out and "manual download" in out


def test_cli_needs_a_subcommand():
    with pytest.raises(SystemExit):
        run_cli("data")
