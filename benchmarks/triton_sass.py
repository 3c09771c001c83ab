"""Compile the Triton bitmatmul kernels for sm_90 without a GPU and count the main loop's SASS.

    python benchmarks/triton_sass.py [--out DIR]

Needs only the `triton` package (no torch, no GPU): triton.compile targets sm_90 offline and the
cuobjdump shipped in Triton's wheel disassembles the cubin. Use the Triton version the GPU runs
(the numbers depend on it). For each kernel and tile it prints, per thread and per K step of the
main loop (the loop that holds the HGMMA): the instruction count, the opcodes that matter (integer
ops that unpack signs, shared-memory stores/loads, barriers, HGMMA), registers, and from the TTGIR
whether the weight operand stays in registers and how many wgmma groups stay in flight
(HGMMA: bf16, IGMMA: int8, QGMMA: fp8), and whether ptxas actually keeps the wgmmas in flight: it
serializes them, with a C7513 / C7515 "Potential Performance Loss" note, when non-wgmma instructions define
a wgmma's input or accumulator registers inside its pipeline stage ("serialized"; "waits" counts the
WARPGROUP.DEPBAR of the whole kernel against its GMMA). --gluon adds the warp-specialized Gluon kernels.
Pointers and M, N, K are compiled as multiples of 16, as the 4B shapes launch them.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import re
import subprocess
import sys
import types
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

SRC = Path(__file__).resolve().parents[1] / "src"
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def kernel_modules():
    """bonsai.kernels.triton.{kernels, fragment_kernels} without running the package __init__ (torch)."""
    for name in ("bonsai", "bonsai.kernels", "bonsai.kernels.triton"):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(SRC / Path(*name.split(".")))]
            sys.modules[name] = module
    return (importlib.import_module("bonsai.kernels.triton.kernels"),
            importlib.import_module("bonsai.kernels.triton.fragment_kernels"))


EPILOGUE = {"rs_ptr": "*fp32", "ro_ptr": "*fp32", "xsum_ptr": "*fp32", "xv_ptr": "*bf16", "ut_ptr": "*bf16",
            "bias_ptr": "*bf16", "res_ptr": "*bf16", "gate_ptr": "*bf16", "nw_ptr": "*bf16"}
SCALARS = {"RPS": "i32", "NORM_COLS": "i32", "NORM_PART": "i32", "norm_eps": "fp32"}
PLAIN = {"HAS_OFFSET": False, "RANK": 0, "HAS_BIAS": False, "GELU": False, "HEAD_DIM": 0, "HAS_RESIDUAL": False,
         "HAS_GATE": False, "EVEN_K": True, "GROUP": 0, "GROUP_M": 8}
HEADS = {"HAS_OFFSET": True, "HAS_BIAS": True, "HEAD_DIM": 128}  # bonsai-4b's qkv epilogue (whole 128-column heads)


def variants():
    """(label, kernel, signature, constexprs, (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)) to compile."""
    old, frag = kernel_modules()
    w1a16_old = {"x_ptr": "*bf16", "wt_ptr": "*u8", "out_ptr": "*bf16", "rs_ptr": "*fp32", "cs_ptr": "*fp32",
                 "gsb_ptr": "*i16", **{k: v for k, v in EPILOGUE.items() if k != "rs_ptr"},
                 "M": "i32", "N": "i32", "K": "i32", "M_BUCKET": "i32", **SCALARS}
    w1a16_new = {"x_ptr": "*bf16", "w_ptr": "*i32", "out_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32",
                 "rs_ptr": "*fp32", "gsb_ptr": "*i16", **{k: v for k, v in EPILOGUE.items() if k != "rs_ptr"},
                 "M": "i32", "N": "i32", "K": "i32", "NG": "i32", "KC": "i32", "M_BUCKET": "i32", **SCALARS}
    w1a8_old = {"q_ptr": "*i8", "xs_ptr": "*fp32", "qsum_ptr": "*i32", "wt_ptr": "*u8", "out_ptr": "*bf16",
                "rs_ptr": "*fp32", "gs_ptr": "*fp32", **{k: v for k, v in EPILOGUE.items() if k != "rs_ptr"},
                "M": "i32", "N": "i32", "K": "i32", "M_BUCKET": "i32", **SCALARS}
    w1a8_new = {**{k: v for k, v in w1a8_old.items() if k not in ("wt_ptr", "M", "N", "K", "M_BUCKET")},
                "w_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "NG": "i32", "KC": "i32", "M_BUCKET": "i32", **SCALARS}
    w1a8_new = {k: w1a8_new[k] for k in frag.w1a8_frag_kernel.arg_names if k in w1a8_new}
    w1a16_new = {k: w1a16_new[k] for k in frag.w1a16_frag_kernel.arg_names if k in w1a16_new}
    w1a8_fp8 = {**w1a8_new, "q_ptr": "*fp8e4nv"}
    one = {"ONE_BITS": 0x3F80}
    frag16 = {**one, "SPLIT_K": 1}
    int8, fp8 = {"FP8": False}, {"FP8": True}
    return [
        ("w1a16 k-major", old.w1a16_kernel, w1a16_old, {**one, "HAS_COL": False, **PLAIN}, (128, 256, 64, 8, 3)),
        ("w1a16 k-major", old.w1a16_kernel, w1a16_old, {**one, "HAS_COL": False, **PLAIN}, (256, 128, 64, 8, 3)),
        ("w1a16 fragment", frag.w1a16_frag_kernel, w1a16_new, {**frag16, **PLAIN}, (256, 128, 64, 8, 3)),
        ("w1a16 fragment", frag.w1a16_frag_kernel, w1a16_new, {**frag16, **PLAIN}, (128, 256, 64, 8, 3)),
        ("w1a16 fragment", frag.w1a16_frag_kernel, w1a16_new, {**frag16, **PLAIN}, (256, 128, 128, 8, 3)),
        ("w1a16 fragment", frag.w1a16_frag_kernel, w1a16_new, {**frag16, **PLAIN}, (16, 64, 256, 4, 4)),
        ("w1a16 split-K 4", frag.w1a16_frag_kernel, w1a16_new, {**frag16, **PLAIN, "SPLIT_K": 4}, (16, 64, 256, 4, 4)),
        ("w1a8 k-major", old.w1a8_kernel, w1a8_old, dict(PLAIN), (128, 256, 128, 8, 3)),
        ("w1a8 fragment", frag.w1a8_frag_kernel, w1a8_new, {**PLAIN, **int8}, (256, 128, 128, 8, 3)),
        ("w1a8 fragment", frag.w1a8_frag_kernel, w1a8_new, {**PLAIN, **int8}, (128, 256, 128, 8, 3)),
        ("w1a8 frag+heads", frag.w1a8_frag_kernel, w1a8_new, {**PLAIN, **HEADS, **int8}, (256, 128, 128, 8, 3)),
        ("w1a8 fp8 frag", frag.w1a8_frag_kernel, w1a8_fp8, {**PLAIN, **fp8}, (256, 128, 128, 8, 3)),
        ("w1a8 fp8 frag", frag.w1a8_frag_kernel, w1a8_fp8, {**PLAIN, **fp8}, (128, 256, 128, 8, 3)),
        ("w1a8 fp8 frag", frag.w1a8_frag_kernel, w1a8_fp8, {**PLAIN, **fp8}, (128, 128, 128, 4, 4)),
        ("w1a8 fp8 frag", frag.w1a8_frag_kernel, w1a8_fp8, {**PLAIN, **fp8, "GROUP": 128}, (256, 128, 128, 8, 3)),
        ("w1a8 fp8+heads", frag.w1a8_frag_kernel, w1a8_fp8, {**PLAIN, **HEADS, **fp8}, (256, 128, 128, 8, 3)),
        ("w1a16 frag+heads", frag.w1a16_frag_kernel, w1a16_new, {**frag16, **PLAIN, **HEADS}, (128, 128, 64, 4, 4)),
    ]


def compile_sm90(kernel, signature: dict, consts: dict, tile: tuple):
    bm, bn, bk, warps, stages = tile
    consts = {**consts, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    sig = {**signature, **{k: "constexpr" for k in consts}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t != "constexpr"}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def _tool(name: str, *args: str) -> str:
    return subprocess.run([str(TOOLS / name), *args], capture_output=True, text=True, check=True).stdout


def main_loop(sass: str) -> list[str]:
    """Instructions of the longest backward branch's body that holds an HGMMA (the K loop)."""
    ins = [(int(m.group(1), 16), m.group(2).strip())
           for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    best = None
    for addr, text in ins:
        m = re.search(r"BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            if any(lo <= a <= addr and "GMMA" in t for a, t in ins) and (best is None or addr - lo > best[1] - best[0]):
                best = (lo, addr)
    return [t for a, t in ins if best and best[0] <= a <= best[1]]


UNPACK_OPS = ("LOP3", "SHF", "IMAD", "PRMT", "IADD3", "SEL", "I2F", "F2F", "VIADD", "LEA")


def ptxas_serializes(ptx: Path) -> str:
    """ptxas's own note on this kernel's wgmmas (triton.compile does not show it): the C75xx codes, or ''."""
    from triton.backends.nvidia.compiler import get_ptxas

    run = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", str(ptx), "-o", str(ptx.with_suffix(".ptxas.cubin"))],
                         capture_output=True, text=True, check=True)
    return ",".join(sorted(set(re.findall(r"\((C75\d\d)\) Potential Performance Loss: wgmma", run.stderr))))


def summarize(label: str, ck, tile: tuple, cubin: Path) -> dict:
    sass = _tool("cuobjdump", "-sass", str(cubin))
    body = main_loop(sass)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
    usage = re.search(r"REG:(\d+)", _tool("cuobjdump", "-res-usage", str(cubin)))
    ttgir = ck.asm["ttgir"]
    dots = re.findall(r"ttng\.warp_group_dot (\S+), (\S+),.*?: (\S+?)<", ttgir)
    a_in_regs = bool(re.search(r"warp_group_dot %\S+, %\S+, .* : tensor<", ttgir))
    pendings = sorted({int(p) for p in re.findall(r"pendings = (\d+)", ttgir)})
    bm, bn, bk, warps, stages = tile
    weights_per_thread = bn * bk // (32 * warps)
    return {"kernel": label, "tile": f"{bm}x{bn}x{bk} w{warps} s{stages}", "regs": int(usage.group(1)) if usage else None,
            "loop_instr": len(body), "weights_per_thread": weights_per_thread,
            "unpack_alu": sum(ops[o] for o in UNPACK_OPS), "STS": ops["STS"], "LDS": ops["LDS"] + ops["LDSM"],
            "BAR": ops["BAR"], "GMMA": ops["HGMMA"] + ops["IGMMA"] + ops["QGMMA"], "LDGSTS": ops["LDGSTS"], "LDG": ops["LDG"],
            "A_in_registers": a_in_regs, "wgmma_pendings": pendings, "n_dots": len(dots),
            "serialized": ptxas_serializes(cubin.with_suffix(".ptx")),
            "waits": f"{sass.count('WARPGROUP.DEPBAR')}/{len(re.findall(r'[HIQ]GMMA', sass))}",
            "ops": dict(ops.most_common())}


GLUON_TILES = [(128, 128, 128, 4, 4), (128, 128, 128, 8, 3), (128, 64, 128, 4, 4)]  # W1A16: BLOCK_K 64
# The Gluon kernels take EPILOGUE's pointers but the low-rank ones.
EPILOGUE_ARGS = {**{k: v for k, v in EPILOGUE.items() if k not in ("xv_ptr", "ut_ptr")},
                 "M": "i32", "N": "i32", "K": "i32", "KC": "i32", **SCALARS}


def gluon_variants():
    """The warp-specialized Gluon kernels (gluon_ws.py), as variants() gives the others."""
    from triton.experimental.gluon import language as gl

    module = importlib.import_module("bonsai.kernels.triton.gluon_ws")
    out = []
    for bm, bn, bk, warps, stages in GLUON_TILES:
        consts = {**{k: v for k, v in PLAIN.items() if k not in ("RANK", "EVEN_K", "GROUP", "GROUP_M")},
                  "BLOCK_N": bn, "STAGES": stages, "GROUP_M": 8, "num_warps": warps}
        for label, kernel, dtype, block_k, extra in (
                ("w1a8 gluon ws", module.w1a8_ws_kernel, gl.int8, bk, {"xs_ptr": "*fp32", "qsum_ptr": "*i32"}),
                ("w1a16 gluon ws", module.w1a16_ws_kernel, gl.bfloat16, bk // 2, {})):
            layout = gl.NVMMASharedLayout.get_default_for([bm, block_k], dtype)
            types = {kernel.arg_names[0]: f"tensordesc<{'i8' if dtype == gl.int8 else 'bf16'}[{bm}, {block_k}],{layout!r}>",
                     "w_ptr": "*i32", "out_ptr": "*bf16", **extra, **EPILOGUE_ARGS}
            sig = {k: types[k] for k in kernel.arg_names if k in types}  # in the kernel's order
            extra_consts = {} if dtype == gl.int8 else {"ONE_BITS": 0x3F80}
            out.append((label, kernel, sig, {**extra_consts, **consts}, (bm, bn, block_k, warps, stages)))
    return out


def compile_gluon_sm90(kernel, signature: dict, consts: dict, tile: tuple):
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = {**signature, **{k: "constexpr" for k in consts}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t.startswith("*")}
    src = GluonASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": tile[3]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/triton_sass"), help="folder for ttgir/ptx/sass")
    parser.add_argument("--gluon", action="store_true", help="also the warp-specialized Gluon kernels (gluon_ws.py)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"triton {triton.__version__}, target sm_90")
    head = (f"{'kernel':<15} {'tile (BMxBNxBK)':<20} {'regs':>4} {'instr':>5} {'w/thr':>5} {'alu':>4} {'STS':>3} "
            f"{'LDS':>3} {'BAR':>3} {'GMMA':>5}  A in regs, wgmma in flight (TTGIR); ptxas: serialized, waits/GMMA")
    print(head)
    todo = [(v, compile_sm90) for v in variants()]
    if args.gluon:
        kernel_modules()
        todo += [(v, compile_gluon_sm90) for v in gluon_variants()]
    for i, ((label, kernel, sig, consts, tile), compile_fn) in enumerate(todo):
        ck = compile_fn(kernel, sig, consts, tile)
        stem = args.out / f"{i:02d}_{label.replace(' ', '_')}"
        for ext in ("ttgir", "ptx"):
            stem.with_suffix("." + ext).write_text(ck.asm[ext])
        cubin = stem.with_suffix(".cubin")
        cubin.write_bytes(ck.asm["cubin"])
        s = summarize(label, ck, tile, cubin)
        stem.with_suffix(".sass").write_text(_tool("cuobjdump", "-sass", str(cubin)))
        print(f"{s['kernel']:<15} {s['tile']:<20} {s['regs']:>4} {s['loop_instr']:>5} {s['weights_per_thread']:>5} "
              f"{s['unpack_alu']:>4} {s['STS']:>3} {s['LDS']:>3} {s['BAR']:>3} {s['GMMA']:>5}  "
              f"{s['A_in_registers']}, pendings {s['wgmma_pendings']}; {s['serialized'] or 'async'}, {s['waits']}")
        print(f"    {s['ops']}")


if __name__ == "__main__":
    main()
