"""Latency, throughput, load time and memory of exported models under ONNX Runtime. Numbers only: formatting
happens in the CLI. Each model is measured in a fresh process, so its peak RSS is its own.

Protocol: warm-up runs first, then ``runs`` timed runs; latencies are reported as median (p50), p90 and p99.
Decoders: ``prefill_ms`` is the prompt's forward pass; ``decode_ms_*`` one new token with the KV cache.
Encoders: sentences per second at batch 1 and batch 32.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sparse_deploy.errors import ConfigError, RuntimeSessionError, SparseDeployError


@dataclass(frozen=True)
class BenchConfig:
    prompt_len: int = 128
    new_tokens: int = 64
    batch: int = 1
    threads: int | None = None
    runs: int = 5
    warmup: int = 1
    verify: bool = True  # check the exports' model files against export.json's sha256 first (not timed)
    kernels: str = "auto"  # auto | sparse | dense: which packed layers run on the native sparse kernels
    trust_remote_code: bool = False  # the torch baseline may run the Python code its model folder ships

    def __post_init__(self) -> None:
        from sparse_deploy.runtime.kernel_choice import check_mode

        check_mode(self.kernels)
        for name in ("prompt_len", "batch", "runs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.new_tokens < 2:
            raise ConfigError(f"new-tokens must be >= 2 (the prefill makes the first token, decode latency is timed "
                              f"on the rest), got {self.new_tokens}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class LatencyStats:
    n: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float

    @classmethod
    def of_seconds(cls, samples: list[float]) -> LatencyStats:
        ms = np.asarray(samples, dtype=np.float64) * 1e3
        return cls(len(ms), float(ms.mean()), *(float(np.percentile(ms, q)) for q in (50, 90, 99)))


@dataclass(frozen=True)
class ModelBench:
    """One model's figures; decoder fields are None for encoders and vice versa."""

    name: str
    backend: str  # "onnxruntime" or "torch"
    kind: str
    file_bytes: int
    load_s: float
    peak_rss_bytes: int
    threads: int
    prefill_ms: LatencyStats | None = None
    decode_ms: LatencyStats | None = None
    tokens_per_s: float | None = None
    batch1_ms: LatencyStats | None = None
    sentences_per_s_batch1: float | None = None
    sentences_per_s_batch32: float | None = None
    encodings: dict = field(default_factory=dict)
    kernels: dict = field(default_factory=dict)  # mode, isa, sparse_layers, dense_layers, reason (ONNX only)

    def flat(self) -> dict:
        """Keys that say what they are: load_s, peak_rss_bytes, prefill_ms, decode_ms_p50, decode_ms_p90, ..."""
        out = asdict(self)
        for key in ("prefill_ms", "decode_ms", "batch1_ms"):
            del out[key]
            stats = getattr(self, key)
            if stats is not None:
                if key == "prefill_ms":
                    out[key] = stats.p50_ms
                for q in ("p50", "p90", "p99"):
                    out[f"{key}_{q}"] = getattr(stats, f"{q}_ms")
        return out


def synthetic_prompt(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Token ids [batch, length] drawn from the ordinary part of the vocabulary (ids >= 100)."""
    rng = np.random.default_rng(seed)
    return rng.integers(100, max(vocab, 101), size=(batch, length), dtype=np.int64)


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse weights cut the bytes a model needs on disk and in memory.",
    "Inference on commodity CPUs is usually bound by memory bandwidth.",
    "A short sentence.",
    "ONNX Runtime folds constant subgraphs when it creates a session, so decoding happens once at load time.",
]


def measure_onnx(folder: str | Path, config: BenchConfig) -> ModelBench:
    """Measure one exported folder in this process (call through ``measure_in_subprocess`` for peak RSS)."""
    from sparse_deploy.machine import peak_rss_bytes
    from sparse_deploy.runtime.generate import DecoderRunner, embed
    from sparse_deploy.runtime.session import ExportedModel, SessionConfig, default_threads

    threads = config.threads or default_threads()
    start = time.perf_counter()
    model = ExportedModel(folder, SessionConfig(threads=threads, verify=False, kernels=config.kernels))  # verified
    load_s = time.perf_counter() - start
    common = dict(name=str(folder), backend="onnxruntime", kind=model.info.kind, file_bytes=model.file_bytes,
                  load_s=load_s, threads=threads, encodings=model.export_info.summary(), kernels=model.kernels.to_json())
    if model.info.kind == "encoder":
        b1, b32 = _encoder_timings(lambda batch: embed(model, batch, batch_size=len(batch)), config)
        return ModelBench(peak_rss_bytes=peak_rss_bytes(), batch1_ms=b1,
                          sentences_per_s_batch1=1e3 / b1.p50_ms, sentences_per_s_batch32=b32, **common)
    runner = DecoderRunner(model)
    vocab = int(model.hf_config.get("vocab_size", 1000))
    prompt = synthetic_prompt(vocab, config.batch, config.prompt_len)
    prefill, decode = _decoder_timings(
        lambda on_step: runner.greedy(prompt, config.new_tokens, stop_at_eos=False, on_step=on_step), config)
    return ModelBench(peak_rss_bytes=peak_rss_bytes(), prefill_ms=prefill, decode_ms=decode,
                      tokens_per_s=config.batch * 1e3 / decode.p50_ms, **common)


def _decoder_timings(run, config: BenchConfig) -> tuple[LatencyStats, LatencyStats]:
    """``run(on_step)`` generates once, reporting each step; step 0 is the prefill."""
    prefill: list[float] = []
    decode: list[float] = []
    for index in range(config.warmup + config.runs):
        timed = index >= config.warmup

        def on_step(step: int, seconds: float) -> None:
            if timed:
                (prefill if step == 0 else decode).append(seconds)

        run(on_step)
    if not decode:
        raise ConfigError("new-tokens must be >= 2 to time decoding (the first token comes from the prefill)")
    return LatencyStats.of_seconds(prefill), LatencyStats.of_seconds(decode)


def _encoder_timings(run, config: BenchConfig) -> tuple[LatencyStats, float]:
    """Batch-1 latency over the sample sentences, and batch-32 throughput."""
    batch32 = (SENTENCES * 7)[:32]
    for _ in range(config.warmup):
        run(SENTENCES[:1])
        run(batch32)
    single = []
    for _ in range(config.runs):
        for sentence in SENTENCES:
            start = time.perf_counter()
            run([sentence])
            single.append(time.perf_counter() - start)
    big = []
    for _ in range(config.runs):
        start = time.perf_counter()
        run(batch32)
        big.append(time.perf_counter() - start)
    return LatencyStats.of_seconds(single), 32 / float(np.median(big))


def measure_in_subprocess(target: str | Path, config: BenchConfig, backend: str = "onnxruntime") -> ModelBench:
    """Run the measurement in a fresh Python process and read its JSON back."""
    module = "sparse_deploy.runtime.bench" if backend == "onnxruntime" else "sparse_deploy.bench_torch"
    cmd = [sys.executable, "-m", module, str(target), json.dumps(asdict(config))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise RuntimeSessionError(f"benchmark of {target} failed: {lines[-1] if lines else proc.returncode}")
    return from_json(json.loads(proc.stdout.strip().splitlines()[-1]))


def from_json(data: dict) -> ModelBench:
    for key in ("prefill_ms", "decode_ms", "batch1_ms"):
        if data.get(key) is not None:
            data[key] = LatencyStats(**data[key])
    return ModelBench(**data)


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
    from sparse_deploy.machine import machine_info
    from sparse_deploy.runtime.session import default_threads

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
    facts = {"cpu": info.cpu, "cores": info.cores, "threads": config.threads or default_threads(),
             "python": info.python, **{f"{k}_version": v for k, v in info.versions.items() if v}}
    return Comparison(measured, dense, eager, facts)


def _a(kind: str) -> str:
    return f"{'an' if kind[:1] in tuple('aeiou') else 'a'} {kind}"


def _main() -> None:
    """Worker: ``python -m sparse_deploy.runtime.bench FOLDER CONFIG_JSON`` prints the ModelBench as JSON."""
    try:
        result = measure_onnx(sys.argv[1], BenchConfig(**json.loads(sys.argv[2])))
    except SparseDeployError as exc:  # one line for the parent to report
        sys.exit(str(exc))
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    _main()
