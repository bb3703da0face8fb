"""Fused dequantize-and-multiply CPU kernels that read GGUF weight blocks directly.

`y (..., N) = x (..., K) @ W^T` with W kept as compact as in the file. Weight
arrays hold N rows of K values:

- block formats (Q4_0 ... Q6_K): uint8 `(N, K // block_elems * block_bytes)`,
  exactly the file's bytes (block sizes: `gguf.constants.GGML_QUANT_SIZES`);
- F16: float16 `(N, K)`; BF16: bfloat16 (`ml_dtypes` / `jnp.bfloat16`) `(N, K)`;
  F32: float32 `(N, K)`.

`repack_np` turns block-format matrices (Q4_0 ... Q8_0, Q2_K ... Q6_K) whose
N is a multiple of 8 into `Q4_0R8` ... `Q8_0R8`, `Q2_KR8` ... `Q6_KR8`: the
same bytes reordered into tiles of 8 rows (layouts: src/repack.cc,
src/repack_k.cc; where the 512-bit kernels are built the legacy formats'
tiles are stored two by two, `interleave`, so that a slice of a repacked
matrix is one only from an even tile), the same array
shape, multiplied for any M by a GEMM that
serves 8 weight rows per instruction (M = 8 sequences cost far less than 8
times one). Where the build has AVX-512 it also turns F16, BF16 (with AVX-512
BF16; K even) and F32 matrices whose N is a multiple of 32 into `F16P`,
`BF16P`, `F32P`: tiles of 32 rows stored as the panel GEMM's panels
(src/gemm16.cc), so that no product repacks them again.

`matmul` and `matmul_np` can also fold in what surrounds a product in a
decoder layer (see `PROLOGUES`): an RMS norm of x times a weight, or SwiGLU of
x's two halves, and a residual added to the result. A decode step then makes a
few library calls per layer instead of tens of small XLA ops; `layer.py` makes
a llama layer's calls (and its attention's, `attention.py`) in one custom call.

For the block formats x is first quantized to 8 bits per block of 32 (256 for
the K-quants) as llama.cpp does, for BF16 rounded to bfloat16 (also as
llama.cpp: the products are then bf16 pairs, `vdpbf16ps` with AVX-512 BF16);
F16 and F32 multiply float32 x. `reference.py` says exactly how. BF16, F16
and F32 products of many x rows (a long prefill) go through a panel GEMM
instead of the dot kernels (src/gemm16.cc: panels of weight rows repacked on
the fly, nothing stored twice), with the same rounding of x. `matmul_np`
and `dequantize_np` call the library through ctypes; `matmul` and `dequantize`
are the same kernels as XLA custom calls, usable inside `jax.jit` on the CPU.
The library is compiled on first use (`build.py`) and cached per machine.
"""

from __future__ import annotations

import ctypes
import math
import subprocess
import sys
import threading
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from cake.errors import BackendError

__all__ = [
    "ALIGN",
    "ALL_FORMATS",
    "FLOATS",
    "FORMATS",
    "KernelsUnavailable",
    "PROLOGUES",
    "REPACKED",
    "REPACK_ROWS",
    "interleave",
    "TILE_ROWS",
    "available",
    "check_format",
    "dequantize",
    "dequantize_np",
    "empty_aligned",
    "matmul",
    "matmul_np",
    "num_threads",
    "repack_np",
    "weight_spec",
]

# Every file format the driver knows; FORMATS is the subset compiled into this
# build, with the repacked formats (REPACKED's values) it holds.
ALL_FORMATS = (
    *("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"),
    *("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"),
    *("F16", "BF16", "F32"),
)
# file format -> its repacked form (tiles of REPACK_ROWS rows, see repack_np)
REPACKED = {
    f: f + "R8"
    for f in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
    + ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
} | {f: f + "P" for f in ("F16", "BF16", "F32")}
REPACK_ROWS = 8  # rows per tile of the block formats' R8 forms
TILE_ROWS = {r: 32 if r.endswith("P") else REPACK_ROWS for r in REPACKED.values()}
_PLAIN = {r: p for p, r in REPACKED.items()}
FLOATS = ("F16", "BF16", "F32")
# matmul's `prologue`: what x goes through first (codes of matmul.cc's enum)
#   "rms": x * (1 / sqrt(mean(x^2) + eps)) * norm, norm (K,) float32;
#   "swiglu": x is (..., 2K): silu(x[..., :K]) * x[..., K:].
PROLOGUES = {None: 0, "rms": 1, "swiglu": 2}


class KernelsUnavailable(BackendError):
    """The CPU kernel library (or one format in it) is not available here."""


def check_format(fmt: str) -> None:
    """A ValueError unless `fmt` is one of ALL_FORMATS or a repacked format."""
    if fmt not in ALL_FORMATS and fmt not in _PLAIN:
        raise ValueError(
            f"unknown weight format {fmt!r}: expected one of "
            f"{ALL_FORMATS + tuple(_PLAIN)}"
        )


def weight_spec(fmt: str, n: int, k: int) -> tuple[tuple[int, int], np.dtype]:
    """The (shape, dtype) of an N x K weight matrix in format `fmt`."""
    check_format(fmt)
    if fmt in _PLAIN and n % TILE_ROWS[fmt]:
        raise ValueError(
            f"{fmt} needs N to be a multiple of {TILE_ROWS[fmt]}; got N={n}"
        )
    if fmt == "BF16P" and k % 2:
        raise ValueError(f"BF16P needs K to be even; got K={k}")
    plain = _PLAIN.get(fmt, fmt)
    if plain == "F16":
        return (n, k), np.dtype(np.float16)
    if plain == "BF16":
        import ml_dtypes

        return (n, k), np.dtype(ml_dtypes.bfloat16)
    if plain == "F32":
        return (n, k), np.dtype(np.float32)
    elems, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[plain]]
    if k % elems:
        raise ValueError(f"{fmt} needs K to be a multiple of {elems}; got K={k}")
    return (n, k // elems * nbytes), np.dtype(np.uint8)


def _check_weights(shape: tuple[int, ...], dtype: Any, fmt: str, k: int) -> int:
    """N, or a one-line ValueError saying what the weights should look like."""
    if len(shape) != 2:
        raise ValueError(
            f"{fmt} weights must be 2-D (N, row); got shape {tuple(shape)}"
        )
    want_shape, want_dtype = weight_spec(fmt, shape[0], k)
    if tuple(shape) != want_shape or np.dtype(dtype) != want_dtype:
        raise ValueError(
            f"{fmt} weights for K={k} must be {want_dtype} {want_shape}; "
            f"got {np.dtype(dtype)} {tuple(shape)}"
        )
    return shape[0]


class _Library:
    """One compiled kernel library, loaded through ctypes."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.cake_format_count.restype = ctypes.c_int
        lib.cake_format_name.restype = ctypes.c_char_p
        lib.cake_format_name.argtypes = [ctypes.c_int]
        lib.cake_format_interleave.argtypes = [ctypes.c_int]
        lib.cake_matmul.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr]
        lib.cake_matmul_fused.argtypes = [
            *(ctypes.c_int, ptr, i64, i64, ptr, i64, ptr),
            *(ctypes.c_int, ptr, ctypes.c_float, ptr),
        ]
        lib.cake_dequantize.argtypes = [ctypes.c_int, ptr, i64, i64, ptr]
        lib.cake_repack.argtypes = [ctypes.c_int, ptr, i64, i64, ptr]
        lib.cake_quantize_q8_32.argtypes = [ptr, ptr, i64]
        lib.cake_quantize_q8_256.argtypes = [ptr, ptr, i64]
        lib.cake_set_panel_rows.argtypes = [i64]
        if hasattr(lib, "cake_sample"):  # sample.cc
            lib.cake_sample.argtypes = [ptr, i64, ctypes.c_float, ctypes.c_float]
            lib.cake_sample.argtypes += [ctypes.c_double, i64, ctypes.c_float]
            lib.cake_sample.restype = i64
        self.raw = lib
        self.path = path
        names = [
            lib.cake_format_name(i).decode() for i in range(lib.cake_format_count())
        ]
        self.codes = {name: i for i, name in enumerate(names)}
        # tiles per unit of each repacked layout (src/qdot.h, interleave)
        self.interleave = {
            n: lib.cake_format_interleave(i) for n, i in self.codes.items()
        }

    def code(self, fmt: str) -> int:
        check_format(fmt)
        if fmt not in self.codes:
            raise KernelsUnavailable(
                f"the CPU kernels were built without {fmt} (compiled in: "
                f"{', '.join(self.codes)}); dequantize the weights instead"
            )
        return self.codes[fmt]

    def matmul(
        self,
        x: np.ndarray,
        w: np.ndarray,
        fmt: str,
        prologue: str | None = None,
        norm: np.ndarray | None = None,
        eps: float = 0.0,
        residual: np.ndarray | None = None,
    ) -> np.ndarray:
        code = self.code(fmt)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim < 1:
            raise ValueError(f"x must be (..., K); got a {x.ndim}-D array")
        k = _prologue_k(x.shape, prologue, norm)
        n = _check_weights(w.shape, w.dtype, fmt, k)
        w = np.ascontiguousarray(w)
        y = np.empty((*x.shape[:-1], n), dtype=np.float32)
        m = math.prod(x.shape[:-1])
        if residual is not None:
            residual = np.ascontiguousarray(residual, dtype=np.float32)
            if residual.shape != y.shape:
                raise ValueError(f"residual must be {y.shape}; got {residual.shape}")
        if k == 0:
            y[...] = 0.0 if residual is None else residual
        elif m and n:
            if norm is not None:
                norm = np.ascontiguousarray(norm, dtype=np.float32)
            rc = self.raw.cake_matmul_fused(
                *(code, x.ctypes.data, m, k, w.ctypes.data, n, y.ctypes.data),
                PROLOGUES[prologue],
                None if norm is None else norm.ctypes.data,
                eps,
                None if residual is None else residual.ctypes.data,
            )
            assert rc == 0, f"cake_matmul_fused returned {rc}"
        return y

    def dequantize(self, w: np.ndarray, fmt: str, k: int) -> np.ndarray:
        code = self.code(fmt)
        n = _check_weights(w.shape, w.dtype, fmt, k)
        w = np.ascontiguousarray(w)
        out = np.empty((n, k), dtype=np.float32)
        if n and k:
            rc = self.raw.cake_dequantize(code, w.ctypes.data, n, k, out.ctypes.data)
            assert rc == 0, f"cake_dequantize returned {rc}"
        return out

    def repack(self, w: np.ndarray, fmt: str) -> tuple[str, np.ndarray]:
        to = REPACKED.get(fmt)
        if to not in self.codes or w.ndim != 2 or w.shape[0] % TILE_ROWS[to]:
            return fmt, w
        if fmt in FLOATS:
            k = w.shape[1]
            if to == "BF16P" and k % 2:
                return fmt, w
        else:
            elems, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[fmt]]
            k = w.shape[1] // nbytes * elems
        n = _check_weights(w.shape, w.dtype, fmt, k)
        w = np.ascontiguousarray(w)
        out = empty_aligned(w.shape, w.dtype)
        if n and k:
            rc = self.raw.cake_repack(
                self.code(fmt), w.ctypes.data, n, k, out.ctypes.data
            )
            assert rc == self.codes[to], f"cake_repack returned {rc}"
        return to, out


ALIGN = 64  # what XLA's CPU client needs to alias a host buffer without a copy


def empty_aligned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialized array starting on an ALIGN-byte boundary."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buf = np.empty(nbytes + ALIGN, np.uint8)
    start = -buf.ctypes.data % ALIGN
    return buf[start : start + nbytes].view(dtype).reshape(shape)


_lock = threading.Lock()
_lib: _Library | None = None
_why = ""  # why there is no library
_tried = False


def _load() -> _Library | None:
    # build is imported here, not at the top: `python -m cake.kernels.cpu.build`
    # imports this package first, and must find build.py not yet loaded.
    from . import build as _build

    global _lib, _why, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        try:
            path = _build.library_path()
            if not path.exists():
                print(
                    f"cake: compiling the CPU kernels once (~{_build.ESTIMATE_S} s)",
                    file=sys.stderr,
                )
                path = _build.build()
            _lib = _Library(str(path))
        except (_build.BuildError, OSError, subprocess.SubprocessError) as e:
            _why = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"cake: CPU kernels unavailable: {_why}", file=sys.stderr)
        return _lib


def _require() -> _Library:
    lib = _load()
    if lib is None:
        raise KernelsUnavailable(
            f"the CPU kernels are not available ({_why}); check available() first"
        )
    return lib


def available() -> bool:
    """Whether the kernel library is usable; builds it on first use (one stderr line).

    A missing compiler or a failed build prints one line with the reason and
    returns False.
    """
    return _load() is not None


def __getattr__(name: str) -> Any:
    # FORMATS loads (and if need be builds) the library on first access only.
    if name == "FORMATS":
        lib = _load()
        return tuple(lib.codes) if lib is not None else ()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def num_threads() -> int:
    """Threads the kernels use: `$CAKE_NUM_THREADS`, else the CPUs this process may run on."""
    return int(_require().raw.cake_num_threads())


def _prologue_k(shape: tuple[int, ...], prologue: str | None, norm: Any) -> int:
    """K of the product for x of `shape` under `prologue`; ValueErrors otherwise."""
    if prologue not in PROLOGUES:
        raise ValueError(
            f"unknown prologue {prologue!r}: expected one of {list(PROLOGUES)}"
        )
    k = shape[-1] // 2 if prologue == "swiglu" else shape[-1]
    if prologue == "swiglu" and shape[-1] % 2:
        raise ValueError(f"a swiglu prologue needs x (..., 2K); got {tuple(shape)}")
    if (prologue == "rms") != (norm is not None):
        raise ValueError("an rms prologue takes a norm weight, and only it does")
    if norm is not None and tuple(norm.shape) != (k,):
        raise ValueError(f"the norm weight must be ({k},); got {tuple(norm.shape)}")
    return k


def matmul_np(
    x: np.ndarray,
    w: np.ndarray,
    fmt: str,
    *,
    prologue: str | None = None,
    norm: np.ndarray | None = None,
    eps: float = 0.0,
    residual: np.ndarray | None = None,
) -> np.ndarray:
    """`x (..., K) @ W^T` -> float32 `(..., N)`, W in `fmt` (see the module docstring).

    prologue/norm/eps: see PROLOGUES; residual (..., N) is added to the result.
    """
    return _require().matmul(x, w, fmt, prologue, norm, eps, residual)


def sample_np(
    logits: np.ndarray,
    temperature: float,
    min_p: float,
    r: float,
    top_k: int = 0,
    top_p: float = 1.0,
) -> int | None:
    """The token drawn from softmax(logits / temperature), weights under min_p
    times the top one's at 0 (and those top-k and top-p leave out: see
    src/sample.cc), where r (in [0, 1)) * their sum falls in their running
    sum; None where the kernels are absent or the row has no finite maximum
    (all -inf, or NaN): then sample another way."""
    lib = _load()
    fn = getattr(lib.raw, "cake_sample", None) if lib is not None else None
    if fn is None:
        return None
    z = np.ascontiguousarray(logits, dtype=np.float32)
    top_k = top_k if 0 < top_k < z.size else 0  # past the row: every token
    tok = fn(z.ctypes.data, z.size, 1.0 / temperature, min_p, r, top_k, top_p)
    return None if tok < 0 else int(tok)


def sample_available() -> bool:
    """Whether the library holds the in-step draw (src/sample.cc's XLA FFI
    handler), for backends/jax/draw.py."""
    lib = _load()
    return lib is not None and hasattr(lib.raw, "cake_ffi_sample")


def sample_ffi(
    logits: Any, inv_t: Any, min_p: Any, r: Any, top_k: Any, top_p: Any
) -> Any:
    """int32 ids (B,) drawn from float32 logits (B, V) as an XLA CPU custom call
    (jit-able): per row, inv_t < 0 draws nothing (-1), 0 is greedy, > 0 is
    `sample_np`'s draw with min_p, top_k (int32) and top_p, and r, given as
    the int32 (B, 2) halves of k = r * 2^53 (see backends/jax/draw.py)."""
    import jax
    import jax.numpy as jnp

    register_ffi(("sample",), "the XLA FFI draw (jax not importable at build time)")
    out = jax.ShapeDtypeStruct(logits.shape[:1], jnp.int32)
    call = jax.ffi.ffi_call("cake_cpu_sample", out, vmap_method="sequential")
    return call(logits.astype(jnp.float32), inv_t, min_p, r, top_k, top_p)


def dequantize_np(w: np.ndarray, fmt: str, k: int) -> np.ndarray:
    """The N x K weights `w` in `fmt`, widened to float32 `(N, K)`."""
    return _require().dequantize(w, fmt, k)


def interleave(fmt: str) -> int:
    """How many tiles one unit of `fmt`'s repacked layout holds in this build:
    2 where the legacy formats' R8 tiles are stored two by two, group by group
    (src/repack.cc; rows are then looked up by unit of 16), else 1."""
    return _require().interleave.get(fmt, 1)


def repack_np(w: np.ndarray, fmt: str) -> tuple[str, np.ndarray]:
    """(`REPACKED[fmt]`, the weights `w` (N, row bytes; floats (N, K)) in it: a
    new array of w's shape and dtype), or (fmt, w) unchanged where fmt has no
    repacked form compiled in or N is not a multiple of its TILE_ROWS (BF16P:
    or K is odd)."""
    check_format(fmt)
    if fmt not in REPACKED:
        return fmt, w
    return _require().repack(w, fmt)


_registered_ffi: set[str] = set()


def register_ffi(names: tuple[str, ...], built_without: str) -> None:
    """Register the library's XLA FFI handlers `cake_ffi_<name>` with jax as
    `cake_cpu_<name>` (once each); a missing one is a KernelsUnavailable
    saying what the library was `built_without`."""
    lib = _require()  # before _lock: _load takes it
    with _lock:
        if all(n in _registered_ffi for n in names):
            return
        import jax

        from . import build as _build

        for name in names:
            symbol = getattr(lib.raw, f"cake_ffi_{name}", None)
            if symbol is None:
                raise KernelsUnavailable(
                    f"the CPU kernels were built without {built_without}; delete "
                    f"the kernel cache under {_build.cache_dir()} and rebuild"
                )
            jax.ffi.register_ffi_target(
                f"cake_cpu_{name}", jax.ffi.pycapsule(symbol), platform="cpu"
            )
            _registered_ffi.add(name)


def _register_jax() -> None:
    register_ffi(
        ("matmul", "matmul_fused", "matmul_grouped", "dequantize"),
        "the XLA FFI handlers (jax was not importable at build time)",
    )


def matmul(
    x: Any,
    w: Any,
    fmt: str,
    k: int,
    *,
    prologue: str | None = None,
    norm: Any = None,
    eps: float = 0.0,
    residual: Any = None,
) -> Any:
    """`x (..., K) @ W^T` -> float32 `(..., N)` as an XLA CPU custom call (jit-able).

    `x` is cast to float32; `w` is laid out as in `weight_spec(fmt, N, k)`.
    prologue/norm/eps: see PROLOGUES (x is (..., 2K) for "swiglu"); residual
    (..., N) float32 is added to the result.
    """
    import jax
    import jax.numpy as jnp

    _register_jax()
    if x.ndim < 1 or _prologue_k(x.shape, prologue, norm) != k:
        raise ValueError(
            f"x must be (..., K={k}) for prologue {prologue!r}; got {tuple(x.shape)}"
        )
    n = _check_weights(w.shape, w.dtype, fmt, k)
    _require().code(fmt)
    shape = (*x.shape[:-1], n)
    if residual is not None and tuple(residual.shape) != shape:
        raise ValueError(f"residual must be {shape}; got {tuple(residual.shape)}")
    if k == 0:
        zero = jnp.zeros(shape, jnp.float32)
        return zero if residual is None else zero + residual
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    x = x.astype(jnp.float32)
    if prologue is None and residual is None:
        call = jax.ffi.ffi_call("cake_cpu_matmul", out, vmap_method="sequential")
        return call(x, w, fmt=fmt)
    none = jnp.zeros((0,), jnp.float32)
    call = jax.ffi.ffi_call("cake_cpu_matmul_fused", out, vmap_method="sequential")
    return call(
        x,
        w,
        none if norm is None else norm.astype(jnp.float32),
        none if residual is None else residual.astype(jnp.float32),
        fmt=fmt,
        prologue=np.int64(PROLOGUES[prologue]),
        eps=np.float32(eps),
    )


def matmul_grouped(
    x: Any, w: Any, counts: Any, fmt: str, k: int, *, prologue: str | None = None
) -> Any:
    """A mixture of experts' products in one XLA CPU custom call: x (M, K)
    holds counts[0] rows for expert 0, then counts[1] for expert 1, ... (int32
    (E,), summing to at most M); w (E, ...) each expert's matrix as
    `weight_spec(fmt, N, k)`. -> float32 (M, N): each row times its expert's
    matrix, rows past the groups zero. prologue None or "swiglu"."""
    import jax
    import jax.numpy as jnp

    _register_jax()
    if prologue not in (None, "swiglu"):
        raise ValueError(f"a grouped product takes no {prologue!r} prologue")
    if x.ndim != 2 or _prologue_k(x.shape, prologue, None) != k:
        raise ValueError(f"x must be (M, K={k}) for {prologue!r}; got {tuple(x.shape)}")
    if w.ndim != 3:
        raise ValueError(f"stacked weights must be (E, N, row); got {tuple(w.shape)}")
    n = _check_weights(w.shape[1:], w.dtype, fmt, k)
    _require().code(fmt)
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    call = jax.ffi.ffi_call("cake_cpu_matmul_grouped", out, vmap_method="sequential")
    return call(
        x.astype(jnp.float32),
        w,
        jnp.asarray(counts, jnp.int32),
        fmt=fmt,
        prologue=np.int64(PROLOGUES[prologue]),
    )


def dequantize(w: Any, fmt: str, k: int, after: Any = None) -> Any:
    """The N x K weights `w` in `fmt` as float32 `(N, K)`, an XLA CPU custom call.

    `after`: an array the call waits for without reading it, e.g. the
    activations the widened matrix multiplies. The weights alone are known at
    the step's start, so XLA would widen every layer's matrices first and hold
    them all (a 256-row SmolLM2 Q4_1 step: 431 MB of scratch against a 97 MB
    file); waiting for each product's input bounds it to about one layer's."""
    import jax
    import jax.numpy as jnp

    _register_jax()
    n = _check_weights(w.shape, w.dtype, fmt, k)
    _require().code(fmt)
    out = jax.ShapeDtypeStruct((n, k), jnp.float32)
    call = jax.ffi.ffi_call("cake_cpu_dequantize", out, vmap_method="sequential")
    if after is None:
        after = jnp.zeros((0,), jnp.float32)
    return call(w, after, fmt=fmt)
