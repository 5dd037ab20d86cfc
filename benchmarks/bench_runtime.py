"""What sparsity and int8 buy at run time on this CPU: an OPT-125m-shaped model, 50% pruned, under ONNX Runtime.

    python benchmarks/bench_runtime.py [--prompt-len 128] [--new-tokens 64] [--runs 5] [--threads N] [--json PATH]

Variants, each exported by ``sparse_deploy.export`` from the same magnitude-pruned checkpoint (random weights from
../shared/tokenizers/opt/config.json, every decoder-block Linear at 50%) and measured in a fresh process by
``sparse_deploy.runtime.bench``: dense fp32, packed-sparse fp32, int8 (dense storage), int8+packed, and the
checkpoint under PyTorch eager. Then the per-token cost of the runtime's Python wrapper: the same greedy decode
driven by a bare ``run_with_ort_values`` loop, by ``DecoderRunner``, and (when optimum is installed, which
sparse-deploy no longer needs) by optimum's ``ORTModelForCausalLM``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_export import make_checkpoint, spec_of  # noqa: E402

from sparse_deploy import ExportConfig, export  # noqa: E402
from sparse_deploy.runtime.bench import BenchConfig, Comparison, measure_in_subprocess  # noqa: E402

VARIANTS = {
    "dense fp32": ExportConfig(encoding="dense"),
    "packed fp32": ExportConfig(encoding="packed"),
    "int8": ExportConfig(encoding="dense", quantize="int8"),
    "int8+packed": ExportConfig(encoding="packed", quantize="int8"),
}


def wrapper_overhead(folder: Path, steps: int, threads: int | None) -> dict[str, float]:
    """Median milliseconds per decode step (prompt of 16 tokens, then ``steps`` tokens) for three drivers."""
    import onnxruntime as ort
    import torch

    from sparse_deploy.runtime import DecoderRunner, ExportedModel, SessionConfig

    model = ExportedModel(folder, SessionConfig(threads=threads))
    runner = DecoderRunner(model)
    prompt = np.arange(100, 116, dtype=np.int64)[None, :]

    def bare() -> list[float]:
        session, times = model.session, []
        past = runner.empty_past(1)
        ids, mask = prompt, np.ones_like(prompt)
        for step in range(steps + 1):
            start = time.perf_counter()
            feeds = {"input_ids": ort.OrtValue.ortvalue_from_numpy(ids),
                     "attention_mask": ort.OrtValue.ortvalue_from_numpy(mask),
                     "position_ids": ort.OrtValue.ortvalue_from_numpy(
                         np.arange(mask.shape[1] - ids.shape[1], mask.shape[1], dtype=np.int64)[None, :])}
            feeds.update(zip(runner.past_names, past))
            out = session.run_with_ort_values(runner.output_names, feeds)
            ids = out[0].numpy()[:, -1:].argmax(-1).astype(np.int64)
            past = out[1:]
            mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
            times.append(time.perf_counter() - start)
        return times[1:]

    def ours() -> list[float]:
        times: list[float] = []
        runner.greedy(prompt, steps + 1, stop_at_eos=False, on_step=lambda i, s: times.append(s) if i else None)
        return times

    drivers = [("bare_ms", bare), ("sparse_deploy_ms", ours)]
    try:
        from optimum.onnxruntime import ORTModelForCausalLM
    except ImportError:  # optimum is not a dependency any more
        ORTModelForCausalLM = None
    if ORTModelForCausalLM is not None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        optimum_model = ORTModelForCausalLM.from_pretrained(folder, use_cache=True, use_io_binding=False,
                                                            session_options=options)
        drivers.append(("optimum_ms", lambda: optimum()))

    def optimum() -> list[float]:
        start = time.perf_counter()
        optimum_model.generate(torch.from_numpy(prompt), max_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        optimum_model.generate(torch.from_numpy(prompt), max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                               do_sample=False)
        return [(time.perf_counter() - start - prefill) / steps]

    result = {}
    for name, fn in drivers:
        fn()  # warm-up
        result[name] = float(np.median([t for _ in range(3) for t in fn()]) * 1e3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    config = BenchConfig(prompt_len=args.prompt_len, new_tokens=args.new_tokens, runs=args.runs, threads=args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_runtime_") as tmp:
        work = args.work or Path(tmp)
        checkpoint = make_checkpoint(spec_of("0.5"), work / "checkpoint")
        results = {}
        for name, export_config in VARIANTS.items():
            folder = work / name.replace(" ", "-").replace("+", "-")
            if not (folder / "model.onnx").exists():
                export(checkpoint, folder, export_config, force=True)
            results[name] = measure_in_subprocess(folder, config)
            print(f"measured {name}", flush=True)
        results["torch eager"] = measure_in_subprocess(checkpoint, config, backend="torch")
        overhead = wrapper_overhead(work / "dense-fp32", 32, args.threads)

    from sparse_deploy.machine import machine_info

    dense = results["dense fp32"]
    print(f"\n# OPT-125m shape, 50% pruned; prompt {config.prompt_len}, {config.new_tokens} new tokens, batch "
          f"{config.batch}, {dense.threads} threads; {machine_info(('onnxruntime', 'torch')).describe()}")
    print(f"{'variant':<14} {'file MB':>8} {'load s':>7} {'RSS MB':>7} {'prefill ms':>10} {'decode p50':>10} "
          f"{'p90':>7} {'p99':>7} {'tok/s':>7} {'decode vs dense':>16}")
    rows = []
    for name, r in results.items():
        ratio = Comparison(r, dense).ratios(dense)
        rows.append({"variant": name, **r.flat(), "vs_dense": ratio})
        speed = dense.decode_ms.p50_ms / r.decode_ms.p50_ms
        print(f"{name:<14} {r.file_bytes / 1e6:8.1f} {r.load_s:7.2f} {r.peak_rss_bytes / 2**20:7.0f} "
              f"{r.prefill_ms.p50_ms:10.1f} {r.decode_ms.p50_ms:10.2f} {r.decode_ms.p90_ms:7.2f} "
              f"{r.decode_ms.p99_ms:7.2f} {r.tokens_per_s:7.1f} {speed:15.2f}x")
    print(f"\nper-token decode, dense fp32, 32 steps after a 16-token prompt: bare loop {overhead['bare_ms']:.2f} ms, "
          f"sparse-deploy runner {overhead['sparse_deploy_ms']:.2f} ms" + (
              f", optimum ORTModelForCausalLM {overhead['optimum_ms']:.2f} ms" if "optimum_ms" in overhead else
              " (optimum not installed)"))
    if args.json:
        args.json.write_text(json.dumps({"config": asdict(config), "rows": rows, "wrapper_overhead": overhead},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
