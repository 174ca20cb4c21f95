"""Building realm's C kernels for the CPU (the onednn backend's `cpu_attention.c` and `cpu_linear.c`).

    lib = load(Path("cpu_linear.c"), compile_flags)    # ctypes.CDLL, built now if this source has none yet

Triton, realm's kernel language, has no CPU code generation (its interpreter runs the GPU kernels as numpy, for tests),
so the CPU's few hot ops are C. Each is built on first use with the system C compiler (`$CC`, else `cc`) into
$REALM_KERNEL_DIR, else $XDG_CACHE_HOME/realm/kernels (~/.cache/realm/kernels), named by a hash of the source, the
flags, the compiler and this CPU (-march=native), and linked against the OpenMP runtime torch has loaded (libgomp,
one thread pool). A kernel's module falls back to the reference, with a warning that says why, where none can be
built.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

BASE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-std=gnu11")  # every kernel's; some add their own
# Linked without -ffast-math whatever the compile used: with it, GCC 12 adds crtfastmath.o, whose constructor switches
# the whole process to flush-to-zero when the library loads (torch's subnormals would become 0 everywhere).
LINK_FLAGS = ("-shared", "-fopenmp")


class CpuKernelUnavailable(RuntimeError):
    """A C kernel could not be built or loaded; the message says why."""


def kernel_dir() -> Path:
    """Where built kernels live: $REALM_KERNEL_DIR, else $XDG_CACHE_HOME/realm/kernels (~/.cache/realm/kernels)."""
    if os.environ.get("REALM_KERNEL_DIR"):
        return Path(os.environ["REALM_KERNEL_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "realm" / "kernels"


def _cpu_identity() -> bytes:
    """What -march=native compiles for: the CPU's model and flags (a shared home directory may see other CPUs)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return "\n".join(wanted).encode()


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise CpuKernelUnavailable("no C compiler: neither $CC nor cc nor gcc is on PATH")
    return cc


def _build(cc: str, source: Path, compile_flags: Sequence[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    obj = tmp[: -len(".so")] + ".o"
    try:
        _run(cc, source, [*compile_flags, "-c", "-o", obj, str(source)])
        _run(cc, source, [*LINK_FLAGS, "-o", tmp, obj, "-lmvec", "-lm"])
        os.replace(tmp, target)
    finally:
        for path in (tmp, obj):
            if os.path.exists(path):
                os.unlink(path)


def _run(cc: str, source: Path, args: list[str]) -> None:
    try:
        done = subprocess.run([cc, *args], capture_output=True, text=True)
    except OSError as e:
        raise CpuKernelUnavailable(f"could not run the C compiler {cc}: {e}") from None
    if done.returncode:
        raise CpuKernelUnavailable(f"{cc} could not build {source.name}: {done.stderr.strip()[-800:]}")


def load(source: Path, compile_flags: Sequence[str]) -> ctypes.CDLL:
    """The built library of this C source, built now if this source, these flags, this compiler and this CPU have
    none yet. Raises CpuKernelUnavailable. (Callers cache it: a second load maps the same file again.)"""
    cc = _compiler()
    flags = (*compile_flags, *LINK_FLAGS)
    key = hashlib.sha256(b"\0".join([source.read_bytes(), " ".join(flags).encode(), cc.encode(),
                                     _cpu_identity()])).hexdigest()[:16]
    target = kernel_dir() / f"{source.stem}-{key}.so"
    if not target.exists():
        _build(cc, source, compile_flags, target)
    try:
        return ctypes.CDLL(str(target))
    except OSError as e:
        raise CpuKernelUnavailable(f"could not load {target}: {e}") from None


def unavailable(library: Callable[[], ctypes.CDLL]) -> str | None:
    """None when library() (a kernel module's cached loader) loads; else why it cannot (no compiler, a failed
    build)."""
    try:
        library()
    except CpuKernelUnavailable as e:
        return str(e)
    return None
