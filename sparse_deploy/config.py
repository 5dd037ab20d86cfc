"""Frozen, validated settings. Strings from the command line are parsed here, once, into typed fields."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from sparse_deploy.errors import ConfigError

Device = Literal["auto", "cpu", "cuda"]
Sweep = Literal["auto", "numba", "torch"]

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


KERNEL_MODES: tuple[str, ...] = ("auto", "sparse", "dense")  # which layers run on the native sparse kernels


@dataclass(frozen=True)
class SparsitySpec:
    """What to prune: an unstructured fraction ``sparsity``, or ``n`` of every aligned group of ``m`` inputs."""

    sparsity: float | None = None
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        if self.sparsity is not None:
            if self.n is not None or self.m is not None:
                raise ConfigError("give either a sparsity or an n:m pattern, not both")
            if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
                raise ConfigError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}")
            if not math.isfinite(self.sparsity) or not 0.0 <= self.sparsity < 1.0:
                raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}; 0.5 prunes half the weights")
            return
        if self.n is None or self.m is None:
            raise ConfigError("give a sparsity in [0, 1) or an n:m pattern such as 2:4")
        if not 0 < self.n < self.m:
            raise ConfigError(f"pattern {self.n}:{self.m} is invalid: n:m needs 0 < n < m (for example 2:4 or 4:8)")

    @classmethod
    def unstructured(cls, sparsity: float) -> SparsitySpec:
        return cls(sparsity=float(sparsity))

    @classmethod
    def pattern(cls, text: str) -> SparsitySpec:
        """Parse ``"2:4"`` (n pruned in every group of m)."""
        match = _PATTERN.match(text)
        if match is None:
            raise ConfigError(f"pattern {text!r} is not of the form n:m, such as 2:4")
        return cls(n=int(match.group(1)), m=int(match.group(2)))

    @classmethod
    def from_options(cls, sparsity: float | None, pattern: str | None, default: float = 0.5) -> SparsitySpec:
        """The CLI's ``--sparsity`` / ``--pattern`` pair; at most one may be given."""
        if sparsity is not None and pattern is not None:
            raise ConfigError("give --sparsity or --pattern, not both")
        if pattern is not None:
            return cls.pattern(pattern)
        return cls.unstructured(default if sparsity is None else sparsity)

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @property
    def target(self) -> float:
        """Fraction of weights pruned."""
        return self.n / self.m if self.is_nm else self.sparsity  # type: ignore[operator,return-value]

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity * 100:g}%"  # 0.999 -> 99.9%, not 100%


@dataclass(frozen=True)
class SolverConfig:
    """Settings of the SparseGPT solve for one matrix.

    ``device``: where the math runs; ``auto`` takes CUDA when present, else the CPU.
    ``sweep``: the column sweep inside a block; ``auto`` is numba on the CPU and torch on CUDA.
    ``row_chunk``: rows the numba sweep handles together (working set per thread).
    ``damp_retries``: how many times a failed Cholesky factorisation is retried with 10x the damping.
    """

    blocksize: int = 128
    percdamp: float = 0.01
    device: Device = "auto"
    sweep: Sweep = "auto"
    row_chunk: int = 16
    damp_retries: int = 4

    def __post_init__(self) -> None:
        if self.blocksize < 1:
            raise ConfigError(f"blocksize must be a positive integer, got {self.blocksize}")
        if not math.isfinite(self.percdamp) or not 0.0 <= self.percdamp <= 10.0:
            raise ConfigError(f"percdamp must be in [0, 10], got {self.percdamp}; the usual value is 0.01")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.sweep not in ("auto", "numba", "torch"):
            raise ConfigError(f"sweep must be auto, numba or torch, got {self.sweep!r}")
        if self.row_chunk < 1:
            raise ConfigError(f"row_chunk must be a positive integer, got {self.row_chunk}")
        if self.damp_retries < 0:
            raise ConfigError(f"damp_retries must be >= 0, got {self.damp_retries}")


QUANT_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantSpec:
    """Joint quantization in the SparseGPT sweep (section 3.5): the grid every kept weight is rounded to.

    ``bits`` 8: one scale per output channel (7-bit symmetric, q in [-64, 64]: the grid that ``export --quantize
    int8`` runs correctly on every CPU). ``bits`` 4: one scale per group of ``group_size`` input columns (32, 64 or
    128) of each row, symmetric (q in [-8, 7], MatMulNBits' grid) or, with ``symmetric=False``, with a zero point
    (q in [0, 15]). The grids are those of ``sparse_deploy.grids``.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in (4, 8):
            raise ConfigError(f"--bits must be 8 or 4, got {self.bits!r}")
        if self.bits == 8:
            if self.group_size is not None:
                raise ConfigError(f"--bits 8 uses one scale per output channel; --group-size ({self.group_size}) "
                                  f"applies to --bits 4 only")
            if not self.symmetric:
                raise ConfigError("--bits 8 is symmetric (7-bit, per output channel); --asymmetric applies to "
                                  "--bits 4 only")
            return
        if self.group_size not in QUANT_GROUP_SIZES:
            raise ConfigError(f"--group-size must be 32, 64 or 128 for --bits 4, got {self.group_size!r}")

    @classmethod
    def from_options(cls, bits: int | None, group_size: int | None, symmetric: bool = True) -> QuantSpec | None:
        """The CLI's ``--bits`` / ``--group-size`` / ``--symmetric``; None when ``--bits`` is not given."""
        if bits is None:
            if group_size is not None:
                raise ConfigError("--group-size needs --bits 4")
            if not symmetric:
                raise ConfigError("--asymmetric needs --bits 4")
            return None
        if bits == 4 and group_size is None:
            group_size = 128
        return cls(bits=bits, group_size=group_size, symmetric=symmetric)

    @property
    def qrange(self) -> tuple[int, int]:
        if self.bits == 8:
            return -64, 64
        return (-8, 7) if self.symmetric else (0, 15)

    def group_for(self, cols: int) -> int:
        """Input columns per scale for a matrix of ``cols`` columns (all of them for per-channel int8)."""
        return cols if self.group_size is None else self.group_size

    def __str__(self) -> str:
        if self.bits == 8:
            return "int8 per channel"
        return f"int4 group {self.group_size}{'' if self.symmetric else ' asymmetric'}"


Method = Literal["sparsegpt", "wanda", "magnitude"]
DATASET_NAMES = ("wikitext2", "c4", "ptb")


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration text: a dataset name (``wikitext2``, ``c4``, ``ptb``) or a local .txt/.jsonl file or folder.

    ``seqlen`` None means min(2048, the model's maximum context).
    """

    source: str = "wikitext2"
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.source:
            raise ConfigError("calibration source is empty; give wikitext2, c4, ptb or a path to a .txt/.jsonl file")
        if self.nsamples < 1:
            raise ConfigError(f"nsamples must be >= 1, got {self.nsamples}")
        if self.seqlen is not None and self.seqlen < 2:
            raise ConfigError(f"seqlen must be >= 2, got {self.seqlen}")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"8GiB"``, ``"512MiB"``, ``"16G"``, ``"4GB"`` or a number of bytes, as bytes (K/M/G/T: powers of 1024 with
    ``i`` or alone, of 1000 with a plain ``B``)."""
    match = _SIZE.match(text)
    if not match or float(match[1]) <= 0:
        raise ConfigError(f"--max-memory {text!r} is not a size; write it like 8GiB, 512MiB or 16G")
    number, unit, binary = float(match[1]), match[2].upper(), match[3]
    plain_b = text.strip().upper().endswith("B") and not binary
    base = 1000 if (unit and plain_b) else 1024
    return int(number * base ** " KMGT".index(unit or " "))


def check_blocking(blocksize: int, spec: SparsitySpec, group_size: int | None = None) -> None:
    """The sweep's column blocks must hold whole n:m groups, and whole quantization groups (or a whole number of
    blocks make one group): checked by ``PruneConfig`` up front and by the solver for direct calls."""
    if spec.is_nm and blocksize % spec.m:  # type: ignore[operator]
        raise ConfigError(f"blocksize {blocksize} must be a multiple of m={spec.m} for the {spec} pattern")
    if group_size is not None and blocksize % group_size and group_size % blocksize:
        raise ConfigError(f"blocksize {blocksize} and group size {group_size} must divide one another (for example "
                          f"blocksize 128)")


@dataclass(frozen=True)
class PruneConfig:
    """Whole-model pruning. ``skip``: a regular expression; linear layers whose name matches stay dense."""

    spec: SparsitySpec = SparsitySpec(sparsity=0.5)
    method: Method = "sparsegpt"
    calibration: CalibrationConfig = CalibrationConfig()
    solver: SolverConfig = SolverConfig()
    true_sequential: bool = False
    skip: str | None = None
    trust_remote_code: bool = False
    quant: QuantSpec | None = None
    # Streaming (models larger than memory): blocks are read from the safetensors shards one at a time and
    # written as they finish, in a stage that a later run resumes. ``max_memory``: bytes the run may hold; the
    # calibration activations stay in RAM when they take at most half of it, else go to a file in the stage
    # (None: what the machine has available). ``resume``: insist on continuing an unfinished run (a rerun with
    # the same settings continues one anyway). ``allow_pickle``: accept pickle-only (.bin) checkpoints, loaded
    # whole. ``stream`` False loads the whole model instead (the reference the streaming run is tested against).
    max_memory: int | None = None
    resume: bool = False
    allow_pickle: bool = False
    stream: bool = True

    def __post_init__(self) -> None:
        if self.max_memory is not None and (isinstance(self.max_memory, bool) or not isinstance(self.max_memory, int)
                                            or self.max_memory <= 0):
            raise ConfigError(f"max_memory must be a positive number of bytes (e.g. --max-memory 8GiB), got "
                              f"{self.max_memory!r}")
        if self.resume and not self.stream:
            raise ConfigError("--resume continues a streaming run; it cannot be combined with loading the whole model")
        if self.method not in ("sparsegpt", "wanda", "magnitude"):
            raise ConfigError(f"method must be sparsegpt, wanda or magnitude, got {self.method!r}")
        if self.quant is not None and self.method != "sparsegpt":
            raise ConfigError(f"--bits needs --method sparsegpt: quantization runs inside its sweep, which {self.method} "
                              f"does not have")
        if self.skip is not None:
            try:
                re.compile(self.skip)
            except re.error as exc:
                raise ConfigError(f"--skip {self.skip!r} is not a valid regular expression: {exc}") from None
        if self.method == "sparsegpt":
            check_blocking(self.solver.blocksize, self.spec, self.quant.group_size if self.quant else None)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation text: ``wikitext2``, ``ptb`` (test splits) or a local text file. ``max_chars`` cuts the text;
    ``batch_size`` None means windows of about 4096 tokens per forward pass.

    For encoders, ``reference`` names the model whose embeddings the evaluated model is compared with.
    ``trust_remote_code`` lets transformers run a model's own Python code (``auto_map``); off unless asked for.
    """

    dataset: str = "wikitext2"
    seqlen: int | None = None
    max_chars: int | None = None
    batch_size: int | None = None
    reference: str | None = None
    device: Device = "auto"
    trust_remote_code: bool = False
    verify: bool = True  # exported folders: check model files against export.json's sha256 before loading
    kernels: str = "auto"  # exported folders: auto | sparse | dense (see sparse_deploy.runtime.kernel_choice)

    def __post_init__(self) -> None:
        if self.kernels not in KERNEL_MODES:
            raise ConfigError(f"kernels must be one of {', '.join(KERNEL_MODES)}, got {self.kernels!r}")
        if not self.dataset:
            raise ConfigError("dataset is empty; give wikitext2, ptb or a path to a text file")
        if self.seqlen is not None and self.seqlen < 2:
            raise ConfigError(f"seqlen must be >= 2, got {self.seqlen}")
        if self.max_chars is not None and self.max_chars < 1:
            raise ConfigError(f"max_chars must be >= 1, got {self.max_chars}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
MIN_OPSET = 14  # the first opset with Trilu, which causal masks need


def _newest_opset() -> int:
    import onnx

    return int(onnx.defs.onnx_opset_version())


ExportEncoding = Literal["packed", "coo", "dense", "auto"]
Quantization = Literal["none", "int8", "int4"]
EXPORT_ENCODINGS: tuple[str, ...] = ("packed", "coo", "dense", "auto")
QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "int4")
INT4_GROUP_SIZES: tuple[int, ...] = (32, 64, 128)
# Largest parity error allowed per quantization: max |ONNX Runtime - torch| / max |torch| over logits (decoders) or
# last_hidden_state (encoders). fp32 is float rounding; int8 and int4 are what their grids cost on the tiny test
# models and stdlib-opt-4l, with a margin (benchmarks/RESULTS.md, "Quantization").
DEFAULT_TOLERANCES: dict[str, float] = {"none": 1e-3, "int8": 0.1, "int4": 0.4}
ExportOps = Literal["standard", "custom"]
EXPORT_OPS: tuple[str, ...] = ("standard", "custom")


@dataclass(frozen=True)
class ExportConfig:
    """Settings of ``sparse-deploy export``.

    ``encoding``: how pruned weights are stored. ``packed`` (a bit per weight plus the nonzero values, rebuilt by
    ONNX Runtime when the session is created), ``coo`` (ONNX ``sparse_initializer``), ``dense`` (the plain export),
    or ``auto`` (the smallest of the three for each weight).
    ``quantize``: ``int8`` quantizes every MatMul weight per output channel, symmetrically, to 7 bits (values in
    [-64, 64], so ONNX Runtime's integer kernels are right on CPUs without VNNI too) after pruning (zeros stay
    exactly 0) and runs them on ONNX Runtime's integer kernels; activations are quantized dynamically. ``int4``
    writes ONNX Runtime's MatMulNBits nodes: 4-bit symmetric weights in groups of ``group_size`` input columns
    (zeros stay exactly 0), accuracy level 4.
    ``group_size``: int4 only, 32, 64 or 128 input columns per scale.
    ``opset``: the ONNX opset; None takes the exporter's default for the architecture.
    ``ops``: ``standard`` writes the portable file (packed weights rebuilt by standard ops; the runtime swaps in
    the native sparse kernels itself); ``custom`` writes each packed weight and its MatMul as one SparseMatMul node
    of the ``ai.sparse_deploy`` domain, for apps that register the native library (``sparse-deploy kernels`` prints
    its path). ``custom`` needs ``encoding`` packed and the library at export time.
    ``min_sparsity``: a weight counts as pruned when at least this fraction of it is zero (or when the checkpoint's
    ``sparse_deploy.json`` records it as pruned); other weights stay dense.
    ``tolerance``: the largest logit difference allowed, relative to the largest logit magnitude; None takes
    ``DEFAULT_TOLERANCES[quantize]`` (``parity_tolerance`` is the one in force).
    ``validation_text``: text the parity check tokenizes; None uses a built-in English paragraph.
    ``validation_tokens``: how many tokens of it are compared (prompt plus one cached decoding step for decoders).
    ``trust_remote_code``: let transformers run the checkpoint's own Python code (``auto_map``); off unless asked.
    """

    encoding: ExportEncoding = "packed"
    quantize: Quantization = "none"
    group_size: int = 32
    opset: int | None = None
    ops: ExportOps = "standard"
    min_sparsity: float = 0.25
    tolerance: float | None = None
    validation_text: str | None = None
    validation_tokens: int = 32
    trust_remote_code: bool = False

    @property
    def parity_tolerance(self) -> float:
        """The tolerance the export's parity check enforces: ``tolerance``, or the quantization's default."""
        return DEFAULT_TOLERANCES[self.quantize] if self.tolerance is None else float(self.tolerance)

    def __post_init__(self) -> None:
        if self.encoding not in EXPORT_ENCODINGS:
            raise ConfigError(f"encoding must be one of {', '.join(EXPORT_ENCODINGS)}, got {self.encoding!r}")
        if self.quantize not in QUANTIZATIONS:
            raise ConfigError(f"quantize must be none, int8 or int4, got {self.quantize!r}")
        if isinstance(self.group_size, bool) or self.group_size not in INT4_GROUP_SIZES:
            raise ConfigError(f"group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                              f"got {self.group_size!r}")
        if self.ops not in EXPORT_OPS:
            raise ConfigError(f"ops must be standard or custom, got {self.ops!r}")
        if self.ops == "custom" and self.encoding != "packed":
            raise ConfigError(f"ops custom needs encoding packed (the sparse ops read packed weights), got "
                              f"{self.encoding!r}")
        if self.ops == "custom" and self.quantize == "int4":
            raise ConfigError("ops custom does not cover int4: its weights are MatMulNBits blocks, not packed; "
                              "use --ops standard")
        if self.opset is not None and (isinstance(self.opset, bool) or not isinstance(self.opset, int)
                                       or not MIN_OPSET <= self.opset <= _newest_opset()):
            raise ConfigError(f"opset must be an integer from {MIN_OPSET} to {_newest_opset()} ({MIN_OPSET} is the "
                              f"first with Trilu, "
                              f"which causal masks need; {_newest_opset()} the installed onnx's newest), got "
                              f"{self.opset!r}")
        if not isinstance(self.min_sparsity, (int, float)) or not 0.0 < self.min_sparsity <= 1.0:
            raise ConfigError(f"min_sparsity must be in (0, 1], got {self.min_sparsity!r}; 0.25 is the default")
        tolerance = self.tolerance
        if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                      or not math.isfinite(tolerance) or tolerance <= 0):
            raise ConfigError(f"tolerance must be a positive number, got {self.tolerance!r}; the default is "
                              f"{DEFAULT_TOLERANCES[self.quantize]:g} for quantize={self.quantize}")
        if isinstance(self.validation_tokens, bool) or not isinstance(self.validation_tokens, int) \
                or self.validation_tokens < 2:
            raise ConfigError(f"validation_tokens must be an integer >= 2, got {self.validation_tokens!r}")
