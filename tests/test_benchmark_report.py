"""The benchmark page keeps figures whose results are not on this machine."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import keep_previous  # noqa: E402

OLD = """# Benchmarks

intro

## Speed and memory

Machine A.

### Inference

old inference table

### Successors

old successors

## Accuracy on real data

### ISBI

old isbi table
"""


def test_a_section_without_results_keeps_the_previous_page_text() -> None:
    new = """# Benchmarks

new intro

## Speed and memory

No speed results yet: `python -m benchmarks speed`.

### Successors

new successors

## Accuracy on real data

No accuracy results yet: `python -m benchmarks accuracy`.
""".splitlines()
    page = "\n".join(keep_previous(new, OLD.splitlines()))
    assert "new intro" in page and "intro\n" not in page.replace("new intro\n", "")
    # The speed section's own tables come back; the successors, re-measured, are the new ones.
    assert "Machine A." in page and "old inference table" in page
    assert "new successors" in page and "old successors" not in page
    assert page.index("### Inference") < page.index("### Successors")
    assert "old isbi table" in page and "No accuracy results yet" not in page


def test_a_subsection_without_results_takes_its_old_block_and_fresh_results_win() -> None:
    new = """# Benchmarks

## Speed and memory

Machine B.

### Inference

new inference table

### Successors

No results yet: `python -m benchmarks.successors`.

### Roofline

No results yet: `python -m benchmarks roofline`.
""".splitlines()
    page = "\n".join(keep_previous(new, OLD.splitlines()))
    assert "new inference table" in page and "old inference table" not in page
    assert "old successors" in page and "Machine B." in page and "Machine A." not in page
    # Nothing old to keep: the section says how to produce it.
    assert "No results yet: `python -m benchmarks roofline`." in page
    assert "old isbi table" not in page  # new has no accuracy section: none is invented


def test_a_dataset_whose_runs_are_not_all_here_keeps_its_previous_table(tmp_path) -> None:
    import json

    from benchmarks.accuracy import RUNS
    from benchmarks.report import _accuracy_section

    from densepred.precision import machine_info

    for run in RUNS:
        if run.dataset != "isbi2012":
            continue
        folder = tmp_path / run.name
        folder.mkdir()
        result = {
            "run": run.name,
            "dataset": run.dataset,
            "model": run.model_note,
            "iterations": 100,
            "train_seconds": 240.0,
            "scores": {"pixel_error": 0.1, "rand_error": 0.2, "membrane_iou": 0.5},
            "machine": machine_info().to_dict(),
        }
        (folder / "result.json").write_text(json.dumps(result))
    (tmp_path / RUNS[-1].name).mkdir(exist_ok=True)  # one CamVid run begun, none finished
    lines = _accuracy_section(tmp_path, tmp_path / "figures")
    page = "\n".join(lines)
    assert all(run.name in page for run in RUNS if run.dataset == "isbi2012")
    assert f"*Measured on: {machine_info().line()}.*" in page
    assert "No complete camvid results yet" in page and "--only camvid_" in page
    camvid = "### CamVid (11 classes, 360x480): train (367) -> val (101)"
    old = ["## Accuracy on real data", "", camvid, "", "old camvid"]
    kept = "\n".join(keep_previous(["## Accuracy on real data", "", *lines], old))
    assert "old camvid" in kept and "No complete camvid" not in kept and "isbi_unet_padded" in kept


def _recipe_run(runs: Path, iterations: int, seconds: float, miou: float, pixel_acc: float, isa: str) -> str:
    """The first CamVid recipe's run folder under ``runs`` (final metrics, the log's start line); its name."""
    import json

    from benchmarks.report import CAMVID_RECIPE_RUNS

    recipe, folder, _ = CAMVID_RECIPE_RUNS[0]
    run = runs / folder
    run.mkdir()
    metrics = {"iterations": iterations, "train_seconds": seconds, "miou": miou, "pixel_acc": pixel_acc}
    (run / "metrics.json").write_text(json.dumps(metrics))
    machine = {"cpu": "Some CPU", "capability": isa, "native_bf16": isa != "AVX2", "cores": 2, "threads": 2}
    start = {"iter": 0, "event": "start", "machine": {**machine, "torch": "2.13.0+cpu", "gpu": None}}
    (run / "log.jsonl").write_text(json.dumps(start) + "\n")
    return recipe


def test_the_recipe_table_reads_the_run_folders_and_says_when_they_are_absent(tmp_path) -> None:
    from benchmarks.report import CAMVID_RECIPE_RUNS, MISSING, _recipe_block

    absent = _recipe_block(tmp_path)
    assert any(MISSING in line for line in absent)  # so the page keeps its previous table
    recipe = _recipe_run(tmp_path, 345, 492.0, 0.1581, 0.3967, "AVX2")
    block = _recipe_block(tmp_path)
    assert not any(MISSING in line for line in block)
    row = next(line for line in block if line.startswith(f"| {recipe} |"))
    assert row.endswith("| 345 | 8.2 | 15.8 | 39.7 |")
    assert any("Some CPU" in line and "AVX2" in line for line in block)
    assert not any(line.startswith(f"| {CAMVID_RECIPE_RUNS[1][0]} |") for line in block)  # its folder is absent


def test_recipe_runs_render_without_the_accuracy_benchmark_and_its_old_tables_stay(tmp_path) -> None:
    from benchmarks.report import _accuracy_section

    recipe = _recipe_run(tmp_path, 1007, 605.0, 0.4932, 0.7682, "AVX512")
    bench = tmp_path / "bench"  # no accuracy results in it
    bench.mkdir()
    section = _accuracy_section(bench, tmp_path / "figures")
    assert any(line.startswith(f"| {recipe} |") and "| 1007 |" in line for line in section)
    old = OLD + "\n### CamVid: the successors' CPU recipes\n\nold recipe table\n"
    new = ["# Benchmarks", "", "## Accuracy on real data", "", *section]
    page = "\n".join(keep_previous(new, old.splitlines()))
    assert "old isbi table" in page and "No accuracy results yet" not in page
    assert "| 1007 |" in page and "old recipe table" not in page
    assert page.index("### ISBI") < page.index("### CamVid: the successors' CPU recipes")


def test_the_crf_lines_name_the_kernels_and_the_ratio() -> None:
    from benchmarks.report import _crf_line

    entry = {"image": "500x375 synthetic", "classes": 21, "iterations": 10, "ours_s": 0.8, "pydensecrf_s": 1.4}
    new = _crf_line({**entry, "agreement": 0.9995, "rounds": 7, "capability": "AVX2"}, "As an AVX2 CPU")
    assert new.startswith("- As an AVX2 CPU, PyTorch kernels AVX2:") and "(**1.75x**)" in new
    assert "99.95% of pixels (best of 7 rounds in alternation)" in new
    older = _crf_line({**entry, "agreement": 0.99}, "Natively")  # results from before the rounds were stored
    assert "PyTorch kernels" not in older and "(best of 5 each)" in older
    assert "pydensecrf" not in _crf_line({k: entry[k] for k in ("image", "classes", "iterations", "ours_s")}, "x")


def test_each_kind_of_cpu_keeps_its_own_block_of_a_per_machine_benchmark() -> None:
    from benchmarks.report import _per_machine

    def table(results: dict) -> str:
        return f"table of {results['machine']['capability']}"

    title = "### The fp32 limit on record"
    old = ["## Speed and memory", "", f"{title} — AVX512", "", "avx512 table", f"{title} — AVX2", "", "old avx2 table"]
    avx2 = _per_machine("The fp32 limit on record", "cmd", {"machine": {"capability": "AVX2"}}, table)
    page = "\n".join(keep_previous(["## Speed and memory", "", *avx2], old))
    # This machine's block is re-measured, the other kind's is kept after it.
    assert "table of AVX2" in page and "old avx2 table" not in page and "avx512 table" in page
    assert page.index(f"{title} — AVX2") < page.index(f"{title} — AVX512")
    # A machine without the results keeps every kind's block, and says nothing of a missing one.
    absent = _per_machine("The fp32 limit on record", "cmd", None, table)
    page = "\n".join(keep_previous(["## Speed and memory", "", *absent], old))
    assert "avx512 table" in page and "old avx2 table" in page and "No results yet" not in page
    # The section's own text has no results here either: each block still comes once.
    own = ["## Speed and memory", "", "No speed results yet: `x`.", "", *avx2]
    page = "\n".join(keep_previous(own, ["## Speed and memory", "", "Machine A.", "", *old[2:]]))
    assert page.count(f"{title} — AVX512") == 1 and page.count(f"{title} — AVX2") == 1 and "Machine A." in page
    # Another AVX-512 core design gets a block of its own beside the untagged AVX-512 one.
    zen5 = _per_machine(
        "The fp32 limit on record", "cmd", {"machine": {"capability": "AVX512", "microarchitecture": "Zen 5"}}, table
    )
    page = "\n".join(keep_previous(["## Speed and memory", "", *zen5], old))
    assert f"{title} — AVX512, Zen 5" in page and "avx512 table" in page and "old avx2 table" in page
    # Nothing measured anywhere yet: the block says how to measure it.
    page = "\n".join(keep_previous(["## Speed and memory", "", *absent], ["## Speed and memory", ""]))
    assert "No results yet: `cmd`." in page


def test_the_int8_table_names_the_ceiling_and_its_weight_range() -> None:
    from benchmarks.int8 import table

    machine = {"cpu": "AMD EPYC", "capability": "AVX2"}
    gops = {"eager fp32": 170.0, "onnxruntime fp32": 180.0, "onnxruntime int8": 255.0}
    ceiling = {"machine": machine, "shape": "3x3 conv 256ch@128^2", "weights_7_bit": True, "gops": gops}
    text = table({"ceiling": {**ceiling, "int8_over_eager_fp32": 1.5}})
    assert "AMD EPYC (AVX2, 7-bit weights: no VNNI)" in text and "x1.50" in text and "onnxruntime int8 255" in text
    assert "no VNNI" not in table({"ceiling": {**ceiling, "weights_7_bit": False, "int8_over_eager_fp32": 2.5}})
    # Capped at AVX2, PyTorch's oneDNN int8 is the figure (ONNX Runtime ignores the cap).
    capped = {**ceiling, "gops": {**gops, "torch int8 (onednn)": 320.0}, "torch_int8_over_eager_fp32": 1.88}
    line = table({"ceiling_avx2": capped}).splitlines()[0]
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in line and "oneDNN int8 320 GOP/s, **x1.88**" in line


def test_the_crf_results_file_gives_a_block_headed_by_its_vector_isa(tmp_path) -> None:
    import json

    from benchmarks.report import _speed_limit_sections

    entry = {"image": "500x375 synthetic", "classes": 21, "iterations": 10, "rounds": 5, "capability": "AVX2"}
    entry.update(ours_s=0.96, pydensecrf_s=1.566, agreement=0.99949)
    (tmp_path / "crf.json").write_text(json.dumps({"machine": {"cpu": "AMD EPYC", "capability": "AVX2"}, "crf": entry}))
    lines = _speed_limit_sections(tmp_path)
    block = lines[lines.index("### CRF against pydensecrf — AVX2") :]
    line = next(text for text in block if text.startswith("- Natively"))
    assert "densepred 0.960 s, pydensecrf 1.566 s (**1.63x**)" in line and "99.95% of pixels" in line
    # The other benchmarks, absent here, say how to produce them (and a page keeps their old blocks).
    assert "No results yet: `python -m benchmarks roofline`." in lines


def test_int8_force_measures_again_only_what_the_run_measures() -> None:
    """``--force`` with one checkpoint re-measures its rows, the 256x256 rows and the ceiling, and
    keeps another checkpoint's rows and accuracy."""
    from benchmarks.int8 import SPEED_MODELS_256, forget_measured

    mine, other = Path("runs/a/best.pt"), "runs/b/best.pt"
    rows = {str(mine): {}, other: {}, **{f"{name} 256x256": {} for name in SPEED_MODELS_256}}
    results = {
        "accuracy": {f"{mine}|32": {}, f"{other}|32": {}, f"{mine}|8": {}, f"{mine}|32|percentile": {}},
        "ceiling": {},
        "ceiling_avx2": {},
        "speed": {"rows": dict(rows)},
        "speed_1_thread": {"rows": dict(rows)},
    }
    forget_measured(results, mine, 32, "minmax")
    kept = {f"{other}|32", f"{mine}|8", f"{mine}|32|percentile"}  # another calibration's row is another row
    assert set(results["accuracy"]) == kept and not {"ceiling", "ceiling_avx2"} & set(results)
    assert set(results["speed"]["rows"]) == set(results["speed_1_thread"]["rows"]) == {other}


def test_the_pipeline_table_shows_what_reading_the_frame_and_writing_its_mask_cost() -> None:
    """Reading the frame and writing its mask are the floor no predict avoids: their share of the forward is printed
    beside the file I/O (an older results file without it still renders)."""
    from benchmarks.pipeline import table

    machine = {"cpu": "AMD EPYC", "capability": "AVX512", "native_bf16": True, "cores": 2, "threads": 2}
    row = {"backend": "openvino", "forward": 0.020, "file_io": 0.013, "predict": 0.034, "ratio": 1.7}
    row["slide"] = {"tiles": 4, "tile_forward": 0.01, "slide": 0.04, "ratio": 1.0}
    results = {"machine": {**machine, "torch": "2.13.0+cpu", "gpu": None}, "frame": "f", "repeats": 5}
    line = next(
        s for s in table({**results, "models": {"m": {**row, "read_and_mask": 0.004}}}).splitlines() if "| m |" in s
    )
    assert "| 0.013 (65%; reading + mask 20%) |" in line and "1.700x" in line
    old = next(s for s in table({**results, "models": {"m": row}}).splitlines() if "| m |" in s)
    assert "| 0.013 (65%) |" in old
    # The header names the files predict wrote: both PNGs in results from before the JPEG overlay.
    assert "reading + both PNGs" in table({**results, "models": {"m": row}})
    assert "reading + mask PNG + overlay JPEG" in table({**results, "overlay": "jpg", "models": {"m": row}})
    # How the frame was decoded, the tiles batched and the forward timed: older results say what they did.
    before = table({**results, "models": {"m": row}})
    assert "decoded by OpenCV" in before and "1 tile per forward pass" in before and "timed straight after" in before
    now = {"png_decoder": "libspng", "tiles_per_forward": 4, "forward_settled": True}
    after = table({**results, **now, "models": {"m": row}})
    assert "decoded by libspng" in after and "4 tiles per forward pass" in after and "timed straight after" not in after
    # The folder's frames at once, where predict ran more than one (older results: one at a time).
    folder = {"frames": 10, "predict_per_frame": 0.018, "ratio_per_frame": 0.9}
    assert "| 0.018 (10 frames) | 0.900x |" in table({**results, "models": {"m": {**row, **folder}}})
    two = table({**results, "models": {"m": {**row, **folder, "streams": 2}}})
    assert "| 0.018 (10 frames, 2 at once) | 0.900x |" in two


def test_the_train_layout_table_gives_each_recipe_its_speed_up_and_setting() -> None:
    from benchmarks.train_layout import table

    machine = {"cpu": "AMD EPYC", "capability": "AVX512", "threads": 2, "torch": "2.13.0+cpu"}
    row = {"model": "segnet", "batch": 4, "crop": 160, "amp": "bf16", "recipe_channels_last": False}
    row["seconds"] = {"channels-first": 1.0, "channels-last": 1.25}
    results = {"machine": machine, "recipes": {"camvid_segnet_cpu": {**row, "speedup": 0.8}}}
    text = table({**results, "avx2": {**results, "recipes": {"camvid_segnet_cpu": {**row, "speedup": 0.8}}}})
    line = "| camvid_segnet_cpu | segnet | 4 x 160 | bf16 | 1.000 | 1.250 | **x0.80** | channels-first |"
    assert text.count(line) == 2 and "ONEDNN_MAX_CPU_ISA=AVX2" in text


def test_the_train_layout_benchmark_times_every_cpu_recipe_that_trains_channels_last() -> None:
    """Every shipped recipe that sets ``model.channels_last`` is among those the benchmark times
    (its figures are the setting's reason), and each of those builds without its dataset's files."""
    from benchmarks.train_layout import DATASETS, RECIPES

    from densepred.config import CONFIG_DIR, load_experiment

    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        if load_experiment(path.stem, []).model.channels_last:
            assert path.stem in RECIPES, path.name
    assert all(load_experiment(name, []).data.dataset in DATASETS for name in RECIPES)


def test_the_int8_profile_times_both_graphs_by_kind_and_says_what_2x_leaves() -> None:
    """ONNX Runtime's profile of a small int8 net and its fp32 graph: each convolution kind timed,
    and the 2x line says whether the int8 convolutions alone fit in half the eager forward."""
    import pytest
    import torch
    from torch import nn

    pytest.importorskip("onnxruntime")
    from benchmarks.int8_profile import by_kind, kind_of, profile_lines, run_profile

    assert (kind_of("QLinearConv"), kind_of("QLinearMul"), kind_of("DequantizeLinear")) == (
        "convolutions",
        "uint8 element-wise and pooling",
        "quantise/dequantise",
    )
    assert (kind_of("Resize"), kind_of("Transpose")) == ("float operators", "layout")
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
    net.append(nn.Conv2d(16, 2, 1))
    net.in_channels = 3
    p = run_profile(net.eval(), [torch.randn(1, 3, 48, 64)], "tiny")
    assert p["size"] == [48, 64] and "QLinearConv" in p["int8_ms_by_op"] and "QLinearConv" not in p["fp32_ms_by_op"]
    int8, fp32 = by_kind(p["int8_ms_by_op"]), by_kind(p["fp32_ms_by_op"])
    assert int8["convolutions"] > 0 and fp32["convolutions"] > 0 and fp32["quantise/dequantise"] == 0
    text = profile_lines(p)[0]
    assert text.startswith("Where tiny's int8 forward (48x64") and "2x asks" not in text
    assert "(**over** it)" in profile_lines(p, eager_fp32_s=1e-9)[0]  # no forward fits in a nanosecond
    assert "(within it)" in profile_lines(p, eager_fp32_s=100.0)[0]
