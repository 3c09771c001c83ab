"""Image-quality metrics as pure functions: Fréchet distance, caption retrieval, PSNR and SSIM.

All inputs are torch tensors; the statistics are computed in float64."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def _sqrt_psd(mat: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite float64 matrix via eigendecomposition."""
    eigvals, eigvecs = torch.linalg.eigh((mat + mat.T) / 2)
    return (eigvecs * eigvals.clamp(min=0).sqrt()) @ eigvecs.T


def frechet_distance_from_stats(
    mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor, cov_b: torch.Tensor
) -> float:
    """||mu_a - mu_b||^2 + tr(A) + tr(B) - 2 tr((A B)^(1/2)) for Gaussians N(mu_a, A), N(mu_b, B).

    tr((A B)^(1/2)) = tr((A^(1/2) B A^(1/2))^(1/2)): the inner product is symmetric PSD, so both
    square roots come from `eigh` and no complex arithmetic (scipy.linalg.sqrtm) is needed."""
    mu_a, mu_b, cov_a, cov_b = (t.double() for t in (mu_a, mu_b, cov_a, cov_b))
    sqrt_a = _sqrt_psd(cov_a)
    inner = sqrt_a @ cov_b @ sqrt_a
    eigvals = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0)
    trace_sqrt = eigvals.sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt)


def feature_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N >= 2."""
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {tuple(feats.shape)}")
    x = feats.double()
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N_a, D] and [N_b, D]."""
    if feats_a.shape[1:] != feats_b.shape[1:]:
        raise ValueError(f"feature widths differ: {tuple(feats_a.shape)} vs {tuple(feats_b.shape)}")
    return frechet_distance_from_stats(*feature_stats(feats_a), *feature_stats(feats_b))


def retrieval_ranks(
    image_emb: torch.Tensor, text_emb: torch.Tensor, targets: torch.Tensor | None = None
) -> torch.Tensor:
    """Rank (0 = best) of each image's own caption among all candidate captions by cosine similarity.

    image_emb [N, D], text_emb [M, D]; targets long [N] (the index of image i's caption; default i).
    Ties count against the image: rank = number of candidates scoring >= the true caption, minus one."""
    if targets is None:
        if image_emb.shape[0] != text_emb.shape[0]:
            raise ValueError("without targets, image_emb and text_emb need the same number of rows")
        targets = torch.arange(image_emb.shape[0])
    sims = F.normalize(image_emb.double(), dim=-1) @ F.normalize(text_emb.double(), dim=-1).T
    true = sims.gather(1, targets.view(-1, 1).to(sims.device))
    return (sims >= true).sum(1) - 1


def retrieval_topk(
    image_emb: torch.Tensor, text_emb: torch.Tensor, k: Sequence[int] = (1, 5), targets: torch.Tensor | None = None
) -> dict[int, float]:
    """Top-k accuracy of caption retrieval: {k: fraction of images whose own caption ranks < k}."""
    ranks = retrieval_ranks(image_emb, text_emb, targets)
    return {kk: float((ranks < kk).double().mean()) for kk in k}


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two image batches [B, C, H, W] of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, float64 [B]; inf where the images are identical.
    a, b: [B, C, H, W] with values spanning `data_range` (1.0 for [0, 1] images)."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image, float64 [B]: Gaussian window 11x11,
    sigma 1.5, C1 = (k1 L)^2, C2 = (k2 L)^2, local statistics over the 'valid' region, averaged
    over pixels and channels. a, b: [B, C, H, W], H and W >= window_size."""
    _check_pair(a, b)
    if min(a.shape[-2:]) < window_size:
        raise ValueError(f"images of {tuple(a.shape[-2:])} are smaller than the {window_size}-pixel SSIM window")
    channels = a.shape[1]
    g = _gaussian_window(window_size, sigma).to(a.device)
    win = (g[:, None] * g[None, :]).expand(channels, 1, window_size, window_size)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, win, groups=channels)

    x, y = a.double(), b.double()
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return smap.flatten(1).mean(1)


def chance_topk(num_candidates: int, k: int) -> float:
    """Top-k accuracy of random guessing among `num_candidates` captions."""
    return min(k, num_candidates) / num_candidates if num_candidates else math.nan
