"""Which vector instructions take the pipes of the integer products on this core.

A loop of 32 independent 512-bit vpdpbusd (16 accumulators) is the anchor; each
other loop adds N instructions of one kind, independent of the products, and
the time it adds says whether that kind competes with vpdpbusd for its pipes
(the K-quant kernels of kernels/cpu/src/repack_k.cc mix products with decode
shifts, masks, GFNI affine transforms, permutes and broadcast loads). Needs
g++ and an AVX-512 VNNI + GFNI CPU; prints ns per loop iteration, best of
`--rounds`, each kind's loop next to the anchor of the same round.

    python3 benchmarks/port_mix.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

# name: (instruction, with {r} the destination, how many per 32 products)
KINDS = {
    "vpdpbusd alone": ("", 0),
    "+16 vgf2p8affineqb": ("vgf2p8affineqb $0, %%zmm29, %%zmm28, %%zmm{r}", 16),
    "+16 vpermw": ("vpermw %%zmm29, %%zmm28, %%zmm{r}", 16),
    "+16 vpmovsxbd": ("vpmovsxbd %%xmm28, %%zmm{r}", 16),
    "+16 vpdpwssd": ("vpdpwssd %%zmm30, %%zmm31, %%zmm{a}", 16),
    "+32 vpsrlw": ("vpsrlw $3, %%zmm28, %%zmm{r}", 32),
    "+32 vpandq": ("vpandq %%zmm29, %%zmm28, %%zmm{r}", 32),
    "+16 vpternlogq": ("vpternlogq $0xec, %%zmm29, %%zmm28, %%zmm{r}", 16),
    "+32 vpbroadcastq m64": ("vpbroadcastq {o}(%1), %%zmm{b}", 32),
}


def loop(extra: str, n: int) -> str:
    lines = []
    for i in range(32):
        b = 16 + i % 8  # the products' second operand, zmm16..23
        if extra and i < n and "vpbroadcastq" in extra:
            lines.append(extra.format(o=8 * i, b=b))
        lines.append(f"vpdpbusd %%zmm{24 + i % 4}, %%zmm{b}, %%zmm{i % 16}")
        if extra and i < n and "vpbroadcastq" not in extra:
            lines.append(extra.format(r=24 + i % 4, a=(i + 8) % 16))
    return "\\n".join(lines)


def source() -> str:
    out = [
        "#include <chrono>",
        "#include <cstdio>",
        "#include <cstdint>",
        "alignas(64) int64_t buf[64];",
    ]
    for k, (extra, n) in enumerate(KINDS.values()):
        out.append(
            f"double run{k}() {{ long n = 1000000; const int64_t* p = buf;"
            " auto t0 = std::chrono::steady_clock::now();"
            f' asm volatile("1:\\n{loop(extra, n)}\\ndec %0\\njnz 1b\\n"'
            ' : "+r"(n) : "r"(p) : "memory");'
            " return std::chrono::duration<double>(std::chrono::steady_clock::now()"
            " - t0).count() / 1e6 * 1e9; }"
        )
    out.append("int main() {")
    for k in range(len(KINDS)):
        out.append(f'  printf("%f\\n", run{k}());')
    out.append("}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "mix.cc", Path(d) / "mix"
        src.write_text(source())
        cc = subprocess.run(
            ["g++", "-O2", "-march=native", str(src), "-o", str(exe)],
            capture_output=True,
            text=True,
        )
        if cc.returncode != 0:
            print(f"port_mix: cannot build ({cc.stderr.strip().splitlines()[-1]})")
            return 1
        best = [float("inf")] * len(KINDS)
        for _ in range(args.rounds):
            run = subprocess.run([str(exe)], capture_output=True, text=True)
            if run.returncode != 0:
                print("port_mix: the loop failed (AVX-512 VNNI and GFNI needed)")
                return 1
            for i, v in enumerate(run.stdout.split()):
                best[i] = min(best[i], float(v))
    base = best[0]
    print(f"{'loop (32 vpdpbusd +)':24} {'ns/iter':>8} {'added ns':>9} {'per op':>7}")
    for (name, (_, n)), t in zip(KINDS.items(), best, strict=True):
        per = f"{(t - base) / n:7.3f}" if n else "       "
        print(f"{name:24} {t:8.2f} {t - base:9.2f} {per}")
    print(f"anchor: {base / 32:.3f} ns per vpdpbusd")
    return 0


if __name__ == "__main__":
    sys.exit(main())
