"""Train the evaluator: the image encoder learns to land on the frozen MiniLM sentence embedding of
its caption (symmetric InfoNCE, learnable temperature), on the train split only."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from bonsai.data import EmojiDataset

from .evaluator import Evaluator, EvaluatorConfig, contrastive_loss
from .metrics import retrieval_topk


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image [B, C, H, W] by up to max_shift pixels, filling with white (+1)."""
    if max_shift == 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=1.0)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


def train_evaluator(
    dataset: EmojiDataset,
    steps: int = 400,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    lr: float = 3e-3,
    config: EvaluatorConfig = EvaluatorConfig(),
    max_shift: int = 2,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
    log_every: int = 100,
) -> tuple[Evaluator, list[float]]:
    """Train on dataset.subset("train") (or all records when it has no split labels "train").
    Text targets are the dataset's sentence embeddings (masked mean of the stored MiniLM token
    states, normalized). Returns the evaluator in eval mode and the per-step losses."""
    train = dataset.subset("train") if "train" in dataset.splits else dataset
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    text = train.sentence_embeddings().to(device)
    images = train.images
    model = Evaluator(config).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    n = len(train)
    batch_size = min(batch_size, n)
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    perm = torch.randperm(n, generator=gen)
    pos = 0
    for step in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        x = random_shift(images[idx], max_shift, gen).to(device)
        loss = contrastive_loss(model(x), text[idx], model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            log(f"step {step + 1}/{steps} loss {recent:.3f} temp {1 / model.logit_scale.exp().item():.4f} {time.perf_counter() - t0:.0f}s")
    return model.eval(), losses


def retrieval_report(evaluator: Evaluator, dataset: EmojiDataset, k: tuple[int, ...] = (1, 5)) -> dict[str, dict[int, float]]:
    """Top-k caption retrieval per split: each split's images against that split's captions
    (sentence embeddings from the stored token states)."""
    report = {}
    for split in sorted(set(dataset.splits)):
        part = dataset.subset(split)
        _, emb = evaluator.encode(part.images)
        report[split] = retrieval_topk(emb, part.sentence_embeddings(), k)
    return report
