"""``benchmark()``: an exported folder against its baselines (a dense export, a checkpoint under PyTorch eager),
each measured by ``bench.worker`` in its own process, one after the other, and the ratios between them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sparse_deploy.bench.protocol import BenchConfig, ModelBench
from sparse_deploy.bench.worker import measure_in_subprocess
from sparse_deploy.errors import ConfigError


@dataclass(frozen=True)
class Comparison:
    """The measured model against the dense ONNX export and PyTorch eager, where given. Ratios are
    measured/baseline: below 1 is smaller or faster for sizes and latencies, above 1 faster for throughputs."""

    model: ModelBench
    dense: ModelBench | None = None
    torch: ModelBench | None = None
    machine: dict = field(default_factory=dict)

    def ratios(self, baseline: ModelBench) -> dict[str, float]:
        m, b = self.model, baseline
        pairs = {"file_bytes_ratio": (m.file_bytes, b.file_bytes), "load_s_ratio": (m.load_s, b.load_s),
                 "peak_rss_ratio": (m.peak_rss_bytes, b.peak_rss_bytes)}
        if m.decode_ms and b.decode_ms:
            pairs |= {"prefill_ratio": (m.prefill_ms.p50_ms, b.prefill_ms.p50_ms),
                      "decode_p50_ratio": (m.decode_ms.p50_ms, b.decode_ms.p50_ms),
                      "decode_p90_ratio": (m.decode_ms.p90_ms, b.decode_ms.p90_ms),
                      "tokens_per_s_ratio": (m.tokens_per_s, b.tokens_per_s)}
        if m.batch1_ms and b.batch1_ms:
            pairs |= {"batch1_p50_ratio": (m.batch1_ms.p50_ms, b.batch1_ms.p50_ms),
                      "sentences_per_s_batch32_ratio": (m.sentences_per_s_batch32, b.sentences_per_s_batch32)}
        return {k: (a / c if c else float("nan")) for k, (a, c) in pairs.items()}

    def to_json(self) -> dict:
        out = {"machine": self.machine, "model": self.model.flat()}
        if self.dense:
            out["dense"] = self.dense.flat()
            out["vs_dense"] = self.ratios(self.dense)
        if self.torch:
            out["torch"] = self.torch.flat()
            out["vs_torch"] = self.ratios(self.torch)
        return out


def benchmark(model: str | Path, *, baseline: str | Path | None = None, torch_baseline: str | Path | None = None,
              config: BenchConfig = BenchConfig(), allow_mismatch: bool = False) -> Comparison:
    """Measure an exported folder, and the baselines given (a dense export, a checkpoint under PyTorch eager),
    each in its own process, one after the other. A baseline of another architecture, shape or vocabulary is
    refused unless ``allow_mismatch``; with ``config.verify`` the exports' files are checked against export.json."""
    from sparse_deploy.integrity import require_same_model, verify_export
    from sparse_deploy.machine import machine_info, usable_cores

    if not allow_mismatch:
        for option, other in (("--baseline", baseline), ("--torch-baseline", torch_baseline)):
            if other is not None:
                require_same_model(model, other, option)
    if config.verify:
        for folder in (model, baseline):
            if folder is not None:
                verify_export(folder)

    measured = measure_in_subprocess(model, config)
    dense = measure_in_subprocess(baseline, config) if baseline else None
    eager = measure_in_subprocess(torch_baseline, config, backend="torch") if torch_baseline else None
    for other in (dense, eager):
        if other is not None and other.kind != measured.kind:
            raise ConfigError(f"{other.name} is {_a(other.kind)} but {model} is {_a(measured.kind)}; compare like "
                              f"with like")
    info = machine_info(("onnxruntime", "numpy", "torch"))
    facts = {"cpu": info.cpu, "cores": info.cores, "threads": config.threads or usable_cores(),
             "python": info.python, **{f"{k}_version": v for k, v in info.versions.items() if v}}
    return Comparison(measured, dense, eager, facts)


def _a(kind: str) -> str:
    return f"{'an' if kind[:1] in tuple('aeiou') else 'a'} {kind}"
