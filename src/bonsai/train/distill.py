"""Distillation: a 1-bit student (training form, straight-through sign) learns to match its
full-precision teacher's velocity on noisy inputs.

The student starts as the teacher's post-training binarization; only its latent weights,
low-rank factors and high-precision layers move. The loss is the MSE between the two velocity
predictions at the same x_t, t and text (the teacher is the target, not the data: its outputs
carry more signal per sample than the data, as in BitsFusion and BinaryDM)."""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import QuantPolicy, quantize_
from .flow import noisy_inputs, sample_timesteps

# x0 [B, C, H, W], text [B, L, E], mask [B, L] bool, and for models with a pooled text input a 4th item, pooled [B, P]
Batch = tuple[torch.Tensor, ...]


def make_student(teacher: nn.Module, policy: QuantPolicy) -> nn.Module:
    """A trainable 1-bit copy of `teacher` (BitLinearTrain layers where the policy says)."""
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    quantize_(student, policy, form="train")
    return student


def distill_loss(teacher: nn.Module, data_weight: float = 0.0) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """loss(student, batch) = MSE(student v, teacher v) (+ data_weight * MSE(student v, true v))."""
    teacher = teacher.eval().requires_grad_(False)

    def loss(student: nn.Module, batch: Batch) -> torch.Tensor:
        x0, text, mask, *pooled = batch
        t = sample_timesteps(x0.shape[0], x0.device)
        x_t, v_true = noisy_inputs(x0, t, torch.randn_like(x0))
        with torch.no_grad():
            v_teacher = teacher(x_t, t, text, mask, *pooled).float()
        v_student = student(x_t, t, text, mask, *pooled).float()
        out = F.mse_loss(v_student, v_teacher)
        if data_weight:
            out = out + data_weight * F.mse_loss(v_student, v_true.float())
        return out

    return loss


@torch.no_grad()
def evaluate_loss(loss_fn: Callable[[nn.Module, Batch], torch.Tensor], model: nn.Module, batches: list[Batch], seed: int = 0) -> float:
    """Mean loss over fixed batches with fixed noise: comparable across models and schemes."""
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(seed)
    try:
        losses = [float(loss_fn(model, b)) for b in batches]
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return sum(losses) / len(losses)
