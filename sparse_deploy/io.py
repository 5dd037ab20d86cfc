"""Output folders that are either complete or absent: stages write to a temporary sibling and rename at the end.

The staging folder sits beside the output and is named ``.NAME.sparse-deploy-partial-PID-XXXX``; a run killed
outright (SIGKILL, power loss) cannot remove it, so every run first removes the stages of processes that no longer
exist. A resumable run (``prune``) stages instead in ``.NAME.sparse-deploy-stage``, a name fixed for the output so
that a rerun finds it, kept after a failure that leaves something worth resuming. ``--force`` replaces only folders
sparse-deploy wrote (they carry ``sparse_deploy.json`` or ``export.json``), and never an output that is, holds or lies inside one of the run's inputs.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sparse_deploy.errors import OutputExistsError

OWN_MARKERS = ("sparse_deploy.json", "export.json")  # a folder holding one of these was written by sparse-deploy
_STAGE = re.compile(r"^\..+\.sparse-deploy-(?:partial|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _input_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """The inputs that are local paths, resolved (symlinks followed); hub ids and missing paths are skipped."""
    paths = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.exists():
            paths.append(path.resolve())
    return paths


def check_output(output: str | Path, force: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse, before any work starts, an output that cannot become a fresh folder: a file, the current folder or
    one of its parents, one of ``inputs`` or a folder holding or inside one of them, a non-empty folder without
    ``force`` or not written by sparse-deploy, or a place that cannot be written to. Returns the absolute path."""
    output = Path(output).expanduser().resolve()
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"output {output} is a file; choose a folder path")
    if output == Path.cwd() or output in Path.cwd().parents:
        raise OutputExistsError(f"output {output} is the current folder or holds it; choose a new folder path")
    for source in _input_paths(inputs):
        if output == source or output in source.parents:
            raise OutputExistsError(f"output {output} is the input {source} or holds it; choose a folder outside "
                                    f"the input")
        if source in output.parents:
            raise OutputExistsError(f"output {output} lies inside the input {source}; choose a folder outside the "
                                    f"input")
    if output.is_dir() and any(output.iterdir()):
        if not force:
            raise OutputExistsError(f"output folder {output} is not empty; pass --force to replace it")
        if not any((output / name).is_file() for name in OWN_MARKERS):
            raise OutputExistsError(
                f"output folder {output} is not empty and was not written by sparse-deploy (it holds no "
                f"{' or '.join(OWN_MARKERS)}); --force replaces only sparse-deploy's own folders, so choose a new "
                f"folder or empty this one yourself"
            )
    parent = next((p for p in output.parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise OutputExistsError(f"output {output} cannot be created: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputExistsError(f"output {output} cannot be created: {parent} is not writable")
    return output


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one we may not signal counts as alive)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_stages(folder: str | Path) -> list[Path]:
    """Delete the staging and retired folders in ``folder`` left by sparse-deploy runs whose process is gone
    (killed before they could clean up). Returns what was removed."""
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = _STAGE.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not pid_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _private_folder(output: Path, kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.sparse-deploy-{kind}-{os.getpid()}-", dir=output.parent))


@contextmanager
def staged_output(output: str | Path, force: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder next to ``output``; on success it replaces ``output``, on any failure or
    interrupt it is deleted, so no half-written result is ever left at ``output``."""
    output = check_output(output, force, inputs)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_stages(output.parent)
        staging = _private_folder(output, "partial")
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


def resumable_stage_path(output: str | Path) -> Path:
    """The fixed staging folder of a resumable run writing ``output``."""
    output = Path(output).expanduser().resolve()
    return output.parent / f".{output.name}.sparse-deploy-stage"


@contextmanager
def resumable_stage(output: str | Path, force: bool = False, inputs: Iterable[str | Path] = (),
                    keep: Callable[[Path], bool] = lambda stage: False,
                    scratch: Iterable[str] = ()) -> Iterator[Path]:
    """Yield the fixed staging folder of ``output`` (created, or left by an earlier run), locked against a second
    run. On success the ``scratch`` entries are removed and the folder replaces ``output``; on failure it is
    deleted unless ``keep(stage)`` says it holds work worth resuming."""
    output = check_output(output, force, inputs)
    staging = resumable_stage_path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_stages(output.parent)
        staging.mkdir(exist_ok=True)
        lock = os.open(staging / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as exc:
        raise OutputExistsError(f"cannot create the staging folder {staging}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel however the process ends
        except BlockingIOError:
            raise OutputExistsError(f"another run is writing {output} (its stage {staging} is locked); wait for it "
                                    f"to finish or stop it") from None
        try:
            yield staging
            for name in scratch:
                shutil.rmtree(staging / name, ignore_errors=True)
            (staging / ".lock").unlink(missing_ok=True)
            _replace(staging, output)
        except BaseException:
            if not keep(staging):
                shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        os.close(lock)


def _replace(staging: Path, output: Path) -> None:
    """Rename ``staging`` to ``output``, moving an existing ``output`` aside first and deleting it after."""
    if not output.exists():
        staging.rename(output)
        return
    retired = _private_folder(output, "old")
    try:
        output.rename(retired / output.name)
    except OSError as exc:
        shutil.rmtree(retired, ignore_errors=True)
        raise OutputExistsError(f"cannot replace {output}: {exc.strerror or exc}") from None
    staging.rename(output)
    shutil.rmtree(retired, ignore_errors=True)
