"""``densepred serve``: the segmentation web page and its HTTP API (the ``serve`` extra)."""

from __future__ import annotations

import argparse
import sys

from .options import add_inference_options, add_model_source, in_range, inference_options, load_source

__all__ = ["add_commands"]


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve import create_app, http_protocol
    except ImportError as exc:
        print(
            f"densepred serve: {exc.name} is missing; install the web extra: pip install 'densepred[serve]'",
            file=sys.stderr,
        )
        return 2
    from ..distributed import resolve_device
    from ..prediction import Predictor

    # The model is loaded once, before the server starts, and shared by every request; it runs
    # the recipe's own inference options unless the command line says otherwise. The backend and
    # the streams are measured once, with those options, at the size the images are expected at.
    device = resolve_device(args.device)
    trained = load_source(args, device)
    options = inference_options(args, trained.experiment.eval)
    predictor = Predictor(trained, device, options, image_size=tuple(args.image_size) if args.image_size else None)
    app = create_app(
        predictor,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_concurrency=args.concurrency,
        queue_size=args.queue,
        memory_budget=int(args.memory_budget_mb * 2**20) if args.memory_budget_mb else None,
        tile=args.tile_size,
        timeout_s=args.timeout,
        read_timeout_s=args.read_timeout,
    )
    print(f"densepred serve: {args.weights or args.checkpoint} on http://{args.host}:{args.port}/ (API docs at /docs)")
    budget = app.state.budget.total / 2**20
    print(f"memory budget {budget:,.0f} MiB; larger images than their share run by {args.tile_size}-px tiles")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", http=http_protocol(args.read_timeout))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="a web page and HTTP API that segment uploaded images (needs [serve])")
    add_model_source(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=in_range(int, 0, 65535), default=8000, help="TCP port (0: any free one)")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-upload-mb", type=in_range(float, 0.001), default=10.0, help="largest accepted upload, in MiB")
    p.add_argument(
        "--max-pixels", type=in_range(int, 1), default=25_000_000, help="largest accepted image, width x height"
    )
    p.add_argument("--concurrency", type=in_range(int, 1), default=2, help="inferences run at once")
    p.add_argument("--queue", type=in_range(int, 0), default=16, help="requests that may wait; more get 503")
    p.add_argument(
        "--memory-budget-mb",
        type=in_range(float, 1),
        help="memory admitted inferences may take together (default: half of what is available at start)",
    )
    p.add_argument(
        "--tile-size", type=in_range(int, 32), default=512, help="sliding-window tile for images too large to run whole"
    )
    p.add_argument("--timeout", type=in_range(float, 0.1), default=60.0, help="inference deadline in s (then 504)")
    p.add_argument(
        "--read-timeout", type=in_range(float, 0.1), default=30.0, help="s a client may take to send headers or body"
    )
    p.add_argument(
        "--image-size",
        type=in_range(int, 1),
        nargs=2,
        metavar=("H", "W"),
        help="the size of most images it will get: the backend and the streams are measured there "
        "(default: 128x128; LR-ASPP on a 2-core Zen 2 is fastest on OpenVINO at 128, ONNX Runtime at 360x480)",
    )
    add_inference_options(p)
    p.set_defaults(func=_cmd_serve)
