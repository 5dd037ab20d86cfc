"""File bytes, session load time and load peak RSS of sparse ONNX exports of an OPT-125m-shaped model.

    python benchmarks/bench_export.py [--sparsities 0.5,2:4,0.7] [--repeat 3] [--work DIR] [--json PATH]

The model is built from ../shared/tokenizers/opt/config.json with random weights (seed 0), every Linear weight of
its decoder blocks is magnitude-pruned, and it is exported through ``sparse_deploy.exporting`` as

    dense        the plain fp32 export (the baseline)
    coo          fp32, pruned weights as ONNX sparse_initializer
    packed       fp32, pruned weights as bits + nonzero values
    int8         int8 storage of 7-bit weights (per output channel, symmetric), stored dense
    int8+packed  int8 weights, pruned ones packed
    int4         4-bit MatMulNBits weights (groups of 32, symmetric, accuracy level 4)

Each session is created ``--repeat`` times, each in a fresh Python process (ONNX Runtime, CPU provider, default
options); load_s is the median time of creating the session, peak_rss_bytes the median of the process's
high-water mark (VmHWM) after it, import_rss_bytes the same before it. That is a plain
``onnxruntime.InferenceSession(model.onnx)``, which constant-folds the packed decode subgraphs. For the packed
variants the load is also measured through sparse-deploy's runtime (``sparse_deploy.runtime.ExportedModel``), which
decodes the packed weights with numpy into a temporary dense file (``sparse_encoding.write_dense``) and opens that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from common import ROOT, make_checkpoint, spec_of

from sparse_deploy import ExportConfig, export  # noqa: E402
from sparse_deploy.machine import machine_info  # noqa: E402

VARIANTS = {
    "dense": ExportConfig(encoding="dense"),
    "coo": ExportConfig(encoding="coo"),
    "packed": ExportConfig(encoding="packed"),
    "int8": ExportConfig(encoding="dense", quantize="int8"),
    "int8+packed": ExportConfig(encoding="packed", quantize="int8"),
    "int4": ExportConfig(encoding="dense", quantize="int4"),
}
_LOAD = """
import sys, time
def hwm():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))
import onnxruntime as ort
before = hwm()
start = time.perf_counter()
ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
print(time.perf_counter() - start, before, hwm())
"""
# The same through sparse-deploy's runtime, which opens packed exports by decoding the weights with numpy into a
# temporary dense file (sparse_encoding.write_dense) instead of letting ONNX Runtime constant-fold them.
_LOAD_STAGED = """
import sys, time
sys.path.insert(0, sys.argv[2])
def hwm():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))
from sparse_deploy.runtime import ExportedModel
before = hwm()
start = time.perf_counter()
ExportedModel(sys.argv[1].rsplit("/", 1)[0])
print(time.perf_counter() - start, before, hwm())
"""


@dataclass(frozen=True)
class ExportMeasure:
    sparsity: str
    variant: str
    file_bytes: int
    encoded_weights: int
    encoded_dense_bytes: int
    encoded_stored_bytes: int
    load_s: float
    import_rss_bytes: int
    peak_rss_bytes: int
    runtime_load_s: float | None  # opened by sparse_deploy.runtime: numpy-decoded into a dense file, not folded
    runtime_peak_rss_bytes: int | None
    rel_diff: float
    top1_agreement: float | None
    export_s: float


def measure_load(path: Path, repeat: int, staged: bool = False) -> tuple[float, int, int]:
    """Median (load seconds, RSS after the imports, peak RSS) over fresh processes."""
    runs = []
    for _ in range(repeat):
        script = _LOAD_STAGED if staged else _LOAD
        out = subprocess.run([sys.executable, "-c", script, str(path), str(ROOT)], capture_output=True, text=True,
                             check=True)
        seconds, before, peak = out.stdout.split()
        runs.append((float(seconds), int(before), int(peak)))
    return tuple(statistics.median(col) for col in zip(*runs))  # type: ignore[return-value]


def run(sparsities: list[str], repeat: int, work: Path) -> list[ExportMeasure]:
    rows = []
    for text in sparsities:
        tag = text.replace(":", "of")
        checkpoint = make_checkpoint(spec_of(text), work / f"checkpoint-{tag}")
        for variant, config in VARIANTS.items():
            out = work / f"onnx-{tag}-{variant.replace('+', '-')}"
            report = export(checkpoint, out, config, force=True)
            load_s, before, peak = measure_load(out / "model.onnx", repeat)
            packed = "packed" in variant
            rt_s, _, rt_peak = measure_load(out / "model.onnx", repeat, staged=True) if packed else (None,) * 3
            rows.append(ExportMeasure(
                sparsity=text, variant=variant, file_bytes=report.model_bytes, encoded_weights=len(report.encoded),
                encoded_dense_bytes=report.dense_bytes, encoded_stored_bytes=report.stored_bytes, load_s=load_s,
                import_rss_bytes=before, peak_rss_bytes=peak,
                runtime_load_s=rt_s, runtime_peak_rss_bytes=rt_peak,
                rel_diff=report.parity.rel_diff,
                top1_agreement=report.parity.top1_agreement, export_s=report.time_s,
            ))
            print(_line(rows[-1], rows), flush=True)
    return rows


def _line(row: ExportMeasure, rows: list[ExportMeasure]) -> str:
    base = next(r for r in rows if r.sparsity == row.sparsity and r.variant == "dense")
    stored = f"{row.encoded_stored_bytes / row.encoded_dense_bytes:.3f}" if row.encoded_dense_bytes else "-"
    top1 = "-" if row.top1_agreement is None else f"{row.top1_agreement:.3f}"
    staged = "- | -" if row.runtime_load_s is None else (
        f"{row.runtime_load_s / base.load_s:.2f} | {row.runtime_peak_rss_bytes / base.peak_rss_bytes:.2f}")
    return (f"| {row.sparsity} | {row.variant} | {row.file_bytes / 1e6:.1f} | {row.file_bytes / base.file_bytes:.3f} | "
            f"{stored} | {row.load_s:.2f} | {row.load_s / base.load_s:.2f} | {row.peak_rss_bytes / 1e6:.0f} | "
            f"{row.peak_rss_bytes / base.peak_rss_bytes:.2f} | {staged} | {row.rel_diff:.1e} | {top1} |")


HEADER = ("| sparsity | variant | file MB | file/dense | stored/dense (pruned weights) | load s | load/dense | "
          "peak RSS MB | RSS/dense | runtime load/dense | runtime RSS/dense | rel. logit error | "
          "top-1 agreement |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", default="0.5,2:4,0.7")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="folder for checkpoints and exports (default: temp)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(machine_info(("torch", "transformers", "onnxscript", "onnx", "onnxruntime")).describe())
    print(HEADER)
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        rows = run(args.sparsities.split(","), args.repeat, args.work or Path(tmp))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
