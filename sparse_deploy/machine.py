"""Facts about the machine: its CPU, cores, memory, package versions, and which torch device ``auto`` means.
Imports neither torch nor onnxruntime at import time."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def user_cache_dir() -> Path:
    """Where sparse-deploy keeps what it measures or compiles once per machine: $SPARSE_DEPLOY_CACHE, else
    $XDG_CACHE_HOME/sparse-deploy, else ~/.cache/sparse-deploy."""
    if os.environ.get("SPARSE_DEPLOY_CACHE"):
        return Path(os.environ["SPARSE_DEPLOY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparse-deploy"


def use_user_numba_cache() -> None:
    """Keep numba's compiled kernels (``cache=True``) in the user cache folder, unless NUMBA_CACHE_DIR says where:
    by default numba writes them into ``__pycache__`` beside the source, which for an editable install is the
    source tree. numba reads NUMBA_CACHE_DIR when it is first imported (and again before each compilation), so
    call this before ``import numba``."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    os.environ["NUMBA_CACHE_DIR"] = str(user_cache_dir() / "numba")
    config = sys.modules.get("numba.core.config")
    if config is not None:  # numba was imported first: have it read the environment again
        config.reload_config()


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class MachineInfo:
    cpu: str
    cores: int
    python: str
    versions: dict[str, str | None]

    def describe(self) -> str:
        versions = ", ".join(f"{k} {v}" for k, v in self.versions.items() if v)
        return f"{self.cpu}, {self.cores} cores, Python {self.python}, {versions}"


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one): the default thread count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_info(packages: tuple[str, ...] = ("torch", "numba", "onnxruntime", "transformers")) -> MachineInfo:
    return MachineInfo(
        cpu=cpu_model(),
        cores=usable_cores(),
        python=platform.python_version(),
        versions={name: package_version(name) for name in packages},
    )


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far. On Linux, VmHWM of /proc/self/status: unlike
    getrusage's ru_maxrss, it starts afresh at exec, so a worker does not inherit its parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def available_memory_bytes() -> int | None:
    """Memory the system can give this process now without swapping (MemAvailable on Linux), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def resolve_device(device: str):
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA is an error. A ``torch.device``."""
    import torch

    from sparse_deploy.errors import ConfigError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but CUDA is not available; use --device cpu or auto")
    return torch.device(device)
