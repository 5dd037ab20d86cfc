"""The benchmark protocol: its settings, the numbers it produces, and the timing loops both workers share.

Warm-up runs first, then ``runs`` timed runs; latencies are reported as median (p50), p90 and p99.
Decoders: ``prefill_ms`` is the prompt's forward pass; ``decode_ms_*`` one new token with the KV cache.
Encoders: sentences per second at batch 1 and batch 32. Numbers only: formatting happens in ``bench.report``.
Imports numpy and the standard library only.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from sparse_deploy.errors import ConfigError


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


def from_json(data: dict) -> ModelBench:
    for key in ("prefill_ms", "decode_ms", "batch1_ms"):
        if data.get(key) is not None:
            data[key] = LatencyStats(**data[key])
    return ModelBench(**data)


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


def decoder_bench(common: dict, config: BenchConfig, run) -> ModelBench:
    """Time ``run(on_step)``, which generates ``config.new_tokens`` tokens once and reports each step (step 0 is
    the prefill; ``BenchConfig`` asks for at least 2 tokens, so there are decode steps to time)."""
    from sparse_deploy.machine import peak_rss_bytes

    prefill: list[float] = []
    decode: list[float] = []
    for index in range(config.warmup + config.runs):
        timed = index >= config.warmup

        def on_step(step: int, seconds: float) -> None:
            if timed:
                (prefill if step == 0 else decode).append(seconds)

        run(on_step)
    decode_ms = LatencyStats.of_seconds(decode)
    return ModelBench(peak_rss_bytes=peak_rss_bytes(), prefill_ms=LatencyStats.of_seconds(prefill),
                      decode_ms=decode_ms, tokens_per_s=config.batch * 1e3 / decode_ms.p50_ms, **common)


def encoder_bench(common: dict, config: BenchConfig, run) -> ModelBench:
    """Batch-1 latency of ``run(sentences)`` over the sample sentences, and batch-32 throughput."""
    from sparse_deploy.machine import peak_rss_bytes

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
    batch1 = LatencyStats.of_seconds(single)
    return ModelBench(peak_rss_bytes=peak_rss_bytes(), batch1_ms=batch1, sentences_per_s_batch1=1e3 / batch1.p50_ms,
                      sentences_per_s_batch32=32 / float(np.median(big)), **common)
