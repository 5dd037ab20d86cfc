"""Builds the native sparse MatMul library (native/*.cpp) into sparse_deploy/_sparse_ops.so.

The library is a plain shared object that ONNX Runtime loads (register_custom_ops_library), not a Python module.
It needs only ONNX Runtime's C/C++ API headers, found in this order: $SPARSE_DEPLOY_ORT_INCLUDE, pkg-config
libonnxruntime, /usr/include/onnxruntime, /usr/local/include/onnxruntime, else Debian's libonnxruntime-dev
downloaded with apt-get (trixie suite, the system's own mirror, a private lists folder) and unpacked into the build
folder: nothing is installed system-wide. The install never fails because of this library: without a compiler or
headers it writes sparse_deploy/_sparse_ops.unavailable with the reason, and the package runs dense.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
HEADER = "onnxruntime_cxx_api.h"
UNAVAILABLE = "_sparse_ops.unavailable"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
HEADERS_CACHE = ROOT / "build" / "ort-headers"
HEADERS_SUITE = "trixie"  # libonnxruntime-dev 1.21: the oldest C API this library supports is 1.17


def _has_header(folder: str | Path | None) -> bool:
    return bool(folder) and (Path(folder) / HEADER).is_file()


def _pkg_config_dirs() -> list[str]:
    if not shutil.which("pkg-config"):
        return []
    try:
        out = subprocess.run(["pkg-config", "--cflags-only-I", "libonnxruntime"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    dirs = [flag[2:] for flag in out.stdout.split() if flag.startswith("-I")] if out.returncode == 0 else []
    return dirs + [str(Path(d) / "onnxruntime") for d in dirs]


def _debian_mirror() -> str | None:
    """The Debian archive URI the system's apt sources already use (never a hard-coded host)."""
    texts = []
    for path in ["/etc/apt/sources.list", *glob.glob("/etc/apt/sources.list.d/*.list"),
                 *glob.glob("/etc/apt/sources.list.d/*.sources")]:
        try:
            texts.append(Path(path).read_text())
        except OSError:
            continue
    for uri in re.findall(r"(?:^deb\s+(?:\[[^\]]*\]\s+)?|^URIs:\s*)(\S+)", "\n".join(texts), flags=re.M):
        if uri.rstrip("/").endswith("/debian") and "security" not in uri:
            return uri
    return None


def _download_headers(dest: Path) -> tuple[Path | None, str]:
    """apt-get download libonnxruntime-dev from the trixie suite and dpkg -x it under dest."""
    include = dest / "usr" / "include" / "onnxruntime"
    if _has_header(include):
        return include, ""
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        return None, "no ONNX Runtime headers found and no apt-get/dpkg to fetch Debian's libonnxruntime-dev"
    mirror = _debian_mirror()
    if mirror is None:
        return None, "no ONNX Runtime headers found and no Debian mirror in the apt sources to fetch them from"
    with tempfile.TemporaryDirectory(prefix="sparse-deploy-apt-") as tmp:
        tmp_path = Path(tmp)
        signed = f"Signed-By: {DEBIAN_KEYRING}\n" if Path(DEBIAN_KEYRING).is_file() else ""
        (tmp_path / "trixie.sources").write_text(
            f"Types: deb\nURIs: {mirror}\nSuites: {HEADERS_SUITE}\nComponents: main\n{signed}")
        for sub in ("lists/partial", "cache/archives/partial"):
            (tmp_path / sub).mkdir(parents=True)
        options = [f"-o Dir::Etc::SourceList={tmp_path / 'trixie.sources'}", "-o Dir::Etc::SourceParts=-",
                   f"-o Dir::State::Lists={tmp_path / 'lists'}", f"-o Dir::Cache={tmp_path / 'cache'}",
                   "-o Debug::NoLocking=1", "-o APT::Get::List-Cleanup=0"]
        options = [part for opt in options for part in opt.split(" ", 1)]
        try:
            for args in (["update"], ["download", "libonnxruntime-dev"]):
                done = subprocess.run(["apt-get", *options, *args], cwd=tmp, capture_output=True, text=True,
                                      timeout=300)
                if done.returncode != 0:
                    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                    return None, f"apt-get {args[0]} for libonnxruntime-dev failed: {tail[0]}"
            debs = sorted(tmp_path.glob("libonnxruntime-dev_*.deb"))
            if not debs:
                return None, "apt-get download libonnxruntime-dev produced no package"
            dest.mkdir(parents=True, exist_ok=True)
            subprocess.run(["dpkg", "-x", str(debs[-1]), str(dest)], check=True, capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"fetching libonnxruntime-dev failed: {exc}"
    return (include, "") if _has_header(include) else (None, "libonnxruntime-dev held no onnxruntime_cxx_api.h")


def find_ort_headers(build_dir: Path) -> tuple[Path | None, str]:
    env = os.environ.get("SPARSE_DEPLOY_ORT_INCLUDE")
    if env:
        return (Path(env), "") if _has_header(env) else (None, f"SPARSE_DEPLOY_ORT_INCLUDE={env} has no {HEADER}")
    for folder in [*_pkg_config_dirs(), "/usr/include/onnxruntime", "/usr/local/include/onnxruntime"]:
        if _has_header(folder):
            return Path(folder), ""
    return _download_headers(build_dir)


class BuildSparseOps(build_ext):
    """Builds the library when it can; otherwise records why in sparse_deploy/_sparse_ops.unavailable."""

    def get_ext_filename(self, fullname: str) -> str:
        return os.path.join(*fullname.split(".")) + ".so"  # a plain library: no Python ABI tag in the name

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return ["RegisterCustomOps", "SparseDeployIsa"]

    def _built(self, ext: Extension) -> Path:
        return Path(self.build_lib) / self.get_ext_filename(ext.name)

    def _marker(self) -> Path:
        return Path(self.build_lib) / "sparse_deploy" / UNAVAILABLE

    def copy_extensions_to_source(self) -> None:
        built = [ext for ext in self.extensions if self._built(ext).is_file()]
        self.extensions, everything = built, self.extensions
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = everything
        source_marker = ROOT / "sparse_deploy" / UNAVAILABLE
        if built:
            source_marker.unlink(missing_ok=True)
        elif self._marker().is_file():  # in-place builds keep the reason next to the package
            shutil.copyfile(self._marker(), source_marker)

    def build_extension(self, ext: Extension) -> None:
        marker = self._marker()
        # Downloaded headers go to build/ort-headers in the source tree (ignored by git), not to pip's temporary build
        # folder: later builds reuse them, and the tests compile a C program against them.
        include, why = find_ort_headers(HEADERS_CACHE)
        if include is not None:
            ext.include_dirs = [str(include), str(ROOT / "native")]
            try:
                super().build_extension(ext)
                marker.unlink(missing_ok=True)
                return
            except Exception as exc:  # noqa: BLE001 - any compiler failure leaves the package usable, dense-only
                why = f"compiling native/ failed: {type(exc).__name__}: {exc}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(why + "\n")
        self.warn(f"sparse kernels not built: {why}")


SPARSE_OPS = Extension(
    "sparse_deploy._sparse_ops",
    sources=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "native").glob("*.cpp")),
    depends=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "native").glob("*.h")),
    language="c++",
    extra_compile_args=["-std=c++17", "-O2", "-fvisibility=hidden", "-fno-gnu-unique", "-fno-math-errno"],
    extra_link_args=["-Wl,--as-needed"],
)

setup(ext_modules=[SPARSE_OPS], cmdclass={"build_ext": BuildSparseOps})
