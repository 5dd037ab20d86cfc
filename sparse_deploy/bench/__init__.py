"""Timing exported models (and their torch baseline) on this CPU: ``benchmark(folder, config=BenchConfig(...))``.

``protocol`` (settings, numbers, timing loops), ``onnx_worker`` and ``torch_worker`` (one model measured in this
process), ``worker`` (each measurement in a fresh process), ``comparison`` (``benchmark()`` and the ratios),
``report`` (tables and plots for people). Importing this package imports neither torch nor onnxruntime.
"""

from sparse_deploy.bench.comparison import Comparison, benchmark
from sparse_deploy.bench.protocol import BenchConfig, LatencyStats, ModelBench
from sparse_deploy.bench.worker import measure_in_subprocess

__all__ = ["BenchConfig", "Comparison", "LatencyStats", "ModelBench", "benchmark", "measure_in_subprocess"]
