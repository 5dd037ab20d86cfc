"""Error types. Every error a user can cause is a SparseDeployError whose message says what to change.

The CLI prints the message on one line and exits with the class's ``exit_code``.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty), for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class SparseDeployError(Exception):
    """Base class for every error sparse-deploy raises on purpose."""

    exit_code = 1


class ConfigError(SparseDeployError, ValueError):
    """A setting is out of range or malformed (sparsity, pattern, block size, ...)."""

    exit_code = 2


class InvalidInputError(SparseDeployError, ValueError):
    """A tensor or file given to sparse-deploy is unusable (wrong shape, NaN, corrupt)."""

    exit_code = 2


class SolverError(SparseDeployError):
    """The SparseGPT solve failed numerically (for example a Hessian that stays singular)."""


class UnsupportedModelError(SparseDeployError):
    """The model's architecture has no adapter, or the folder is not a model sparse-deploy can read."""

    exit_code = 2


class ModelLoadError(SparseDeployError):
    """A model folder or hub id could not be read."""

    exit_code = 2


class CalibrationError(SparseDeployError):
    """Calibration or evaluation text could not be loaded."""

    exit_code = 2


class OutputExistsError(SparseDeployError):
    """The output folder exists and is not empty, and --force was not given."""

    exit_code = 2


class ExportError(SparseDeployError):
    """The ONNX export failed."""


class ExportMismatchError(ExportError):
    """The exported ONNX model disagrees with torch beyond the tolerance."""


class RuntimeSessionError(SparseDeployError):
    """An exported model could not be loaded or run under ONNX Runtime."""

    exit_code = 2


class NonFiniteError(SparseDeployError):
    """A computed result (perplexity, logits, embeddings) came out NaN or infinite: it is reported, never printed
    as a number."""


class KernelsUnavailableError(RuntimeSessionError):
    """The native sparse kernel library was not built or cannot be loaded here; the message says why."""


class PruneInterrupted(SparseDeployError):
    """A streaming prune stopped by Ctrl-C; its finished blocks are kept for the next run to continue."""

    exit_code = 130
