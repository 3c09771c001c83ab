"""Launchers for the warp-specialized Gluon kernels (gluon_ws.py), ops.py's variant "ws".

They take what ops.w1a16 / ops.w1a8 have prepared (x or its int8 quantization, the fragment words, the
epilogue's operands) and run on Hopper (compute capability 9.0: wgmma, TMA) for products the kernels
cover: no group scales, no low-rank term, K a multiple of 16 (TMA's row alignment for int8) and head
norms whose heads fit the tile. supports() says whether a product is covered; ops falls back to the
fragment kernels otherwise. The tile is chosen per (kernel, M bucket, N, K, epilogue) by timing TILES
on the first call, as Triton's autotuner does (so the first call must not be captured in a CUDA graph), and
the choice is kept in Triton's cache folder for later processes on the same GPU and Triton.
A tile runs one program per output tile, or (stream_k) one per SM over all the tiles' K steps
(schedule.py), with a workspace of two partial tiles per program.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cache
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.testing
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError

from ..packed import PackedWeight


class Tile(NamedTuple):
    block_m: int  # tokens
    block_n: int  # weight rows
    block_k: int
    warps: int  # MMA warps; 4 load warps are added
    stages: int
    stream_k: bool = False  # one program per SM over all the tiles' K steps, else one per tile


# 8 MMA warps take 64 weight rows per warpgroup; with the 4 load warps a program has 12 warps and ptxas gives
# each thread at most 168 registers, enough for a 64 x 256 float32 accumulator (128). By arithmetic, at the
# tensor cores' peak a 128 x 128 tile moves 128 bytes of shared memory a clock per SM (written by the loads,
# read by wgmma), the whole of its bandwidth; a 256 x 128 tile (cuBLAS's shape) moves 96.
# On an H100 the 256 x 128 tiles were the fastest for every bonsai-4b GEMM at 1024-4096 rows, out of these,
# four more 128- and 64-token tiles, and 128 tokens x 256 rows (benchmarks/RESULTS.md, fifth and seventh
# sessions); the 128 x 128 one stays for narrower shapes.
# Each tile is compiled for each epilogue on first use: fewer tiles, a shorter first image.
TILES = {
    "w1a8": [Tile(256, 128, 128, 8, 3), Tile(256, 128, 128, 8, 4), Tile(128, 128, 128, 4, 4)],
    "w1a16": [Tile(256, 128, 64, 8, 3), Tile(256, 128, 64, 8, 4), Tile(128, 128, 64, 4, 4)],
}
# The 256-token tiles under stream-K, for shapes whose tiles leave the last wave part empty. Timed one by one on
# an H100 (benchmarks/RESULTS.md, seventh session) they lost where they were meant to win (3072 -> 3072 at 1024
# tokens: 1.6-2.1x slower, each split tile writing and re-reading its partial sums) and won 4-5% on one shape,
# so the tile timing takes them with BONSAI_WS_STREAM_K=1 only.
STREAM_K_TILES = {kind: [t._replace(stream_k=True) for t in tiles if t.block_m == 256] for kind, tiles in TILES.items()}
STREAM_K = os.environ.get("BONSAI_WS_STREAM_K", "0") == "1"


def candidates(kind: str) -> list[Tile]:
    """The tiles the first call of a shape times."""
    return TILES[kind] + (STREAM_K_TILES[kind] if STREAM_K else [])


HOPPER = (9, 0)
_chosen: dict[tuple, Tile] = {}


class Unbuildable(RuntimeError):
    """No tile of a "ws" kernel builds with this Triton."""


# What a kernel that does not build raises: Gluon's front end, ptxas, and Gluon's API (experimental: it moves
# between Triton versions) missing a name or taking other arguments.
BUILD_ERRORS = (Unbuildable, CompilationError, PTXASError, ImportError, AttributeError, TypeError)


def supports(x: torch.Tensor, weight: PackedWeight, head_dim: int, rank: int) -> bool:
    """Whether the "ws" kernels cover x [M, K] @ W.T with this epilogue (else: the fragment kernels). TMA
    reads x: 16-byte aligned rows. Head norms need whole heads in a 128-row tile (powers of two up to 128)."""
    return (x.is_cuda and torch.cuda.get_device_capability(x.device) == HOPPER and weight.group_size == 0
            and rank == 0 and weight.in_features % 16 == 0 and x.is_contiguous() and x.data_ptr() % 16 == 0
            and head_dim <= 128)


def _descriptor(x: torch.Tensor, block_m: int, block_k: int):
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    dtype = {torch.int8: gl.int8, torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[x.dtype]
    layout = gl.NVMMASharedLayout.get_default_for([block_m, block_k], dtype)
    return TensorDescriptor.from_tensor(x, [block_m, block_k], layout)


def _run(kind: str, launch, m: int, n: int, k: int, consts: dict, tile: Tile | None, gpu: str = "") -> None:
    """launch(tile) with `tile`, or the fastest of candidates(kind) for this product: timed once, then
    remembered, and on `gpu` (its name; "" for none) also saved in Triton's cache folder for later processes."""
    if tile is None:
        from .ops import m_bucket

        key = (kind, m_bucket(m), n, k, tuple(sorted(consts.items())), STREAM_K)
        tile = _chosen.get(key)
        if tile is None:
            head_dim = consts["HEAD_DIM"]
            tiles = [t for t in candidates(kind) if not head_dim or t.block_n % head_dim == 0]
            record = _record_name(gpu, key, tiles) if gpu else None
            tile = _saved_choice(record, tiles) if record else None
            if tile is None:
                tile = _time_tiles(kind, launch, tiles, m, n, k)
                if record:
                    _save_choice(record, tile)
            _chosen[key] = tile
    launch(tile)


def _time_tiles(kind: str, launch, tiles: list[Tile], m: int, n: int, k: int) -> Tile:
    """The fastest of `tiles` that launches, timed as ops' Triton autotuners time their configs (ops._bench)."""
    from .ops import _bench

    times, failed = {}, []
    for t in tiles:
        try:
            times[t] = _bench(lambda t=t: launch(t), None)
        except OutOfResources:  # as the autotuner: such a tile is left out
            continue
        except BUILD_ERRORS as err:  # and so is one that does not build
            failed.append(err)
    if not times:
        if failed:
            raise Unbuildable(f"no {kind} ws tile builds with Triton {triton.__version__}: "
                              f"{type(failed[0]).__name__}: {failed[0]}") from failed[0]
        raise RuntimeError(f"no {kind} ws tile launches for M={m}, N={n}, K={k} on this GPU")
    return min(times, key=times.get)


# The tile timing's choices outlive the process, as Triton's compiled kernels do (the first image of a process
# otherwise times every shape's tiles again): one small JSON file per product in Triton's cache folder, named by
# everything the choice rests on.
_RECORD = "ws_tile.json"


def _record_name(gpu: str, key: tuple, tiles: list[Tile]) -> str:
    """Triton's version, the GPU, the kernels' source, the product and its candidate tiles, hashed."""
    from triton.runtime.cache import triton_key

    return hashlib.sha256("-".join((triton_key(), gpu, _kernel_source(), repr(key), repr(tiles))).encode()).hexdigest()


@cache
def _kernel_source() -> str:
    """gluon_ws.py's hash, read once a process (not once a product)."""
    return hashlib.sha256(Path(__file__).with_name("gluon_ws.py").read_bytes()).hexdigest()


def _saved_choice(record: str, tiles: list[Tile]) -> Tile | None:
    """The tile saved under `record`, if it is one of `tiles` (anything else in the file: None, time again)."""
    from triton.runtime.cache import get_cache_manager

    path = get_cache_manager(record).get_file(_RECORD)
    if path is None:
        return None
    try:
        saved = json.loads(Path(path).read_text())["tile"]
        tile = Tile(*saved)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return tile if tile in tiles else None


def _save_choice(record: str, tile: Tile) -> None:
    from triton.runtime.cache import get_cache_manager

    get_cache_manager(record).put(json.dumps({"tile": list(tile)}), _RECORD, binary=False)  # written atomically


FLAGS = ("HAS_OFFSET", "HAS_BIAS", "GELU", "HEAD_DIM", "HAS_RESIDUAL", "HAS_GATE")  # the kernels' epilogue switches


def w1a16(xc: torch.Tensor, words: torch.Tensor, out: torch.Tensor, epi: tuple, scalars: tuple, consts: dict,
          tile: Tile | None = None) -> None:
    """out = epilogue(xc @ W.T) for xc bf16/fp16 [M, K] (column scales applied); epi: ops._epilogue_args,
    scalars: ops._epilogue_scalars, consts: ops' kernel constants."""
    from .gluon_ws import w1a16_ws_kernel

    rs, ro, xsum, _xv, _ut, bias, res, gate, nw = epi
    _launch("w1a16", w1a16_ws_kernel, xc, (words, out, rs, ro, xsum, bias, res, gate, nw), scalars,
            {"ONE_BITS": consts["ONE_BITS"]}, consts, tile)


def w1a8(q: torch.Tensor, xs: torch.Tensor, qsum: torch.Tensor, words: torch.Tensor, out: torch.Tensor, epi: tuple,
         scalars: tuple, consts: dict, tile: Tile | None = None) -> None:
    """out = epilogue(dequantized q @ W.T) for q int8 [M, K] with per-row scales xs and row sums qsum."""
    from .gluon_ws import w1a8_ws_kernel

    rs, ro, xsum, _xv, _ut, bias, res, gate, nw = epi
    _launch("w1a8", w1a8_ws_kernel, q, (words, out, xs, qsum, rs, ro, xsum, bias, res, gate, nw), scalars, {}, consts,
            tile)


def _launch(kind: str, kernel, x: torch.Tensor, pointers: tuple, scalars: tuple, extra: dict, consts: dict,
            tile: Tile | None) -> None:
    """kernel(x's descriptor, words, out, part, count, ..., M, N, K, KC, scalars) on `tile` or the fastest of
    candidates(kind)."""
    from .ops import _sm_count, _tile_counters

    words, out = pointers[:2]
    (m, k), n = x.shape, out.shape[1]
    flags = {key: consts[key] for key in FLAGS}

    def launch(t: Tile) -> None:
        bm, bn, bk, warps, stages, stream_k = t
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        steps = tiles * triton.cdiv(k, bk)
        programs = min(_sm_count(x.device), steps) if stream_k else tiles
        if stream_k and programs * steps < 2**31:  # schedule.py's arithmetic is int32
            part = torch.empty(2 * programs, bm * bn, dtype=torch.int32 if kind == "w1a8" else torch.float32,
                               device=x.device)
            count = _tile_counters(x.device, tiles)
        else:
            stream_k, programs, part, count = False, tiles, out, out
        kernel[(programs,)](_descriptor(x, bm, bk), words, out, part, count, *pointers[2:], m, n, k, words.shape[1],
                            *scalars, **extra, **flags, BLOCK_N=bn, STAGES=stages, GROUP_M=8, STREAM_K=stream_k,
                            num_warps=warps)

    _run(kind, launch, m, n, k, flags, tile, _gpu_name(x.device) if x.is_cuda else "")


@cache
def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)
