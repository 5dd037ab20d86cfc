"""The public API: ``prune`` a Hugging Face model into a checkpoint folder (``evaluate`` lives in
``sparse_deploy.evaluation`` and is re-exported here)."""

from __future__ import annotations

import hashlib
import platform
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sparse_deploy import __version__
from sparse_deploy.formats.checkpoint import SCALES_NAME, Manifest, write_manifest, write_scales
from sparse_deploy.config import PruneConfig
from sparse_deploy.data.calibration import calibration_windows
from sparse_deploy.adapters import adapter_for
from sparse_deploy.errors import ConfigError, ModelLoadError, PruneInterrupted, first_line
from sparse_deploy.evaluation import EvalReport, evaluate  # noqa: F401  (part of this module's API)
from sparse_deploy.hf import (
    copy_side_files, default_seqlen, load_config, load_model, load_tokenizer, no_loading_bars, resolve_source,
)
from sparse_deploy.io import check_output, resumable_stage, resumable_stage_path, staged_output
from sparse_deploy.machine import available_memory_bytes, package_version, peak_rss_bytes, resolve_device
from sparse_deploy.pruning.sequential import prune_sequential
from sparse_deploy.pruning.streaming import RESUME_DIR, announce, prune_streaming, read_progress
from sparse_deploy.pruning.weights import SourceWeights, has_pickle_weights, has_safetensors, model_dtype


@dataclass(frozen=True)
class PruneReport:
    output: Path
    manifest: Manifest


def check_activation_memory(model_config, model_dtype: torch.dtype, config: PruneConfig, seqlen: int,
                            spill_to: Path | None = None) -> None:
    """Refuse, before calibration, a run whose layer inputs (nsamples x seqlen x hidden, held for the whole run)
    cannot fit where they are kept: the device's memory, or on the CPU with ``spill_to`` (a streaming run, whose
    activations go to a file there when they do not fit in RAM) that folder's disk. The windows' token ids stay in
    RAM either way."""
    hidden = next((v for k in ("hidden_size", "n_embd", "d_model") if isinstance(v := getattr(model_config, k, None),
                                                                               int)), None)
    if hidden is None:
        return
    device = resolve_device(config.solver.device)
    dtype = torch.float32 if device.type == "cpu" else model_dtype
    ids, activations = seqlen * 8, seqlen * hidden * dtype.itemsize  # bytes per window
    ram = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory_bytes()
    if ram is None:
        return
    if device.type == "cpu" and spill_to is not None:
        disk = shutil.disk_usage(next(p for p in (spill_to, *spill_to.parents) if p.exists())).free
        fits = int(min(0.9 * ram // ids, 0.9 * max(ram, disk) // activations))
        where = f"RAM ({ram / 2**30:.1f} GiB free) and disk ({disk / 2**30:.1f} GiB free)"
    else:
        fits = int(0.9 * ram // (ids + activations))
        where = f"{device.type} ({ram / 2**30:.1f} GiB free)"
    if config.calibration.nsamples <= fits:
        return
    needed = config.calibration.nsamples * (ids + activations)
    raise ConfigError(
        f"--nsamples {config.calibration.nsamples} x --seqlen {seqlen} needs about {needed / 2**30:.1f} GiB for the "
        f"layer inputs (x {hidden} hidden, {str(dtype).removeprefix('torch.')}), more than {where} can hold; lower "
        f"--nsamples to {fits} or less, or --seqlen"
    )


def prune(model: str | Path, output: str | Path, config: PruneConfig = PruneConfig(), *, force: bool = False,
          progress: bool = True) -> PruneReport:
    """Prune ``model`` (a local folder or a hub id) layer by layer and write a checkpoint folder to ``output``:
    ``save_pretrained`` files (safetensors, zeros stored), the tokenizer, and ``sparse_deploy.json``.

    A safetensors model is streamed: one block at a time is read, pruned and written, so memory follows one block
    (plus the activations, which go to disk beyond ``config.max_memory``), and an interrupted run is resumed by
    the next run with the same settings (see ``pruning.streaming``)."""
    start = time.perf_counter()
    model = str(model)
    output = Path(output)
    check_output(output, force, inputs=[model])  # before any slow work
    source = resolve_source(model)
    folder = _local_folder(source)
    streaming = config.stream and has_safetensors(folder)
    if not has_safetensors(folder) and has_pickle_weights(folder) and not config.allow_pickle:
        raise ModelLoadError(
            f"{model} has only pickle weights (pytorch_model.bin): loading them runs Python code from the file and "
            f"needs the whole model in memory; convert it to safetensors to prune it block by block, or pass "
            f"--allow-pickle if you trust the file")
    if config.resume and not streaming:
        raise ConfigError(f"--resume continues a streaming run, and {model} is not read as safetensors")
    if streaming:
        return _prune_streaming(model, folder, output, config, force, progress, start)
    net, adapter = load_model(source, config.trust_remote_code)
    tokenizer = load_tokenizer(source, config.trust_remote_code)
    seqlen = default_seqlen(net.config, config.calibration.seqlen)
    check_activation_memory(net.config, net.dtype, config, seqlen)
    windows = calibration_windows(tokenizer, config.calibration, seqlen, encoder=adapter.kind == "encoder")
    with staged_output(output, force, inputs=[model]) as stage:
        report = prune_sequential(net, adapter, windows, config, progress=progress)
        with no_loading_bars():  # transformers 5 draws a bar for writing the shards
            net.save_pretrained(stage)  # safetensors, the default
        tokenizer.save_pretrained(stage)
        copy_side_files(source, stage, config.trust_remote_code)
        manifest = _manifest(model, net.config, type(net).__name__, config, windows, report,
                             time.perf_counter() - start, peak_rss_bytes())
        if config.quant is not None:
            manifest = replace(manifest, quantization=_write_grid(stage, config, report))
        write_manifest(stage, manifest)
    return PruneReport(output, manifest)


def _local_folder(source: str) -> Path:
    """The model's folder: a local path as is; a hub id's snapshot (downloaded into the Hugging Face cache)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                               "*.jinja", "*.py"]))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not download {source}: {first_line(exc)}") from None


def _prune_streaming(model: str, folder: Path, output: Path, config: PruneConfig, force: bool, progress: bool,
                     start: float) -> PruneReport:
    hf_config = load_config(str(folder), config.trust_remote_code)
    adapter = adapter_for(getattr(hf_config, "model_type", "unknown"))
    weights = SourceWeights(folder)
    weights.check_readable()  # before any slow work
    tokenizer = load_tokenizer(str(folder), config.trust_remote_code)
    seqlen = default_seqlen(hf_config, config.calibration.seqlen)
    check_activation_memory(hf_config, model_dtype(hf_config, weights), config, seqlen, spill_to=output.parent)
    windows = calibration_windows(tokenizer, config.calibration, seqlen, encoder=adapter.kind == "encoder")
    stage_path = resumable_stage_path(output)
    unfinished = read_progress(stage_path) if stage_path.is_dir() else None
    if config.resume and unfinished is None:
        raise ConfigError(f"--resume: there is no unfinished run for {output} (nothing to resume in {stage_path}); "
                          f"run without --resume to start one")

    def worth_keeping(stage: Path) -> bool:
        return read_progress(stage) is not None

    with resumable_stage(output, force, inputs=[model], keep=worth_keeping, scratch=[RESUME_DIR]) as stage:
        if unfinished is not None:
            announce(f"resuming the unfinished run in {stage}: {unfinished.next_block} of {unfinished.blocks} "
                     f"blocks are done", progress)
        try:
            streamed = prune_streaming(weights, stage, hf_config, adapter, windows, config,
                                       _resume_settings(model, config, windows), progress=progress)
        except KeyboardInterrupt:
            done = read_progress(stage)
            if done is None:
                raise
            raise PruneInterrupted(
                f"interrupted after {done.next_block} of {done.blocks} blocks; they are kept in {stage}: run the "
                f"same command again (or add --resume) to continue, or delete that folder") from None
        hf_config.save_pretrained(stage)
        _save_generation_config(folder, hf_config, adapter, stage)
        tokenizer.save_pretrained(stage)
        copy_side_files(str(folder), stage, config.trust_remote_code)
        report = streamed.report
        manifest = _manifest(model, hf_config, (hf_config.architectures or [hf_config.model_type])[0], config,
                             windows, report, streamed.time_s, streamed.peak_rss_bytes)
        manifest = replace(manifest, extra={"streaming": {"activations": streamed.activations,
                                                          "resumed_from_block": streamed.resumed_from}})
        if config.quant is not None:
            manifest = replace(manifest, quantization=_write_grid(stage, config, report))
        write_manifest(stage, manifest)
    return PruneReport(output, manifest)


def _resume_settings(model: str, config: PruneConfig, windows: torch.Tensor) -> dict:
    """What must be the same for a stage to be continued: everything that changes the result."""
    solver = config.solver
    return {
        "model": str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else model,
        "method": config.method, "spec": str(config.spec), "true_sequential": config.true_sequential,
        "skip": config.skip, "quant": str(config.quant) if config.quant else None,
        "calibration": [config.calibration.source, int(windows.shape[0]), int(windows.shape[1]),
                        config.calibration.seed],
        "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
        "solver": [solver.blocksize, solver.percdamp, resolve_device(solver.device).type, solver.sweep],
        "versions": [__version__, torch.__version__],
    }


def _save_generation_config(folder: Path, hf_config, adapter, stage: Path) -> None:
    """What save_pretrained writes beside config.json for a model that generates."""
    if adapter.kind != "decoder":
        return
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        shutil.copy2(folder / "generation_config.json", stage / "generation_config.json")
    else:
        GenerationConfig.from_model_config(hf_config).save_pretrained(stage)


def _manifest(model: str, hf_config, architecture: str, config: PruneConfig, windows: torch.Tensor, report,
              time_s: float, peak_rss: int) -> Manifest:
    """What the run did, in the manifest's terms (``formats.checkpoint``)."""
    return Manifest.of_run(
        model={"source": model, "model_type": hf_config.model_type,
               "architecture": (hf_config.architectures or [architecture])[0]},
        method=config.method,
        sparsity=config.spec.sparsity,
        pattern=str(config.spec) if config.spec.is_nm else None,
        calibration={"source": config.calibration.source, "nsamples": int(windows.shape[0]),
                     "seqlen": int(windows.shape[1]), "seed": config.calibration.seed},
        solver={"blocksize": config.solver.blocksize, "percdamp": config.solver.percdamp,
                "device": resolve_device(config.solver.device).type, "true_sequential": config.true_sequential,
                "skip": config.skip, "skipped": list(report.skipped)},
        layers=tuple(r.record(str(config.spec) if config.spec.is_nm else None) for r in report.linears),
        time_s=time_s,
        time_per_layer_s=report.layer_times_s,
        peak_rss_bytes=peak_rss,
        versions={"torch": torch.__version__, "transformers": package_version("transformers"),
                  "numba": package_version("numba"), "python": platform.python_version()},
        tool_version=__version__,
    )


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
