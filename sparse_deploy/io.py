"""Output folders that are either complete or absent: stages write to a temporary sibling and rename at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sparse_deploy.errors import OutputExistsError


def check_output(output: str | Path, force: bool) -> Path:
    """Refuse, before any work starts, an output that cannot become a fresh folder: a file, a non-empty folder
    without ``force``, the current folder or one of its parents, or a place that cannot be written to. Returns
    the absolute path."""
    output = Path(output).expanduser().resolve()
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"output {output} is a file; choose a folder path")
    if output == Path.cwd() or output in Path.cwd().parents:
        raise OutputExistsError(f"output {output} is the current folder or holds it; choose a new folder path")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise OutputExistsError(f"output folder {output} is not empty; pass --force to replace it")
    parent = next((p for p in output.parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise OutputExistsError(f"output {output} cannot be created: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputExistsError(f"output {output} cannot be created: {parent} is not writable")
    return output


@contextmanager
def staged_output(output: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``output``; on success it replaces ``output``, on any failure or
    interrupt it is deleted, so no half-written result is ever left at ``output``."""
    output = check_output(output, force)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    except OSError as exc:
        raise OutputExistsError(f"cannot create the output folder {output}: {exc.strerror or exc}") from None
    try:
        yield staging
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        _replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace(staging: Path, output: Path) -> None:
    """Rename ``staging`` to ``output``, moving an existing ``output`` aside first and deleting it after."""
    if not output.exists():
        staging.rename(output)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
    try:
        output.rename(retired / output.name)
    except OSError as exc:
        shutil.rmtree(retired, ignore_errors=True)
        raise OutputExistsError(f"cannot replace {output}: {exc.strerror or exc}") from None
    staging.rename(output)
    shutil.rmtree(retired, ignore_errors=True)
