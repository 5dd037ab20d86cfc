"""The PyTorch eager baseline for ``sparse-deploy bench --torch-baseline``: what users run without an export.

Same protocol and the same numbers as ``runtime.bench.measure_onnx``, for a checkpoint folder under transformers
(fp32 on the CPU, KV cache on, greedy). Run as a worker: ``python -m sparse_deploy.bench_torch FOLDER CONFIG``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from sparse_deploy.errors import SparseDeployError
from sparse_deploy.hf import cache_keyword, load_model, load_tokenizer, resolve_source, returned_cache
from sparse_deploy.inspection import weight_files
from sparse_deploy.machine import peak_rss_bytes
from sparse_deploy.runtime.bench import (
    BenchConfig,
    ModelBench,
    _decoder_timings,
    _encoder_timings,
    synthetic_prompt,
)
from sparse_deploy.runtime.session import default_threads


@torch.no_grad()
def measure_torch(folder: str | Path, config: BenchConfig) -> ModelBench:
    threads = config.threads or default_threads()
    torch.set_num_threads(threads)
    source = resolve_source(str(folder))
    start = time.perf_counter()
    model, adapter = load_model(source, config.trust_remote_code)
    model = model.float()
    load_s = time.perf_counter() - start
    common = dict(name=str(folder), backend="torch", kind=adapter.kind, load_s=load_s, threads=threads,
                  file_bytes=sum(p.stat().st_size for p in weight_files(Path(source))))
    if adapter.kind == "encoder":
        tokenizer = load_tokenizer(source, config.trust_remote_code)

        def run(batch: list[str]) -> None:
            model(**tokenizer(batch, padding=True, return_tensors="pt"))

        b1, b32 = _encoder_timings(run, config)
        return ModelBench(peak_rss_bytes=peak_rss_bytes(), batch1_ms=b1, sentences_per_s_batch1=1e3 / b1.p50_ms,
                          sentences_per_s_batch32=b32, **common)
    prompt = torch.from_numpy(synthetic_prompt(model.config.vocab_size, config.batch, config.prompt_len))

    keyword = cache_keyword(model)  # "cache" from transformers 5.24, "past_key_values" before

    def generate(on_step) -> None:
        past, ids, mask = None, prompt, torch.ones_like(prompt)
        for step in range(config.new_tokens):
            begin = time.perf_counter()
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{keyword: past})
            ids = out.logits[:, -1, :].argmax(-1, keepdim=True)
            on_step(step, time.perf_counter() - begin)
            past = returned_cache(out)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)

    prefill, decode = _decoder_timings(generate, config)
    return ModelBench(peak_rss_bytes=peak_rss_bytes(), prefill_ms=prefill, decode_ms=decode,
                      tokens_per_s=config.batch * 1e3 / decode.p50_ms, **common)


if __name__ == "__main__":
    try:
        result = measure_torch(sys.argv[1], BenchConfig(**json.loads(sys.argv[2])))
    except SparseDeployError as exc:  # one line for the parent to report
        sys.exit(str(exc))
    print(json.dumps(asdict(result), default=lambda o: float(o) if isinstance(o, np.floating) else str(o)))
