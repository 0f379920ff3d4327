"""Int8 static quantisation (densepred.quantize): its speed against fp32 eager, and the mIoU it
costs on CamVid val for a trained model.

    python -m benchmarks int8 --data-root ../shared/data
    python -m benchmarks.int8 --checkpoint runs/camvid_segnet_cpu2/checkpoints/best.pt --images 32

Accuracy: the checkpoint (default :data:`DEFAULT_CHECKPOINT`, the strongest CamVid model trained
on this machine) is calibrated on ``--images`` training images spread over the train split, and
both it and its int8 version are scored on the whole val split by ``densepred.evaluation.evaluate``
with the recipe's inference options at fp32 (``amp=none``); argmax agreement is counted on the
first :data:`AGREEMENT_IMAGES` val images.

Speed: one forward pass, batch 1, at the eval size (CamVid 360x480) for the checkpoint's model and
at 256x256 for VGG-type nets (SegNet, FCN-8s; registry weights, noise calibration: the speed does
not depend on the values). Candidates: eager fp32 (the baseline), eager bf16 autocast (what
``amp=auto`` picks on a CPU with native bf16; only there), ONNX Runtime fp32 and int8, and PyTorch's own int8
(TorchScript ``quantize_jit``; oneDNN and x86 engines). Timing: calls interleaved round by round,
best of the rounds (the machine may be shared). The table is measured again by child processes:
with ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, which moves PyTorch to its AVX2 kernels
(ONNX Runtime dispatches by CPUID and ignores both), and with one thread, where a neighbour
process on the other core cannot stall every operator's thread join (eager PyTorch's many small
MobileNet operators suffer that most). The one-layer ceiling (:func:`run_ceiling`) is measured
again under the AVX2 variables, where PyTorch's oneDNN int8, the one int8 runtime they cap, says
what int8 gives a CPU without VNNI. The checkpoint's int8 forward is profiled by kind of operator
beside its fp32 graph (:mod:`benchmarks.int8_profile`): what bounds its speed-up here.

Results: ``--out`` (default runs/bench/int8.json), with the machine they were measured on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from densepred.allocator import retain_freed_memory
from densepred.build import build_dataset
from densepred.checkpoint import load_trained
from densepred.config import EvalConfig
from densepred.evaluation import evaluate
from densepred.inference import predict_logits
from densepred.precision import autocast, cpu_name, machine_info, resolve_amp
from densepred.quantize import CALIBRATIONS, DEFAULT_CALIBRATION, int8_options, quantize, training_images
from densepred.registry import create_model

from .children import AVX2, json_from_child
from .int8_profile import profile_checkpoint, profile_lines

DEFAULT_CHECKPOINT = Path("runs/camvid_lraspp_cpu/checkpoints/best.pt")  # `densepred train --config camvid_lraspp_cpu`
SPEED_MODELS_256 = ("segnet", "fcn8s")
SPEED_CALIBRATION = 4  # images: the int8 graph's speed does not depend on its ranges
AGREEMENT_IMAGES = 8


def _best_of(candidates: dict[str, Callable[[], object]], rounds: int, seconds: float = 10.0) -> dict[str, float]:
    """Seconds per call of each candidate: one warm-up each, then rounds of one call each, best
    kept; at least ``rounds``, more (up to 50) while the rounds took under ``seconds`` in all."""
    with torch.inference_mode():
        for fn in candidates.values():
            fn()
        best = dict.fromkeys(candidates, float("inf"))
        start_all, done = time.perf_counter(), 0
        while done < rounds or (time.perf_counter() - start_all < seconds and done < 50):
            for name, fn in candidates.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
            done += 1
    return best


def _torch_int8(model: nn.Module, images: list[Tensor], engine: str) -> Callable[[Tensor], Tensor]:
    """PyTorch's own static int8 (TorchScript graph mode): the alternative densepred.quantize measured."""
    from torch.ao.quantization import get_default_qconfig, quantize_jit

    torch.backends.quantized.engine = engine  # process-wide: the reason the library does not use it
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), images[0], check_trace=False)
        quantized = quantize_jit(
            traced, {"": get_default_qconfig(engine)}, lambda m, data: [m(x) for x in data], [images], inplace=False
        )

    def run(x: Tensor) -> Tensor:
        torch.backends.quantized.engine = engine
        return quantized(x)

    return run


def _candidates(model: nn.Module, images: list[Tensor], x: Tensor, *, full: bool) -> dict[str, Callable[[], object]]:
    from densepred.export import INPUT_NAME, export_onnx, onnx_session

    int8 = quantize(model, images)
    found: dict[str, Callable[[], object]] = {
        "eager fp32": lambda: model(x),
        "onnxruntime int8": lambda: int8(x),
    }
    if not full:
        return found

    def bf16() -> Tensor:
        with autocast("bf16", x.device):
            return model(x)

    if resolve_amp("auto", x.device) == "bf16":  # emulated elsewhere: SegNet at 256 took 207 s a call on AVX2
        found["eager bf16 autocast"] = bf16
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, Path(tmp) / "fp32.onnx", metadata={})
        session = onnx_session(Path(tmp) / "fp32.onnx", threads=torch.get_num_threads())
    found["onnxruntime fp32"] = lambda: session.run(None, {INPUT_NAME: x.numpy()})
    for engine in ("onednn", "x86"):
        try:
            run = _torch_int8(model, images, engine)
            with torch.inference_mode():
                run(x)  # some failures come at the first call (per-channel transposed convolutions)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run this model is reported, not fatal
            print(f"  torch int8 ({engine}) cannot run: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
            continue
        found[f"torch int8 ({engine})"] = lambda run=run: run(x)
    return found


def _speed_row(model: nn.Module, images: list[Tensor], size: tuple[int, int], *, rounds: int, full: bool) -> dict:
    x = torch.randn(1, int(images[0].shape[1]), *size, generator=torch.Generator().manual_seed(0))
    seconds = _best_of(_candidates(model.eval(), images, x, full=full), rounds)
    base = seconds["eager fp32"]
    return {
        "size": list(size),
        "seconds": seconds,
        "speedup_vs_eager_fp32": {k: base / v for k, v in seconds.items()},
    }


def run_speed(
    checkpoint: Path | None,
    data_root: Path | None,
    *,
    rounds: int,
    full: bool,
    rows: dict[str, dict],
    save: Callable[[], None] = lambda: None,
) -> dict[str, dict]:
    """The speed table, added to ``rows`` (what is there is kept; ``save`` after each row): the
    checkpoint's model at its eval size (CamVid: 360x480), the VGG-type nets at 256x256."""
    if checkpoint is not None and str(checkpoint) not in rows:
        trained = load_trained(checkpoint, "cpu")
        root = data_root / trained.experiment.data.dataset if data_root else None
        images = training_images(trained, SPEED_CALIBRATION, root=root)
        size = tuple(images[0].shape[-2:])
        print(f"speed: {trained.experiment.model.name} {size[0]}x{size[1]} ({checkpoint})", flush=True)
        rows[str(checkpoint)] = {
            "model": trained.experiment.model.name,
            **_speed_row(trained.model, images, size, rounds=rounds, full=full),
        }
        save()
    for name in SPEED_MODELS_256:
        if f"{name} 256x256" in rows:
            continue
        print(f"speed: {name} 256x256 (registry weights, noise calibration)", flush=True)
        model = create_model(name, num_classes=11).eval()
        g = torch.Generator().manual_seed(1)
        noise = [torch.randn(1, 3, 256, 256, generator=g) for _ in range(SPEED_CALIBRATION)]
        rows[f"{name} 256x256"] = {
            "model": name,
            **_speed_row(model, noise, (256, 256), rounds=max(2, rounds // 2), full=full),
        }
        del model
        save()
    return rows


CEILING_SHAPE = (256, 128)  # channels, side: the roofline's 3x3 convolution peak


def run_ceiling(rounds: int) -> dict:
    """What int8 gives one dense layer on this CPU: a 3x3 convolution at the roofline's peak shape
    and its ReLU, quantised by :func:`densepred.quantize.quantized_onnx` as the models are (a
    1-channel 1x1 head, which it keeps float, closes the net), eager fp32 (the reference) against
    ONNX Runtime fp32 and int8, interleaved. A model's int8 speed-up falls short of this ratio by
    what stays float (its head) and by its operators that int8 does not speed up (a pooling with
    indices, the im2col of SegNet's switch-feeding convolutions), and exceeds it where eager fp32
    falls short of the peak (FCN, SegNet at 360x480)."""
    import onnx

    from densepred.export import INPUT_NAME, onnx_session, trace_onnx
    from densepred.quantize import quantized_onnx

    channels, side = CEILING_SHAPE
    net = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, 1, 1)).eval()
    net.in_channels = channels  # what tracing reads
    x = torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(0)).relu()
    int8_proto, details = quantized_onnx(net, [x])
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path, int8_path = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(trace_onnx(net), fp32_path)
        onnx.save(int8_proto, int8_path)
        threads = torch.get_num_threads()
        fp32, int8 = onnx_session(fp32_path, threads=threads), onnx_session(int8_path, threads=threads)
    feed = {INPUT_NAME: x.numpy()}
    # PyTorch's oneDNN int8 as well: the one int8 runtime that ONEDNN_MAX_CPU_ISA caps, so under
    # the AVX2 variables (the ceiling_avx2 child) it says what int8 gives without VNNI.
    torch_int8 = _torch_int8(net, [x], "onednn")
    seconds = _best_of(
        {
            "eager fp32": lambda: net(x),
            "onnxruntime fp32": lambda: fp32.run(None, feed),
            "onnxruntime int8": lambda: int8.run(None, feed),
            "torch int8 (onednn)": lambda: torch_int8(x),
        },
        rounds,
    )
    ops = 2 * channels * (channels * 9 + 1) * side * side
    return {
        "machine": machine_info().to_dict(),
        "shape": f"3x3 conv {channels}ch@{side}^2",
        "weights_7_bit": "7-bit" in details["weights"],
        "gops": {k: ops / v / 1e9 for k, v in seconds.items()},
        "int8_over_eager_fp32": seconds["eager fp32"] / seconds["onnxruntime int8"],
        "torch_int8_over_eager_fp32": seconds["eager fp32"] / seconds["torch int8 (onednn)"],
    }


def _agreement(fp32: nn.Module, int8: nn.Module, dataset, options: EvalConfig, count: int) -> float:
    same = total = 0
    with torch.inference_mode():
        for i in range(min(count, len(dataset))):
            x = dataset[i]["image"][None]
            a = predict_logits(fp32, x, options).argmax(1)
            b = predict_logits(int8, x, options).argmax(1)
            same, total = same + int((a == b).sum()), total + a.numel()
    return same / total


def run_accuracy(checkpoint: Path, data_root: Path | None, images: int, calibrate: str = DEFAULT_CALIBRATION) -> dict:
    """mIoU of the checkpoint at fp32 and at int8 on its val split, and the quantisation's cost."""
    trained = load_trained(checkpoint, "cpu")
    exp = trained.experiment
    if data_root is not None:
        exp.data.root = str(data_root / exp.data.dataset)
    val = build_dataset(exp, exp.data.val_split, train=False)
    fp32_options = dataclasses.replace(exp.eval, amp="none", backend="eager", max_images=None)
    start = time.perf_counter()
    calibration = training_images(trained, images, experiment=exp)
    int8 = quantize(trained.model, calibration, calibrate=calibrate)
    quantise_s = time.perf_counter() - start
    print(f"accuracy: {checkpoint}: {int8.describe()} in {quantise_s:.0f} s", flush=True)
    fp32_metrics = evaluate(trained.model, val, fp32_options, progress=False)
    int8_metrics = evaluate(int8, val, int8_options(fp32_options), progress=False)
    return {
        "checkpoint": str(checkpoint),
        "model": exp.model.name,
        "val_images": len(val),
        "calibration_images": images,
        "quantise_seconds": quantise_s,
        "quantization": int8.details,
        "miou_fp32": fp32_metrics["miou"],
        "miou_int8": int8_metrics["miou"],
        "miou_points_lost": 100 * (fp32_metrics["miou"] - int8_metrics["miou"]),
        "pixel_acc_fp32": fp32_metrics["pixel_acc"],
        "pixel_acc_int8": int8_metrics["pixel_acc"],
        f"argmax_agreement_first_{AGREEMENT_IMAGES}_val": _agreement(
            trained.model, int8, val, fp32_options, AGREEMENT_IMAGES
        ),
    }


def _ceiling_in_child(rounds: int, env: dict[str, str]) -> dict:
    """:func:`run_ceiling` measured by a fresh process under ``env``."""
    return json_from_child("benchmarks.int8", ["--ceiling-only", "--rounds", str(rounds)], env)


def _speed_in_child(
    checkpoint: Path | None, data_root: Path | None, rounds: int, env: dict[str, str], table: dict, threads: int
) -> dict:
    """``table`` completed by a fresh process under ``env``."""
    args = ["--speed-only", "--rounds", str(rounds), "--threads", str(threads)]
    args += ["--checkpoint", str(checkpoint)] if checkpoint else ["--no-checkpoint"]
    args += ["--data-root", str(data_root)] if data_root else []
    return json_from_child("benchmarks.int8", args, env, start=table)


def table(results: dict) -> str:
    lines = []
    labels = {
        "speed": "",
        "speed_avx2": " under ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2",
        "speed_1_thread": "",
    }
    for key, label in labels.items():
        if key not in results:
            continue
        m = results[key]["machine"]
        lines += [
            f"Speed{label}: {cpu_name(m)}, torch capability {m['capability']}, {m['threads']} threads, "
            f"torch {m['torch']}. Seconds per forward pass, batch 1, best of interleaved rounds "
            "(x = speed-up over eager fp32).",
            "",
        ]
        for name, row in results[key]["rows"].items():
            cells = ", ".join(
                f"{k} {v:.3f} s (x{row['speedup_vs_eager_fp32'][k]:.2f})" for k, v in row["seconds"].items()
            )
            where = f" ({name})" if name.endswith(".pt") else " (registry weights)"
            lines.append(f"- {row['model']} {row['size'][0]}x{row['size'][1]}{where}: {cells}")
        lines.append("")
    if "ceiling" in results:
        c = results["ceiling"]
        rates = ", ".join(f"{k} {v:.0f}" for k, v in c["gops"].items())
        lines += [
            f"One dense layer in int8 on {cpu_name(c['machine'])} ({c['machine']['capability']}"
            f"{', 7-bit weights: no VNNI' if c['weights_7_bit'] else ''}), a {c['shape']}, GOP/s: {rates}: "
            f"int8 runs it at **x{c['int8_over_eager_fp32']:.2f}** eager fp32's speed "
            f"(x{c['gops']['onnxruntime int8'] / c['gops']['onnxruntime fp32']:.2f} ONNX Runtime fp32's): what the "
            "models' int8 falls short of is their float layers and other operators.",
            "",
        ]
    if "ceiling_avx2" in results:
        c = results["ceiling_avx2"]
        lines += [
            f"The same layer with PyTorch's kernels capped at AVX2 ({', '.join(f'{k}={v}' for k, v in AVX2.items())}, "
            f"an approximation of an AVX2 CPU on this one): eager fp32 {c['gops']['eager fp32']:.0f} GFLOP/s, "
            f"PyTorch's oneDNN int8 {c['gops']['torch int8 (onednn)']:.0f} GOP/s, "
            f"**x{c['torch_int8_over_eager_fp32']:.2f}**: without VNNI, int8 products are summed through 16-bit "
            "intermediates (two multiply-add instructions where VNNI has one), so what int8 gains there depends "
            "on how many vector integer multiplies the core issues per FMA: x1.9 on an earlier AVX2 EPYC, none on "
            "a Zen 2, which issues one 256-bit integer multiply per cycle against two FMAs. (ONNX Runtime ignores "
            "the cap: its int8 here is this CPU's.)",
            "",
        ]
    if "profile" in results:
        p = results["profile"]
        row = results.get("speed", {}).get("rows", {}).get(p["checkpoint"])
        lines += profile_lines(p, row["seconds"]["eager fp32"] if row else None)
    for r in results.get("accuracy", {}).values():
        agree = r[f"argmax_agreement_first_{AGREEMENT_IMAGES}_val"]
        lines.append(
            f"Accuracy, {r['model']} ({r['checkpoint']}), CamVid val ({r['val_images']} images), int8 calibrated on "
            f"{r['calibration_images']} train images{_ranges(r)}: mIoU fp32 {100 * r['miou_fp32']:.2f}, int8 "
            f"{100 * r['miou_int8']:.2f}, {r['miou_points_lost']:+.2f} points lost; argmax agreement {100 * agree:.2f}%"
            # 7-bit weights on a CPU without VNNI: the figure holds for that range
            + (f"; weights {r['quantization']['weights']}" if "quantization" in r else "")
        )
    return "\n".join(lines)


def _ranges(r: dict) -> str:
    """ ", percentile ranges": how the activation ranges were taken (results before it was recorded say nothing)."""
    method = r.get("quantization", {}).get("calibration")
    return f", {method} ranges" if method else ""


def accuracy_key(checkpoint: Path | None, images: int, calibrate: str = DEFAULT_CALIBRATION) -> str:
    """The accuracy row of a checkpoint calibrated on ``images`` by ``calibrate`` (minmax rows keep their old key)."""
    return f"{checkpoint}|{images}" + ("" if calibrate == "minmax" else f"|{calibrate}")


def forget_measured(results: dict, checkpoint: Path | None, images: int, calibrate: str = DEFAULT_CALIBRATION) -> None:
    """Drop from ``results`` what a run with ``checkpoint`` measures (its accuracy and speed rows,
    the 256x256 rows, the one-layer ceilings), so that it is measured again; another checkpoint's
    rows stay."""
    results.get("accuracy", {}).pop(accuracy_key(checkpoint, images, calibrate), None)
    results.pop("ceiling", None)
    results.pop("ceiling_avx2", None)
    results.pop("profile", None)
    measured = [str(checkpoint), *(f"{name} 256x256" for name in SPEED_MODELS_256)]
    for key in ("speed", "speed_avx2", "speed_1_thread"):
        rows = results.get(key, {}).get("rows", {})
        for row in measured:
            rows.pop(row, None)


def run_int8(
    data_root: Path | None,
    out: Path,
    *,
    checkpoint: Path | None = DEFAULT_CHECKPOINT,
    images: int = 32,
    calibrate: str = DEFAULT_CALIBRATION,
    rounds: int = 5,
    force: bool = False,
    avx2: bool = True,
) -> dict:
    """Measure what is not in ``out`` yet (``force``: what this call measures, again), write it,
    print the table."""
    info = machine_info().to_dict()
    results = json.loads(out.read_text()) if out.exists() else {}
    if results.get("machine") != info:
        results = {"machine": info, "accuracy": {}}  # a figure holds for the machine it was measured on
    elif force:
        forget_measured(results, checkpoint, images, calibrate)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(results, indent=2))

    key = accuracy_key(checkpoint, images, calibrate)
    if checkpoint is not None and key not in results["accuracy"]:
        results["accuracy"][key] = run_accuracy(checkpoint, data_root, images, calibrate)
        save()
    if "ceiling" not in results:
        results["ceiling"] = run_ceiling(rounds)
        save()
    if "ceiling_avx2" not in results:
        results["ceiling_avx2"] = _ceiling_in_child(rounds, AVX2)
        save()
    speed = results.setdefault("speed", {"machine": info, "rows": {}})
    run_speed(checkpoint, data_root, rounds=rounds, full=True, rows=speed["rows"], save=save)
    if checkpoint is not None and "profile" not in results:
        print(f"profile: {checkpoint} int8 and fp32 on ONNX Runtime", flush=True)
        results["profile"] = profile_checkpoint(checkpoint, data_root, SPEED_CALIBRATION)
        save()
    threads = torch.get_num_threads()
    # Two more tables, each from a fresh process: PyTorch's AVX2 kernels (ONNX Runtime ignores the
    # variables), and one thread, where a busy neighbour core cannot stall every op's thread join.
    children = {"speed_avx2": (AVX2, threads)} if avx2 else {}
    children["speed_1_thread"] = ({}, 1)
    for key, (env, n) in children.items():
        if threads == 1 and key == "speed_1_thread":
            continue
        results[key] = _speed_in_child(checkpoint, data_root, rounds, env, results.get(key, {}), n)
        save()
    print(table(results))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8", description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"), help="folder holding camvid/")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--no-checkpoint", action="store_true", help="speed of the 256x256 VGG-type nets only")
    parser.add_argument("--images", type=int, default=32, help="calibration images (train split)")
    parser.add_argument(
        "--calibrate", choices=CALIBRATIONS, default=DEFAULT_CALIBRATION, help="activation ranges (as --calibrate)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (best kept)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/int8.json"))
    parser.add_argument(
        "--force", action="store_true", help="measure again what this run measures (other checkpoints' rows stay)"
    )
    parser.add_argument("--no-avx2", action="store_true", help="skip the speed table under AVX2 kernels")
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default torch's)")
    parser.add_argument("--speed-only", action="store_true", help=argparse.SUPPRESS)  # a child of _speed_in_child
    parser.add_argument("--ceiling-only", action="store_true", help=argparse.SUPPRESS)  # a child of _ceiling_in_child
    args = parser.parse_args()
    retain_freed_memory()  # eager runs as under `densepred predict` and `eval`
    checkpoint = None if args.no_checkpoint else args.checkpoint
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ceiling_only:  # the child of _ceiling_in_child
        args.out.write_text(json.dumps(run_ceiling(args.rounds), indent=2))
        return
    if args.speed_only:  # the child of _speed_in_child: completes the table in --out
        info = machine_info().to_dict()
        table = json.loads(args.out.read_text()) if args.out.exists() else {}
        if table.get("machine") != info:
            table = {"machine": info, "rows": {}}

        def save() -> None:
            args.out.write_text(json.dumps(table, indent=2))

        run_speed(checkpoint, args.data_root, rounds=args.rounds, full=False, rows=table["rows"], save=save)
        return
    run_int8(
        args.data_root,
        args.out,
        checkpoint=checkpoint,
        images=args.images,
        calibrate=args.calibrate,
        rounds=args.rounds,
        force=args.force,
        avx2=not args.no_avx2,
    )


if __name__ == "__main__":
    main()
