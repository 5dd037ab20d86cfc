"""Peak RSS and time of the streaming prune against model size, and resume after SIGKILL.

    python benchmarks/bench_prune.py [--shapes opt-125m,1.1b,7b] [--layers N] [--kill-after K] [--resume-blocks R]
                                     [--in-memory] [--check-resume SHAPE:LAYERS] [--dir DIR] [--json PATH]

Each shape is written as a random-weight bf16 checkpoint in sharded safetensors (1 GiB shards, as
save_pretrained writes them; generating it is part of the run), then pruned 50% (SparseGPT) on the CPU with 16 x
512 calibration tokens from WikiText-2 validation in ../shared/data, each run a fresh `python -m sparse_deploy
prune` process. Peak RSS is the process's VmHWM (polled from /proc and taken from the manifest, which keeps the
maximum over the runs that built one output). ``--kill-after K`` SIGKILLs the run once K blocks are done (what a
whole 32-block 7B run costs on a small CPU is then K blocks' worth), and ``--resume-blocks R`` continues it with
``--resume`` for R more blocks (0: to the end). ``--in-memory`` also runs the whole-model prune (the path before
streaming) for comparison, ``--in-memory-seconds S`` SIGKILLs it after S seconds (it has loaded the whole model
by then, so its peak RSS is a lower bound). ``--check-resume 1.1b:4`` prunes that shape cut to 4 blocks twice,
straight and killed after half its blocks then resumed, and compares every output tensor bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import ROOT, SHARED
CALIB = SHARED / "data" / "wikitext-2" / "valid.txt"
NSAMPLES, SEQLEN = 16, 512

SHAPES = {  # Llama-shaped unless noted; vocab 32000
    "opt-125m": dict(model_type="opt", hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=768),
    "1.1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
}


@dataclass(frozen=True)
class StreamRun:
    shape: str
    mode: str  # "stream" | "in-memory"
    blocks: int
    blocks_done: int
    model_bytes: int
    peak_rss_bytes: int
    wall_s: float
    mean_block_s: float
    total_s: float | None  # the whole prune (None when killed before the end)
    resumed_from: int | None = None


def write_model(shape: str, folder: Path, layers: int | None = None, shard_bytes: int = 2**30) -> int:
    """A random bf16 checkpoint of ``shape`` in sharded safetensors, written shard by shard (never the whole model
    in memory), with a tokenizer whose ids fit the vocabulary. Returns the bytes of weights."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = dict(SHAPES[shape])
    if layers:
        spec["num_hidden_layers"] = layers
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    config.dtype = "bfloat16"
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    tied = set(meta.get_expanded_tied_weights_keys())
    entries = [(k, tuple(v.shape)) for k, v in meta.state_dict().items() if k not in tied]
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    groups: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for key, shp in entries:
        nbytes = 2 * _numel(shp)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((key, shp))
        size += nbytes
    weight_map, total = {}, 0
    for n, group in enumerate(groups, 1):
        name = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for key, shp in group:
            if key.endswith("norm.weight") or key.endswith("layer_norm.weight"):
                tensors[key] = torch.ones(shp, dtype=torch.bfloat16)
            elif key.endswith(".bias") or len(shp) == 1:
                tensors[key] = torch.zeros(shp, dtype=torch.bfloat16)
            else:
                tensors[key] = (torch.randn(shp, generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[key] = name
            total += tensors[key].numel() * 2
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    tokenizer = SHARED / "tokenizers" / "opt" if shape == "opt-125m" else SHARED / "models" / "stdlib-opt-4l"
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)
    return total


def prune_run(model: Path, out: Path, *, in_memory: bool = False, kill_after: int | None = None,
              resume: bool = False, stop_after: int | None = None,
              seconds: float | None = None) -> tuple[int, float, dict | None, int]:
    """One `sparse-deploy prune` process; SIGKILLed once ``kill_after`` blocks are done (or ``stop_after`` more
    after resuming). Returns (peak RSS polled, wall s, manifest or None, blocks done)."""
    cmd = [sys.executable, "-m", "sparse_deploy", "prune", str(model), "-o", str(out), "--calibration", str(CALIB),
           "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--device", "cpu", "--sparsity", "0.5"]
    cmd += ["--in-memory"] if in_memory else []
    cmd += ["--resume"] if resume else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    progress_file = out.parent / f".{out.name}.sparse-deploy-stage" / ".resume" / "progress.json"
    start_block = _done(progress_file)
    limit = kill_after if kill_after is not None else (start_block + stop_after if stop_after else None)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _vmhwm(proc.pid))
        over_time = seconds is not None and time.perf_counter() - start > seconds
        if over_time or (limit is not None and _done(progress_file) >= limit):
            peak = max(peak, _vmhwm(proc.pid))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return peak, time.perf_counter() - start, None, _done(progress_file)
        time.sleep(0.5)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"prune failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    manifest = json.loads((out / "sparse_deploy.json").read_text())
    return max(peak, manifest["peak_rss_bytes"]), wall, manifest, len(manifest["time_per_layer_s"])


def _done(progress_file: Path) -> int:
    try:
        return int(json.loads(progress_file.read_text())["next_block"])
    except (OSError, ValueError, KeyError):
        return 0


def _vmhwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _block_times(out: Path) -> list[float]:
    progress_file = out.parent / f".{out.name}.sparse-deploy-stage" / ".resume" / "progress.json"
    try:
        return json.loads(progress_file.read_text())["layer_times_s"]
    except (OSError, ValueError, KeyError):
        return []


def bench_shape(shape: str, root: Path, args) -> list[StreamRun]:
    model = root / f"{shape}-random"
    t0 = time.perf_counter()
    model_bytes = write_model(shape, model, args.layers)
    blocks = args.layers or SHAPES[shape]["num_hidden_layers"]
    print(f"# wrote {shape} ({blocks} blocks, {model_bytes / 2**30:.2f} GiB bf16) in {time.perf_counter() - t0:.0f} s",
          flush=True)
    runs = []
    out = root / f"{shape}-pruned"
    kill = args.kill_after if args.kill_after and args.kill_after < blocks else None
    peak, wall, manifest, done = prune_run(model, out, kill_after=kill)
    times = manifest["time_per_layer_s"] if manifest else _block_times(out)
    runs.append(StreamRun(shape, "stream", blocks, done, model_bytes, peak, wall, sum(times) / max(len(times), 1),
                          manifest["time_s"] if manifest else None))
    _print(runs[-1])
    if kill is not None and args.resume_blocks is not None:
        peak, wall, manifest, done = prune_run(model, out, resume=True, stop_after=args.resume_blocks or None)
        times = manifest["time_per_layer_s"] if manifest else _block_times(out)
        runs.append(StreamRun(shape, "stream, resumed", blocks, done, model_bytes, peak, wall,
                              sum(times) / max(len(times), 1), manifest["time_s"] if manifest else None, kill))
        _print(runs[-1])
    if args.in_memory:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.parent / f".{out.name}.sparse-deploy-stage", ignore_errors=True)
        peak, wall, manifest, done = prune_run(model, out, in_memory=True, seconds=args.in_memory_seconds)
        times = manifest["time_per_layer_s"] if manifest else []
        runs.append(StreamRun(shape, "in-memory" if manifest else f"in-memory, killed at {wall:.0f} s", blocks,
                              done if manifest else 0, model_bytes, peak, wall, sum(times) / max(len(times), 1),
                              manifest["time_s"] if manifest else None))
        _print(runs[-1])
    for path in (model, out, out.parent / f".{out.name}.sparse-deploy-stage"):
        shutil.rmtree(path, ignore_errors=True)
    return runs


def check_resume(spec: str, root: Path) -> bool:
    shape, _, layers = spec.partition(":")
    layers_n = int(layers or 4)
    model = root / f"{shape}-check"
    write_model(shape, model, layers_n)
    prune_run(model, root / "straight")
    killed = prune_run(model, root / "resumed", kill_after=layers_n // 2)
    prune_run(model, root / "resumed", resume=True)
    same = _digest(root / "straight") == _digest(root / "resumed")
    print(f"# resume check on {shape} x {layers_n} blocks: killed after {killed[3]} blocks, resumed: "
          f"{'bit-identical' if same else 'DIFFERENT'} to the uninterrupted run", flush=True)
    for path in ("straight", "resumed", model.name):
        shutil.rmtree(root / path, ignore_errors=True)
    return same


def _digest(folder: Path) -> dict[str, str]:
    import torch
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        for key, tensor in load_file(str(shard)).items():
            out[key] = hashlib.sha256(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def _print(run: StreamRun) -> None:
    total = f"{run.total_s:.0f}" if run.total_s is not None else "-"
    print(f"{run.shape:>9} {run.mode:>16} {run.blocks_done:>3}/{run.blocks:<3} {run.model_bytes / 2**30:8.2f} "
          f"{run.peak_rss_bytes / 2**30:10.2f} {run.mean_block_s:9.1f} {total:>8} {run.wall_s:8.0f}", flush=True)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="opt-125m,1.1b,7b")
    parser.add_argument("--layers", type=int, default=None, help="cut every shape to this many blocks")
    parser.add_argument("--kill-after", type=int, default=None, help="SIGKILL each run after this many blocks")
    parser.add_argument("--resume-blocks", type=int, default=None, help="then resume for this many blocks (0: all)")
    parser.add_argument("--in-memory", action="store_true", help="also run the whole-model prune")
    parser.add_argument("--in-memory-seconds", type=float, default=None,
                        help="SIGKILL the whole-model run after this long (its peak comes with loading the model)")
    parser.add_argument("--check-resume", default=None, help="SHAPE:LAYERS for the bit-identical resume check")
    parser.add_argument("--dir", default=None, help="where to write the generated models (default: a temp folder)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from sparse_deploy.machine import machine_info

    print(f"# streaming prune, SparseGPT 50%, CPU, {NSAMPLES} x {SEQLEN} calibration tokens; "
          f"{machine_info().describe()}", flush=True)
    runs: list[StreamRun] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if args.check_resume:
            check_resume(args.check_resume, Path(tmp))
        print(f"{'shape':>9} {'run':>16} {'blocks':>7} {'model_GiB':>8} {'peak_RSS_GiB':>10} {'s/block':>9} "
              f"{'prune_s':>8} {'wall_s':>8}", flush=True)
        for shape in [s for s in args.shapes.split(",") if s]:
            runs += bench_shape(shape, Path(tmp), args)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=1) + "\n")


if __name__ == "__main__":
    main()
