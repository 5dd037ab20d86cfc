"""The ``sparse-deploy`` command line: flags -> config -> public API. No logic of its own.

Every command runs inside ``reported()``: a SparseDeployError is printed on one line and the process exits
with the error's exit code (2 for bad input or settings, 1 for failures).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from sparse_deploy import __version__
from sparse_deploy.errors import SparseDeployError

app = typer.Typer(
    help="Prune Hugging Face models with SparseGPT, export them to sparse ONNX, and measure them on CPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sparse-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """sparse-deploy: one-shot pruning, sparse ONNX export and CPU benchmarks."""
