"""bonsai.models.attention and bonsai.cpu_bf16: bfloat16 on CPUs that compute it natively, float32 elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bonsai import cpu_bf16
from bonsai.models.attention import BF16_MIN_MACS, attention


def qkv(t: int, s: int, seed: int, heads: int = 3, size: int = 64) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, heads, n, size, generator=gen) for n in (t, s, s))


def macs_per_sample(q: torch.Tensor, k: torch.Tensor) -> int:
    return q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# Self-attention over 512 tokens, and bonsai-4b's cross-attention: 1024 queries, 64 text tokens, 24 heads of 128.
@pytest.mark.parametrize("queries, keys, heads, size", [(512, 512, 3, 64), (1024, 64, 24, 128)])
@pytest.mark.parametrize("native", [True, False])
def test_large_attention_runs_in_bf16_only_where_the_cpu_computes_it(monkeypatch, native: bool, queries: int,
                                                                      keys: int, heads: int, size: int) -> None:
    monkeypatch.setattr(cpu_bf16, "cpu_computes_bf16", lambda: native)
    q, k, v = qkv(queries, keys, seed=1, heads=heads, size=size)
    mask = torch.rand(2, 1, 1, keys, generator=torch.Generator().manual_seed(2)) > 0.2
    assert macs_per_sample(q, k) >= BF16_MIN_MACS
    out = attention(q, k, v, attn_mask=mask)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    assert out.dtype == torch.float32
    fp32 = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if native:
        assert 1e-4 < rel_err(out, ref) < 1e-2  # bfloat16's rounding, not float32's
    else:
        assert torch.equal(out, fp32)


def test_small_attention_stays_float32(monkeypatch) -> None:
    monkeypatch.setattr(cpu_bf16, "cpu_computes_bf16", lambda: True)
    q, k, v = qkv(256, 256, seed=3, heads=5, size=64)  # bonsai-emoji's self-attention
    assert macs_per_sample(q, k) < BF16_MIN_MACS
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_the_environment_can_keep_float32_and_refuses_other_values(monkeypatch) -> None:
    for value, expected in (("0", False), ("float32", ValueError)):
        monkeypatch.setenv("BONSAI_CPU_BF16", value)
        cpu_bf16.cpu_computes_bf16.cache_clear()
        try:
            if expected is ValueError:
                with pytest.raises(ValueError, match="BONSAI_CPU_BF16 must be auto or 0"):
                    cpu_bf16.cpu_computes_bf16()
            else:
                assert cpu_bf16.cpu_computes_bf16() is expected
        finally:
            cpu_bf16.cpu_computes_bf16.cache_clear()
