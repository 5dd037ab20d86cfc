"""Each model is measured in a fresh Python process, so its peak RSS is its own: ``measure_in_subprocess`` starts
this module (``python -m sparse_deploy.bench.worker BACKEND TARGET CONFIG_JSON``), which measures with the backend's
worker and prints the ModelBench as one JSON line. Imports neither torch nor onnxruntime until it measures."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from sparse_deploy.bench.protocol import BenchConfig, ModelBench, from_json
from sparse_deploy.errors import ConfigError, RuntimeSessionError, SparseDeployError

BACKENDS = ("onnxruntime", "torch")


def measure(target: str | Path, config: BenchConfig, backend: str = "onnxruntime") -> ModelBench:
    """Measure ``target`` in this process: an exported folder under ONNX Runtime, or a checkpoint under torch."""
    if backend == "onnxruntime":
        from sparse_deploy.bench.onnx_worker import measure_onnx

        return measure_onnx(target, config)
    if backend == "torch":
        from sparse_deploy.bench.torch_worker import measure_torch

        return measure_torch(target, config)
    raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def measure_in_subprocess(target: str | Path, config: BenchConfig, backend: str = "onnxruntime") -> ModelBench:
    """``measure`` in a fresh Python process; its JSON read back."""
    cmd = [sys.executable, "-m", __name__, backend, str(target), json.dumps(asdict(config))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise RuntimeSessionError(f"benchmark of {target} failed: {lines[-1] if lines else proc.returncode}")
    return from_json(json.loads(proc.stdout.strip().splitlines()[-1]))


def _main(argv: list[str]) -> None:
    try:
        result = measure(argv[1], BenchConfig(**json.loads(argv[2])), backend=argv[0])
    except SparseDeployError as exc:  # one line for the parent to report
        sys.exit(str(exc))
    print(json.dumps(asdict(result), default=lambda o: float(o) if hasattr(o, "__float__") else str(o)))


if __name__ == "__main__":
    _main(sys.argv[1:])
