"""The warp-specialized Gluon kernels, checked without a GPU: they compile for sm_90 and ptxas keeps their
wgmma loop asynchronous (the reason they exist; see gluon_ws.py), and ws.py's tile choice. Also the fragment
kernels' compiled expansion of the weights (one LOP3 per pair of bf16 weights). Their results
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

    from bonsai.kernels.triton.ws import Tile

    gl = gluon_language
    bm, bn, bk, warps, stages, stream_k = Tile(*tile)
    layout = gl.NVMMASharedLayout.get_default_for([bm, bk], dtype)
    types = {kernel.arg_names[0]: f"tensordesc<{'i8' if dtype == gl.int8 else 'bf16'}[{bm}, {bk}],{layout!r}>",
             "w_ptr": "*i32", "out_ptr": "*bf16", "part_ptr": "*i32" if dtype == gl.int8 else "*fp32",
             "count_ptr": "*i32", "xs_ptr": "*fp32", "qsum_ptr": "*i32", "rs_ptr": "*fp32",
             "ro_ptr": "*fp32", "xsum_ptr": "*fp32", "bias_ptr": "*bf16", "res_ptr": "*bf16", "gate_ptr": "*bf16",
             "nw_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "KC": "i32", "RPS": "i32", "NORM_COLS": "i32",
             "NORM_PART": "i32", "norm_eps": "fp32"}
    sig = {k: types[k] for k in kernel.arg_names if k in types}
    consts = {"BLOCK_N": bn, "STAGES": stages, "GROUP_M": 8, "STREAM_K": stream_k, "num_warps": warps, **fusion}
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


def compile_ws(kernel: str, tile: tuple, fusion: dict):
    from bonsai.kernels.triton import gluon_ws

    gl = gluon_language
    int8 = kernel == "w1a8"
    return compile_sm90(gluon_ws.w1a8_ws_kernel if int8 else gluon_ws.w1a16_ws_kernel, gl.int8 if int8 else gl.bfloat16,
                        tile, fusion)


STREAM_K_CASES = [("w1a8", (256, 128, 128, 8, 4, True), GATED), ("w1a16", (256, 128, 64, 8, 3, True), QKV)]


@pytest.mark.parametrize("kernel, tile, fusion", [
    ("w1a8", (128, 128, 128, 4, 4), QKV), ("w1a8", (256, 128, 128, 8, 3), GATED), ("w1a8", (256, 128, 128, 8, 4), FC1),
    ("w1a16", (128, 128, 64, 4, 4), FC1), ("w1a16", (256, 128, 64, 8, 3), QKV),
    ("w1a16", (256, 128, 64, 8, 4), GATED),  # a 128-register accumulator: needs the 12-warp program's 168
    *STREAM_K_CASES])
def test_ws_kernel_keeps_its_wgmmas_in_flight(kernel, tile, fusion, tmp_path):
    int8 = kernel == "w1a8"
    compiled = compile_ws(kernel, tile, fusion)
    ptx = tmp_path / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])
    run = subprocess.run([str(PTXAS), "-arch=sm_90a", str(ptx), "-o", str(tmp_path / "kernel.cubin")],
                         capture_output=True, text=True, check=True)
    assert not re.search(r"C75\d\d\) Potential Performance Loss: wgmma", run.stderr), run.stderr
    sass = subprocess.run([str(CUOBJDUMP), "-sass", str(tmp_path / "kernel.cubin")],
                          capture_output=True, text=True, check=True).stdout
    bm, bn, bk, warps = tile[:4]
    # One K step's products: 16 weight rows per MMA warp; per instruction 32 (int8) or 16 columns, and up to
    # 128 (int8) or 256 tokens.
    k_step, n_max = (32, 128) if int8 else (16, 256)
    gmma = len(re.findall(r"[IH]GMMA\.", sass))
    assert gmma == bn // (16 * warps) * (bk // k_step) * (bm // min(bm, n_max))
    # One wait inside the loop (for the step before: one product in flight) and one after it.
    assert sass.count("WARPGROUP.DEPBAR") == 2


def main_loop(sass: str) -> list[str]:
    """The instructions of the longest loop (backward branch) that holds a wgmma: the K loop."""
    ins = [(int(a, 16), text.strip()) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(m.group(1), 16), a) for a, text in ins if (m := re.search(r"BRA (0x[0-9a-f]+)", text))
             and int(m.group(1), 16) < a]
    lo, hi = max((lp for lp in loops if any(lp[0] <= a <= lp[1] and "GMMA" in t for a, t in ins)),
                 key=lambda lp: lp[1] - lp[0])
    return [t for a, t in ins if lo <= a <= hi]


@pytest.mark.parametrize("split_k, tile", [(4, (16, 64, 256, 4, 4)), (1, (128, 128, 64, 4, 4))])
def test_fragment_kernel_expands_each_pair_of_bf16_weights_in_one_lop3(split_k, tile, tmp_path):
    """fragment_kernels._signs_onto: the sign mask (an immediate) and 1.0's bits (a register) in one LOP3 per
    register of two weights. As two Triton constants, ptxas spent a LOP3 on each (and one shift either way)."""
    from bonsai.kernels.triton import fragment_kernels

    kernel = fragment_kernels.w1a16_frag_kernel
    bm, bn, bk, warps, stages = tile
    types = {"x_ptr": "*bf16", "w_ptr": "*i32", "count_ptr": "*i32", "gsb_ptr": "*i16", "norm_eps": "fp32"}
    sig = {p.name: types.get(p.name, "*fp32" if p.name.endswith("_ptr") else "i32") for p in kernel.params
           if not p.is_constexpr}
    consts = {"ONE_BITS": 0x3F80, "GROUP": 0, "HAS_OFFSET": False, "RANK": 0, "HAS_BIAS": False, "GELU": False,
              "HEAD_DIM": 0, "HAS_RESIDUAL": False, "HAS_GATE": False, "EVEN_K": True, "SPLIT_K": split_k,
              "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
    sig.update({k: "constexpr" for k in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t != "constexpr"}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    (tmp_path / "kernel.cubin").write_bytes(compiled.asm["cubin"])
    sass = subprocess.run([str(CUOBJDUMP), "-sass", str(tmp_path / "kernel.cubin")],
                          capture_output=True, text=True, check=True).stdout
    loop = main_loop(sass)
    sign_ops = [t for t in loop if "LOP3" in t and "0x80008000" in t]
    assert len(sign_ops) == bn * bk // (32 * warps) // 2  # one per pair of this thread's weights in a K step
    assert not [t for t in loop if "LOP3" in t and "0x3f803f80" in t], "1.0's bits put on by a LOP3 of their own"


@pytest.mark.parametrize("kernel, tile, fusion", STREAM_K_CASES)
def test_stream_k_kernel_counts_each_piece_once(kernel, tile, fusion):
    """A split tile's pieces meet through the workspace (gluon_ws._piece_out): every MMA thread's stores to it
    come before the count, which one thread adds with release and acquire at GPU scope; the partition's
    threads learn the count after a barrier and read the other pieces from L2 (.cg), and the counter is set
    back to zero."""
    ptx = compile_ws(kernel, tile, fusion).asm["ptx"]
    counts = [m.start() for m in re.finditer(r"atom\.global\.gpu\.acq_rel\.add", ptx)]
    assert len(counts) == 1
    line = ptx[ptx.rfind("\n", 0, counts[0]) + 1:ptx.find("\n", counts[0])]
    assert re.match(r"\s*@%p\d+ atom", line), f"every thread counts: {line}"
    before = ptx[:counts[0]]
    assert before.rfind("bar.sync") > before.rfind("st.global"), "the count can pass the piece's stores"
    after = ptx[counts[0]:]
    assert re.search(r"bar\.sync[^;]*;\s*ld\.shared", after), "the count is not shared through a barrier"
    assert "ld.global.cg" in after
    assert re.search(r"atom\.global\.gpu\.relaxed\.exch|atom\.global\.gpu\.exch", after), "the counter is not reset"


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


def test_ws_tile_choice_is_kept_for_later_processes(monkeypatch, tmp_path):
    """The tile timing's choice is saved in Triton's cache folder (TRITON_CACHE_DIR) under a name made of the
    GPU, Triton, the kernels' source and the product, so that a later process launches it without timing; on
    another GPU, or when the saved record is unreadable or names no candidate tile, the tiles are timed again."""
    import json

    from bonsai.kernels.triton import ws

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    tiles = ws.TILES["w1a16"]
    timed, launched = [], []
    cost = {t: 10.0 - i for i, t in enumerate(tiles)}  # the last is the fastest

    def bench(fn, **_):
        fn()
        timed.append(launched[-1])
        return cost[launched[-1]]

    monkeypatch.setattr(ws.triton.testing, "do_bench", bench)
    flags = {"HEAD_DIM": 0}

    def new_process(gpu="NVIDIA H100 80GB HBM3"):
        monkeypatch.setattr(ws, "_chosen", {})
        timed.clear()
        launched.clear()
        ws._run("w1a16", launched.append, 2048, 3072, 3072, flags, None, gpu)
        return launched[-1]

    assert new_process() == tiles[-1] and len(timed) == len(tiles)
    assert new_process() == tiles[-1] and not timed  # the saved choice, launched without timing
    assert new_process("NVIDIA H200") == tiles[-1] and len(timed) == len(tiles)  # another GPU: timed
    records = list(tmp_path.rglob("ws_tile.json"))
    assert len(records) == 2
    for record in records:
        record.write_text(json.dumps({"tile": [1, 2, 3, 4, 5, False]}))  # no candidate tile
    assert new_process() == tiles[-1] and len(timed) == len(tiles)
    for record in tmp_path.rglob("ws_tile.json"):
        record.write_text("{not json")
    assert new_process() == tiles[-1] and len(timed) == len(tiles)
    assert new_process() == tiles[-1] and not timed  # saved again after the timing


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


def test_stream_k_tiles_are_timed_only_when_asked(monkeypatch):
    """ws.STREAM_K (BONSAI_WS_STREAM_K=1) adds the stream-K tiles to those the first call times; each setting
    remembers its own choice."""
    from bonsai.kernels.triton import ws

    launched = []
    monkeypatch.setattr(ws, "_chosen", {})
    monkeypatch.setattr(ws.triton.testing, "do_bench", lambda fn, **_: (fn(), 1.0)[1])
    for stream_k in (False, True):
        monkeypatch.setattr(ws, "STREAM_K", stream_k)
        launched.clear()
        ws._run("w1a16", launched.append, 2048, 3072, 3072, {"HEAD_DIM": 0}, None)
        assert {t for t in launched if t.stream_k} == (set(ws.STREAM_K_TILES["w1a16"]) if stream_k else set())
    assert len(ws._chosen) == 2


@pytest.mark.parametrize("kind", ["w1a8", "w1a16"])
@pytest.mark.parametrize("stream_k", [False, True])
def test_ws_launch_passes_each_argument_its_place(kind, stream_k, monkeypatch):
    """ws._launch's arguments, by the Gluon kernel's own parameter names (a kernel launched with them shifted
    would compute garbage, and CI has no GPU to show it): the grid, the stream-K workspace (two partial tiles
    per program, in the accumulator's type) and tile counters, and every epilogue pointer where it belongs."""
    import torch

    from bonsai.kernels.triton import gluon_ws, ops, ws

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.names = kernel.arg_names

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, dict(zip(self.names, args)), kwargs))

    name = f"{kind}_ws_kernel"
    monkeypatch.setattr(gluon_ws, name, Recorder(getattr(gluon_ws, name)))
    monkeypatch.setattr(ops, "_sm_count", lambda device: 132)
    monkeypatch.setattr(ws, "_descriptor", lambda x, bm, bk: ("descriptor", bm, bk))
    m, k, n = 1024, 3072, 3072
    epi = tuple(torch.full((n,), float(i)) for i in range(9))  # rs, ro, xsum, xv, ut, bias, res, gate, nw
    out = torch.empty(m, n, dtype=torch.bfloat16)
    consts = {"ONE_BITS": 0x3F80, **{flag: 0 for flag in ws.FLAGS}}
    tile = (ws.STREAM_K_TILES if stream_k else ws.TILES)[kind][0]
    if kind == "w1a8":
        q, xs, qsum = torch.zeros(m, k, dtype=torch.int8), torch.ones(m), torch.zeros(m, dtype=torch.int32)
        words = torch.zeros(n // 16, k // 128, 64, dtype=torch.int32)
        ws.w1a8(q, xs, qsum, words, out, epi, (1, 0, 1, 1e-6), consts, tile)
    else:
        words = torch.zeros(n // 16, k // 64, 32, dtype=torch.int32)
        ws.w1a16(torch.zeros(m, k, dtype=torch.bfloat16), words, out, epi, (1, 0, 1, 1e-6), consts, tile)
    (grid, args, kwargs), = launches
    assert len(args) + len(kwargs) == len(getattr(gluon_ws, name).names)
    assert args["w_ptr"] is words and args["out_ptr"] is out and args["KC"] == words.shape[1]
    assert (args["M"], args["N"], args["K"]) == (m, n, k) and args["norm_eps"] == 1e-6
    rs, ro, xsum, _, _, bias, res, gate, nw = epi
    placed = [args[p] for p in ("rs_ptr", "ro_ptr", "xsum_ptr", "bias_ptr", "res_ptr", "gate_ptr", "nw_ptr")]
    assert all(a is b for a, b in zip(placed, (rs, ro, xsum, bias, res, gate, nw)))
    if kind == "w1a8":
        assert args["xs_ptr"] is xs and args["qsum_ptr"] is qsum
    tiles = (m // tile.block_m) * (n // tile.block_n)
    assert kwargs["STREAM_K"] == stream_k and kwargs["BLOCK_N"] == tile.block_n and kwargs["num_warps"] == tile.warps
    if stream_k:  # 96 tiles of 256 x 128 for 132 SMs
        assert grid == (132,)
        part = args["part_ptr"]
        assert part.shape == (2 * 132, tile.block_m * tile.block_n)
        assert part.dtype == (torch.int32 if kind == "w1a8" else torch.float32)
        assert args["count_ptr"].dtype == torch.int32 and args["count_ptr"].numel() >= tiles
        assert not args["count_ptr"].any()
    else:
        assert grid == (tiles,)


def test_stream_k_beyond_int32_runs_one_program_per_tile(monkeypatch):
    """schedule.py computes program x K steps in int32: past 2**31 the launcher runs the tile per program."""
    import torch

    from bonsai.kernels.triton import gluon_ws, ops, ws

    grids = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: grids.append((grid, kwargs["STREAM_K"]))

    monkeypatch.setattr(gluon_ws, "w1a16_ws_kernel", Recorder())
    monkeypatch.setattr(ops, "_sm_count", lambda device: 100_000)  # more programs than any GPU, same arithmetic
    monkeypatch.setattr(ws, "_descriptor", lambda x, bm, bk: None)
    m, k, n = 65536, 3072, 3072  # 6144 tiles of 24 K steps: 100000 x 147456 > 2**31
    x = torch.zeros(1, k, dtype=torch.bfloat16).expand(m, k)
    epi = (torch.ones(n),) * 9
    ws.w1a16(x, torch.zeros(n // 16, k // 64, 32, dtype=torch.int32), torch.empty(1, n).expand(m, n), epi,
             (1, 0, 1, 1e-6), {"ONE_BITS": 0x3F80, **{flag: 0 for flag in ws.FLAGS}}, ws.STREAM_K_TILES["w1a16"][0])
    assert grids == [((6144,), False)]


def test_the_diagnostic_patch_still_applies():
    """benchmarks/ws_parts.patch (the switches behind RESULTS.md's "where the time goes") against gluon_ws.py."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None:
        pytest.skip("no git here")
    done = subprocess.run(["git", "apply", "--check", "benchmarks/ws_parts.patch"], cwd=root, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
