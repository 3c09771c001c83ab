"""Triton bitmatmul kernels against the float64 reference.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1) on small shapes with
odd M, K not a multiple of the tile, N not a multiple of the tile. The `gpu` tests run the
autotuned kernels on CUDA through the dispatcher.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

# Triton builds its standard library (tl.zeros, ...) for one mode when first imported, so interpreter
# mode must be chosen before that. If something imported triton earlier in this process, the
# interpreter tests run in a fresh process instead (test_interpreter_in_fresh_process).
_TRITON_PREIMPORTED = "triton" in sys.modules
if not torch.cuda.is_available() and not _TRITON_PREIMPORTED:
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and not _TRITON_PREIMPORTED

pytest.importorskip("triton")

from bonsai.kernels import PackedWeight, available_kernels, bitmatmul, pack_signs, set_kernel  # noqa: E402
from bonsai.kernels.dispatch import select_kernel  # noqa: E402
from bonsai.kernels.triton import ops as triton_ops  # noqa: E402
from bonsai.kernels.triton import ws  # noqa: E402

BF16_UNIT = 2.0**-8  # bf16 keeps 8 significant bits


def _upcast_bf16_dot(original):
    """The interpreter multiplies bf16 operands as their raw uint16 bit patterns; upcast them as the GPU would."""
    from triton.runtime import interpreter as ti
    import triton.language as tl

    def create_dot(self, a, b, d, *args):
        if a.dtype.scalar == tl.bfloat16:
            a, b = (ti.TensorHandle(ti._convert_float(t.data, tl.bfloat16, tl.float32, None).view(ti.np.float32),
                                    tl.float32) for t in (a, b))
        return original(self, a, b, d, *args)

    return create_dot


def _round_to_e4m3(original):
    """The interpreter's float32 -> float8 e4m3 conversion loses the carry of its rounding (31.75 becomes 16.0,
    1.98 becomes 1.0) and flushes small subnormals to zero (triton-lang/triton#8322, still in Triton 3.9);
    convert as the GPU's cvt.rn.satfinite does (round to nearest even, saturating at +-448), with torch."""
    import numpy as np
    import triton.language as tl

    def convert(data, input_dtype, output_dtype, rounding_mode):
        if output_dtype == tl.float8e4nv and input_dtype == tl.float32:
            t = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy()).clamp(-448.0, 448.0)
            return t.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return original(data, input_dtype, output_dtype, rounding_mode)

    return convert


@pytest.fixture(scope="module")
def interp():
    """The launchers, with kernels running under the interpreter (skipped where they cannot)."""
    if not INTERPRETED:
        pytest.skip("interpreter tests need TRITON_INTERPRET=1 before triton is imported")
    from triton.runtime import interpreter as ti

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ti.InterpreterBuilder, "create_dot", _upcast_bf16_dot(ti.InterpreterBuilder.create_dot))
        mp.setattr(ti, "_convert_float", _round_to_e4m3(ti._convert_float))
        yield triton_ops


@pytest.mark.skipif(not _TRITON_PREIMPORTED or torch.cuda.is_available(), reason="interpreter tests ran here")
def test_interpreter_in_fresh_process():
    run_under_interpreter(__file__)


def run_under_interpreter(path: str) -> None:
    """Run a test file's tests in a fresh process with TRITON_INTERPRET=1 (set before triton is imported)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", path, "-q", "-p", "no:cacheprovider"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:]


def random_weight(n: int, k: int, *, group: int = 0, col: bool = False, offset: bool = False, rank: int = 0,
                  device: str = "cpu", gen: torch.Generator | None = None) -> PackedWeight:
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    def pos(*shape):
        return (torch.rand(*shape, generator=gen) + 0.5).to(device)

    extra = {}
    if group:
        extra.update(group_size=group, group_scale=pos(n, -(-k // group)).half())
    if col:
        extra["col_scale"] = pos(k)
    if offset:
        extra["row_offset"] = rnd(n) * 0.05
    if rank:
        extra.update(lowrank_u=(rnd(n, rank) * 0.1).bfloat16(), lowrank_v=(rnd(rank, k) * 0.1).bfloat16())
    return PackedWeight(pack_signs(rnd(n, k)), k, pos(n) / k**0.5, **extra)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all(), "non-finite output"
    return ((y.double() - ref).norm() / ref.norm()).item()


def binary_part(w: PackedWeight) -> torch.Tensor:
    """float64 [N, K]: row_scale * group_scale * B, the part of W that W1A8 multiplies with quantized x."""
    b = w.sign_matrix(torch.float64) * w.row_scale.double()[:, None]
    if w.group_scale is not None:
        b = b * w.group_scale.double().repeat_interleave(w.group_size, dim=1)[:, : w.in_features]
    return b


# (M, N, K, weight features): odd M, K off the 64-wide tile, N off the 32-wide tile.
CASES = [
    (5, 48, 200, {}),
    (17, 33, 136, {"col": True, "offset": True}),
    (3, 40, 256, {"group": 64, "col": True, "offset": True, "rank": 5}),
    (7, 24, 200, {"group": 32, "rank": 3}),
]
TILE = triton_ops.TileConfig(16, 32, 64)


VARIANTS = ["k-major", "fragment"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m,n,k,features", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_w1a16_matches_float64_reference(interp, m, n, k, features, dtype, variant):
    gen = torch.Generator().manual_seed(m * 1000 + k)
    w = random_weight(n, k, gen=gen, **features)
    x = torch.randn(m, k, generator=gen).to(dtype)
    y = interp.w1a16(x, w, config=TILE, variant=variant)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, x.double() @ w.dequantize(torch.float64).T) < (1e-2 if dtype != torch.float16 else 2e-3)


@pytest.mark.parametrize("variant", VARIANTS)  # "fragment" falls back to "k-major" for this group size
def test_w1a16_group_not_multiple_of_tile_and_bias(interp, variant):
    gen = torch.Generator().manual_seed(1)
    w = random_weight(20, 150, group=48, col=True, gen=gen)
    x = torch.randn(2, 3, 150, generator=gen).half()
    bias = torch.randn(20, generator=gen).half()
    y = interp.w1a16(x, w, bias=bias, config=triton_ops.TileConfig(16, 16, 32), variant=variant)
    ref = x.double() @ w.dequantize(torch.float64).T + bias.double()
    assert y.shape == (2, 3, 20) and rel_err(y, ref) < 2e-3


@pytest.mark.parametrize("m,n,k,features,shares", [
    (1, 48, 300, {"group": 64, "col": True, "offset": True, "rank": 5}, 3),  # 5 K blocks: 2 + 2 + 1
    (5, 40, 520, {}, 4),  # K off the block
    (16, 33, 256, {"col": True}, 2),
])
def test_w1a16_split_k_matches_float64_reference(interp, monkeypatch, m, n, k, features, shares):
    gen = torch.Generator().manual_seed(m * 100 + shares)
    w = random_weight(n, k, gen=gen, **features)
    x, bias = torch.randn(m, k, generator=gen).bfloat16(), torch.randn(n, generator=gen).bfloat16()
    counters = []
    tile_counters = interp._tile_counters
    monkeypatch.setattr(interp, "_tile_counters", lambda *a: counters.append(tile_counters(*a)) or counters[-1])
    config = triton_ops.TileConfig(16, 32, 64, split_k=shares)
    y = interp.w1a16(x, w, bias, config=config, variant="fragment")
    assert len(counters) == 1 and not counters[0].any()  # each tile's last program set its counter back to zero
    assert rel_err(y, x.double() @ w.dequantize(torch.float64).T + bias.double()) < 1e-2
    whole = interp.w1a16(x, w, bias, config=triton_ops.TileConfig(16, 32, 64), variant="fragment")
    assert len(counters) == 1 and rel_err(y, whole.double()) < 1e-2  # one bf16 rounding apart
    assert torch.equal(interp.w1a16(x, w, bias, config=config, variant="fragment"), y)  # the counters, reused


def test_split_k_shares():
    split_k = triton_ops.split_k
    assert split_k(1, 9216, 3072, 64, 256, 132) == 3  # 144 tiles: three programs each
    assert split_k(16, 3072, 3072, 64, 256, 132) == 6  # 48 tiles, 12 K blocks: at least two blocks a share
    assert split_k(16, 3072, 12288, 64, 128, 132) == 8
    assert split_k(17, 3072, 3072, 64, 256, 132) == 1  # more rows: tiles along M fill the SMs
    assert split_k(1, 3072, 384, 64, 128, 132) == 1  # three K blocks: nothing to split
    for n in (64, 320, 3072, 9216):
        for k in range(256, 8192, 320):
            for block_k in (64, 128, 256):
                s = split_k(4, n, k, 64, block_k, 132)
                blocks = -(-k // block_k)
                per = -(-blocks // s)
                assert 1 <= s <= triton_ops.MAX_SPLIT_K and (s - 1) * per < blocks  # no share is empty


def test_quantize_rows_error_within_half_step(interp):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 300, generator=gen).bfloat16()
    cs = torch.rand(300, generator=gen) + 0.5
    xsum = torch.empty(9)
    q, scale, qsum = interp.quantize_rows(x, cs, xsum)
    assert torch.allclose(xsum.double(), x.double().sum(1), rtol=1e-5, atol=1e-4)  # raw rows, before col_scale
    xc = x.double() * cs.double()
    assert torch.allclose(scale.double(), xc.abs().amax(1) / 127, rtol=1e-6)
    assert ((q.double() * scale.double()[:, None] - xc).abs() <= scale.double()[:, None] * (0.5 + 1e-5)).all()
    assert torch.equal(qsum, q.int().sum(1, dtype=torch.int32))
    assert q.abs().max() == 127


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m,n,k,features", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w1a8_exact_on_quantized_input_and_within_derived_bound(interp, m, n, k, features, dtype, variant):
    """Two checks: (1) against float64 on the kernel's own quantized x, where only the fp32 epilogue and the
    output rounding err; (2) against the true reference, within the bound that per-token quantization allows:
    |q s - x'| <= s/2 elementwise (x' = x * col_scale, s = max|x'| / 127), so
    ||dy||_F <= ||dx'||_F ||binary part||_2 with ||dx'||_F <= sqrt(K sum_m (s_m / 2)^2)."""
    gen = torch.Generator().manual_seed(m * 7 + k)
    w = random_weight(n, k, gen=gen, **features)
    x = torch.randn(m, k, generator=gen).to(dtype)
    y = interp.w1a8(x, w, config=TILE, variant=variant)
    assert y.dtype == dtype and y.shape == (m, n)
    ref = x.double() @ w.dequantize(torch.float64).T
    cs = w.col_scale.double() if w.col_scale is not None else torch.ones(k, dtype=torch.float64)
    q, scale, _ = interp.quantize_rows(x, w.col_scale)
    xq = q.double() * scale.double()[:, None]
    shift = (xq - x.double() * cs) @ binary_part(w).T
    assert rel_err(y, ref + shift) < 2 * BF16_UNIT
    bound = (k * (scale.double() / 2).square().sum()).sqrt() * torch.linalg.matrix_norm(binary_part(w), ord=2)
    assert (y.double() - ref).norm() <= bound + 2 * BF16_UNIT * ref.norm()


E4M3_MAX = 448.0


def test_quantize_rows_fp8_rounds_to_nearest_e4m3(interp):
    """fp8: q = x' / s rounded to nearest-even e4m3 with s = max|x'| / 448 (x' = x * col_scale), so within half
    an e4m3 step of x' / s: 2^-4 of its size among normal numbers, 2^-10 among subnormals."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(9, 300, generator=gen) * torch.logspace(-3, 1, 300)).bfloat16()  # magnitudes over 4 decades
    cs = torch.rand(300, generator=gen) + 0.5
    xsum = torch.empty(9)
    q, scale, qsum = interp.quantize_rows(x, cs, xsum, fp8=True)
    assert q.dtype == torch.float8_e4m3fn and qsum is None
    assert torch.allclose(xsum.double(), x.double().sum(1), rtol=1e-5, atol=1e-4)
    xc = x.float() * cs
    assert torch.allclose(scale.double(), xc.abs().amax(1).double() / E4M3_MAX, rtol=1e-6)
    v = xc.double() / scale.double()[:, None]
    assert ((q.double() - v).abs() <= v.abs() * 2.0**-4 + 2.0**-10).all()
    assert torch.equal(q.view(torch.uint8), (xc / scale[:, None]).to(torch.float8_e4m3fn).view(torch.uint8))
    assert q.float().abs().amax() == E4M3_MAX
    assert (q.float().abs() < 2.0**-6).any() and (q.float() != 0).sum() > 0.99 * q.numel()  # subnormals were hit


# Cases the fp8 activations take: the fragment kernel, group sizes 0 or multiples of 128.
FP8_CASES = [
    (5, 48, 200, {}, TILE),
    (17, 33, 136, {"col": True, "offset": True}, TILE),
    (9, 72, 300, {"group": 128, "col": True, "offset": True, "rank": 4}, triton_ops.TileConfig(16, 64, 256)),
    (33, 40, 520, {}, triton_ops.TileConfig(32, 32, 256)),
]


@pytest.mark.parametrize("m,n,k,features,tile", FP8_CASES)
def test_w1a8_fp8_exact_on_quantized_input_and_within_derived_bound(interp, m, n, k, features, tile):
    """As the int8 test above, with e4m3's rounding: |q s - x'| <= s (2^-4 |x' / s| + 2^-10) elementwise."""
    gen = torch.Generator().manual_seed(m * 11 + k)
    w = random_weight(n, k, gen=gen, **features)
    x = torch.randn(m, k, generator=gen).bfloat16()
    y = interp.w1a8(x, w, config=tile, activation="fp8")
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert "triton-fragment-int8" in w.cache, "the fragment kernel did not run"
    ref = x.double() @ w.dequantize(torch.float64).T
    cs = w.col_scale.double() if w.col_scale is not None else torch.ones(k, dtype=torch.float64)
    q, scale, _ = interp.quantize_rows(x, w.col_scale, fp8=True)
    xq = q.double() * scale.double()[:, None]
    shift = (xq - x.double() * cs) @ binary_part(w).T
    assert rel_err(y, ref + shift) < 2 * BF16_UNIT
    step = (x.double() * cs).abs() * 2.0**-4 + scale.double()[:, None] * 2.0**-10
    bound = step.norm() * torch.linalg.matrix_norm(binary_part(w), ord=2)
    assert (y.double() - ref).norm() <= bound + 2 * BF16_UNIT * ref.norm()
    print(f"fp8 activations: relative error {rel_err(y, ref):.2e}")


@pytest.mark.parametrize("features,variant,match", [({"group": 64}, "fragment", "group sizes"),
                                                    ({}, "k-major", "fragment kernel")])
def test_w1a8_fp8_refuses_what_its_kernel_cannot_run(interp, features, variant, match):
    w = random_weight(16, 256, **features)
    with pytest.raises(ValueError, match=match):
        interp.w1a8(torch.randn(2, 256), w, config=TILE, variant=variant, activation="fp8")
    with pytest.raises(ValueError, match="activation format"):
        interp.w1a8(torch.randn(2, 256), w, config=TILE, activation="fp4")


@pytest.mark.parametrize("activation", ["int8", "fp8"])
def test_w1a8_numerics_reference_matches_the_kernel(interp, activation):
    """bitmatmul_w1a8_reference (which measures W1A8's rounding on a real model without a GPU) computes what
    the kernel computes, up to the kernel's bf16 output."""
    from bonsai.kernels.reference import bitmatmul_w1a8_reference

    gen = torch.Generator().manual_seed(4)
    w = random_weight(72, 300, group=128, col=True, offset=True, rank=4, gen=gen)
    x = (torch.randn(2, 9, 300, generator=gen) * 3 + 0.5).bfloat16()
    y = interp.w1a8(x, w, config=triton_ops.TileConfig(16, 64, 256), activation=activation)
    emulated = bitmatmul_w1a8_reference(x.float(), w, activation)
    assert rel_err(y, emulated.double()) < 2 * BF16_UNIT
    assert rel_err(emulated, x.double() @ w.dequantize(torch.float64).T) > 1e-3  # it does round the activations


# Fragment kernels with several chunks per K step and a group scale the k-major fallback would not take.
FRAGMENT_CASES = [
    ("w1a16", 9, 72, 300, {"group": 128, "col": True, "offset": True, "rank": 4}, triton_ops.TileConfig(16, 64, 128)),
    ("w1a16", 33, 40, 136, {}, triton_ops.TileConfig(32, 32, 128)),
    ("w1a8", 9, 72, 300, {"group": 128, "col": True, "offset": True, "rank": 4}, triton_ops.TileConfig(16, 64, 256)),
    ("w1a8", 33, 40, 520, {}, triton_ops.TileConfig(32, 32, 256)),
]


@pytest.mark.parametrize("kernel,m,n,k,features,tile", FRAGMENT_CASES)
def test_fragment_kernels_with_wide_k_steps(interp, kernel, m, n, k, features, tile):
    gen = torch.Generator().manual_seed(m + n + k)
    w = random_weight(n, k, gen=gen, **features)
    x = torch.randn(m, k, generator=gen).bfloat16()
    y = getattr(interp, kernel)(x, w, config=tile, variant="fragment")
    assert w.cache.keys() & {"triton-fragment-bf16", "triton-fragment-int8"}, "fragment kernel did not run"
    tol = 1e-2 if kernel == "w1a16" else 3e-2  # W1A8: per-token int8 activations (see the bound test above)
    assert rel_err(y, x.double() @ w.dequantize(torch.float64).T) < tol


@pytest.mark.parametrize("build,chunk,set_means", [("bf16_words", 64, -1), ("int8_words", 128, 1)])
def test_fragment_words_hold_every_sign_where_the_docstring_says(build, chunk, set_means):
    """Decode the words with the index formulas of fragments.py and compare with the sign matrix."""
    from bonsai.kernels.triton import fragments

    gen = torch.Generator().manual_seed(3)
    n, k = 37, 3 * chunk - 5
    w = random_weight(n, k, gen=gen)
    words = getattr(fragments, build)(w).long() & 0xFFFFFFFF
    nn, kk = torch.meshgrid(torch.arange(n), torch.arange(k), indexing="ij")
    g, rs, r0 = nn // 16, (nn // 8) % 2, nn % 8
    kc, kin = kk // chunk, kk % chunk
    if chunk == 64:
        j, h, c, e = kin // 16, (kin // 8) % 2, (kin // 2) % 4, kin % 2
        word, bit = 4 * r0 + c, 8 * rs + 2 * j + h + 16 * e
    else:
        t, h, c, i = kin // 32, (kin // 16) % 2, (kin // 4) % 4, kin % 4
        word, bit = 2 * (4 * r0 + c) + t // 2, 4 * rs + 2 * (t % 2) + h + 8 * i
    bits = (words[g, kc, word] >> bit) & 1
    signs = torch.where(bits == 1, set_means, -set_means)
    assert torch.equal(signs.float(), w.sign_matrix())


def test_w1a8_rejects_group_sizes_it_cannot_tile(interp):
    w = random_weight(16, 96, group=48)
    with pytest.raises(ValueError, match="group_size"):
        interp.w1a8(torch.randn(2, 96), w, config=TILE)


def test_kernels_registered_for_cuda_only():
    assert {"triton-w1a16", "triton-w1a8"} <= set(available_kernels())
    assert "triton-w1a8-fp8" not in available_kernels()  # compiled wrong on GPUs (RESULTS.md)
    w = random_weight(8, 32)
    x = torch.randn(3, 32)
    try:
        set_kernel("triton-w1a8")
        with pytest.raises(RuntimeError, match="does not run on cpu"):
            bitmatmul(x, w)
    finally:
        set_kernel(None)
    assert not select_kernel(x, w).name.startswith("triton")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kernel,m,tol", [("triton-w1a16", 1, 1e-2), ("triton-w1a16", 300, 1e-2),
                                          ("triton-w1a8", 3, 2e-2), ("triton-w1a8", 1100, 2e-2)])
def test_cuda_dispatch_matches_reference(kernel, m, tol):
    gen = torch.Generator().manual_seed(m)
    w = random_weight(1000, 3000, group=128, col=True, offset=True, rank=16, gen=gen).to("cuda")
    x = torch.randn(m, 3000, generator=gen).bfloat16().cuda()
    ref = x.double() @ w.dequantize(torch.float64).T
    try:
        set_kernel(kernel)
        assert rel_err(bitmatmul(x, w), ref) < tol
    finally:
        set_kernel(None)


@pytest.mark.gpu
@cuda
def test_cuda_w1a8_computes_its_numerics_reference():
    """Against bitmatmul_w1a8_reference on the same rounded activations, so that only the GEMM's own
    accumulation and the bf16 output are measured, over K = 12288 (bonsai-4b's MLP down)."""
    from bonsai.kernels.reference import bitmatmul_w1a8_reference

    gen = torch.Generator().manual_seed(12288)
    w = random_weight(3072, 12288, offset=True, gen=gen).to("cuda")
    x = (torch.randn(1024, 12288, generator=gen) * 2 + 0.3).bfloat16().cuda()
    y = triton_ops.w1a8(x, w)
    err = rel_err(y, bitmatmul_w1a8_reference(x.float(), w, "int8").double())
    print(f"int8: relative error against its numerics reference {err:.2e}")
    assert err < 8e-3
    with pytest.raises(RuntimeError, match="does not run on CUDA"):  # fp8: compiled wrong by Triton 3.6
        triton_ops.w1a8(x, w, activation="fp8")


def _every_tile(tiles: dict[str, list]) -> list[tuple]:
    return sorted({t for ts in tiles.values() for t in ts})


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name,tile", [("w1a16", t) for t in _every_tile(triton_ops._W1A16_FRAG_TILES)]
                         + [("w1a16", (*t, 4)) for t in triton_ops._W1A16_FRAG_TILES["small"]]
                         + [("w1a8", t) for t in _every_tile(triton_ops._W1A8_FRAG_TILES)])
def test_cuda_every_fragment_tile_matches_reference(name, tile):
    """Each tile the autotuner may pick (and the small ones with K in four shares), compiled for this GPU: the
    compiler lays out registers per tile, and Triton 3.6 got some tiles of the fp8 variant wrong."""
    bm, bn, bk, warps, stages, *split = tile
    config = triton_ops.TileConfig(bm, bn, bk, warps, stages, split_k=split[0] if split else 1)
    gen = torch.Generator().manual_seed(sum(tile))
    w = random_weight(1000, 6144, offset=True, gen=gen).to("cuda")
    x = (torch.randn(300 if not split else 5, 6144, generator=gen) * 2 + 0.3).bfloat16().cuda()
    y = getattr(triton_ops, name)(x, w, config=config, variant="fragment")
    assert rel_err(y, x.double() @ w.dequantize(torch.float64).T) < (1e-2 if name == "w1a16" else 2e-2)


@pytest.mark.parametrize("name", ["w1a16", "w1a8"])
def test_ws_variant_falls_back_to_fragment_off_hopper(interp, name):
    """The warp-specialized Gluon kernels run on Hopper only (gluon_ws.py; checked on CPU by compiling them,
    tests/test_kernel_gluon.py); elsewhere, here under the interpreter, "ws" is the fragment kernel."""
    gen = torch.Generator().manual_seed(7)
    w = random_weight(48, 256, gen=gen, offset=True)
    x = torch.randn(40, 256, generator=gen).bfloat16()
    fn = getattr(interp, name)
    assert torch.equal(fn(x, w, config=TILE, variant="ws"), fn(x, w, config=TILE, variant="fragment"))


def test_auto_variant_is_ws_from_the_rows_it_was_timed_at(monkeypatch):
    """The default "auto" takes "ws" from WS_MIN_ROWS rows on (where the H100 timed it faster), below that
    "fragment"; a variant asked for by name is kept, and a wrong name is refused."""
    ops = triton_ops
    monkeypatch.setattr(ops, "DEFAULT_VARIANT", "auto")
    assert ops._variant(None, ops.WS_MIN_ROWS - 1) == "fragment"
    assert ops._variant(None, ops.WS_MIN_ROWS) == "ws"
    assert ops._variant("fragment", 4096) == "fragment" and ops._variant("ws", 17) == "ws"
    with pytest.raises(ValueError, match="unknown Triton kernel variant"):
        ops._variant("fast", 4096)


@pytest.mark.parametrize("name", ["w1a16", "w1a8"])
def test_auto_variant_falls_back_when_ws_does_not_build(interp, monkeypatch, name):
    """Gluon's API moves between Triton versions: where the "ws" kernels do not build, "auto" warns once and
    the fragment kernels run from then on, with their results; "ws" asked for by name raises."""
    gen = torch.Generator().manual_seed(11)
    w = random_weight(48, 256, gen=gen, offset=True)
    x = torch.randn(40, 256, generator=gen).bfloat16()
    expected = getattr(interp, name)(x, w, config=TILE, variant="fragment")
    tries = []

    def unbuildable(*args, **kwargs):
        tries.append(1)
        raise ws.Unbuildable("no ws tile builds with Triton x.y")

    monkeypatch.setattr(ws, "supports", lambda *args: True)
    monkeypatch.setattr(ws, name, unbuildable)
    monkeypatch.setattr(interp, "_ws_failure", [])
    monkeypatch.setattr(interp, "DEFAULT_VARIANT", "auto")
    monkeypatch.setattr(interp, "WS_MIN_ROWS", 32)
    with pytest.warns(RuntimeWarning, match="do not build with Triton"):
        assert torch.equal(getattr(interp, name)(x, w, config=TILE), expected)
    assert torch.equal(getattr(interp, name)(x, w, config=TILE), expected)
    assert len(tries) == 1  # not tried again
    with pytest.raises(ws.Unbuildable):
        getattr(interp, name)(x, w, config=TILE, variant="ws")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name,tile,dtype", [(name, t, torch.bfloat16) for name in ("w1a16", "w1a8")
                                              for t in ws.TILES[name] + ws.STREAM_K_TILES[name]]
                         + [("w1a16", t, torch.float16) for t in ws.TILES["w1a16"] + ws.STREAM_K_TILES["w1a16"]])
def test_cuda_every_ws_tile_matches_reference(name, tile, dtype):
    """Each tile of the warp-specialized kernels (variant "ws"), M and N off the tile, K off BLOCK_K; W1A16
    also on fp16 activations (its weight tiles then hold fp16 +-1). Under stream-K (schedule.py) each of the 18
    tiles is split among 7-8 of 132 programs."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the ws kernels run on Hopper")
    config = triton_ops.TileConfig(tile.block_m, tile.block_n, 64, tile.warps, tile.stages, stream_k=tile.stream_k)
    gen = torch.Generator().manual_seed(sum(tile))
    w = random_weight(1040, 6160, offset=True, gen=gen).to("cuda")
    x = (torch.randn(300, 6160, generator=gen) * 2 + 0.3).to(dtype).cuda()
    y = getattr(triton_ops, name)(x, w, config=config, variant="ws")
    assert rel_err(y, x.double() @ w.dequantize(torch.float64).T) < (1e-2 if name == "w1a16" else 2e-2)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", ["w1a16", "w1a8"])
@pytest.mark.parametrize("m", [333, 4096])  # 32 tiles, 4-5 pieces each; 256 tiles, whole and split ones
def test_cuda_stream_k_counts_every_piece_once(name, m):
    """The last piece of a split tile adds the others from the workspace: were a piece's stores not visible
    before its count, or a count lost, results would differ between launches or counters stay set. 60
    launches back to back on one stream, two inputs in turn, against each input's first launch bit for bit."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the ws kernels run on Hopper")
    gen = torch.Generator().manual_seed(m)
    w = random_weight(2048, 3088, offset=True, gen=gen).to("cuda")
    xs = [(torch.randn(m, 3088, generator=gen) * 2 + 0.3).bfloat16().cuda() for _ in range(2)]
    tile = ws.STREAM_K_TILES[name][0]
    config = triton_ops.TileConfig(tile.block_m, tile.block_n, 64, tile.warps, tile.stages, stream_k=True)
    run = lambda x: getattr(triton_ops, name)(x, w, config=config, variant="ws")  # noqa: E731
    firsts = [run(x) for x in xs]
    runs = torch.stack([run(xs[i % 2]) for i in range(60)])
    for x, first in zip(xs, firsts):
        assert rel_err(first, x.double() @ w.dequantize(torch.float64).T) < (1e-2 if name == "w1a16" else 2e-2)
    assert bool((runs == torch.stack(firsts * 30)).all())
    torch.cuda.synchronize()
    assert not triton_ops._tile_counters(xs[0].device, 1).any()


@pytest.mark.gpu
@cuda
def test_cuda_split_k_counts_every_share_once():
    """Split-K's last program per tile sums the shares: were a share's stores not visible before its count,
    or a count lost, results would differ between runs or counters stay set. 200 launches with 8 shares of
    48 tiles each, back to back on one stream, two inputs in turn (a stale share would be the other input's),
    against each input's first launch bit for bit."""
    gen = torch.Generator().manual_seed(8)
    w = random_weight(3072, 4096, offset=True, gen=gen).to("cuda")
    xs = [torch.randn(3, 4096, generator=gen).bfloat16().cuda() for _ in range(2)]
    config = triton_ops.TileConfig(16, 64, 256, 4, 4, split_k=8)
    firsts = [triton_ops.w1a16(x, w, config=config, variant="fragment") for x in xs]
    runs = torch.stack([triton_ops.w1a16(xs[i % 2], w, config=config, variant="fragment") for i in range(200)])
    for x, first in zip(xs, firsts):
        assert rel_err(first, x.double() @ w.dequantize(torch.float64).T) < 1e-2
    assert bool((runs == torch.stack(firsts * 100)).all())
    torch.cuda.synchronize()
    assert not triton_ops._tile_counters(xs[0].device, 1).any()


@pytest.mark.gpu
@cuda
def test_cuda_automatic_choice_by_layer_and_rows():
    big, small = random_weight(3072, 3072).to("cuda"), random_weight(320, 1280).to("cuda")
    grouped = random_weight(3072, 3072, group=64).to("cuda")  # the fragment W1A8 takes multiples of 128
    x_big, x_small = torch.randn(1024, 3072, device="cuda").bfloat16(), torch.randn(1024, 1280, device="cuda").bfloat16()
    assert select_kernel(x_big, big).name == "triton-w1a8"  # compute-bound: int8 tensor cores
    assert select_kernel(x_big[:1023], big).name == "triton-w1a16"
    assert select_kernel(x_big[:16], big).name == "triton-w1a16"
    assert select_kernel(x_big, grouped).name == "triton-w1a16"
    assert select_kernel(x_small, small).name == "reference"  # launch-bound: dequantize + cuBLAS wins
    assert "fp8" not in select_kernel(x_big, big).name  # forced only


def test_small_layers_are_left_to_the_reference_path():
    from bonsai.kernels.triton import MIN_AUTO_WEIGHTS, large_enough

    assert MIN_AUTO_WEIGHTS == 1024 * 1024
    assert large_enough(random_weight(1024, 1024))  # bonsai-4b's text encoder attention
    assert not large_enough(random_weight(1023, 1024))
    assert not large_enough(random_weight(320, 1280))  # bonsai-emoji's largest layer
