"""The warp-specialized Gluon kernels, checked without a GPU: they compile for sm_90 and ptxas keeps their
wgmma loop asynchronous (the reason they exist; see gluon_ws.py), and ws.py's tile choice. Their results
and numbers come from the GPU tests in test_kernel_triton*.py and benchmarks/bench_gluon_ws.py."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
gluon_language = pytest.importorskip("triton.experimental.gluon.language")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402

PTXAS = Path(get_ptxas(90).path)  # the one Triton compiles sm_90 with (3.9 ships two)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
pytestmark = [
    pytest.mark.skipif(not (PTXAS.exists() and CUOBJDUMP.exists()), reason="Triton's wheel ships no ptxas here"),
    # test_kernel_triton.py imports triton under the interpreter when it comes first; the kernels' shared
    # @triton.jit helpers (fragment_kernels) are then interpreted functions, which Gluon cannot compile.
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="triton was imported for its interpreter"),
]


def compile_sm90(kernel, dtype, tile: tuple, fusion: dict):
    from triton.experimental.gluon._runtime import GluonASTSource

    gl = gluon_language
    bm, bn, bk, warps, stages = tile
    layout = gl.NVMMASharedLayout.get_default_for([bm, bk], dtype)
    types = {kernel.arg_names[0]: f"tensordesc<{'i8' if dtype == gl.int8 else 'bf16'}[{bm}, {bk}],{layout!r}>",
             "w_ptr": "*i32", "out_ptr": "*bf16", "xs_ptr": "*fp32", "qsum_ptr": "*i32", "rs_ptr": "*fp32",
             "ro_ptr": "*fp32", "xsum_ptr": "*fp32", "bias_ptr": "*bf16", "res_ptr": "*bf16", "gate_ptr": "*bf16",
             "nw_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "KC": "i32", "RPS": "i32", "NORM_COLS": "i32",
             "NORM_PART": "i32", "norm_eps": "fp32"}
    sig = {k: types[k] for k in kernel.arg_names if k in types}
    consts = {"BLOCK_N": bn, "STAGES": stages, "GROUP_M": 8, "num_warps": warps, **fusion}
    if dtype != gl.int8:
        consts["ONE_BITS"] = 0x3F80
    sig.update({k: "constexpr" for k in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t.startswith("*")}
    src = GluonASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


PLAIN = {"HAS_OFFSET": False, "HAS_BIAS": False, "GELU": False, "HEAD_DIM": 0, "HAS_RESIDUAL": False, "HAS_GATE": False}
# bonsai-4b's epilogues: qkv (row offset, bias, head norms), fc1 (GELU), attention out and fc2 (residual + gate)
QKV = {**PLAIN, "HAS_OFFSET": True, "HAS_BIAS": True, "HEAD_DIM": 128}
FC1 = {**PLAIN, "HAS_OFFSET": True, "HAS_BIAS": True, "GELU": True}
GATED = {**PLAIN, "HAS_OFFSET": True, "HAS_BIAS": True, "HAS_RESIDUAL": True, "HAS_GATE": True}


@pytest.mark.parametrize("kernel, tile, fusion", [
    ("w1a8", (128, 128, 128, 4, 4), QKV), ("w1a8", (256, 128, 128, 8, 3), GATED), ("w1a8", (256, 128, 128, 8, 4), FC1),
    ("w1a16", (128, 128, 64, 4, 4), FC1), ("w1a16", (256, 128, 64, 8, 3), QKV),
    ("w1a16", (256, 128, 64, 8, 4), GATED)])  # a 128-register accumulator: needs the 12-warp program's 168
def test_ws_kernel_keeps_its_wgmmas_in_flight(kernel, tile, fusion, tmp_path):
    from bonsai.kernels.triton import gluon_ws

    gl = gluon_language
    int8 = kernel == "w1a8"
    compiled = compile_sm90(gluon_ws.w1a8_ws_kernel if int8 else gluon_ws.w1a16_ws_kernel, gl.int8 if int8 else gl.bfloat16, tile, fusion)
    ptx = tmp_path / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])
    run = subprocess.run([str(PTXAS), "-arch=sm_90a", str(ptx), "-o", str(tmp_path / "kernel.cubin")],
                         capture_output=True, text=True, check=True)
    assert not re.search(r"C75\d\d\) Potential Performance Loss: wgmma", run.stderr), run.stderr
    sass = subprocess.run([str(CUOBJDUMP), "-sass", str(tmp_path / "kernel.cubin")],
                          capture_output=True, text=True, check=True).stdout
    bm, bn, bk, warps, _ = tile
    # One K step's products: 16 weight rows per MMA warp; per instruction 32 (int8) or 16 columns, and up to
    # 128 (int8) or 256 tokens.
    k_step, n_max = (32, 128) if int8 else (16, 256)
    gmma = len(re.findall(r"[IH]GMMA\.", sass))
    assert gmma == bn // (16 * warps) * (bk // k_step) * (bm // min(bm, n_max))
    # One wait inside the loop (for the step before: one product in flight) and one after it.
    assert sass.count("WARPGROUP.DEPBAR") == 2


def test_ws_tile_timing_picks_the_fastest_that_launches(monkeypatch):
    """ws._run on the first call of a shape times every tile that fits (Triton's OutOfResources: left out, as
    the autotuner does), remembers the fastest, and launches it; later calls launch it without timing."""
    from triton.runtime.errors import OutOfResources

    from bonsai.kernels.triton import ws

    tiles = ws.TILES["w1a8"]
    cost = {t: 10.0 - i for i, t in enumerate(tiles)}  # the last tile is the fastest...
    too_big = tiles[-1]  # ...but does not fit
    launched = []

    def launch(tile):
        if tile == too_big:
            raise OutOfResources(300000, 232448, "shared memory")
        launched.append(tile)

    monkeypatch.setattr(ws, "_chosen", {})
    monkeypatch.setattr(ws.triton.testing, "do_bench", lambda fn, **_: (fn(), cost[launched[-1]])[1])
    flags = {"HEAD_DIM": 0}
    ws._run("w1a8", launch, 2048, 3072, 3072, flags, None)
    assert launched[-1] == tiles[-2]  # the fastest that fits, launched after the timing
    launched.clear()
    ws._run("w1a8", launch, 2048, 3072, 3072, flags, None)
    assert launched == [tiles[-2]]  # remembered
    # Head norms keep to tiles holding whole heads.
    ws._run("w1a8", launch, 2048, 3072, 3072, {"HEAD_DIM": 128}, None)
    assert launched[-1][1] % 128 == 0


def test_ws_tiles_that_do_not_build_are_left_out(monkeypatch):
    """A tile this Triton cannot build is left out of the timing as the autotuner leaves it (ptxas errors);
    when none builds, ws says so (ws.Unbuildable), naming the first error, and ops' "auto" can fall back."""
    from triton.runtime.errors import PTXASError

    from bonsai.kernels.triton import ws

    tiles = ws.TILES["w1a16"]
    launched = []

    def launch(tile):
        if tile != tiles[1]:
            raise PTXASError("ptxas fatal: C7602 insufficient registers")
        launched.append(tile)

    monkeypatch.setattr(ws, "_chosen", {})
    monkeypatch.setattr(ws.triton.testing, "do_bench", lambda fn, **_: (fn(), 1.0)[1])
    ws._run("w1a16", launch, 2048, 3072, 3072, {"HEAD_DIM": 0}, None)
    assert launched[-1] == tiles[1]

    def never(tile):
        raise AttributeError("module 'gluon' has no attribute 'warp_specialize'")

    with pytest.raises(ws.Unbuildable, match="no w1a16 ws tile builds with Triton .*AttributeError"):
        ws._run("w1a16", never, 4096, 3072, 3072, {"HEAD_DIM": 0}, None)

