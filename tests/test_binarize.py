"""Binarization schemes: the reference bitmatmul against a float64 dense product, and what each scheme promises."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bonsai.kernels import PackedWeight, bitmatmul_reference
from bonsai.quant import BinarizeConfig, binarize

N, K = 24, 37  # K odd and not a multiple of 8 or of the group size
GROUP = 16
CONFIGS = [
    BinarizeConfig(scheme, group, rank)
    for scheme in ("xnor", "mean", "onebit")
    for group in (0, GROUP)
    for rank in (0, 4)
    if not (scheme == "onebit" and group)  # onebit has column scales instead of groups
]


def _id(c: BinarizeConfig) -> str:
    return f"{c.scheme}-g{c.group_size}-r{c.rank}"


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dense64(p: PackedWeight) -> torch.Tensor:
    """W [N, K] in float64, rebuilt from the packed fields with numpy's bit order (independent of unpack_signs)."""
    k = p.in_features
    bits = np.unpackbits(p.signs.numpy(), axis=1, bitorder="little")[:, :k]
    w = (torch.from_numpy(bits).double() * 2 - 1) * p.row_scale.double()[:, None]
    if p.group_scale is not None:
        w = w * p.group_scale.double()[:, torch.arange(k) // p.group_size]
    if p.col_scale is not None:
        w = w * p.col_scale.double()[None, :]
    if p.row_offset is not None:
        w = w + p.row_offset.double()[:, None]
    if p.lowrank_u is not None:
        w = w + p.lowrank_u.double() @ p.lowrank_v.double()
    return w


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_bitmatmul_matches_float64_dense(config: BinarizeConfig) -> None:
    seed = CONFIGS.index(config)
    w = _randn(N, K, seed=seed)
    p = binarize(w, config)
    assert (p.group_size, p.rank) == (config.group_size, config.rank)
    x = _randn(3, 5, K, seed=100 + seed)  # float32, leading batch dims
    expected = x.double() @ dense64(p).T
    y = bitmatmul_reference(x, p)
    assert y.dtype == torch.float32 and y.shape == (3, 5, N)
    assert rel_err(y, expected) < 1e-5
    # and the binarized weight is an approximation of w, not just self-consistent
    # (for Gaussian weights one scale per row leaves sqrt(1 - 2/pi) ~ 0.60 of the norm)
    assert rel_err(dense64(p), w) < 0.62


def test_xnor_row_scale_is_mean_abs() -> None:
    w = _randn(N, K, seed=1)
    p = binarize(w, BinarizeConfig("xnor"))
    torch.testing.assert_close(p.row_scale, w.abs().mean(1), rtol=1e-6, atol=0)
    assert torch.equal(p.sign_matrix() > 0, w >= 0)
    assert p.row_offset is None and p.col_scale is None and p.group_scale is None


def test_mean_scheme_centres_each_row() -> None:
    w = _randn(N, K, seed=2) + torch.linspace(-3, 3, N)[:, None]  # rows with very different means
    p = binarize(w, BinarizeConfig("mean"))
    mean = w.mean(1)
    torch.testing.assert_close(p.row_offset, mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p.row_scale, (w - mean[:, None]).abs().mean(1), rtol=1e-6, atol=0)
    assert torch.equal(p.sign_matrix() > 0, w - mean[:, None] >= 0)
    # on rows with offsets, centring fits better than a scaled sign of W itself
    assert rel_err(dense64(p), w) < rel_err(dense64(binarize(w, BinarizeConfig("xnor"))), w)


@pytest.mark.parametrize("scheme", ["xnor", "mean"])
def test_group_scales_are_group_mean_magnitudes(scheme: str) -> None:
    w = _randn(N, K, seed=3)
    p = binarize(w, BinarizeConfig(scheme, GROUP))
    centred = w - w.mean(1, keepdim=True) if scheme == "mean" else w
    groups = [centred[:, i : i + GROUP].abs().mean(1) for i in range(0, K, GROUP)]  # last group has 5 columns
    expected = torch.stack(groups, dim=1)
    assert p.group_scale.shape == (N, 3)
    torch.testing.assert_close(p.row_scale[:, None] * p.group_scale.float(), expected, rtol=1e-3, atol=0)
    assert torch.equal(p.group_scale.amax(1), torch.ones(N, dtype=torch.float16))  # the row scale carries the largest


def test_onebit_scales_are_positive_and_exact_on_rank1_magnitudes() -> None:
    w = _randn(N, K, seed=4)
    p = binarize(w, BinarizeConfig("onebit"))
    assert (p.row_scale > 0).all() and (p.col_scale > 0).all()
    assert torch.equal(p.sign_matrix() > 0, w >= 0)
    # |W| = a b^T exactly (a, b > 0): sign(W) * a b^T is W itself
    a, b = torch.rand(N) + 0.1, torch.rand(K) + 0.1
    w1 = torch.sign(_randn(N, K, seed=5)) * a[:, None] * b[None, :]
    assert rel_err(dense64(binarize(w1, BinarizeConfig("onebit"))), w1) < 1e-5


@pytest.mark.parametrize("scheme", ["xnor", "mean", "onebit"])
def test_low_rank_residual_is_the_best_rank_r_fit(scheme: str) -> None:
    w = _randn(N, K, seed=6)
    base = binarize(w, BinarizeConfig(scheme))
    err0 = rel_err(dense64(base), w)
    residual = w.double() - dense64(base)
    for rank in (2, 4, 8):
        err = rel_err(dense64(binarize(w, BinarizeConfig(scheme, 0, rank))), w)
        # SVD optimum: the residual's energy beyond its top r singular values (bf16 factors add a little)
        s = torch.linalg.svdvals(residual)
        optimum = float(s[rank:].norm() / w.double().norm())
        assert err < err0
        assert err == pytest.approx(optimum, rel=2e-2)


@pytest.mark.parametrize("scheme", ["xnor", "mean"])
def test_group_scales_help_when_column_magnitudes_vary(scheme: str) -> None:
    # columns grouped 16 at a time with magnitudes 0.1, 1 and 10
    magnitude = torch.tensor([0.1, 1.0, 10.0]).repeat_interleave(GROUP)[:K]
    w = _randn(N, K, seed=7) * magnitude
    err_row = rel_err(dense64(binarize(w, BinarizeConfig(scheme))), w)
    err_group = rel_err(dense64(binarize(w, BinarizeConfig(scheme, GROUP))), w)
    assert err_group < 0.8 * err_row


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scheme": "ternary"}, "unknown binarization scheme 'ternary'"),
        ({"group_size": -8}, "group_size and rank"),
        ({"rank": -1}, "group_size and rank"),
        ({"scheme": "onebit", "group_size": 16}, "onebit"),
    ],
)
def test_bad_configs_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BinarizeConfig(**kwargs)


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4)])
def test_binarize_needs_a_matrix(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="2-D"):
        binarize(torch.randn(*shape))


def test_rank_above_the_weight_rank_is_rejected() -> None:
    w = torch.randn(6, 40)
    with pytest.raises(ValueError, match="rank 8 exceeds min"):
        binarize(w, BinarizeConfig("mean", rank=8))
