"""Wall time and peak RSS of pruning an OPT-125m-shaped model on the CPU, numba solver vs torch solver.

    python benchmarks/bench_prune_solvers.py [--modes quick,full] [--solvers numba,torch] [--device cpu] [--json PATH]

The model is built from ../shared/tokenizers/opt/config.json with random fp32 weights; calibration text is
WikiText-2 validation from ../shared/data. Modes: quick = 16 x 512 tokens, full = 128 x 2048 tokens.
Each run is a fresh `python -m sparse_deploy prune` process, so its peak RSS (recorded in the checkpoint's
sparse_deploy.json) is its own. Peak RSS is set
against the model's weight bytes plus one copy of the calibration activations (nsamples x seqlen x hidden x 4).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import SHARED
MODES = {"quick": (16, 512), "full": (128, 2048)}


@dataclass(frozen=True)
class PruneRun:
    mode: str
    solver: str
    device: str
    nsamples: int
    seqlen: int
    wall_s: float
    prune_s: float
    mean_layer_s: float
    peak_rss_bytes: int
    weight_bytes: int
    activation_bytes: int


def build_model(folder: Path) -> int:
    """An OPT-125m-shaped model with random weights and OPT's tokenizer; returns its weight bytes."""
    import torch
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig.from_pretrained(SHARED / "tokenizers" / "opt")
    config.torch_dtype = "float32"
    model = OPTForCausalLM(config).eval()
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "opt").save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_once(model: Path, out: Path, mode: str, solver: str, device: str, hidden: int, weight_bytes: int) -> PruneRun:
    nsamples, seqlen = MODES[mode]
    calib = SHARED / "data" / "wikitext-2" / "valid.txt"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "sparse_deploy", "prune", str(model), "-o", str(out), "--force", "--sweep", solver,
           "--calibration", str(calib), "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--device", device]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    manifest = json.loads((out / "sparse_deploy.json").read_text())
    layers = manifest["time_per_layer_s"]
    return PruneRun(mode, solver, device, nsamples, seqlen, wall, manifest["time_s"], sum(layers) / len(layers),
                    manifest["peak_rss_bytes"], weight_bytes, nsamples * seqlen * hidden * 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="quick,full")
    parser.add_argument("--solvers", default="numba,torch", help="CPU sweeps to compare (numba, torch)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from sparse_deploy.machine import machine_info

    print(f"# prune OPT-125m-shaped (random fp32 weights), device {args.device}; {machine_info().describe()}")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "opt-125m-random"
        weight_bytes = build_model(model)
        hidden = json.loads((model / "config.json").read_text())["hidden_size"]
        print(f"{'mode':>6} {'solver':>7} {'tokens':>11} {'wall_s':>8} {'prune_s':>8} {'s/layer':>8} "
              f"{'peak_rss_GiB':>12} {'weights+acts_GiB':>16}")
        for mode in args.modes.split(","):
            for solver in args.solvers.split(","):
                run = run_once(model, Path(tmp) / "out", mode, solver, args.device, hidden, weight_bytes)
                runs.append(run)
                print(f"{mode:>6} {solver:>7} {run.nsamples:>4}x{run.seqlen:<6} {run.wall_s:8.1f} "
                      f"{run.prune_s:8.1f} {run.mean_layer_s:8.2f} {run.peak_rss_bytes / 2**30:12.2f} "
                      f"{(run.weight_bytes + run.activation_bytes) / 2**30:16.2f}", flush=True)
    by_key = {(r.mode, r.solver): r for r in runs}
    for mode in args.modes.split(","):
        if (mode, "numba") in by_key and (mode, "torch") in by_key:
            ratio = by_key[(mode, "torch")].prune_s / by_key[(mode, "numba")].prune_s
            print(f"{mode}: torch solver / numba solver wall time = {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=1) + "\n")


if __name__ == "__main__":
    main()
