"""Which program computes which part of the output: tile order, and the stream-K split of the K steps.

One program per tile leaves SMs idle when the tiles do not fill the last wave: bonsai-4b's 3072 -> 3072
GEMM at 1024 tokens is 96 tiles of 256 x 128 for 132 SMs, so 27% of the GPU waits. Stream-K (Osama et
al., 2023) launches one program per SM instead and gives each an equal, contiguous share of all the
K steps of all the tiles, in tile order. A share then starts and ends inside a tile; such a tile is split
into pieces computed by consecutive programs. Each piece's program writes its partial sums to a slot of
a workspace and counts the piece in the tile's counter; the program that counts last adds the pieces
in program order (the same bits whoever comes last), applies the epilogue and zeroes the counter.

A program's share holds at most two pieces: the one its share starts in and the one it ends in; the
tiles in between are whole. So the workspace has two slots per program.

These helpers use integer arithmetic only: the tests run them as Python functions (`.fn`) against a
plain model of the schedule (all but _tile_ids and _this_share, which read the program id); the Gluon
kernels call them as they are.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile index -> (row block, column block), grouped along M so neighbours share weight tiles in L2."""
    num_m = (M + BLOCK_M - 1) // BLOCK_M  # tl.cdiv is a jit'd helper; plain ops keep the interpreter simple
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % size_m
    pid_n = (tile % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program's tile, one tile per program."""
    return _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)


@triton.jit
def _share_start(program, programs, steps):
    """First K step (counted over all tiles, tile after tile) of `program`'s share of `steps`; the share
    ends where the next program's starts. programs <= steps, so no share is empty (the launcher keeps
    programs * steps below 2**31)."""
    return program * steps // programs


@triton.jit
def _this_share(M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(K steps per tile, K steps in all, this program's share [start, end)): what both partitions of a
    stream-K program walk, from one definition so that they walk the same pieces."""
    tile_steps = (K + BLOCK_K - 1) // BLOCK_K
    steps = (M + BLOCK_M - 1) // BLOCK_M * ((N + BLOCK_N - 1) // BLOCK_N) * tile_steps
    program, programs = tl.program_id(0), tl.num_programs(0)
    return tile_steps, steps, _share_start(program, programs, steps), _share_start(program + 1, programs, steps)


@triton.jit
def _step_owner(step, programs, steps):
    """The program whose share holds K step `step`: the last one whose share starts at or before it."""
    return ((step + 1) * programs - 1) // steps


@triton.jit
def _piece_slot(program, tile, tile_steps, programs, steps):
    """Workspace slot of `program`'s piece of `tile`: 2 program for the piece its share starts in, 2 program + 1
    for the one it ends in (a share that starts before this tile and holds only part of it ends in it)."""
    return 2 * program + (_share_start(program, programs, steps) < tile * tile_steps)


@triton.jit
def _next_piece(start, end, tile_steps):
    """The piece of work at K step `start` of a share ending at `end`: (tile, its first K step, K steps), up
    to the tile's end or the share's."""
    tile = start // tile_steps
    k_first = start - tile * tile_steps
    return tile, k_first, min(tile_steps - k_first, end - start)
