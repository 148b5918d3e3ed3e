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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).parent
# compiled together into one library
SOURCES = tuple(
    HERE / f
    for f in ("kernels.c", "avx512.c", "avx512_tiles.c", "mxfp4_vnni.c", "mxfp4_q16.c", "moe.c",
              "attention.c", "int8.c", "norm.c")
)  # fmt: skip
HEADERS = (HERE / "kernels.h", HERE / "avx512.h")
# -fopenmp: both cores, sharing the libgomp that torch has already loaded (same soname).
# -ffp-contract=off: no fused multiply-adds but the written ones, so that every path of a kernel
# rounds the same products (batch invariance); it is also -std=c11's default.
FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off")
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


def _run(cmd: list[str]) -> None:
    """Run one compiler command; BuildError with the first line of its complaint."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{cmd[0]} failed: {e}") from e
    if out.returncode != 0:
        first = next((ln for ln in out.stderr.splitlines() if ln.strip()), "no message")
        raise BuildError(f"{cmd[0]} exited with {out.returncode}: {first}")


def build_library() -> Path:
    """Path of the compiled library, compiling it first if the cache lacks it.

    The sources compile side by side (one compiler each), then link: the first use waits for
    the slowest file, not for all of them. Concurrent builders each write their own temporary
    files and os.replace() the library into place, so a reader never sees a half-written one.
    """
    cc = compiler()
    target = library_path(cc)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(prefix=target.stem + ".", dir=target.parent) as objdir:
            objects = [str(Path(objdir) / f"{src.stem}.o") for src in SOURCES]
            compiles = [[*cc, *FLAGS, "-c", str(src), "-o", obj]
                        for src, obj in zip(SOURCES, objects, strict=True)]  # fmt: skip
            with ThreadPoolExecutor(max_workers=len(compiles)) as pool:
                list(pool.map(_run, compiles))  # re-raises the first BuildError
            _run([*cc, *FLAGS, *objects, "-o", tmp, *LIBS])
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
