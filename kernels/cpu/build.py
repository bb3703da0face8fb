"""Compile the CPU kernels (src/*.cc) into one shared library, cached per machine.

    python -m cake.kernels.cpu.build    # builds if needed, prints the library path

The library lands in `<cache>/kernels/<hash>/libcake_cpu.so`, `<cache>` being
`$CAKE_CACHE_DIR` or `~/.cache/cake`. The hash covers the sources, the flags, the
compiler's version, jaxlib's version (the XLA FFI header) and the CPU's feature
flags: a `-march=native` binary belongs to one kind of machine.

Every `src/*.cc` present is compiled; `-DCAKE_HAVE_KQUANTS` says that kquants.cc
is one of them (see matmul.cc for how a missing or partial one is handled).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cake.paths import cache_dir

SRC = Path(__file__).resolve().parent / "src"
LIB_NAME = "libcake_cpu.so"
# What available() announces before a first build (measured: 7 s on 2 cores).
ESTIMATE_S = 10
# -ffp-contract=off: dequantize must round like the NumPy reference (d * q, then + m);
# the kernels' FMAs are explicit intrinsics, which the flag leaves alone.
# -fvisibility=hidden: only the C entry points are exported (matmul.cc and common.cc
# mark them), so the XLA FFI header's inline templates never clash with another
# library's copies.
BASE_FLAGS = [
    *("-O3", "-fPIC", "-shared", "-std=c++17", "-pthread"),
    *("-ffp-contract=off", "-fvisibility=hidden"),
]


class BuildError(Exception):
    """The kernels could not be compiled; the message is one line."""


class NoCompiler(BuildError):
    """No C++ compiler on this machine."""


def compiler() -> str | None:
    """`$CXX`, else the first of g++, c++, clang++ on the PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return next((p for c in ("g++", "c++", "clang++") if (p := shutil.which(c))), None)


def _arch_flags(march: str | None) -> list[str]:
    if march is not None:
        return [f"-march={march}"]
    if platform.machine().lower() in ("arm64", "aarch64"):
        return ["-mcpu=native"]
    return ["-march=native"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {platform.platform()}"


def _ffi_include() -> tuple[str, str] | None:
    """(jaxlib version, include dir holding xla/ffi/api/ffi.h), or None without jax."""
    try:
        import jax
        import jaxlib
    except ImportError:
        return None
    include = jax.ffi.include_dir()
    if not (Path(include) / "xla" / "ffi" / "api" / "ffi.h").exists():
        return None
    return jaxlib.__version__, include


def _plan(march: str | None, ffi: bool) -> tuple[str, list[str], list[Path], Path]:
    """(compiler, flags, sources, library path) for one build variant."""
    cxx = compiler()
    if cxx is None:
        raise NoCompiler("no C++ compiler found (install g++ or set CXX)")
    sources = sorted(SRC.glob("*.cc"))
    flags = BASE_FLAGS + _arch_flags(march)
    if platform.system() == "Linux":
        # a missing strong symbol fails the build, not the dlopen
        flags.append("-Wl,--no-undefined")
    if any(p.name == "kquants.cc" for p in sources):
        flags.append("-DCAKE_HAVE_KQUANTS")
    jaxlib_version = "none"
    inc = _ffi_include() if ffi else None
    if inc is not None:
        jaxlib_version = inc[0]
        flags += ["-DCAKE_WITH_XLA_FFI", f"-I{inc[1]}"]
    try:
        version = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NoCompiler(f"{cxx} --version failed: {e}") from e
    h = hashlib.sha256()
    for part in [version, jaxlib_version, _cpu_flags(), " ".join(flags)]:
        h.update(part.encode() + b"\0")
    for p in sorted(SRC.glob("*.h")) + sources:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return cxx, flags, sources, cache_dir() / "kernels" / h.hexdigest()[:16] / LIB_NAME


def library_path(march: str | None = None, ffi: bool = True) -> Path:
    """Where the library for the current sources and machine is (built or not)."""
    return _plan(march, ffi)[3]


def _first_error(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if "error" in ln]
    return (errors or stderr.splitlines() or ["failed"])[0].strip()


def build(march: str | None = None, ffi: bool = True) -> Path:
    """Compile the library unless it is cached; return its path.

    `march` overrides `-march=native` (tests build the AVX2 and plain C++ paths
    with it); `ffi=False` leaves out the XLA FFI handlers. Raises BuildError.
    """
    cxx, flags, sources, out = _plan(march, ffi)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Private names, then a rename: two processes may build at once.
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out.parent) as tmp:
        compile_flags = [
            f for f in flags if f != "-shared" and not f.startswith("-Wl,")
        ]
        objs = [Path(tmp) / f"{p.stem}.o" for p in sources]
        # one compiler per source at once: kquants.cc and matmul.cc (the FFI
        # header) take a few seconds each
        try:
            procs = [
                subprocess.Popen(
                    [cxx, *compile_flags, f"-I{SRC}", "-c", str(src), "-o", str(obj)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for src, obj in zip(sources, objs, strict=True)
            ]
        except OSError as e:
            raise BuildError(f"{cxx} could not be run: {e}") from e
        errors = [p.communicate()[1] for p in procs]
        failed = [
            e or f"{cxx} exited with {p.returncode}"
            for p, e in zip(procs, errors, strict=True)
            if p.returncode
        ]
        if failed:
            raise BuildError(_first_error(failed[0]))
        lib = Path(tmp) / LIB_NAME
        r = subprocess.run(
            [cxx, *flags, *map(str, objs), "-o", str(lib)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise BuildError(_first_error(r.stderr))
        lib.chmod(0o755)
        os.replace(lib, out)
    return out


def main() -> int:
    try:
        print(build())
    except NoCompiler as e:
        print(
            f"cake: {e}; the CPU kernels are skipped and the pure fallback will be used"
        )
        return 0
    except BuildError as e:
        print(f"cake: the CPU kernels failed to build: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
