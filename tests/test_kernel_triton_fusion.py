"""Row operations fused into the Triton kernels (bonsai.kernels.fusion): W1A8's quantization kernel
runs the prologue, the GEMM epilogue of both kernels GELU, the q / k head norms and the gated residual
(heads of a size the tiles cannot hold whole, here 12, are finished in torch by the launcher).

Under the interpreter (see test_kernel_triton.py), on odd shapes (K off the tile, odd M, several
samples so that rows_per_sample matters), with fresh random inputs:
1. against float64: epilogue(prologue(x) @ W.T + bias) from the dequantized weight. W1A16 within its
   bf16 tolerance; W1A8 exactly (two bf16 units) on its own quantized activations, and within
   3e-2 of the true reference (its per-token int8 quantization, as in test_kernel_triton.py; 5e-2
   with float8 e4m3 activations).
2. against the unfused kernel on float32 x, with the same operations done in torch around it: only
   float32 rounding separates them (1e-5), except that a prologue done in torch may move an
   activation across an int8 rounding boundary (one quantization step of one term, rare: 2e-3).
3. a 1-bit DiT whose linears run the interpreted kernels: its fused blocks (dit_fused) against
   dit.py's forward on the same kernels.
The `gpu` tests run the same checks on CUDA through the dispatcher, at bonsai-4b's shapes.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from test_kernel_triton import (  # noqa: F401  (interp: the fixture)
    _TRITON_PREIMPORTED, BF16_UNIT, TILE, binary_part, interp, random_weight, rel_err, run_under_interpreter,
)  # fmt: skip

from bonsai.kernels import Epilogue, Kernel, Prologue, dispatch, set_kernel  # noqa: E402
from bonsai.kernels.fusion import apply_epilogue, apply_prologue  # noqa: E402
from bonsai.kernels.triton import ops as triton_ops  # noqa: E402
from bonsai.models import DiT, DiTConfig, dit_fused  # noqa: E402
from bonsai.quant import QuantPolicy, quantize_  # noqa: E402
from tiny_dits import dit_inputs, fused_and_unfused, one_bit_dit  # noqa: E402

VARIANTS = ["k-major", "fragment"]
# The GELU's exp(-2u) overflows to inf for very negative inputs, by design (its limit, 0, is right); numpy says so.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@pytest.mark.skipif(not _TRITON_PREIMPORTED or torch.cuda.is_available(), reason="interpreter tests ran here")
def test_interpreter_in_fresh_process():
    run_under_interpreter(__file__)


def make_prologue(kind: str | None, b: int, k: int, gen: torch.Generator) -> Prologue | None:
    if kind is None:
        return None
    parts = {}
    if "affine" in kind:
        parts.update(weight=torch.rand(k, generator=gen) + 0.5, bias=torch.randn(k, generator=gen) * 0.1)
    if "modulated" in kind:
        parts.update(shift=torch.randn(b, k, generator=gen) * 0.5, scale=torch.randn(b, k, generator=gen) * 0.5)
    return Prologue(1e-6, **parts)


# Head norms: (parts, head size). q alone, q and k, and a size that is not a power of two.
HEADS = {"heads16-q": (1, 16), "heads8-qk": (2, 8), "heads12-q": (1, 12)}


def make_epilogue(kind: str | None, b: int, t: int, n: int, gen: torch.Generator) -> Epilogue | None:
    """kind: parts joined by '+': gelu, one of HEADS (whole heads over about 2/3 of the columns, the rest
    untouched, as v is), residual, gated (a residual with a gate)."""
    if kind is None:
        return None
    parts = kind.split("+")
    norm = {}
    for name, (groups, d) in HEADS.items():
        if name in parts:
            heads = max(1, (2 * n // 3) // (groups * d))
            norm = dict(norm_weight=torch.rand(groups, d, generator=gen) + 0.5, norm_cols=groups * d * heads, norm_eps=1e-6)
    residual = torch.randn(b, t, n, generator=gen) if {"residual", "gated"} & set(parts) else None
    gate = torch.randn(b, n, generator=gen) if "gated" in parts else None
    return Epilogue(gelu="gelu" in parts, residual=residual, gate=gate, **norm)


def cast(op, dtype: torch.dtype):
    """A prologue / epilogue with its tensors in dtype (as the model passes them: in the activations' dtype)."""
    if op is None:
        return None
    return type(op)(**{name: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for name, v in vars(op).items()})


def float64_reference(x, w, bias, prologue, epilogue) -> torch.Tensor:
    x64 = x.double() if prologue is None else apply_prologue(x.double(), cast(prologue, torch.float64))
    y = x64 @ w.dequantize(torch.float64).T + bias.double()
    return y if epilogue is None else apply_epilogue(y, cast(epilogue, torch.float64))


@pytest.mark.parametrize("kind", ["plain", "affine", "modulated", "affine+modulated"])
def test_quantize_rows_applies_the_prologue(interp, kind):
    gen = torch.Generator().manual_seed(len(kind))
    b, t, k = 3, 5, 300  # K not a power of two: the row block is masked
    x = (torch.randn(b, t, k, generator=gen) * 2 + 0.3).bfloat16()
    prologue = make_prologue(kind.replace("plain", "norm-only"), b, k, gen)
    cs = torch.rand(k, generator=gen) + 0.5
    xsum, xn = torch.empty(b * t), torch.empty(b * t, k, dtype=torch.bfloat16)
    q, scale, qsum = interp.quantize_rows(x.reshape(-1, k), cs, xsum, prologue, t, xn)
    xp = apply_prologue(x.double(), cast(prologue, torch.float64)).reshape(-1, k)
    assert ((xsum.double() - xp.sum(1)).abs() <= 1e-5 * xp.abs().sum(1)).all()  # LayerNorm alone sums to ~0
    # The output in bf16: within one ulp, 2 BF16_UNIT relative (the interpreter truncates to bf16 where the
    # GPU rounds to nearest, which halves that).
    assert ((xn.double() - xp).abs() <= 2 * BF16_UNIT * xp.abs() + 1e-30).all()
    xc = xp * cs.double()
    assert torch.allclose(scale.double(), xc.abs().amax(1) / 127, rtol=1e-5)
    assert ((q.double() * scale.double()[:, None] - xc).abs() <= scale.double()[:, None] * (0.5 + 1e-3)).all()
    assert torch.equal(qsum, q.int().sum(1, dtype=torch.int32)) and q.abs().max() == 127


# (B, T, K, N, weight features, prologue, epilogue, tile): T odd, K off the tile, N off the tile; low
# rank and row offset together with a prologue (both must see its output).
W1A8_CASES = [
    (3, 5, 200, 48, {}, "modulated", "gelu", TILE),
    (2, 9, 300, 72, {"group": 128, "col": True, "offset": True, "rank": 4}, "affine+modulated", "heads8-qk+gated",
     triton_ops.TileConfig(16, 64, 256)),
    (1, 7, 136, 33, {"col": True, "offset": True}, "affine", "heads16-q+residual", TILE),
    (3, 3, 520, 40, {"rank": 3}, None, "gelu+heads12-q+gated", triton_ops.TileConfig(32, 32, 256)),
    (2, 11, 256, 40, {"group": 64, "offset": True, "rank": 5}, "modulated", "gelu+gated", TILE),
    (2, 6, 256, 96, {"offset": True}, "modulated", "gelu+heads16-q+gated", triton_ops.TileConfig(16, 32, 128)),
]


@pytest.mark.parametrize("variant,activation", [("k-major", "int8"), ("fragment", "int8"), ("fragment", "fp8")])
@pytest.mark.parametrize("b,t,k,n,features,pro,epi,tile", W1A8_CASES)
def test_w1a8_fused_rows_match_float64(interp, b, t, k, n, features, pro, epi, tile, variant, activation):
    if activation == "fp8" and features.get("group", 0) % 128:
        pytest.skip("fp8 activations take group sizes 0 or multiples of 128")
    gen = torch.Generator().manual_seed(b * 100 + t * 10 + k)
    w = random_weight(n, k, gen=gen, **features)
    x = (torch.randn(b, t, k, generator=gen) * 2 + 0.3).bfloat16()
    bias = torch.randn(n, generator=gen).bfloat16()
    prologue = cast(make_prologue(pro, b, k, gen), torch.bfloat16)
    epilogue = cast(make_epilogue(epi, b, t, n, gen), torch.bfloat16)

    y = interp.w1a8(x, w, bias, prologue, epilogue, config=tile, variant=variant, activation=activation)

    assert y.shape == (b, t, n) and y.dtype == torch.bfloat16
    ref = float64_reference(x, w, bias, prologue, epilogue)
    assert rel_err(y, ref) < (3e-2 if activation == "int8" else 5e-2)  # e4m3 keeps 4 significant bits, int8 ~7
    # Exactly, on the kernel's own quantized activations: only the binary part sees them.
    q, scale, _ = interp.quantize_rows(x.reshape(-1, k), w.col_scale, None, prologue, t, fp8=activation == "fp8")
    xp = x.double() if prologue is None else apply_prologue(x.double(), cast(prologue, torch.float64))
    cs = 1 if w.col_scale is None else w.col_scale.double()
    shift = (q.double() * scale.double()[:, None] - xp.reshape(-1, k) * cs) @ binary_part(w).T
    exact = xp @ w.dequantize(torch.float64).T + bias.double() + shift.reshape(b, t, n)
    exact = exact if epilogue is None else apply_epilogue(exact, cast(epilogue, torch.float64))
    assert rel_err(y, exact) < 2 * BF16_UNIT


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("b,t,k,n,features,pro,epi,tile", W1A8_CASES)
def test_w1a8_fused_rows_match_the_unfused_kernel(interp, b, t, k, n, features, pro, epi, tile, variant):
    gen = torch.Generator().manual_seed(b * 100 + t * 10 + k + 1)
    w = random_weight(n, k, gen=gen, **features)
    x, bias = torch.randn(b, t, k, generator=gen) * 2 + 0.3, torch.randn(n, generator=gen)
    prologue, epilogue = make_prologue(pro, b, k, gen), make_epilogue(epi, b, t, n, gen)

    y = interp.w1a8(x, w, bias, prologue, epilogue, config=tile, variant=variant)
    unfused = interp.w1a8(x if prologue is None else apply_prologue(x, prologue), w, bias, config=tile, variant=variant)
    unfused = unfused.double() if epilogue is None else apply_epilogue(unfused.double(), cast(epilogue, torch.float64))

    assert y.dtype == torch.float32
    assert rel_err(y, unfused) < (2e-3 if prologue is not None else 1e-5)


W1A16_CASES = [
    (3, 5, 200, 48, {}, "gelu", TILE),
    (2, 9, 300, 72, {"group": 128, "col": True, "offset": True, "rank": 4}, "heads8-qk+gated",
     triton_ops.TileConfig(16, 64, 128)),
    (1, 7, 136, 33, {"col": True, "offset": True}, "heads16-q+residual", TILE),
    (3, 3, 150, 40, {"group": 48, "rank": 3}, "gelu+heads12-q+gated", triton_ops.TileConfig(16, 16, 32)),
    (2, 6, 256, 96, {}, "gelu+heads16-q+gated", triton_ops.TileConfig(16, 32, 64)),
    # K in three shares (fragment kernel), the epilogue after their sum
    (2, 5, 300, 72, {"group": 64, "col": True, "offset": True, "rank": 4}, "gelu+heads8-qk+gated",
     triton_ops.TileConfig(16, 64, 64, split_k=3)),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("b,t,k,n,features,epi,tile", W1A16_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w1a16_fused_epilogue_matches_float64(interp, b, t, k, n, features, epi, tile, variant, dtype):
    gen = torch.Generator().manual_seed(b * 100 + t * 10 + k + 2)
    w = random_weight(n, k, gen=gen, **features)
    x, bias = torch.randn(b, t, k, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)
    epilogue = cast(make_epilogue(epi, b, t, n, gen), dtype)
    y = interp.w1a16(x, w, bias, epilogue=epilogue, config=tile, variant=variant)
    assert y.shape == (b, t, n) and y.dtype == dtype
    assert rel_err(y, float64_reference(x, w, bias, None, epilogue)) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("b,t,k,n,features,epi,tile", W1A16_CASES)
def test_w1a16_fused_epilogue_matches_the_unfused_kernel(interp, b, t, k, n, features, epi, tile, variant):
    gen = torch.Generator().manual_seed(b * 100 + t * 10 + k + 3)
    w = random_weight(n, k, gen=gen, **features)
    x, bias = torch.randn(b, t, k, generator=gen), torch.randn(n, generator=gen)
    epilogue = make_epilogue(epi, b, t, n, gen)
    y = interp.w1a16(x, w, bias, epilogue=epilogue, config=tile, variant=variant)
    unfused = apply_epilogue(interp.w1a16(x, w, bias, config=tile, variant=variant).double(), cast(epilogue, torch.float64))
    assert rel_err(y, unfused) < 1e-5


def test_launchers_refuse_what_they_do_not_fuse(interp):
    gen = torch.Generator().manual_seed(4)
    w, x = random_weight(16, 64, gen=gen), torch.randn(2, 3, 64, generator=gen)
    too_many_heads = Epilogue(norm_weight=torch.ones(1, 8), norm_cols=32)  # the output has 16 columns
    with pytest.raises(ValueError, match="does not fuse a prologue"):
        interp.w1a16(x, w, prologue=make_prologue("affine", 2, 64, gen), config=TILE)
    for launcher in (interp.w1a16, interp.w1a8):
        with pytest.raises(ValueError, match="head norms of 32 columns, but the output has 16"):
            launcher(x, w, epilogue=too_many_heads, config=TILE)
    with pytest.raises(ValueError, match="per-sample shift/scale/gate need x"):
        interp.w1a8(x.reshape(6, 64), w, prologue=make_prologue("modulated", 2, 64, gen), config=TILE)
    with pytest.raises(ValueError, match="residual: expected shape"):
        interp.w1a8(x, w, epilogue=Epilogue(residual=torch.randn(2, 3, 15)), config=TILE)


@pytest.mark.parametrize("name", ["w1a8", "w1a16"])
def test_dit_fused_blocks_on_triton_kernels_match_dit_forward(interp, monkeypatch, name):
    fuses = {"w1a8": triton_ops.W1A8_FUSES, "w1a16": triton_ops.W1A16_FUSES}[name]
    launcher, shares = getattr(interp, name), []

    def fn(x, weight, bias, prologue, epilogue):
        shares.append((prologue is not None, epilogue is not None))
        return launcher(x, weight, bias, prologue, epilogue, config=TILE)

    # The interpreted kernel stands in for the CUDA one: registered for CPU tensors, alone.
    monkeypatch.setattr(dispatch, "_registry", [Kernel(f"interpreted-{name}", ("cpu",), fn, fuses_bias=True, fuses=fuses)])
    monkeypatch.setattr(dispatch, "_plugins_loaded", True)
    model, inputs = one_bit_dit(), dit_inputs()
    fused, unfused = fused_and_unfused(model, inputs, monkeypatch)
    assert any(pro for pro, _ in shares) == (name == "w1a8") and any(epi for _, epi in shares)
    with torch.no_grad():
        set_kernel("reference")
        try:
            reference = model(*inputs)
        finally:
            set_kernel(None)
    assert torch.isfinite(fused).all() and fused.abs().max() > 0.1
    # W1A8: both quantize activations to int8, at slightly different values (measured 7e-3). W1A16: the same
    # bf16 products, only float32 rounding apart (measured 8e-8). Both against the reference: 7e-3, 2e-3.
    assert rel_err(fused, unfused.double()) < (2e-2 if name == "w1a8" else 1e-5)
    assert rel_err(fused, reference.double()) < (2e-2 if name == "w1a8" else 1e-2)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kernel,m,tol", [("triton-w1a16", 300, 1e-2), ("triton-w1a8", 1024, 3e-2)])
@pytest.mark.parametrize("pro,epi", [("modulated", "gelu"), ("affine", "heads-qk+gated"), (None, "gelu+heads-q+gated")])
@pytest.mark.parametrize("variant", ["fragment", "ws", "ws stream-k"])
def test_cuda_fused_rows_match_float64(kernel, m, tol, pro, epi, variant, monkeypatch):
    """bonsai-4b's shapes (K = 3072, two samples), autotuned kernels through the dispatcher (which splits the
    row operations: W1A16 gets no prologue), in the default variant and in "ws" (Hopper; else it is "fragment"),
    there also with the stream-K tiles alone (their split tiles finish the epilogue from the workspace)."""
    if variant == "ws stream-k":
        from bonsai.kernels.triton import ws

        monkeypatch.setattr(ws, "candidates", lambda kind: ws.STREAM_K_TILES[kind])
        monkeypatch.setattr(ws, "_chosen", {})
        variant = "ws"
    monkeypatch.setattr(triton_ops, "DEFAULT_VARIANT", variant)
    gen = torch.Generator().manual_seed(m)
    b, k, n = 2, 3072, 9216
    w = random_weight(n, k, offset=True, gen=gen).to("cuda")
    x = (torch.randn(b, m, k, generator=gen) * 2 + 0.3).bfloat16().cuda()
    bias = torch.randn(n, generator=gen).bfloat16().cuda()
    prologue = cast(make_prologue(pro, b, k, gen), torch.bfloat16)  # W1A16: the dispatcher applies it in torch
    epilogue = make_epilogue(epi.replace("heads-", "heads16-").replace("heads16-qk", "heads8-qk"), b, m, n, gen)
    if epilogue.norm_weight is not None:  # bonsai-4b's heads: 128 columns, q (3072) or q and k (6144) of 9216
        groups = epilogue.norm_weight.shape[0]
        epilogue = replace(epilogue, norm_weight=torch.rand(groups, 128, generator=gen) + 0.5, norm_cols=groups * 3072)
    epilogue = cast(epilogue, torch.bfloat16)
    prologue, epilogue = (None if op is None else type(op)(**{f: (v.cuda() if isinstance(v, torch.Tensor) else v)
                                                              for f, v in vars(op).items()}) for op in (prologue, epilogue))
    ref = float64_reference(x, w, bias, prologue, epilogue)
    try:
        set_kernel(kernel)
        from bonsai.kernels import bitmatmul

        y = bitmatmul(x, w, bias, prologue, epilogue)
    finally:
        set_kernel(None)
    if kernel == "triton-w1a16" and pro is not None:
        # torch applies the prologue in bf16 (LayerNorm, then x * (1 + scale) + shift, each rounded to bf16)
        # before the product; measured 1.4e-2 for the modulated prologue on an H200
        tol = 2e-2
    assert rel_err(y, ref) < tol


@pytest.mark.gpu
@cuda
def test_cuda_dit_fused_blocks_match_dit_forward(monkeypatch):
    """A 1-bit DiT in bf16 large enough for W1A8 (1024 tokens x 2 samples, layers of >= 1M weights)."""
    config = DiTConfig(hidden_size=1024, depth=2, num_heads=8, sample_size=128, patch_size=4, text_dim=256)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DiT(config)
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features**-0.5)
                nn.init.normal_(module.bias, std=0.1)
    quantize_(model, QuantPolicy())
    model = model.to("cuda", torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 3, 128, 128, generator=g), torch.rand(2, generator=g),
              torch.randn(2, 20, 256, generator=g), torch.ones(2, 20, dtype=torch.bool))
    inputs = tuple(t.to("cuda", torch.bfloat16) if t.is_floating_point() else t.cuda() for t in inputs)
    kernels = []
    select = dispatch.select_kernel
    monkeypatch.setattr(dispatch, "select_kernel", lambda x, w: kernels.append(select(x, w).name) or select(x, w))
    with torch.no_grad():
        assert dit_fused.applies(model.blocks[0], torch.zeros(2, 1024, 1024, device="cuda", dtype=torch.bfloat16))
        fused = model(*inputs)
        assert "triton-w1a8" in kernels
        monkeypatch.setattr(dit_fused, "applies", lambda block, x: False)
        unfused = model(*inputs)
    assert torch.isfinite(fused).all()
    assert rel_err(fused, unfused.double()) < 3e-2
