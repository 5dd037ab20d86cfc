"""The ONNX Runtime side of a benchmark: one exported folder measured in this process through ``runtime/``
(the path users run). ``bench.worker`` calls it in a fresh process, so the peak RSS is the model's own."""

from __future__ import annotations

import time
from pathlib import Path

from sparse_deploy.bench.protocol import BenchConfig, ModelBench, decoder_bench, encoder_bench, synthetic_prompt
from sparse_deploy.machine import usable_cores


def measure_onnx(folder: str | Path, config: BenchConfig) -> ModelBench:
    """Load time, then the protocol's timings of one exported folder (its files were verified by the caller)."""
    from sparse_deploy.runtime.generate import DecoderRunner, embed
    from sparse_deploy.runtime.session import ExportedModel, SessionConfig

    threads = config.threads or usable_cores()
    start = time.perf_counter()
    model = ExportedModel(folder, SessionConfig(threads=threads, verify=False, kernels=config.kernels))  # verified
    load_s = time.perf_counter() - start
    common = dict(name=str(folder), backend="onnxruntime", kind=model.info.kind, file_bytes=model.file_bytes,
                  load_s=load_s, threads=threads, encodings=model.export_info.summary(), kernels=model.kernels.to_json())
    if model.info.kind == "encoder":
        return encoder_bench(common, config, lambda batch: embed(model, batch, batch_size=len(batch)))
    runner = DecoderRunner(model)
    vocab = int(model.hf_config.get("vocab_size", 1000))
    prompt = synthetic_prompt(vocab, config.batch, config.prompt_len)
    return decoder_bench(common, config, lambda on_step: runner.greedy(prompt, config.new_tokens, stop_at_eos=False,
                                                                       on_step=on_step))
