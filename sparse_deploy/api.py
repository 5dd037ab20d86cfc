"""The public API: ``prune`` a Hugging Face model into a checkpoint folder; ``evaluate`` (``sparse_deploy.evaluation``)
a model folder."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sparse_deploy import __version__
from sparse_deploy.formats.checkpoint import SCALES_NAME, LayerRecord, Manifest, write_manifest, write_scales
from sparse_deploy.config import PruneConfig
from sparse_deploy.data.calibration import calibration_windows
from sparse_deploy.errors import ConfigError
from sparse_deploy.evaluation import EvalReport, evaluate  # noqa: F401  (part of this module's API)
from sparse_deploy.hf import (
    copy_side_files, default_seqlen, load_model, load_tokenizer, no_loading_bars, resolve_source,
)
from sparse_deploy.io import check_output, staged_output
from sparse_deploy.machine import available_memory_bytes, package_version, peak_rss_bytes, resolve_device
from sparse_deploy.pruning.sequential import prune_sequential


@dataclass(frozen=True)
class PruneReport:
    output: Path
    manifest: Manifest


def check_activation_memory(net, config: PruneConfig, seqlen: int) -> None:
    """Refuse, before calibration, a run whose layer inputs (nsamples x seqlen x hidden, held for the whole run)
    cannot fit in the memory of the device that holds them."""
    hidden = next((v for k in ("hidden_size", "n_embd", "d_model") if isinstance(v := getattr(net.config, k, None),
                                                                               int)), None)
    if hidden is None:
        return
    device = resolve_device(config.solver.device)
    dtype = torch.float32 if device.type == "cpu" else net.dtype
    per_window = seqlen * (hidden * dtype.itemsize + 8)  # activations + the window's int64 token ids
    needed = config.calibration.nsamples * per_window
    available = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory_bytes()
    if available is None or needed <= 0.9 * available:
        return
    fits = int(0.9 * available // per_window)
    raise ConfigError(
        f"--nsamples {config.calibration.nsamples} x --seqlen {seqlen} needs about {needed / 2**30:.1f} GiB for the "
        f"layer inputs (x {hidden} hidden, {str(dtype).removeprefix('torch.')}) but {device.type} has "
        f"{available / 2**30:.1f} GiB free; lower --nsamples to {fits} or less, or --seqlen"
    )


def prune(model: str | Path, output: str | Path, config: PruneConfig = PruneConfig(), *, force: bool = False,
          progress: bool = True) -> PruneReport:
    """Prune ``model`` (a local folder or a hub id) layer by layer and write a checkpoint folder to ``output``:
    ``save_pretrained`` files (safetensors, zeros stored), the tokenizer, and ``sparse_deploy.json``."""
    start = time.perf_counter()
    model = str(model)
    output = Path(output)
    check_output(output, force, inputs=[model])  # before any slow work
    source = resolve_source(model)
    net, adapter = load_model(source, config.trust_remote_code)
    tokenizer = load_tokenizer(source, config.trust_remote_code)
    seqlen = default_seqlen(net.config, config.calibration.seqlen)
    check_activation_memory(net, config, seqlen)
    windows = calibration_windows(tokenizer, config.calibration, seqlen, encoder=adapter.kind == "encoder")
    with staged_output(output, force, inputs=[model]) as stage:
        report = prune_sequential(net, adapter, windows, config, progress=progress)
        with no_loading_bars():  # transformers 5 draws a bar for writing the shards
            net.save_pretrained(stage)  # safetensors, the default
        tokenizer.save_pretrained(stage)
        copy_side_files(source, stage, config.trust_remote_code)
        pruned = sum(round(r.sparsity * r.shape[0] * r.shape[1]) for r in report.linears)
        prunable = sum(r.shape[0] * r.shape[1] for r in report.linears)
        manifest = Manifest(
            model={"source": model, "model_type": net.config.model_type,
                   "architecture": (net.config.architectures or [type(net).__name__])[0]},
            method=config.method,
            sparsity=config.spec.sparsity,
            pattern=str(config.spec) if config.spec.is_nm else None,
            calibration={"source": config.calibration.source, "nsamples": int(windows.shape[0]),
                         "seqlen": int(windows.shape[1]), "seed": config.calibration.seed},
            solver={"blocksize": config.solver.blocksize, "percdamp": config.solver.percdamp,
                    "device": resolve_device(config.solver.device).type, "true_sequential": config.true_sequential,
                    "skip": config.skip, "skipped": list(report.skipped)},
            layers=tuple(LayerRecord(r.name, r.shape, r.sparsity, str(config.spec) if config.spec.is_nm else None,
                                     r.rel_error, r.time_s) for r in report.linears),
            totals={"prunable_params": prunable, "pruned_params": pruned,
                    "sparsity": pruned / prunable if prunable else 0.0},
            time_s=time.perf_counter() - start,
            time_per_layer_s=report.layer_times_s,
            peak_rss_bytes=peak_rss_bytes(),
            versions={"torch": torch.__version__, "transformers": package_version("transformers"),
                      "numba": package_version("numba"), "python": platform.python_version()},
            tool_version=__version__,
        )
        if config.quant is not None:
            manifest = replace(manifest, quantization=_write_grid(stage, config, report))
        write_manifest(stage, manifest)
    return PruneReport(output, manifest)


def _write_grid(stage: Path, config: PruneConfig, report) -> dict:
    """The sidecar of solver scales and the manifest's record of the grid (see ``checkpoint``)."""
    from sparse_deploy import grids

    quant = config.quant
    tensors = {}
    for r in report.linears:
        if r.scales is None:
            continue
        scales = r.scales.numpy()
        tensors[f"{r.name}.weight.scales"] = scales[:, 0].copy() if quant.group_size is None else scales
        if r.zero_points is not None:
            tensors[f"{r.name}.weight.zero_points"] = r.zero_points.numpy().astype("uint8")
    write_scales(stage, tensors)
    lo, hi = quant.qrange
    scheme = grids.INT8_SCHEME if quant.bits == 8 else (grids.INT4_SCHEME if quant.symmetric
                                                         else "int4-asymmetric-per-group")
    return {"bits": quant.bits, "group_size": quant.group_size, "symmetric": quant.symmetric, "scheme": scheme,
            "qmin": lo, "qmax": hi, "scales_file": SCALES_NAME, "weights": len([k for k in tensors
                                                                                if k.endswith(".scales")])}
