"""The PyTorch eager side of a benchmark (``sparse-deploy bench --torch-baseline``): what users run without an
export. Same protocol and the same numbers as ``bench.onnx_worker``, for a checkpoint folder under transformers
(fp32 on the CPU, KV cache on, greedy). ``bench.worker`` calls it in a fresh process.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from sparse_deploy.bench.protocol import BenchConfig, ModelBench, decoder_bench, encoder_bench, synthetic_prompt
from sparse_deploy.hf import cache_keyword, load_model, load_tokenizer, resolve_source, returned_cache
from sparse_deploy.inspection import weight_files
from sparse_deploy.machine import usable_cores


@torch.no_grad()
def measure_torch(folder: str | Path, config: BenchConfig) -> ModelBench:
    threads = config.threads or usable_cores()
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

        return encoder_bench(common, config, run)
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

    return decoder_bench(common, config, generate)
