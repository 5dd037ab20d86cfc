"""Output folders that are either complete or absent: stages write to a temporary sibling and rename at the end."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sparse_deploy.errors import OutputExistsError


def check_output(output: Path, force: bool) -> None:
    """Refuse a file, or a non-empty folder without ``force``, before any work starts."""
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"output {output} is a file; choose a folder path")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise OutputExistsError(f"output folder {output} is not empty; pass --force to replace it")


@contextmanager
def staged_output(output: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``output``; on success it replaces ``output``, on any failure or
    interrupt it is deleted, so no half-written result is ever left at ``output``."""
    output = Path(output)
    check_output(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        output.rename(retired / output.name)
        staging.rename(output)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(output)
