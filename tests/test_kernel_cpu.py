"""The compiled CPU kernel (bonsai.kernels.cpu) on every ISA path this machine runs.

Two references, both float64, on fresh random inputs:

1. Exact pipeline: the kernel quantizes each activation row as q = round(x * col_scale * 127 / absmax)
   (float32 ops, half to even) and then does exact integer sums. Emulating that quantization in
   torch and finishing in float64 must agree to float32 rounding (1e-4 of |x| @ |W|.T).
2. The true product x.double() @ W.T. Here the error is the quantization error: per element
   e_k = xc_k - s q_k is uniform on [-s/2, s/2] (s = absmax / 127), so output (m, n) has error with
   standard deviation sigma_mn = s_m / sqrt(12) * ||rs_n * gs_n||_2 over k. We assert the total
   relative error <= 1.5 x its prediction sqrt(sum sigma^2) / ||y|| (a chi-square with >= 33 degrees
   of freedom exceeds 2.25 x its mean with probability < 1e-4), every element within 6 sigma, and
   the relative error below 2e-2 (for Gaussian x, absmax ~ 3.5-4 sigma gives ~ 1e-2).
"""

from __future__ import annotations

import importlib
import math
import sys

import pytest
import torch

from bonsai.kernels import PackedWeight, bitmatmul, pack_signs
from bonsai.kernels import dispatch
from bonsai.kernels.cpu import available_isas, binding, bitmatmul_cpu

ISAS = available_isas()

# (M, N, K, group_size, col_scale, row_offset, rank, bias): odd sizes; K never divisible by 8 or G.
# The AMX path takes M >= 16 (fewer rows go to AVX-512), pads groups to 64 columns and works on
# 32-row panels: the cases with M in 17..45 and 301 exercise partial tiles and panels there.
CASES = [
    (1, 33, 203, 0, False, False, 0, False),
    (7, 77, 203, 24, True, True, 0, True),
    (13, 65, 301, 10, True, True, 3, False),  # G not a multiple of 4: padded groups
    (17, 45, 203, 24, True, True, 3, True),  # one row past a tile; G padded to 64 on AMX
    (29, 97, 1001, 128, True, True, 4, True),
    (37, 45, 2051, 0, True, True, 0, False),  # long group: int16 chunks (AVX2), K-chunks of 128 k4 steps
    (11, 39, 1203, 600, False, True, 2, True),  # a group that spans two K-chunks
    (45, 71, 1203, 600, True, True, 17, True),  # the same on two 32-row panels; rank past 16 columns
    (301, 71, 4099, 0, False, True, 0, True),  # several M-blocks
    (50, 70, 1100, 0, True, False, 40, True),  # rank 40: 16-rank blocks in a pair and alone (AMX x V.T)
    # AMX: one group past 3072 columns goes in passes (768 + 768 + 16 k4 steps); whole tiles keep
    # their sums in y between passes, the edge tiles (13 last rows, 4 last columns) elsewhere.
    (77, 100, 6151, 0, True, True, 5, True),
    (2053, 4096, 203, 0, False, True, 0, True),  # a 32.1 MiB output: AVX-512 and AMX stream it to y
]


def random_weight(gen: torch.Generator, n: int, k: int, g: int, col: bool, offset: bool, rank: int) -> PackedWeight:
    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen)

    fields: dict = {"signs": pack_signs(torch.randn(n, k, generator=gen)), "row_scale": rand(n) + 0.5}
    if g:
        fields["group_scale"] = (rand(n, -(-k // g)) + 0.5).half()
    if col:
        fields["col_scale"] = rand(k) + 0.5
    if offset:
        fields["row_offset"] = torch.randn(n, generator=gen) * 0.05
    if rank:
        fields["lowrank_u"] = (torch.randn(n, rank, generator=gen) * 0.05).bfloat16()
        fields["lowrank_v"] = (torch.randn(rank, k, generator=gen) * 0.05).bfloat16()
    return PackedWeight(in_features=k, group_size=g, **fields)


def sign_part(w: PackedWeight) -> torch.Tensor:
    """rs * gs * B in float64 [N, K] (col_scale is folded into the activations)."""
    plain = PackedWeight(w.signs, w.in_features, w.row_scale, w.group_size, w.group_scale)
    return plain.dequantize(torch.float64)


def quantize_like_kernel(x: torch.Tensor, col: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float64 [M, K], scale float64 [M, 1]) with the kernel's float32 operations."""
    xc = x * col if col is not None else x
    amax = xc.abs().amax(dim=1, keepdim=True)
    q = torch.round(xc * (torch.tensor(127.0) / amax)).clamp(-127, 127)
    return q.double(), (amax / torch.tensor(127.0)).double()


def extra_terms(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """row_offset, low-rank and bias contributions in float64."""
    out = torch.zeros(x.shape[0], w.out_features, dtype=torch.float64)
    if bias is not None:
        out += bias.double()
    if w.row_offset is not None:
        out += x.double().sum(1, keepdim=True) * w.row_offset.double()[None, :]
    if w.lowrank_u is not None:
        out += x.double() @ (w.lowrank_u.double() @ w.lowrank_v.double()).T
    return out


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch) -> str:
    monkeypatch.setenv("BONSAI_CPU_ISA", request.param)
    return request.param


@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}-N{}-K{}-G{}-col{:d}-off{:d}-r{}-bias{:d}".format(*c))
def test_matches_float64_references(isa: str, case: tuple) -> None:
    m, n, k, g, col, offset, rank, with_bias = case
    gen = torch.Generator().manual_seed(hash((m, n, k, g)) % 2**31)
    w = random_weight(gen, n, k, g, col, offset, rank)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    y = bitmatmul_cpu(x, w, bias).double()
    assert y.shape == (m, n) and torch.isfinite(y).all()

    w_sign = sign_part(w)
    x_abs = x.double().abs() * (w.col_scale.double() if col else 1)
    magnitude = x_abs @ w_sign.abs().T + extra_terms(x.abs(), w, bias).abs()
    q, scale = quantize_like_kernel(x, w.col_scale)
    y_pipeline = scale * (q @ w_sign.T) + extra_terms(x, w, bias)
    pipe_err = ((y - y_pipeline).abs() / magnitude).max().item()
    assert pipe_err < 1e-4, f"{isa}: kernel differs from its exact int8 pipeline by {pipe_err:.2e} of |x||W|"

    y_ref = x.double() @ w.dequantize(torch.float64).T + (0 if bias is None else bias.double())
    rel = ((y - y_ref).norm() / y_ref.norm()).item()
    sigma = scale / math.sqrt(12) * w_sign.pow(2).sum(1).sqrt()[None, :]  # [M, N]
    predicted = (sigma.pow(2).sum().sqrt() / y_ref.norm()).item()
    worst = ((y - y_ref).abs() / sigma).max().item()
    msg = f"{isa}: relative error {rel:.2e}, predicted {predicted:.2e}, worst element {worst:.1f} sigma"
    assert rel <= 1.5 * predicted + 1e-6, msg
    assert worst <= 6.0, msg
    assert rel < 2e-2, msg


# (N, K, group size): 12M multiply-adds, big enough for 2 threads; the second in passes over K on AMX.
@pytest.mark.parametrize("n, k, g", [(177, 1517, 64), (200, 3500, 0)])
def test_paths_agree_and_threads_do_not_change_results(monkeypatch, n: int, k: int, g: int) -> None:
    gen = torch.Generator().manual_seed(5)
    w = random_weight(gen, n, k, g, True, True, 5)
    x = torch.randn(45, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    results = {}
    for isa in ISAS:
        monkeypatch.setenv("BONSAI_CPU_ISA", isa)
        for threads in ("1", "2", "3", "7"):  # 3, 7: uneven ranges, more threads than cores
            monkeypatch.setenv("BONSAI_CPU_THREADS", threads)
            results[isa, threads] = bitmatmul_cpu(x, w, bias)
            assert torch.equal(results[isa, "1"], results[isa, threads]), f"{isa}: {threads} threads changed the result"
    base = results["scalar", "1"]
    for (isa, _), y in results.items():  # same quantization and integer sums; float order may differ
        # AMX also rounds x and x V.T to bfloat16 for the low-rank products (measured 1.3e-5 of max |y|
        # here, where the int8 quantization's own error is 1e-2 of |y|)
        tol = 1e-4 if isa == "amx" else 1e-5
        assert torch.allclose(y, base, rtol=tol, atol=tol * base.abs().max().item()), isa


def test_bitmatmul_dispatches_cpu_tensors_to_the_kernel(monkeypatch) -> None:
    monkeypatch.delenv("BONSAI_KERNEL", raising=False)
    gen = torch.Generator().manual_seed(7)
    w = random_weight(gen, 50, 99, 32, False, True, 2)
    x = torch.randn(2, 3, 99, generator=gen)
    assert "cpu" in dispatch.available_kernels()
    assert dispatch.select_kernel(x, w).name == "cpu"
    y = bitmatmul(x, w)
    assert y.shape == (2, 3, 50) and y.dtype == torch.float32
    assert torch.equal(y, bitmatmul_cpu(x, w))
    bias = torch.randn(50, generator=gen)
    assert torch.equal(bitmatmul(x, w, bias), bitmatmul_cpu(x, w, bias))  # fused in the kernel
    dispatch.set_kernel("reference")  # a kernel that does not fuse the bias: added after it
    try:
        assert torch.equal(bitmatmul(x, w, bias), bitmatmul(x, w) + bias)
    finally:
        dispatch.set_kernel(None)
    assert "cpu" in w.cache  # prepared once per weight


def test_without_a_vector_path_the_reference_path_runs_unless_scalar_is_asked_for(monkeypatch) -> None:
    monkeypatch.delenv("BONSAI_KERNEL", raising=False)
    monkeypatch.delenv("BONSAI_CPU_ISA", raising=False)
    monkeypatch.setattr(binding, "_warned", False)
    monkeypatch.setattr(binding, "_best_isa", lambda lib: "scalar")  # a CPU with none of the vector paths
    w = random_weight(torch.Generator().manual_seed(8), 20, 70, 0, False, True, 0)
    x = torch.randn(3, 70)
    with pytest.warns(RuntimeWarning, match="none of the compiled kernel's vector paths"):
        assert dispatch.select_kernel(x, w).name == "reference"
    monkeypatch.setenv("BONSAI_CPU_ISA", "scalar")
    assert dispatch.select_kernel(x, w).name == "cpu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_come_back_in_their_dtype(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    w = random_weight(gen, 40, 77, 0, True, False, 0)
    x = torch.randn(5, 77, generator=gen).to(dtype)
    y = bitmatmul(x, w)
    assert y.dtype == dtype and y.shape == (5, 40)
    y_ref = x.double() @ w.dequantize(torch.float64).T
    rel = ((y.double() - y_ref).norm() / y_ref.norm()).item()
    assert rel < 2e-2, f"{dtype}: relative error {rel:.2e}"


def test_unavailable_isa_is_a_clear_error(monkeypatch) -> None:
    missing = [name for name in binding.ISAS if name not in ISAS]
    monkeypatch.setenv("BONSAI_CPU_ISA", missing[0] if missing else "bogus")
    w = random_weight(torch.Generator().manual_seed(1), 8, 16, 0, False, False, 0)
    with pytest.raises((RuntimeError, ValueError), match="BONSAI_CPU_ISA"):
        bitmatmul_cpu(torch.randn(2, 16), w)


def test_missing_library_warns_once_and_raises_import_error(monkeypatch) -> None:
    monkeypatch.setattr(binding, "library_path", lambda: None)
    monkeypatch.setattr(binding, "_warned", False)
    monkeypatch.delitem(sys.modules, "bonsai.kernels.cpu")
    with pytest.warns(RuntimeWarning, match="reference path") as record:
        for _ in range(2):
            with pytest.raises(ImportError, match="not built"):
                importlib.import_module("bonsai.kernels.cpu")
    assert len([r for r in record if "reference path" in str(r.message)]) == 1


def test_deepcopy_of_a_layer_that_ran_on_the_kernel():
    """After a forward on the compiled kernel, a BitLinear's packed view holds the kernel's C
    structs; the layer still deep-copies (model copies, EMA), and the copy computes the same."""
    import copy

    from torch import nn

    from bonsai.quant import BinarizeConfig
    from bonsai.quant.layers import binarize_linear

    torch.manual_seed(0)
    layer = binarize_linear(nn.Linear(37, 11), BinarizeConfig("mean", rank=2))
    x = torch.randn(5, 37)
    assert dispatch.select_kernel(x, layer.packed).name == "cpu"
    y = layer(x)
    twin = copy.deepcopy(layer)
    assert twin._packed is None and torch.equal(twin(x), y)
    assert twin.signs.data_ptr() != layer.signs.data_ptr()
