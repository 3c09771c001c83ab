"""The stream-K schedule of the "ws" kernels (schedule.py), run as plain Python: the pieces both partitions
walk cover every K step of every tile once, and the pieces of a split tile find each other's workspace
slots. The kernels themselves run on a GPU only (tests/test_kernel_triton.py, benchmarks/bench_gluon_ws.py)."""

from __future__ import annotations

import types

import pytest

pytest.importorskip("triton")

from bonsai.kernels.triton import schedule  # noqa: E402


def plain_functions():
    """schedule's @triton.jit helpers as the Python functions they are written as, calling each other."""
    namespace = dict(vars(schedule))
    for name, value in vars(schedule).items():
        if hasattr(value, "fn") and callable(value.fn):
            namespace[name] = types.FunctionType(value.fn.__code__, namespace, name)
    return types.SimpleNamespace(**{k: v for k, v in namespace.items() if k.startswith("_") and callable(v)})


S = plain_functions()


def walk(programs: int, tiles: int, tile_steps: int) -> list[tuple[int, int, int, int]]:
    """(program, tile, first K step, K steps) of every piece, as _mma_stream_k and _load_stream_k walk them."""
    steps = tiles * tile_steps
    pieces = []
    for program in range(programs):
        start, end = S._share_start(program, programs, steps), S._share_start(program + 1, programs, steps)
        assert start < end  # no empty share
        while start < end:
            tile, k_first, n_steps = S._next_piece(start, end, tile_steps)
            pieces.append((program, tile, k_first, n_steps))
            start += n_steps
    return pieces


# (programs, tiles, K steps per tile): fewer tiles than SMs (3072 -> 3072 at 1024 tokens: 96 tiles of 48
# steps), more tiles than SMs (at 2048 tokens), a multiple (no split), short K, one tile, odd counts.
CASES = [(132, 96, 48), (132, 192, 48), (132, 264, 48), (132, 18, 97), (132, 384, 192), (7, 5, 3), (3, 1, 4),
         (5, 5, 1), (16, 3, 16), (132, 100, 2)]


@pytest.mark.parametrize("programs, tiles, tile_steps", CASES)
def test_pieces_cover_every_step_once(programs, tiles, tile_steps):
    programs = min(programs, tiles * tile_steps)  # as ws._launch: no more programs than K steps
    covered = [[0] * tile_steps for _ in range(tiles)]
    for _program, tile, k_first, n_steps in walk(programs, tiles, tile_steps):
        assert n_steps > 0 and k_first + n_steps <= tile_steps
        for k in range(k_first, k_first + n_steps):
            covered[tile][k] += 1
    assert all(count == 1 for row in covered for count in row)


@pytest.mark.parametrize("programs, tiles, tile_steps", CASES)
def test_split_tiles_find_their_pieces(programs, tiles, tile_steps):
    """A split tile's pieces come from the programs _step_owner names for its first and last step, in program
    order; every piece has its own slot in the workspace (2 per program), and the slot the last piece reads
    for program q is the one q wrote."""
    programs = min(programs, tiles * tile_steps)
    steps = tiles * tile_steps
    by_tile: dict[int, list] = {}
    for piece in walk(programs, tiles, tile_steps):
        by_tile.setdefault(piece[1], []).append(piece)
    written = {}
    for tile, pieces in by_tile.items():
        first = S._step_owner(tile * tile_steps, programs, steps)
        last = S._step_owner(tile * tile_steps + tile_steps - 1, programs, steps)
        assert [p[0] for p in pieces] == list(range(first, last + 1))
        assert [p[2] for p in pieces] == sorted(p[2] for p in pieces)  # in K order too
        if len(pieces) == 1:
            assert pieces[0][3] == tile_steps  # whole: no workspace
            continue
        for program, *_ in pieces:
            slot = S._piece_slot(program, tile, tile_steps, programs, steps)
            assert 2 * program <= slot < 2 * program + 2
            assert slot not in written, "two pieces in one slot"
            written[slot] = tile
    for tile, pieces in by_tile.items():
        if len(pieces) > 1:
            first = S._step_owner(tile * tile_steps, programs, steps)
            last = S._step_owner(tile * tile_steps + tile_steps - 1, programs, steps)
            assert all(written[S._piece_slot(q, tile, tile_steps, programs, steps)] == tile
                       for q in range(first, last + 1))


def test_a_share_that_divides_the_tiles_splits_none():
    """132 programs over 264 tiles: two whole tiles each, no workspace, no counter."""
    pieces = walk(132, 264, 48)
    assert len(pieces) == 264 and all(n_steps == 48 for *_, n_steps in pieces)


def test_grouped_tile_order_is_a_permutation():
    for m_tiles, n_tiles in [(4, 24), (16, 24), (9, 5), (1, 7)]:
        coords = {S._tile_coords(t, m_tiles * 256, n_tiles * 128, 256, 128, 8) for t in range(m_tiles * n_tiles)}
        assert coords == {(i, j) for i in range(m_tiles) for j in range(n_tiles)}
