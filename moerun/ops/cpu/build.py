"""Compile kernels.c with the system C compiler on first use and cache the shared library.

No torch C++ extension: its build would need torch (a CUDA one, from pip) in the build
environment. The cache key hashes the source, the flags, the compiler's identity and the machine
architecture; the CPU's features are not part of it because the AVX2 and AVX-512 code is enabled
per function (target attributes) and picked at run time, so one binary serves every x86-64 CPU.
"""

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
# compiled together into one library
SOURCES = tuple(HERE / f for f in ("kernels.c", "avx512.c", "mxfp4_vnni.c", "moe.c"))
HEADERS = (HERE / "kernels.h",)
# -fopenmp: both cores, sharing the libgomp that torch has already loaded (same soname)
FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp")
LIBS = ("-lm",)
COMPILE_TIMEOUT_S = 120


class BuildError(Exception):
    """No usable C compiler, or the compile failed; the message is one line."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moerun"


def compiler() -> list[str]:
    """$CC if set (it may carry arguments), else cc, else gcc."""
    cc = shlex.split(os.environ.get("CC", ""))
    if cc:
        if shutil.which(cc[0]) is None:
            raise BuildError(f"CC={cc[0]} not found")
        return cc
    for name in ("cc", "gcc"):
        if path := shutil.which(name):
            return [path]
    raise BuildError("no C compiler (cc or gcc) on PATH")


def _compiler_identity(cc: list[str]) -> str:
    """First line of `cc --version`, so that an upgraded compiler gets a fresh build."""
    try:
        out = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{cc[0]} --version failed: {e}") from e
    if out.returncode != 0:
        raise BuildError(f"{cc[0]} --version exited with {out.returncode}")
    return out.stdout.splitlines()[0] if out.stdout else ""


def library_path(cc: list[str]) -> Path:
    h = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        h.update(source.read_bytes())
    for part in (*cc, _compiler_identity(cc), *FLAGS, *LIBS, platform.machine()):
        h.update(part.encode() + b"\0")
    return cache_dir() / f"cpu_kernels-{h.hexdigest()[:16]}.so"


def build_library() -> Path:
    """Path of the compiled library, compiling it first if the cache lacks it.

    Concurrent builders each write their own temporary file and os.replace() it into place, so a
    reader never sees a half-written library.
    """
    cc = compiler()
    target = library_path(cc)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        cmd = [*cc, *FLAGS, *map(str, SOURCES), "-o", tmp, *LIBS]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as e:
            raise BuildError(f"{cc[0]} failed: {e}") from e
        if out.returncode != 0:
            first = next((ln for ln in out.stderr.splitlines() if ln.strip()), "no message")
            raise BuildError(f"{cc[0]} exited with {out.returncode}: {first}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
