"""The ``sparse-deploy`` command line: flags -> config -> public API. No logic of its own."""

from __future__ import annotations

import typer

from sparse_deploy import __version__

app = typer.Typer(
    help="Prune Hugging Face models with SparseGPT, export them to sparse ONNX, and measure them on CPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sparse-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """sparse-deploy: one-shot pruning, sparse ONNX export and CPU benchmarks."""
