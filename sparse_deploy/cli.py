"""The ``sparse-deploy`` command line: flags -> config -> public API. No logic of its own.

Every command runs inside ``reported()``: a SparseDeployError is printed on one line and the process exits
with the error's exit code (2 for bad input or settings, 1 for failures).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from sparse_deploy import __version__, api, evaluation
from sparse_deploy.config import (MIN_OPSET, CalibrationConfig, EvalConfig, PruneConfig, QuantSpec, SolverConfig,
                                  SparsitySpec, parse_size)
from sparse_deploy.errors import ConfigError, SparseDeployError
from sparse_deploy.inspection import inspect_checkpoint

_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _OneLineErrors(TyperGroup):
    """Usage errors (a malformed number, an unknown choice or option) as one ``error:`` line and exit 2, like
    every other error, instead of a usage box."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):  # type: ignore[override]
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _CLICK_ERROR as exc:
            hint = f" (see {exc.ctx.command_path} --help)" if getattr(exc, "ctx", None) is not None else ""
            typer.secho(f"error: {exc.format_message()}{hint}", err=True, fg=typer.colors.RED)
            sys.exit(exc.exit_code)
        except typer.Abort:
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    help="Prune Hugging Face models with SparseGPT, export them to sparse ONNX, and measure them on CPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text is plain: "[default: ...]" in it is not markup to drop
)


TRUST_HELP = ("Let transformers run the Python code a model folder ships (auto_map in its config). Off by default: "
              "read that code first.")
NO_VERIFY_HELP = "Open an exported folder without checking its model files against the sha256 in export.json."
FORCE_HELP = ("Replace the output folder when sparse-deploy wrote it (it holds sparse_deploy.json or export.json); "
              "never an input or another folder.")


class KernelsChoice(str, Enum):
    auto = "auto"
    sparse = "sparse"
    dense = "dense"


KERNELS_HELP = ("Which packed layers run on the native sparse kernels: auto (those faster than dense on this CPU, "
                "timed once and cached), sparse (all; an error without the library), dense (none).")


def _kernels_line(kernels: dict) -> str | None:
    """One line on what ran on the sparse kernels, or why nothing did."""
    if not kernels:
        return None
    if kernels.get("sparse_layers"):
        return (f"sparse kernels: {kernels['sparse_layers']} layers sparse, {kernels['dense_layers']} dense "
                f"(kernels={kernels['mode']}, {kernels['isa']} path)")
    why = kernels.get("reason") or f"kernels={kernels['mode']}"
    return f"sparse kernels: not used ({why})"


@contextmanager
def reported() -> Iterator[None]:
    """Turn a SparseDeployError into a one-line message and a non-zero exit."""
    try:
        yield
    except SparseDeployError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.secho("interrupted; nothing was written", err=True, fg=typer.colors.RED)
        raise typer.Exit(130) from None


def percent(fraction: float, digits: int = 1) -> str:
    """``fraction`` as a percentage with enough digits that only exactly 0 and 1 read as 0% and 100%."""
    text = f"{fraction:.{digits}%}"
    while 0 < fraction < 1 and digits < 8 and float(text[:-1]) in (0.0, 100.0):
        digits += 1
        text = f"{fraction:.{digits}%}"
    return text


def _writable_file(path: Optional[Path], option: str) -> None:
    """Refuse, before a long run, a --json/--plot path whose folder is missing or cannot be written."""
    if path is None:
        return
    folder = path.expanduser().resolve().parent
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file path")
    if not folder.is_dir():
        raise ConfigError(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"{option} {path}: folder {folder} is not writable")


def _write_json(path: Path, payload: object) -> None:
    """Write ``payload`` as indented JSON through a temporary file, so an interrupted write leaves nothing."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    tmp.replace(path)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sparse-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, show_default=False,
                                 help="Print the version and exit."),
) -> None:
    """sparse-deploy: one-shot pruning, sparse ONNX export and CPU benchmarks."""


@app.command()
def prune(
    model: str = typer.Argument(..., help="A local Hugging Face model folder, or a hub id when online."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the pruned checkpoint."),
    method: str = typer.Option(
        "sparsegpt", help="sparsegpt, wanda or magnitude. All three read calibration text: wanda scores with it, "
        "magnitude uses it to record each layer's reconstruction error."
    ),
    sparsity: Optional[float] = typer.Option(None, help="Unstructured fraction to prune, in [0, 1) [default: 0.5]."),
    pattern: Optional[str] = typer.Option(None, help="n:m pattern instead of --sparsity, e.g. 2:4 or 4:8."),
    calibration: str = typer.Option(
        "wikitext2", help="wikitext2, c4, ptb (need network), or a local .txt/.jsonl file or folder of them."
    ),
    nsamples: int = typer.Option(128, help="Calibration windows."),
    seqlen: Optional[int] = typer.Option(None, help="Tokens per window [default: min(2048, model context)]."),
    device: str = typer.Option("auto", help="auto (CUDA if present), cpu or cuda."),
    blocksize: int = typer.Option(128, help="Columns per block (sparsegpt only)."),
    percdamp: float = typer.Option(0.01, help="Hessian damping as a fraction of its mean diagonal (sparsegpt only)."),
    sweep: str = typer.Option("auto", help="Column sweep: auto (numba on CPU, torch on CUDA), numba or torch (sparsegpt only)."),
    seed: int = typer.Option(0, help="Seed for drawing calibration windows."),
    skip: Optional[str] = typer.Option(None, help="Regex of linear-layer names to leave dense."),
    true_sequential: bool = typer.Option(
        False, "--true-sequential", help="Prune attention inputs, attention output, MLP in, MLP out in turn."
    ),
    bits: Optional[int] = typer.Option(
        None, "--bits", help="Also quantize every kept weight inside the SparseGPT sweep (section 3.5), pushing "
        "each rounding error onto the columns not yet processed: 8 (7-bit symmetric per output channel, the grid "
        "of export --quantize int8) or 4 (per group of --group-size input columns, MatMulNBits' grid). The "
        "checkpoint stores the dequantized weights plus their scales (quant_scales.safetensors), so export "
        "writes these exact integers. With --sparsity 0 this is GPTQ. sparsegpt only."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Input columns per scale with --bits 4: 32, 64 "
                                             "or 128 [default: 128]."),
    symmetric: bool = typer.Option(True, "--symmetric/--asymmetric", help="--bits 4 grid: symmetric (q in -8..7, "
                                   "what ONNX Runtime's MatMulNBits exports use) or with a zero point per group "
                                   "(q in 0..15)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the manifest (sparse_deploy.json) here."),
    max_memory: Optional[str] = typer.Option(
        None, "--max-memory", help="Host memory the run may use, e.g. 8GiB or 16G. The calibration activations "
        "stay in RAM when they take at most half of it, else go to a file in the stage folder [default: the "
        "machine's available memory]."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the unfinished run for --output (after a crash, a kill or Ctrl-C); an "
        "error if there is none. Rerunning the same command without it also continues, and says so."),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Accept a model with only pickle weights (pytorch_model.bin), which runs "
        "code from the file and is loaded whole; safetensors models are streamed block by block."),
    in_memory: bool = typer.Option(
        False, "--in-memory", help="Load the whole model instead of streaming it block by block (same result, "
        "more memory, not resumable)."),
) -> None:
    """Prune a model in one shot, layer by layer, and write a checkpoint that plain transformers loads.

    Safetensors models are streamed: one block at a time is read from the shards, pruned and written, so memory
    follows one block, not the model. The stage folder (.OUTPUT.sparse-deploy-stage beside --output) keeps the
    finished blocks: after a crash or Ctrl-C, run the same command again (or with --resume) to continue.

    With --bits, SparseGPT also quantizes (joint sparsification and quantization; --sparsity 0 gives GPTQ)."""
    with reported():
        _writable_file(json_path, "--json")
        config = PruneConfig(
            spec=SparsitySpec.from_options(sparsity, pattern),
            method=method,  # type: ignore[arg-type]
            calibration=CalibrationConfig(calibration, nsamples, seqlen, seed),
            solver=SolverConfig(blocksize=blocksize, percdamp=percdamp, device=device, sweep=sweep),  # type: ignore
            true_sequential=true_sequential,
            skip=skip,
            trust_remote_code=trust_remote_code,
            quant=QuantSpec.from_options(bits, group_size, symmetric),
            max_memory=parse_size(max_memory) if max_memory is not None else None,
            resume=resume,
            allow_pickle=allow_pickle,
            stream=not in_memory,
        )
        if config.spec.target == 0 and config.quant is None:
            typer.secho("warning: --sparsity 0 prunes nothing; the checkpoint will hold the input's weights",
                        err=True, fg=typer.colors.YELLOW)
        report = api.prune(model, output, config, force=force)
        m = report.manifest
        typer.echo(
            f"pruned {len(m.layers)} linear layers of {model} to {percent(m.totals['sparsity'])} "
            f"({m.method}, {m.pattern or f'{config.spec} unstructured'}"
            f"{f', {config.quant}' if config.quant else ''}) in {m.time_s:.1f} s, "
            f"peak RSS {m.peak_rss_bytes / 2**30:.2f} GiB -> {report.output}"
        )
        if json_path:
            _write_json(json_path, m.to_json())


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="A model folder (a checkpoint from prune, or any HF model)."),
    dataset: str = typer.Option("wikitext2", help="wikitext2, ptb (need network), or a local text file."),
    seqlen: Optional[int] = typer.Option(None, help="Tokens per window [default: min(2048, model context)]."),
    max_chars: Optional[int] = typer.Option(None, help="Evaluate only the text's first N characters."),
    reference: Optional[str] = typer.Option(None, help="Encoders: the dense model to compare embeddings with."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    no_verify: bool = typer.Option(False, "--no-verify", help=NO_VERIFY_HELP),
    kernels: KernelsChoice = typer.Option(KernelsChoice.auto, "--kernels", help=KERNELS_HELP),
) -> None:
    """Perplexity of a causal LM by the standard protocol, or an encoder's embedding cosine to a reference."""
    with reported():
        _writable_file(json_path, "--json")
        config = EvalConfig(dataset=dataset, seqlen=seqlen, max_chars=max_chars, reference=reference,
                            device=device, trust_remote_code=trust_remote_code,
                            verify=not no_verify, kernels=kernels.value)  # type: ignore[arg-type]
        report = evaluation.evaluate(model, config)
        if report.kind == "perplexity":
            typer.echo(f"perplexity {report.perplexity:.3f} on {dataset} ({report.windows} windows of "
                       f"{report.seqlen} tokens)")
        else:
            typer.echo(f"mean cosine to {reference}: {report.mean_cosine:.4f} over {report.sentences} sentences")
        if json_path:
            _write_json(json_path, asdict(report))


@app.command()
def inspect(
    folder: Path = typer.Argument(..., help="A checkpoint folder."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write every row and total as JSON here."),
) -> None:
    """Per-matrix shapes, sparsity, n:m pattern and (from the manifest) reconstruction error, and the totals."""
    with reported():
        _writable_file(json_path, "--json")
        result = inspect_checkpoint(folder)
        pruned = {w.name for w in result.pruned()}
        errors = result.rel_errors
        width = max((len(w.name) for w in result.weights), default=10)
        typer.echo(f"{'weight':<{width}}  {'shape':>13}  {'sparsity':>8}  {'pattern':>7}  rel. error")
        for w in result.weights:
            mark = "" if w.name in pruned else "  (dense)"
            shape = "x".join(map(str, w.shape))
            error = errors.get(w.name)
            error_text = f"{error:.2e}" if error is not None else "-"
            typer.echo(f"{w.name:<{width}}  {shape:>13}  {percent(w.sparsity, 2):>8}  {w.pattern or '-':>7}  "
                       f"{error_text}{mark}")
        params, zeros = result.pruned_params, result.pruned_zeros
        typer.echo(f"pruned matrices: {len(pruned)}, {zeros:,} of {params:,} weights zero "
                   f"({percent(zeros / params if params else 0, 2)})")
        typer.echo(f"all 2-D weights: {result.total_zeros:,} of {result.total_params:,} zero "
                   f"({percent(result.total_zeros / max(result.total_params, 1), 2)})")
        if errors:
            typer.echo("rel. error: ||(W - W') X||^2 / ||W X||^2 on each layer's calibration inputs, from the manifest")
        if result.manifest:
            m = result.manifest
            typer.echo(f"manifest: {m.method}, {m.pattern or f'{m.sparsity * 100:g}%'}, calibrated on "
                       f"{m.calibration['source']} ({m.calibration['nsamples']} x {m.calibration['seqlen']})")
        if json_path:
            _write_json(json_path, result.to_json())
        typer.echo(_availability_line())


def _availability_line() -> str:
    from sparse_deploy.runtime.session import native_kernels

    native, reason = native_kernels()
    if native is None:
        return f"sparse kernels: unavailable here ({reason}); exports run dense"
    return f"sparse kernels: available ({native.isa()} path, {native.library_path()})"


@app.command("kernels")
def kernels_command() -> None:
    """The native sparse kernel library: its path (for apps that register it), whether it loads here and why not,
    and the instruction-set path it runs."""
    with reported():
        from sparse_deploy.runtime import kernels as native

        state = native.availability()
        typer.echo(f"library: {native.library_path()}")
        typer.echo(f"domain: {native.DOMAIN} (ops {native.OP_FP32}, {native.OP_INT8})")
        if state.ok:
            typer.echo(f"available: yes\nisa: {native.isa()} (force one with {native.ISA_ENV}=amx|avx512|avx2|portable)")
        else:
            typer.echo(f"available: no ({state.reason})")
            raise typer.Exit(1)


@app.command()
def bench(
    onnx_dir: Path = typer.Argument(..., help="An exported folder (model.onnx) to measure."),
    baseline: Optional[Path] = typer.Option(None, help="A dense export of the same model, for the ratios."),
    torch_baseline: Optional[Path] = typer.Option(None, help="A checkpoint folder to time under PyTorch eager."),
    prompt_len: int = typer.Option(128, help="Prompt tokens (decoders)."),
    new_tokens: int = typer.Option(64, help="Tokens to generate per run (decoders; at least 2)."),
    batch: int = typer.Option(1, help="Sequences per run (decoders)."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads [default: one per core]."),
    runs: int = typer.Option(5, help="Timed runs after one warm-up run."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every number as JSON here."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG bar chart here."),
    allow_mismatch: bool = typer.Option(
        False, "--allow-mismatch", help="Compare with a baseline of another architecture, shape or vocabulary."
    ),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP + " (--torch-baseline)"),
    no_verify: bool = typer.Option(False, "--no-verify", help=NO_VERIFY_HELP),
    kernels: KernelsChoice = typer.Option(KernelsChoice.auto, "--kernels", help=KERNELS_HELP),
) -> None:
    """Latency, throughput, load time, peak memory and size, side by side with the baselines given."""
    with reported():
        from sparse_deploy.bench.report import format_comparison, plot_comparison
        from sparse_deploy.bench import BenchConfig, benchmark

        _writable_file(json_path, "--json")
        _writable_file(plot, "--plot")
        config = BenchConfig(prompt_len=prompt_len, new_tokens=new_tokens, batch=batch, threads=threads, runs=runs,
                             verify=not no_verify, kernels=kernels.value, trust_remote_code=trust_remote_code)
        comparison = benchmark(onnx_dir, baseline=baseline, torch_baseline=torch_baseline, config=config,
                               allow_mismatch=allow_mismatch)
        typer.echo(format_comparison(comparison, (onnx_dir.name, "dense ONNX", "torch eager")))
        line = _kernels_line(comparison.model.kernels)
        if line:
            typer.echo(line)
        if json_path:
            _write_json(json_path, comparison.to_json())
        if plot:
            plot_comparison(comparison, plot)
            typer.echo(f"plot written to {plot}")


@app.command()
def generate(
    onnx_dir: Path = typer.Argument(..., help="An exported decoder folder (model.onnx)."),
    prompt: str = typer.Argument(..., help="Text to continue."),
    max_new_tokens: int = typer.Option(32, "--new-tokens", "--max-new-tokens", help="Tokens to generate (greedy)."),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads [default: one per core]."),
    no_verify: bool = typer.Option(False, "--no-verify", help=NO_VERIFY_HELP),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the prompt and continuation here."),
    kernels: KernelsChoice = typer.Option(KernelsChoice.auto, "--kernels", help=KERNELS_HELP),
) -> None:
    """Greedy continuation of a prompt through ONNX Runtime, with the KV cache."""
    with reported():
        _writable_file(json_path, "--json")
        from sparse_deploy.runtime import ExportedModel, SessionConfig
        from sparse_deploy.runtime import generate as run_generate

        model = ExportedModel(onnx_dir, SessionConfig(threads=threads, verify=not no_verify, kernels=kernels.value))
        continuation = run_generate(model, prompt, max_new_tokens)
        typer.echo(prompt + continuation)
        if json_path:
            _write_json(json_path, {"prompt": prompt, "continuation": continuation, "new_tokens": max_new_tokens})


class EncodingChoice(str, Enum):
    packed = "packed"
    coo = "coo"
    dense = "dense"
    auto = "auto"


class OpsChoice(str, Enum):
    standard = "standard"
    custom = "custom"


class QuantizeChoice(str, Enum):
    none = "none"
    int8 = "int8"
    int4 = "int4"


TOP1_WARNING = 0.9  # below this top-1 agreement with torch, export warns


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@app.command("export")
def export_command(
    checkpoint: Path = typer.Argument(
        ..., help="Checkpoint folder written by `sparse-deploy prune`, or any Hugging Face model folder."
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Folder for model.onnx, the config and tokenizer files and export.json."
    ),
    encoding: EncodingChoice = typer.Option(
        EncodingChoice.packed, "--encoding",
        help="How pruned weights are stored: packed (a bit per weight + the nonzero values, rebuilt by ONNX "
             "Runtime at load; the smallest file), coo (ONNX sparse_initializer; larger than dense below 2/3 "
             "sparsity), dense (the plain export), auto (the smallest of the three per weight).",
    ),
    quantize: QuantizeChoice = typer.Option(
        QuantizeChoice.none, "--quantize",
        help="int8: per-output-channel symmetric 7-bit weights (-64..64, stored as int8; right on CPUs with or "
             "without VNNI) after pruning, run on ONNX Runtime's integer kernels. int4: ONNX Runtime's MatMulNBits "
             "(4-bit symmetric weights per group of --group-size input columns, accuracy level 4; the 4-bit "
             "blocks are stored as they are, --encoding does not pack them). Pruned weights stay exactly 0. The "
             "parity check allows a relative logit error of 1e-3 unquantized, 0.1 int8, 0.4 int4.",
    ),
    group_size: Optional[int] = typer.Option(
        None, "--group-size", help="int4 only: input columns per 4-bit scale, 32, 64 or 128 [default: 32].",
    ),
    opset: Optional[int] = typer.Option(None, "--opset", help=f"ONNX opset, {MIN_OPSET} or newer; default: the exporter's for the model."),
    ops: OpsChoice = typer.Option(
        OpsChoice.standard, "--ops",
        help="standard: the portable file (any ONNX Runtime; sparse-deploy's runtime swaps in its sparse kernels "
             "itself). custom: SparseMatMul nodes in the file, for apps that register the native library "
             "(`sparse-deploy kernels` prints its path); needs --encoding packed.",
    ),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the export info (export.json) here."),
) -> None:
    """Export a pruned checkpoint to ONNX with sparse-encoded weights, checked against torch on real tokens.

    Decoders get their KV cache (past_key_values.* in, present.* out); encoders export feature extraction.
    Nothing is written when the export fails or ONNX Runtime and torch disagree beyond the tolerance of the
    quantization (relative logit error 1e-3 unquantized, 0.1 int8, 0.4 int4).
    """
    with reported():
        from sparse_deploy.config import ExportConfig
        from sparse_deploy.exporting import export
        from sparse_deploy.exporting.pipeline import REPORT_NAME

        _writable_file(json_path, "--json")
        if group_size is not None and quantize != QuantizeChoice.int4:
            raise ConfigError(f"--group-size applies to --quantize int4 only (got --quantize {quantize.value})")
        config = ExportConfig(encoding=encoding.value, quantize=quantize.value, opset=opset,
                              group_size=32 if group_size is None else group_size, ops=ops.value,
                              trust_remote_code=trust_remote_code)
        report = export(checkpoint, output, config, force=force)
        encoded = report.encoded
        typer.echo(f"wrote {report.output} ({_mb(report.model_bytes)} of model files, {report.task})")
        if encoded:
            typer.echo(
                f"{len(encoded)} of {len(report.weights)} weights stored sparse: {_mb(report.dense_bytes)} dense -> "
                f"{_mb(report.stored_bytes)} ({report.stored_bytes / report.dense_bytes:.2f}x)"
            )
        elif report.weights:
            typer.echo(f"all {len(report.weights)} weights stored dense")
        if config.quantize == "int4":
            typer.echo(f"{len(report.quantized)} weights as 4-bit MatMulNBits blocks (groups of {config.group_size}, "
                       f"not sparse-encoded)")
        parity = report.parity
        line = (f"parity: max |d {parity.output}| / max |{parity.output}| = {parity.rel_diff:.2e} "
                f"over {parity.positions} positions")
        if parity.tolerance is not None:
            line += f" (tolerance {parity.tolerance:.0e})"
        if parity.top1_agreement is not None:
            line += f", top-1 agreement {parity.top1_agreement:.1%}"
        typer.echo(line)
        if parity.top1_agreement is not None and parity.top1_agreement < TOP1_WARNING:
            typer.secho(f"warning: the export's next-token choice differs from torch at "
                        f"{1 - parity.top1_agreement:.1%} of positions; measure its accuracy (sparse-deploy eval) "
                        f"before serving it", err=True, fg=typer.colors.YELLOW)
        if json_path:
            _write_json(json_path, json.loads((report.output / REPORT_NAME).read_text()))
