"""Time one SparseGPT solve on the CPU: torch per-column loop vs the numba sweep vs a dense-GEMM floor.

    python benchmarks/bench_solver.py [--shapes 4096x4096,3072x768] [--sparsity 0.5 | --pattern 2:4]
                                      [--repeat 1] [--json PATH] [--device cpu|cuda]

torch_s: the published reference code's structure in torch on the CPU (tests/reference_sparsegpt.py):
         Cholesky-inverse-Cholesky, a sort per block, one set of tensor operations per column.
torch_path_s: this project's torch path on the CPU (the CUDA path's code): the same per-column sweep, with
         this project's GEMM-bound inverse factor and selection.
numba_s: this project's CPU path (numba sweep over row chunks, BLAS block updates).
gemm_floor_s: a dense GEMM with rows·cols·cols multiply-adds.
With --device cuda, torch_path_s is timed on the GPU and the CPU columns are left empty.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass

import common  # noqa: F401  (puts the checkout and tests/ on sys.path)
import torch
from reference_sparsegpt import reference_prune

from sparse_deploy.config import SolverConfig, SparsitySpec
from sparse_deploy.machine import machine_info
from sparse_deploy.pruning.solver import sparsify

DEFAULT_SHAPES = "768x768,3072x768,768x3072,4096x4096,11008x4096"


@dataclass(frozen=True)
class SolverTiming:
    rows: int
    cols: int
    torch_s: float | None
    torch_path_s: float
    numba_s: float | None
    gemm_floor_s: float


def _median_time(fn, repeat: int, sync=lambda: None) -> float:
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def problem(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and a correlated, full-rank Hessian, like a real layer's."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=gen) / cols**0.5
    A = torch.randn(cols, cols, generator=gen) / cols**0.5
    H = A @ A.T + 0.05 * torch.eye(cols)
    return W, H


def time_shape(rows: int, cols: int, spec: SparsitySpec, repeat: int, device: str) -> SolverTiming:
    W, H = problem(rows, cols)
    if device == "cuda":
        sync = torch.cuda.synchronize
        cfg = SolverConfig(device="cuda", sweep="torch")
        sparsify(W, H, spec, cfg)  # warm-up: CUDA context and kernels
        torch_path_s = _median_time(lambda: sparsify(W, H, spec, cfg), repeat, sync)
        a, b = torch.randn(rows, cols, device="cuda"), torch.randn(cols, cols, device="cuda")
        a @ b
        floor = _median_time(lambda: a @ b, max(repeat, 3), sync)
        return SolverTiming(rows, cols, None, torch_path_s, None, floor)
    numba_cfg = SolverConfig(device="cpu", sweep="numba")
    sparsify(W[:64, :256], H[:256, :256], spec, numba_cfg)  # warm-up: numba compile / cache load
    numba_s = _median_time(lambda: sparsify(W, H, spec, numba_cfg), repeat)
    torch_path_s = _median_time(lambda: sparsify(W, H, spec, SolverConfig(device="cpu", sweep="torch")), repeat)
    n, m = (spec.n, spec.m) if spec.is_nm else (0, 0)
    torch_s = _median_time(lambda: reference_prune(W, H, spec.sparsity or 0.0, n, m), repeat)
    a, b = torch.randn(rows, cols), torch.randn(cols, cols)
    a @ b
    floor = _median_time(lambda: a @ b, max(repeat, 3))
    return SolverTiming(rows, cols, torch_s, torch_path_s, numba_s, floor)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        rows, _, cols = item.strip().lower().partition("x")
        shapes.append((int(rows), int(cols)))
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="rows x cols, comma separated")
    parser.add_argument("--sparsity", type=float, default=None)
    parser.add_argument("--pattern", default=None, help="n:m, e.g. 2:4")
    parser.add_argument("--repeat", type=int, default=1, help="runs per timing; the median is reported")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", default=None, help="write the timings as a JSON list here")
    args = parser.parse_args()
    spec = SparsitySpec.from_options(args.sparsity, args.pattern)

    print(f"# SparseGPT solve, {spec}, device {args.device}, {torch.get_num_threads()} threads; "
          f"{machine_info(('torch', 'numba')).describe()}")
    results = []
    if args.device == "cuda":
        print(f"{'shape':>12} {'torch_path_s':>13} {'gemm_floor_s':>13} {'path/floor':>11}")
    else:
        print(f"{'shape':>12} {'torch_s':>9} {'torch_path_s':>13} {'numba_s':>9} {'gemm_floor_s':>13} "
              f"{'torch/numba':>12} {'path/numba':>11} {'numba/floor':>12}")
    for rows, cols in parse_shapes(args.shapes):
        t = time_shape(rows, cols, spec, args.repeat, args.device)
        results.append(t)
        if args.device == "cuda":
            print(f"{rows:>6}x{cols:<5} {t.torch_path_s:13.4f} {t.gemm_floor_s:13.4f} "
                  f"{t.torch_path_s / t.gemm_floor_s:10.1f}x", flush=True)
        else:
            print(f"{rows:>6}x{cols:<5} {t.torch_s:9.3f} {t.torch_path_s:13.3f} {t.numba_s:9.3f} "
                  f"{t.gemm_floor_s:13.4f} {t.torch_s / t.numba_s:11.1f}x {t.torch_path_s / t.numba_s:10.1f}x "
                  f"{t.numba_s / t.gemm_floor_s:11.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in results], fh, indent=1)


if __name__ == "__main__":
    main()
