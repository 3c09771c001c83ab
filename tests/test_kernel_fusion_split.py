"""Partial fusion: a kernel names the row operations it fuses (Kernel.fuses) and the dispatcher runs
the rest with the torch references, in order.

Fake CPU kernels run their share in float64 (apply_prologue / apply_epilogue around the reference
product) and record what they were given; bitmatmul through them must equal the full float64
composition epilogue(prologue(x) @ W.T + bias) to float64 rounding, whichever share they take.
"""

from __future__ import annotations

import pytest
import torch

from bonsai.kernels import Epilogue, Kernel, bitmatmul, dispatch, fused_parts, fuses_rows, set_kernel
from bonsai.kernels.fusion import EPILOGUE_PARTS, PARTS, apply_epilogue, apply_prologue, epilogue_parts, split

from test_kernel_cpu import random_weight
from test_kernel_cpu_fusion import as_float64, make_prologue


def full_epilogue(b: int, t: int, n: int, gen: torch.Generator) -> Epilogue:
    """Every epilogue part at once: GELU, two parts of 3 heads of 4 (q, k) in the first 24 columns, gated residual."""
    return Epilogue(gelu=True, norm_weight=torch.rand(2, 4, generator=gen, dtype=torch.float64) + 0.5, norm_cols=24,
                    norm_eps=1e-6, residual=torch.randn(b, t, n, generator=gen, dtype=torch.float64),
                    gate=torch.randn(b, n, generator=gen, dtype=torch.float64))


def fake_kernel(fuses: frozenset[str], calls: list) -> Kernel:
    def fn(x, weight, bias, prologue=None, epilogue=None):  # a kernel that fuses nothing gets (x, weight, bias)
        calls.append((prologue, epilogue))
        x = x if prologue is None else apply_prologue(x, prologue)
        y = x @ weight.dequantize(torch.float64).T + bias
        return y if epilogue is None else apply_epilogue(y, epilogue)

    return Kernel("fake-partial", ("cpu",), fn, fuses_bias=True, fuses=fuses)


@pytest.fixture
def use_kernel(monkeypatch):
    def use(kernel: Kernel) -> None:
        monkeypatch.setattr(dispatch, "_registry", [kernel])
        monkeypatch.setattr(dispatch, "_plugins_loaded", True)

    yield use
    set_kernel(None)


# (parts the kernel fuses, whether it gets the prologue, the epilogue parts it gets of the full epilogue)
SHARES = [
    (frozenset(), False, ()),
    (frozenset({"prologue"}), True, ()),
    (frozenset({"gelu", "residual"}), False, ("gelu",)),  # the residual comes after the head norms it lacks
    (frozenset({"prologue", "gelu", "residual"}), True, ("gelu",)),
    (frozenset({"head_norm", "residual"}), False, ()),  # GELU first, which it lacks: nothing
    (frozenset({"gelu", "head_norm"}), False, ("gelu", "head_norm")),
    (PARTS, True, EPILOGUE_PARTS),
]


def share_id(value) -> str | None:
    return "+".join(sorted(value)) or "nothing" if isinstance(value, frozenset) else None


@pytest.mark.parametrize("fuses,gets_prologue,gets_parts", SHARES, ids=share_id)
def test_dispatcher_gives_the_kernel_its_share_and_applies_the_rest(use_kernel, fuses, gets_prologue, gets_parts):
    gen = torch.Generator().manual_seed(len(fuses) * 10 + len(gets_parts))
    b, t, k, n = 3, 5, 37, 40
    w = random_weight(gen, n, k, 0, False, True, 3)
    x = torch.randn(b, t, k, generator=gen, dtype=torch.float64) * 2 + 0.3
    bias = torch.randn(n, generator=gen, dtype=torch.float64)
    prologue, epilogue = as_float64(make_prologue("modulated", b, k, gen)), full_epilogue(b, t, n, gen)
    calls: list = []
    use_kernel(fake_kernel(fuses, calls))

    y = bitmatmul(x, w, bias, prologue, epilogue)

    (given_prologue, given_epilogue), = calls
    assert (given_prologue is prologue) == gets_prologue
    assert (() if given_epilogue is None else epilogue_parts(given_epilogue)) == gets_parts
    expected = apply_epilogue(apply_prologue(x, prologue) @ w.dequantize(torch.float64).T + bias, epilogue)
    assert ((y - expected).norm() / expected.norm()).item() < 1e-13
    assert fused_parts(x, w) == fuses and fuses_rows(x, w) == (fuses == PARTS)


@pytest.mark.parametrize("kinds", [("gelu",), ("residual",), ("gated",), ("heads",), ("gelu", "gated"),
                                   ("heads", "residual")])
def test_split_keeps_the_order_for_every_epilogue(kinds):
    gen = torch.Generator().manual_seed(7)
    full = full_epilogue(2, 3, 32, gen)
    epi = Epilogue(gelu="gelu" in kinds,
                   **({"norm_weight": full.norm_weight, "norm_cols": 24} if "heads" in kinds else {}),
                   **({"residual": full.residual} if {"residual", "gated"} & set(kinds) else {}),
                   **({"gate": full.gate} if "gated" in kinds else {}))
    for fuses in [frozenset(s) for s in ((), ("gelu",), ("residual",), ("gelu", "residual"), ("head_norm",))]:
        share = split(None, epi, fuses)
        taken = () if share.epilogue is None else epilogue_parts(share.epilogue)
        rest = () if share.after is None else epilogue_parts(share.after)
        assert taken + rest == epilogue_parts(epi)  # nothing lost, nothing reordered
        assert set(taken) <= fuses and (not rest or rest[0] not in fuses)  # the longest prefix it fuses
        if share.after is not None and "residual" in rest:
            assert share.after.gate is epi.gate


def test_inplace_epilogue_writes_the_same_values():
    gen = torch.Generator().manual_seed(8)
    epi = Epilogue(norm_weight=torch.rand(2, 4, generator=gen) + 0.5, norm_cols=24)
    y = torch.randn(2, 3, 32, generator=gen)
    expected = apply_epilogue(y, epi)
    assert torch.equal(apply_epilogue(y.clone(), epi, inplace=True), expected)


def test_malformed_kernels_are_clear_errors():
    with pytest.raises(ValueError, match="unknown fusion parts"):
        Kernel("bad", ("cpu",), lambda *a: None, fuses_bias=True, fuses=frozenset({"softmax"}))
    with pytest.raises(ValueError, match="must add the bias"):
        Kernel("bad", ("cpu",), lambda *a: None, fuses=frozenset({"gelu"}))


def test_the_compiled_cpu_kernel_still_fuses_everything():
    from bonsai.kernels.cpu import bitmatmul_cpu  # noqa: F401  (skips nothing: the tests need the build)

    gen = torch.Generator().manual_seed(9)
    w = random_weight(gen, 16, 24, 0, False, False, 0)
    assert fuses_rows(torch.randn(2, 24), w) and fused_parts(torch.randn(2, 24), w) == PARTS
