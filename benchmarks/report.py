"""docs/benchmarks.md from the JSON results of ``python -m benchmarks speed|system|accuracy``.

Every number in the page comes from a results file. A section whose file is missing keeps the
page's previous text for it, when the page has one (results measured elsewhere are not lost by
re-measuring one part here), or else says how to produce it. Pictures (accuracy-versus-time
curves, the CRF boundary crop) are written to docs/benchmarks/ next to the page.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from densepred.precision import MachineInfo

from .accuracy import CAMVID_PAPERS, ISBI_PAPER, RUNS, _curve
from .speed import _input_size, _paper_size


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(value, digits: int = 2, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _machine(results: dict | None) -> str:
    """The line under every table heading: a figure holds for the machine it was taken on."""
    m = (results or {}).get("machine")
    try:
        return f"*Measured on: {MachineInfo(**m).line()}.*"
    except TypeError:  # results written before the machine was recorded in full
        return "*Machine not recorded with these results: remeasure with `--force`.*"


def _heading(title: str, *results: dict | None) -> list[str]:
    """A table heading and the machine(s) its results were measured on."""
    machines = list(dict.fromkeys(_machine(r) for r in results))
    return [f"### {title}", "", *machines, ""]


def _speed_section(speed: dict | None) -> list[str]:
    if not speed:
        return ["No speed results yet: `python -m benchmarks speed`.", ""]
    out = _heading("Inference, eager fp32 (images/s, latency per batch, peak resident memory of the process)", speed)
    rows = []
    for name, r in speed.get("models", {}).items():
        paper = _input_size(name, _paper_size(name))
        small = _input_size(name, 256)
        cells = [name]
        for side in (paper, small):
            for batch in (1, 8):
                x = r.get(f"infer {side}x{side} b{batch}")
                cells.append(
                    "-" if x is None else f"{x['images_per_s']:.2f} / {x['latency_s']:.2f} s / {x['peak_rss_mib']:.0f}"
                )
        rows.append(cells)
    out += _table(
        ["model", "paper size, b1", "paper size, b8", "256 (U-Net valid: 268), b1", "256, b8"],
        rows,
    )
    out += [
        "",
        "Paper sizes: FCN 500x500, DeepLab 513x513, U-Net 572x572. Cell: images/s / seconds per batch / "
        "peak RSS in MiB.",
        "",
        *_heading("Variants at 256x256, batch 1 (speed-up over eager fp32 measured in the same run)", speed),
    ]
    rows = []
    names = ["channels-last", "bf16 autocast", "torch.compile", "onnxruntime"]
    for name, r in speed.get("models", {}).items():
        v = r.get("variants 256 b1")
        if not v:
            continue
        cells = [name, f"{1000 * v['eager fp32']['latency_s']:.0f} ms"]
        for key in names:
            x = v.get(key, {})
            cells.append(f"{x['speedup']:.2f}x" if "speedup" in x else "n/a")
        rows.append(cells)
    out += _table(["model", "eager fp32", *names], rows)
    out += [
        "",
        "The ratios are what carries to another machine, except bf16 autocast's: it holds where the CPU "
        "computes bfloat16 natively (AVX512-BF16 or AMX); an AVX2 CPU emulates it 25-70x slower than fp32, "
        "which is why `amp: auto` runs fp32 there.",
    ]
    out += ["", *_heading("Training step (forward, loss, backward, SGD) at the recipe's crop, batch 2", speed)]
    rows = []
    for name, r in speed.get("models", {}).items():
        t = r.get("train step")
        if t:
            rows.append([name, f"{t['crop']}x{t['crop']}", f"{t['images_per_s']:.2f}", f"{t['peak_rss_mib']:.0f}"])
    out += _table(["model", "crop", "images/s", "peak RSS (MiB)"], rows)
    return out + [""]


def _system_section(system: dict | None, speed: dict | None) -> list[str]:
    if not system:
        return ["No system results yet: `python -m benchmarks system`.", ""]
    out = _heading("Data loading against training, per shipped recipe", system)
    rows = []
    models = (speed or {}).get("models", {})
    for recipe, r in system.get("loader", {}).items():
        train = models.get(r["model"], {}).get("train step", {}).get("images_per_s")
        ok = "-" if train is None else ("yes" if r["images_per_s"] > train else "**no**")
        rows.append(
            [
                recipe,
                r["model"],
                r["data"],
                f"{r['images_per_s']:.1f}",
                _fmt(train),
                ok,
                f"{r['batch']} / {r['workers']}",
            ]
        )
    out += _table(
        ["recipe", "model", "images read", "loader img/s", "training img/s", "loader faster", "batch / workers"], rows
    )
    out += [
        "",
        "Loader: the recipe's own augmentation, crop and normalisation on real images (CamVid stands in for "
        "VOC-style RGB recipes, ISBI for the gray ones). Training: the speed table's step for the recipe's model.",
        "",
    ]
    t = system.get("trainer_overhead")
    if t:
        out += [
            *_heading("Trainer overhead", system),
            f"densepred's training loop {t['densepred_images_per_s']:.1f} images/s against a bare PyTorch loop "
            f"{t['bare_images_per_s']:.1f} images/s on the same model, data and batch ({t['recipe']}, best of "
            f"{len(t['runs']['bare'])} alternating runs): overhead **{t['overhead_percent']:+.1f}%** (bound: 5%).",
            "",
        ]
    crf_lines = [_crf_line(system[key], label) for key, label in CRF_ENTRIES if system.get(key)]
    if crf_lines:
        out += [*_heading("CRF", system), *crf_lines, ""]
    a = system.get("crf_agreement")
    if a:
        out += [
            "Label agreement with the exact O(N^2) CRF (`dense_crf_exact`), by input family "
            '(`benchmarks/crf_agreement.py`; "narrow": theta_alpha 5, theta_beta 10, the DeepLab v2 '
            "widths scaled to images 24-64 pixels a side):",
            "",
            *a["markdown"],
            "",
        ]
    return out


def _curves(results: dict, path: Path) -> bool:
    curves = {name: r["curve"] for name, r in results.items() if r.get("curve")}
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, dataset in zip(axes, ("isbi2012", "camvid"), strict=True):
        for name, curve in curves.items():
            if results[name]["dataset"] != dataset:
                continue
            ax.plot([p["time"] / 60 for p in curve], [p["miou"] for p in curve], marker="o", label=name)
        ax.set_title(f"{dataset}: validation mIoU over training time")
        ax.set_xlabel("minutes of training (2 CPU cores)")
        ax.set_ylabel("mIoU")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _accuracy_section(out_dir: Path, figures: Path) -> list[str]:
    results = {r.name: _load(out_dir / r.name / "result.json") for r in RUNS}
    results = {k: v for k, v in results.items() if v}
    for name, r in results.items():  # the log is the source; older results stored no curve
        r["curve"] = _curve(out_dir / name) or r.get("curve", [])
    recipes = _recipe_block(out_dir.parent)  # trained by `densepred train`, not by this benchmark
    if not results:
        return ["No accuracy results yet: `python -m benchmarks accuracy --data-root ../shared/data`.", "", *recipes]
    out: list[str] = []
    for dataset, block in (("isbi2012", _isbi_block), ("camvid", _camvid_block)):
        names = [run.name for run in RUNS if run.dataset == dataset]
        if all(name in results for name in names):
            out += block({name: results[name] for name in names}, figures)
        else:  # a table mixes no machines: the page keeps the complete one it has
            title = ACCURACY_TITLES[dataset]
            command = f"python -m benchmarks accuracy --data-root ../shared/data --only {','.join(names)}"
            out += [f"### {title}", "", f"No complete {dataset} results yet: `{command}`.", ""]
    if len(results) == len(RUNS) and _curves(results, figures / "accuracy_vs_time.png"):
        out += ["![validation mIoU over training time](benchmarks/accuracy_vs_time.png)", ""]
    return out + recipes


ACCURACY_TITLES = {
    "isbi2012": "ISBI 2012 membranes: train25 (slices 0-24) -> val5 (slices 25-29)",
    "camvid": "CamVid (11 classes, 360x480): train (367) -> val (101)",
}


def _isbi_block(results: dict[str, dict], figures: Path) -> list[str]:
    out = _heading(ACCURACY_TITLES["isbi2012"], *results.values())
    rows = []
    for name, r in results.items():
        s = r["scores"]
        rows.append(
            [
                name,
                r["model"],
                str(r["iterations"]),
                _fmt(r["train_seconds"] / 60 if r["train_seconds"] else None, 1),
                _fmt(s["pixel_error"], 4),
                _fmt(s["rand_error"], 4),
                _fmt(s["membrane_iou"], 4),
            ]
        )
    for paper, s in ISBI_PAPER.items():
        rows.append(
            [
                paper,
                "paper, test set, 30 training images, hours on a GPU",
                "-",
                "-",
                str(s["pixel_error"]),
                str(s["rand_error"]),
                "-",
            ]
        )
    out += _table(["run", "model", "iterations", "train min", "pixel error", "Rand error", "membrane IoU"], rows)
    out += [
        "",
        "What differs from the paper: U-Net's figures are on the 30-slice *test* set (labels never public), "
        "trained on all 30 training slices with heavy elastic augmentation for ~10 hours on a GPU; ours "
        "train on 25 slices for minutes on two CPU cores and score the 5 held-out slices, with one labelling "
        "(the challenge took the best threshold of a probability map). VGG-based models start from scratch "
        "here (no ImageNet weights offline), and a few dozen VGG steps fit in the budget: where they still "
        "predict 'cell' everywhere (membrane IoU 0), the table shows it rather than hides it.",
    ]
    return out + [""]


def _camvid_block(results: dict[str, dict], figures: Path) -> list[str]:
    out = _heading(ACCURACY_TITLES["camvid"], *results.values())
    rows, per_class, pictures = [], [], []
    for name, r in results.items():
        scores = r["scores"]["scores"]
        plain, preset = scores["no CRF"], scores.get("deeplab_v2 preset")
        tuned = scores.get("tuned on train")
        rows.append(
            [
                name,
                r["model"],
                str(r["iterations"]),
                _fmt(r["train_seconds"] / 60 if r["train_seconds"] else None, 1),
                _fmt(100 * plain["miou"], 1),
                _fmt(100 * plain["pixel_acc"], 1),
                _fmt(100 * preset["miou"], 1) if preset else "-",
                _fmt(100 * tuned["miou"], 1) if tuned else "-",
            ]
        )
        per_class.append([name, *(_fmt(100 * v, 1) for v in plain["iou"])])
        class_names = r["scores"]["class_names"]
        if r["scores"].get("picture"):
            pictures.append(f"`{r['scores']['picture']}` ({name})")
    for paper, miou in CAMVID_PAPERS.items():
        rows.append([paper, "paper, test set, ImageNet pre-training, GPU", "-", "-", str(miou), "-", "-", "-"])
    out += _table(
        [
            "run",
            "model",
            "iterations",
            "train min",
            "mIoU",
            "pixel acc",
            "mIoU + CRF (v2 preset)",
            "mIoU + CRF (tuned)",
        ],
        rows,
    )
    out += [
        "",
        "What differs from the papers: their figures are on CamVid's 233-image *test* split at 360x480, "
        "from ImageNet-pretrained networks trained for hours to days on GPUs; ours are on the 101-image "
        "val split (the test split is not in ../shared/data), from scratch, trained on 256x256 crops for "
        "the minutes in the table on two CPU cores (the padded U-Net also at 1/4 width). The CRF columns "
        "use the same network outputs: the DeepLab v2 preset as published, and the appearance kernel "
        "re-tuned on 4 *train* images (never val), as DeepLab cross-validates it.",
    ]
    if per_class:
        out += ["", "Per-class IoU (%) without CRF:", ""]
        out += _table(["run", *class_names], per_class)
    if pictures:
        out += [
            "",
            "CRF before/after pictures (image | without CRF | with CRF | ground truth, cropped where the CRF "
            "fixes the most pixels near true class boundaries) are written by the benchmark to "
            + ", ".join(pictures)
            + "; they show CamVid frames, so they stay out of the repository.",
            "",
        ]
    return out


# The successors' CamVid CPU recipes: (recipe, its run folder under runs/, what the row trains)
CAMVID_RECIPE_RUNS = (
    ("camvid_lraspp_cpu", "camvid_lraspp_cpu", "LR-ASPP MobileNetV3-Large, from scratch, median-frequency weights"),
    ("camvid_segnet_cpu", "camvid_segnet_cpu2", "SegNet (VGG16-BN encoder, pooling indices), from scratch, 160 crops"),
)
RECIPE_HEADING = "### CamVid: the successors' CPU recipes"


def _recipe_block(runs_root: Path) -> list[str]:
    """The successors' CPU recipes trained with ``densepred train`` (not by the accuracy
    benchmark): their run folders' final metrics and machine, where the folders are here."""
    rows, machines = [], []
    for recipe, folder, what in CAMVID_RECIPE_RUNS:
        metrics = _load(runs_root / folder / "metrics.json")
        log = runs_root / folder / "log.jsonl"
        if not metrics or not log.is_file():
            continue
        start = json.loads(log.read_text().splitlines()[0])
        machines.append({"machine": start.get("machine")})
        rows.append(
            [
                recipe,
                what,
                str(metrics["iterations"]),
                _fmt(metrics["train_seconds"] / 60, 1),
                _fmt(100 * metrics["miou"], 1),
                _fmt(100 * metrics["pixel_acc"], 1),
            ]
        )
    if not rows:
        command = " / ".join(f"`densepred train --config {r}`" for r, *_ in CAMVID_RECIPE_RUNS)
        return [RECIPE_HEADING, "", f"No {MISSING} {command} with `data.root=../shared/data/camvid`.", ""]
    out = _heading(RECIPE_HEADING[4:], *machines)
    out += [
        "`densepred train --config camvid_lraspp_cpu` / `camvid_segnet_cpu` with "
        "`data.root=../shared/data/camvid`, the schedule fitted to the recipe's time budget:",
        "",
    ]
    out += _table(["recipe", "model", "iterations", "train min", "mIoU", "pixel acc"], rows)
    return out + [
        "",
        "What differs: SegNet's paper trains from ImageNet VGG16 weights for 40K+ iterations of whole "
        "360x480 images and reports the test split (SegNet row above); LR-ASPP's paper reports Cityscapes, "
        "not CamVid. Here both start from scratch (no network for ImageNet files), train for minutes on CPU "
        "crops, and are scored on the val split.",
        "",
    ]


CRF_ENTRIES = (
    ("crf", "Natively"),
    ("crf_avx2", "As an AVX2 CPU (`ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2`)"),
)


def _crf_line(c: dict, label: str) -> str:
    """One CRF comparison: ours against pydensecrf, the kernels PyTorch ran, the agreement."""
    kernels = f", PyTorch kernels {c['capability']}" if "capability" in c else ""
    line = f"- {label}{kernels}: fully-connected CRF, {c['image']}, {c['classes']} classes, {c['iterations']} "
    line += f"iterations, one thread: densepred {c['ours_s']:.3f} s"
    if "pydensecrf_s" in c:
        rounds = f"best of {c['rounds']} rounds in alternation" if "rounds" in c else "best of 5 each"
        line += (
            f", pydensecrf {c['pydensecrf_s']:.3f} s (**{c['pydensecrf_s'] / c['ours_s']:.2f}x**), labels agree "
            f"on {100 * c['agreement']:.2f}% of pixels ({rounds})"
        )
    return line + "."


SUCCESSOR_HEADING = "### The successor families: 512x512, a 1024x2048 frame by sliding windows, a training step"


def _successor_section(results: dict | None) -> list[str]:
    from .successors import table

    if not results:
        return [SUCCESSOR_HEADING, "", "No results yet: `python -m benchmarks.successors`.", ""]
    return [
        SUCCESSOR_HEADING,
        "",
        "`python -m benchmarks.successors`, each model in a fresh process.",
        "",
        table(results),
        "",
        "`deeplabv3` and `deeplabv3plus` run at output stride 16 (their default, the papers' training stride); "
        "torchvision's DeepLabV3 and FCN-ResNet at 8, hence about 3x the work.",
        "",
    ]


# What each rendered section measures and how to read it: method, not figures (those come from
# the results, so they never go stale).
NOTES = {
    "roofline": "Peaks are measured before and after the models and the best is kept (a peak taken while "
    "something else runs flatters every model). FLOPs are counted from every convolution, transposed "
    "convolution and linear layer (2 per multiply-add); the training step counts 3x the forward's. "
    '"default" is what `predict` and `eval` run on images of the row\'s size: the backend (named) that '
    "the probe chose at that size, the size of their first image's forward passes (`serve`, which "
    "cannot know its images' size, probes at 128 pixels). That count is nominal, as counts by hand from "
    "the layer shapes are: it holds the taps that read only padding as work, which the kernels skip, "
    "and so puts the DeepLab v3 family above 100% (its ASPP rates of 12-36 on 16-33 pixel maps). "
    '"% of conv peak, taps on the image" '
    "counts only the multiply-adds whose input pixel is in the image, the honest share where the two differ "
    "(`python -m benchmarks.roofline --recount` adds it to older results). "
    '"% of roof" (where the peaks include a depthwise one) '
    "holds depthwise convolutions, which read a byte for every few FLOPs and are bound by memory, to the "
    "machine's measured depthwise 3x3 speed and the other layers to the dense peak: it differs from "
    '"% of conv peak" for the MobileNetV3 nets alone. A size\'s variants take turns, round by round, with '
    "the reference convolution as one more turn, and each keeps its best of two rounds (the median of its "
    'calls in each): "% of the peak beside" holds a row to the reference convolution timed beside it (in '
    "brackets, GFLOP/s), which says how fast the machine was while the row ran. Run it on a quiet machine: "
    "other work running during the models halves some of them.",
    "int8": "int8 runs on ONNX Runtime (`--int8 N` on `predict`, `eval`, `export`), fp32 and int8 in "
    "interleaved rounds. ONNX Runtime picks its int8 kernels by CPUID (VNNI where the CPU has it): the AVX2 "
    'variables change PyTorch\'s fp32 baseline only, so rows "under ATEN_CPU_CAPABILITY=avx2" are not an '
    "AVX2 machine's; the block headed AVX2 is. Without VNNI the weights take 7 bits (their 16-bit "
    "products would saturate), as its accuracy lines say. The "
    "CamVid models were trained minutes from scratch on the CPU (their fp32 mIoU is in the accuracy "
    "lines): the accuracy cost is measured on weak models.",
    "pipeline": "Random weights of each model, 11 classes, through `Predictor` with `backend=auto`. "
    "`predict` is `predict_files` on one CamVid val frame: read the PNG, normalise, the network, class "
    "ids, the index PNG and the overlay, into a new folder each run; then on a folder of consecutive "
    "frames, per frame, with as many frames at once as `predict` measures best (the cell says where "
    "more than one; blocks from before `eval.streams` ran one at a time). The overlay is the JPEG "
    "`predict` writes by default where the table's header "
    "says so, a PNG in blocks measured before that default. Beside a forward of a few tens of "
    "milliseconds (LR-ASPP), reading the frame and writing its files still show; beside a forward of a "
    "second they do not. Where reading the frame and "
    "writing its mask alone (decoding the PNG, by the decoder the block names: on the Zen 2 a CamVid frame "
    "takes libspng 3.3 ms, OpenCV 4.6, PIL 5.7; and the 8-bit index PNG) take over 15% of the forward, no "
    "`predict` comes within 1.15x of it. "
    "A forward that short also varies by up to a third from run to run here, and its ratio with it.",
    "train_layout": "Random data at each recipe's batch and crop, its model, optimiser and the precision its "
    "`train.amp` resolves to here (bf16 where the CPU computes it natively). A recipe trains channels-last "
    "(`model.channels_last: true`) where that won on both kinds of kernel; SegNet, whose max-unpooling "
    "loses in that layout under AVX2 kernels, stays channels-first.",
    "crf": "The system section's CRF line, kept per kind of CPU: measured on the CPU itself, not under "
    "the AVX2 variables (which cap PyTorch's, FBGEMM's and oneDNN's kernels but not the rest of the machine).",
}


def _rendered(title: str, command: str, results: dict | None, table, notes: str = "") -> list[str]:  # noqa: ANN001 - a table(results) function
    """A section rendered by its benchmark's own ``table``, or how to produce it."""
    if not results:
        return [f"### {title}", "", f"No results yet: `{command}`.", ""]
    return [f"### {title}", "", f"`{command}`. {notes}".rstrip(), "", table(results), ""]


MACHINE_TAG = " — "  # "### Title — AVX2": a block measured on one kind of CPU, kept beside the others'


def _per_machine(title: str, command: str, results: dict | None, table, notes: str = "") -> list[str]:  # noqa: ANN001
    """:func:`_rendered` with the vector ISA its results were measured on in the heading, so that
    the page keeps each kind of CPU's block (an AVX2 and an AVX-512 one): a figure of one says
    little of the other (bf16, VNNI, the runtimes' kernels)."""
    if results:  # "AVX512, Zen 5": two AVX-512 EPYCs differ twofold in fp32 width
        machine = results["machine"]
        core = machine.get("microarchitecture")
        title += MACHINE_TAG + machine["capability"] + (f", {core}" if core else "")
    return _rendered(title, command, results, table, notes)


def _speed_limit_sections(out_dir: Path) -> list[str]:
    """The roofline, int8, the pipeline around the network and the CRF, each per vector ISA."""
    from . import int8, pipeline, roofline, train_layout

    return [
        *_per_machine(
            "The fp32 limit on record: % of the measured convolution peak",
            "python -m benchmarks roofline",
            _load(out_dir / "roofline.json"),
            roofline.table,
            NOTES["roofline"],
        ),
        *_per_machine(
            "int8",
            "python -m benchmarks int8 --data-root ../shared/data",
            _load(out_dir / "int8.json"),
            int8.table,
            NOTES["int8"],
        ),
        *_per_machine(
            "predict end to end, against the forward pass alone",
            "python -m benchmarks.pipeline",
            _load(out_dir / "pipeline.json"),
            pipeline.table,
            NOTES["pipeline"],
        ),
        *_per_machine(
            "Training step, channels-first against channels-last, per CPU recipe",
            "python -m benchmarks.train_layout",
            _load(out_dir / "train_layout.json"),
            train_layout.table,
            NOTES["train_layout"],
        ),
        *_per_machine(
            "CRF against pydensecrf",
            "python benchmarks/crf_speed.py --save runs/bench/crf.json",
            _load(out_dir / "crf.json"),
            lambda results: _crf_line(results["crf"], "Natively"),
            NOTES["crf"],
        ),
    ]


MISSING = "results yet:"  # the phrase of every section rendered without results


def _split(lines: list[str], prefix: str) -> list[tuple[str | None, list[str]]]:
    """``lines`` cut at each heading line starting with ``prefix``: the text before the first
    heading (under ``None``), then each heading with what follows it up to the next one."""
    blocks: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in lines:
        if line.startswith(prefix):
            blocks.append((line, []))
        else:
            blocks[-1][1].append(line)
    return blocks


def _missing(body: list[str]) -> bool:
    return any(MISSING in line for line in body)


def keep_previous(new: list[str], old: list[str]) -> list[str]:
    """``new``, where a part rendered without results takes ``old``'s text for the same heading:
    a ``### `` block by its heading; a ``## `` section's own text (before its first ``### ``)
    together with the old section's blocks that ``new`` does not render."""
    old_sections = dict(_split(old, "## "))
    out: list[str] = []
    for heading, body in _split(new, "## "):
        previous = old_sections.get(heading) if heading is not None else None
        if heading is not None:
            out.append(heading)
        if previous is None:
            out += body
            continue
        old_blocks = _split(previous, "### ")
        old_by_heading = dict(old_blocks[1:])
        blocks = _split(body, "### ")
        rendered = {h for h, _ in blocks}
        for sub, text in blocks:
            if sub is None:
                if _missing(text):  # the section's own results are absent: its old text and tables
                    out += old_blocks[0][1]
                    for old_sub, old_text in old_blocks[1:]:
                        # (another machine's block of a rendered one comes beside it, below)
                        if old_sub not in rendered and not any(_same_title(h, old_sub) for h in rendered if h):
                            out += [old_sub, *old_text]
                else:
                    out += text
                continue
            if _missing(text) and any(_same_title(sub, old_sub) for old_sub in old_by_heading):
                text = []  # no results here, but other machines' blocks of it follow
            elif _missing(text) and sub in old_by_heading:
                text = old_by_heading[sub]
            if text:
                out += [sub, *text]
            # The same block measured on other kinds of CPU, which this machine cannot re-measure.
            for old_sub, old_text in old_blocks[1:]:
                if old_sub not in rendered and old_sub != sub and _same_title(sub, old_sub):
                    out += [old_sub, *old_text]
    return out


def _same_title(a: str, b: str) -> bool:
    """Two headings of one benchmark's block, each tagged with the machine it was measured on."""
    return MACHINE_TAG in b and a.split(MACHINE_TAG)[0] == b.split(MACHINE_TAG)[0]


def write_report(out_dir: Path, doc: Path) -> Path:
    figures = doc.parent / "benchmarks"
    figures.mkdir(parents=True, exist_ok=True)
    speed = _load(out_dir / "speed.json")
    system = _load(out_dir / "system.json")
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks report` from the results of `python -m benchmarks speed`, "
        "`system` and `accuracy --data-root ../shared/data` (all four: `python -m benchmarks all`). "
        "Speed figures are ratios-friendly: each variant is compared with eager fp32 in the same run, "
        "because absolute numbers move with whatever else the machine runs.",
        "",
        "## Speed and memory",
        "",
        *_speed_section(speed),
        *_successor_section(_load(out_dir / "successors.json")),
        *_speed_limit_sections(out_dir),
        "## System",
        "",
        *_system_section(system, speed),
        "## Accuracy on real data",
        "",
        *_accuracy_section(out_dir, figures),
    ]
    if doc.exists():
        lines = keep_previous(lines, doc.read_text().splitlines())
    doc.write_text("\n".join(lines) + "\n")
    print(f"wrote {doc}")
    return doc
