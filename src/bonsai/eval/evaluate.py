"""Score generated images: Fréchet distance to real images in the evaluator's feature space,
prompt adherence by caption retrieval, and PSNR/SSIM against the teacher's images."""

from __future__ import annotations

from typing import Protocol

import torch

from .evaluator import Evaluator
from .metrics import chance_topk, frechet_distance, psnr, retrieval_topk, ssim


class SentenceEmbedder(Protocol):
    def embed(self, prompts: list[str]) -> torch.Tensor: ...  # [B, 384], L2-normalized


def _check_images(name: str, images: torch.Tensor, like: torch.Tensor | None = None) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: expected float images [N, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
    if like is not None and images.shape != like.shape:
        raise ValueError(f"{name}: shape {tuple(images.shape)} differs from the images' {tuple(like.shape)}")


def evaluate_images(
    images: torch.Tensor,
    captions: list[str],
    evaluator: Evaluator,
    text_encoder: SentenceEmbedder,
    reference_images: torch.Tensor | None = None,
    teacher_images: torch.Tensor | None = None,
    candidates: list[str] | None = None,
) -> dict[str, float]:
    """images float [N, 3, 64, 64] in [-1, 1], captions[i] the prompt of image i.

    Retrieval ranks each image's own caption among `candidates` (default: the distinct captions
    given, in order); top1/top5 and their chance levels. With reference_images [M, 3, 64, 64]
    (real images, M >= 2): fd, the Fréchet distance of evaluator features. With teacher_images
    (same shape as images, same prompts and seeds): mean psnr (dB, on [0, 1] pixels) and ssim."""
    _check_images("images", images)
    if len(captions) != images.shape[0]:
        raise ValueError(f"{len(captions)} captions for {images.shape[0]} images")
    candidates = list(dict.fromkeys(captions)) if candidates is None else list(candidates)
    index = {c: i for i, c in enumerate(candidates)}
    missing = [c for c in captions if c not in index]
    if missing:
        raise ValueError(f"captions missing from the candidates, e.g. {missing[0]!r}")
    targets = torch.tensor([index[c] for c in captions])
    feats, emb = evaluator.encode(images)
    text_emb = text_encoder.embed(candidates).float().cpu()
    topk = retrieval_topk(emb, text_emb, (1, 5), targets)
    result = {
        "top1": topk[1],
        "top5": topk[5],
        "chance_top1": chance_topk(len(candidates), 1),
        "chance_top5": chance_topk(len(candidates), 5),
        "num_images": float(images.shape[0]),
        "num_candidates": float(len(candidates)),
    }
    if reference_images is not None:
        _check_images("reference_images", reference_images)
        ref_feats, _ = evaluator.encode(reference_images)
        result["fd"] = frechet_distance(feats, ref_feats)
    if teacher_images is not None:
        _check_images("teacher_images", teacher_images, images)
        a, b = (x.float().add(1).div(2).clamp(0, 1) for x in (images, teacher_images))
        result["psnr"] = float(psnr(a, b).mean())
        result["ssim"] = float(ssim(a, b).mean())
    return result
