"""The streaming driver: prune a model block by block straight from its safetensors shards into a stage folder,
holding one block (plus the calibration activations, in RAM or on disk) at a time, resumable after a crash.

Stage layout while running (``.resume/`` is removed before the stage becomes the output):

    model-00001-of-000NN.safetensors     tensors outside the blocks, copied unchanged (dtype kept)
    model-000{i+2}-of-000NN.safetensors  block i, pruned, in the model's dtype; one file per finished block
    .resume/progress.json                settings, input fingerprint, next block, per-layer records so far
    .resume/act-{i}.bin                  the activations entering block i (raw, compute dtype)
    .resume/scales-{i}.safetensors       block i's quantization scales (--bits only)

Every file is written under a temporary name, fsync'd and renamed, and progress.json is written last, so a
SIGKILL or a power cut at any moment leaves a stage whose progress.json names only complete files. A resumed
run recomputes the calibration windows and the first block's extra arguments (masks, positions), reads the
activations entering the next block and goes on: its result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sparse_deploy.adapters import Adapter
from sparse_deploy.config import PruneConfig
from sparse_deploy.errors import ConfigError, ModelLoadError
from sparse_deploy.machine import available_memory_bytes, peak_rss_bytes
from sparse_deploy.pruning.activations import Activations, FileActivations, RamActivations
from sparse_deploy.pruning.sequential import (
    LinearReport, SequentialReport, capture_first_inputs, check_skip, prune_block, solver_setup,
)
from sparse_deploy.pruning.weights import (
    INDEX_NAME, SINGLE_NAME, SavedNames, SourceWeights, build_skeleton, layer_type, load_tensors, model_dtype,
    source_key,
)

RESUME_DIR = ".resume"
SINGLE_FILE_MAX_BYTES = 2**30  # smaller checkpoints end as one model.safetensors, larger ones stay sharded
PROGRESS_NAME = "progress.json"
PROGRESS_VERSION = 1


@dataclass
class StreamReport:
    """What the streaming run did besides pruning: where activations lived, the block it resumed at (None for
    a fresh run), the peak RSS and seconds over every run that built this stage."""

    report: SequentialReport
    activations: str  # "ram" | "disk"
    resumed_from: int | None
    peak_rss_bytes: int
    time_s: float


@dataclass
class _Progress:
    settings: dict
    next_block: int = 0
    blocks: int = 0
    records: list = field(default_factory=list)
    layer_times_s: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    weight_map: dict = field(default_factory=dict)
    peak_rss_bytes: int = 0
    time_s: float = 0.0
    version: int = PROGRESS_VERSION


def read_progress(stage: Path) -> _Progress | None:
    path = stage / RESUME_DIR / PROGRESS_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return _Progress(**data) if data.get("version") == PROGRESS_VERSION else None
    except (ValueError, TypeError):
        return None


def settings_difference(old: dict, new: dict) -> list[str]:
    return [f"{key}: {old.get(key)!r} then, {new.get(key)!r} now" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]


def prune_streaming(weights: SourceWeights, stage: Path, hf_config, adapter: Adapter, windows: torch.Tensor,
                    config: PruneConfig, settings: dict, *, progress: bool = True) -> StreamReport:
    """Prune the model whose tensors ``weights`` reads into ``stage`` block by block (see the module's docstring).
    ``settings``: what must match for a stage to be resumed (the caller's; the input fingerprint is added)."""
    start_time = time.perf_counter()
    dtype = model_dtype(hf_config, weights)
    settings = {**settings, "input": weights.fingerprint(), "dtype": str(dtype)}
    resume_dir = stage / RESUME_DIR
    resume_dir.mkdir(exist_ok=True)
    state = read_progress(stage)
    if state is not None and state.settings != settings:
        differences = "; ".join(settings_difference(state.settings, settings))
        raise ConfigError(f"the unfinished run in {stage} used other settings ({differences}); rerun with the same "
                          f"settings to continue it, or delete that folder to start afresh")
    resumed_from = state.next_block if state is not None else None
    device, solver, compute_dtype = solver_setup(config, dtype)

    skeleton = build_skeleton(hf_config, adapter, dtype, layer_type(hf_config, 0))
    names = {module: name for name, module in skeleton.named_modules()}
    block_path = names[adapter.blocks(skeleton)[0]].rpartition(".")[0]  # "model.layers"
    base_path = names[skeleton.base_model]  # "" when the model is its own base
    del names  # it would keep the skeleton's modules (and their tensors) alive
    prefix = getattr(skeleton, "base_model_prefix", "")
    count = int(hf_config.num_hidden_layers)
    prefixes = [f"{block_path}.{i}" for i in range(count)]
    skip = check_skip(config, adapter, prefixes)
    saved = SavedNames(skeleton)
    shards = count + 1
    shard_name = "model-{:05d}-of-{:05d}.safetensors".format
    if state is None:
        state = _Progress(settings=settings, blocks=count)
    earlier_s = state.time_s

    with torch.no_grad():
        # Tensors outside the blocks: the skeleton's, less the tied copies save_pretrained leaves out.
        tied = set(skeleton.get_expanded_tied_weights_keys())
        outside = [k for k in skeleton.state_dict() if not k.startswith(block_path + ".")]
        base_keys = {k: k for k in skeleton.state_dict() if k.startswith(base_path + "." if base_path else "")
                     and k not in tied}
        load_tensors(skeleton, base_keys, weights, dtype, prefix, saved)
        hidden_size = adapter.get_weight(adapter.blocks(skeleton)[0].get_submodule(adapter.groups[0][0])).shape[1]
        shape = (int(windows.shape[0]), int(windows.shape[1]), int(hidden_size))
        nbytes = shape[0] * shape[1] * shape[2] * compute_dtype.itemsize
        in_ram = nbytes <= _activation_budget(config)
        if resumed_from is None:
            store: Activations = (RamActivations(torch.empty(shape, dtype=compute_dtype)) if in_ram
                                  else FileActivations(resume_dir / "act-0.bin", shape, compute_dtype, create=True))
        else:
            store = _Discard(shape, compute_dtype)
        if state.next_block < count:  # the masks and positions every block takes (and, fresh, block 0's inputs)
            captured = capture_first_inputs(skeleton, adapter, windows, device, compute_dtype, sink=store)
        if resumed_from is None:
            _write_shard(stage / shard_name(1, shards), _source_tensors([k for k in outside if k not in tied], weights,
                                                                        dtype, prefix, saved), state)
        elif state.next_block < count:
            store = _open_activations(resume_dir, state.next_block, shape, compute_dtype, in_ram)
        skeleton.to("meta")  # only blocks from here on: the embeddings and block 0's first copy go

        templates: dict = {}
        with tqdm(total=count, initial=state.next_block, desc="prune", unit="block", disable=not progress,
                  leave=False) as bar:  # closed (its line cleared) however the loop ends
            for i in range(state.next_block, count):
                kind = layer_type(hf_config, i)
                if kind not in templates:
                    templates[kind] = adapter.blocks(build_skeleton(hf_config, adapter, dtype, kind))[0]
                block = templates[kind]
                local = list(block.state_dict())
                load_tensors(block, {k: f"{prefixes[i]}.{k}" for k in local}, weights, dtype, prefix, saved)
                last = i == count - 1
                if last:  # nothing reads the last block's outputs; the file they would overwrite is resume state
                    outputs: Activations = _Discard(shape, compute_dtype)
                elif in_ram:
                    outputs = store
                else:
                    outputs = FileActivations(resume_dir / f"act-{i + 1}.bin.tmp", shape, compute_dtype, create=True)
                done = prune_block(block, prefixes[i], adapter, captured, store, outputs, config, solver, device,
                                   compute_dtype, skip)
                _write_shard(stage / shard_name(i + 2, shards),
                             {saved(f"{prefixes[i]}.{k}"): v for k, v in block.state_dict().items()}, state)
                if config.quant is not None:
                    _write_scales(resume_dir / f"scales-{i}.safetensors", done.linears)
                if not last:
                    _save_activations(outputs, resume_dir / f"act-{i + 1}.bin")
                state.records += [_record(r) for r in done.linears]
                state.skipped += list(done.skipped)
                state.layer_times_s.append(done.time_s)
                state.next_block = i + 1
                state.peak_rss_bytes = max(state.peak_rss_bytes, peak_rss_bytes())
                state.time_s = earlier_s + time.perf_counter() - start_time
                _write_json(resume_dir / PROGRESS_NAME, asdict(state))
                if isinstance(store, FileActivations) and not last:
                    store.close()
                    store.path.unlink(missing_ok=True)
                    store = FileActivations(resume_dir / f"act-{i + 1}.bin", shape, compute_dtype)
                elif in_ram:
                    (resume_dir / f"act-{i}.bin").unlink(missing_ok=True)
                block.load_state_dict({k: torch.empty_like(v, device="meta") for k, v in block.state_dict().items()},
                                      assign=True)  # free the block's tensors until the next load
                bar.update(1)
                bar.set_postfix(block_s=f"{done.time_s:.1f}", peak=f"{state.peak_rss_bytes / 2**30:.2f}GiB")
        if isinstance(store, FileActivations):
            store.close()

    _finish_weights(stage, state.weight_map)
    linears = _reports(state, resume_dir, config.quant is not None)
    elapsed = earlier_s + time.perf_counter() - start_time
    report = SequentialReport(linears, tuple(state.layer_times_s), tuple(state.skipped))
    return StreamReport(report, "ram" if in_ram else "disk", resumed_from, max(state.peak_rss_bytes,
                                                                                peak_rss_bytes()), elapsed)


def _finish_weights(stage: Path, weight_map: dict) -> None:
    """Write the shard index, or, for a checkpoint of at most ``SINGLE_FILE_MAX_BYTES``, merge the shards into one
    ``model.safetensors`` as save_pretrained writes small models (costing at most that much memory). Safe to
    repeat after a crash at any point: the merged file is renamed into place before the shards are removed."""
    shards = sorted(set(weight_map.values()))
    merged = stage / SINGLE_NAME
    if merged.is_file() or _total_size(stage, weight_map) <= SINGLE_FILE_MAX_BYTES:
        if not merged.is_file():
            from safetensors.torch import load_file

            tensors: dict[str, torch.Tensor] = {}
            for name in shards:
                tensors.update(load_file(str(stage / name)))
            _write_shard(merged, tensors, _Progress(settings={}))
        for name in shards:
            (stage / name).unlink(missing_ok=True)
        return
    _write_json(stage / INDEX_NAME, {"metadata": {"total_size": _total_size(stage, weight_map)},
                                     "weight_map": dict(sorted(weight_map.items()))})


def announce(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _activation_budget(config: PruneConfig) -> int:
    """Activations stay in RAM when they take at most half the memory budget (``max_memory``, else what the
    machine has available now); the other half is for the block, its Hessians and the solver."""
    budget = config.max_memory if config.max_memory is not None else (available_memory_bytes() or 0)
    return budget // 2


class _Discard(Activations):
    """A sink for the capture of a resumed run: the activations it needs are on disk."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), dtype

    def write(self, j, value):
        pass


def _open_activations(resume_dir: Path, index: int, shape, dtype, in_ram: bool) -> Activations:
    path = resume_dir / f"act-{index}.bin"
    if not path.is_file():
        raise ConfigError(f"{path} is missing, so the unfinished run cannot continue; delete "
                          f"{resume_dir.parent} to start afresh")
    if in_ram:
        return RamActivations.load(path, shape, dtype, torch.device("cpu"))
    return FileActivations(path, shape, dtype)


def _save_activations(store: Activations, path: Path) -> None:
    if isinstance(store, RamActivations):
        store.save(path)
    else:
        store.sync()
        store.close()
        os.replace(store.path, path)
    _fsync_dir(path.parent)


def _source_tensors(keys: list[str], weights: SourceWeights, dtype: torch.dtype, prefix: str,
                    saved: SavedNames) -> dict[str, torch.Tensor]:
    """The tensors outside the blocks under the names save_pretrained gives them, in the model's dtype."""
    found = {key: source_key(key, weights, prefix, saved) for key in keys}
    missing = [key for key, name in found.items() if name is None]
    if missing:
        raise ModelLoadError(f"{weights.folder}: the checkpoint has no tensor {missing[0]}; it does not match its "
                             f"config.json")
    read = weights.get_many(list(found.values()))
    return {saved(key): read[name].to(dtype) if read[name].is_floating_point() else read[name]
            for key, name in found.items()}


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], state: _Progress) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # an ordinary file, as save_pretrained writes (safetensors creates it private)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    state.weight_map.update({k: path.name for k in tensors})


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _total_size(stage: Path, weight_map: dict) -> int:
    from safetensors import safe_open

    total = 0
    for name in sorted(set(weight_map.values())):
        with safe_open(str(stage / name), framework="pt") as fh:
            for key in fh.keys():
                piece = fh.get_slice(key)
                numel = 1
                for d in piece.get_shape():
                    numel *= d
                total += numel * _ITEMSIZE[piece.get_dtype()]
    return total


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _record(r: LinearReport) -> dict:
    return {"name": r.name, "shape": list(r.shape), "sparsity": r.sparsity, "rel_error": r.rel_error,
            "time_s": r.time_s}


def _write_scales(path: Path, linears) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for r in linears:
        if r.scales is not None:
            tensors[f"{r.name}.scales"] = r.scales.contiguous()
        if r.zero_points is not None:
            tensors[f"{r.name}.zero_points"] = r.zero_points.contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _reports(state: _Progress, resume_dir: Path, quant: bool) -> tuple[LinearReport, ...]:
    scales: dict[str, torch.Tensor] = {}
    if quant:
        from safetensors.torch import load_file

        for i in range(state.blocks):
            scales.update(load_file(str(resume_dir / f"scales-{i}.safetensors")))
    return tuple(LinearReport(r["name"], tuple(r["shape"]), r["sparsity"], r["rel_error"], r["time_s"],
                              scales.get(f"{r['name']}.scales"), scales.get(f"{r['name']}.zero_points"))
                 for r in state.records)

