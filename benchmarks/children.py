"""Measuring again in a fresh process: the CPU-capability variables act when PyTorch is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# PyTorch's and oneDNN's kernels capped at AVX2 on a CPU with more: an approximation of an AVX2
# machine (ONNX Runtime and OpenVINO dispatch by CPUID and ignore both).
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def json_from_child(module: str, args: list[str], env: dict[str, str], start: dict | None = None) -> dict:
    """What ``python -m module ARGS --out FILE`` leaves in FILE, run under ``env``; FILE holds
    ``start`` first (a table for the child to complete)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        if start is not None:
            out.write_text(json.dumps(start))
        cmd = [sys.executable, "-m", module, *args, "--out", str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, **env})
        return json.loads(out.read_text())
