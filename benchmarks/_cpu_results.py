"""Where the CPU benchmarks (bench_cpu_gemm.py, bench_cpu_step.py) write their JSON: one file per CPU model."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from enginepy.bench import device_name

RESULTS = Path(__file__).resolve().parent / "results"


def write_cpu_result(prefix: str, model: str, result: dict, out: str | None = None) -> Path:
    """Writes result to `out`, or benchmarks/results/<prefix>-<model>-<cpu model, threads>.json; returns the path."""
    name = device_name(torch.device("cpu")).lower()
    slug = "-".join("".join(c if c.isalnum() else " " for c in name).split())
    path = Path(out) if out else RESULTS / f"{prefix}-{model}-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
