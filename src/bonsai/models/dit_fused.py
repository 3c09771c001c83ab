"""DiTBlock.forward with its row-wise ops fused into the 1-bit matmuls, for kernels that fuse them.

The same computation as dit.py's block, regrouped so that every norm, modulation, GELU, q/k
RMSNorm and gated residual runs inside a bitmatmul call (bonsai.kernels.fusion): the LayerNorms
and adaLN modulations become prologues of qkv, q and fc1; tanh-GELU the epilogue of fc1; the
q / k head norms epilogues of qkv, q and kv; the residual adds (with their gates) epilogues of
the output projections and fc2. What is left outside the kernel is attention itself.

Used only where it pays: every linear of the block is a BitLinear (on CPU also one wrapped by a LoRA,
whose branches run folded into the packed weight's low-rank term), no gradient is needed, and the
kernel chosen for the input fuses row operations (all of them: the compiled CPU kernel; some: the
Triton kernels, with the dispatcher running the rest in torch, as dit.py would). Anywhere else
(training, dense models, the reference path, an active LoRA on a GPU) dit.py's own forward runs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import Epilogue, Prologue, bitmatmul, fused_parts
from ..lora.layers import LoRALayer
from ..quant import BitLinear
from .attention import attention

_LINEARS = ("attn.qkv", "attn.proj", "cross.q", "cross.kv", "cross.proj", "mlp.fc1", "mlp.fc2")


def bit_layer(layer: nn.Module) -> BitLinear | None:
    """The BitLinear that computes `layer`: itself, or the base of a LoRA wrapper whose branches are all at
    weight 0 (a LoRA a prompt tag loaded stays loaded, switched off: it must change neither path nor image)."""
    if type(layer) is BitLinear:
        return layer
    return layer.base if isinstance(layer, LoRALayer) and type(layer.base) is BitLinear and not layer.active else None


def _folds(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `layer` is a LoRA on a BitLinear whose branches the fused path runs folded into the packed
    weight's low-rank term (on CPU; the GPU kernels would take it too, but that is not measured yet)."""
    return x.device.type == "cpu" and isinstance(layer, LoRALayer) and type(layer.base) is BitLinear


def applies(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether `block` on x [B, T, D] should take the fused path."""
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in block.parameters())):
        return False
    layers = [block.get_submodule(name) for name in _LINEARS]
    if not all(bit_layer(layer) is not None or _folds(layer, x) for layer in layers):
        return False
    # A kernel that fuses nothing would run every row operation in torch, as dit.py does, only regrouped.
    first = bit_layer(layers[0]) or layers[0].base
    return bool(fused_parts(x, first.packed))


def linear(layer: nn.Module, x: torch.Tensor, prologue: Prologue | None = None, epilogue: Epilogue | None = None) -> torch.Tensor:
    """epilogue(layer(prologue(x))) in one kernel call; an active LoRA runs folded into the low-rank term."""
    bit = bit_layer(layer)
    if bit is not None:
        return bit(x, prologue, epilogue)
    return bitmatmul(x, layer.folded(), layer.base.bias, prologue, epilogue)


def head_norms(norms: list[nn.RMSNorm], dim: int) -> Epilogue:
    """RMSNorm of each head of the first len(norms) * dim output columns (q, then k), as an epilogue."""
    weight = norms[0].weight[None] if len(norms) == 1 else torch.stack([norm.weight for norm in norms])
    return Epilogue(norm_weight=weight, norm_cols=len(norms) * dim, norm_eps=norms[0].eps)


def self_attention(attn: nn.Module, x: torch.Tensor, prologue: Prologue, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * attn(prologue(x)) for x [B, T, D]."""
    B, T, D = x.shape
    H = attn.num_heads
    qkv = linear(attn.qkv, x, prologue, head_norms([attn.q_norm, attn.k_norm], D))
    q, k, v = qkv.reshape(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
    out = attention(q, k, v)
    return linear(attn.proj, out.transpose(1, 2).reshape(B, T, D), epilogue=Epilogue(residual=x, gate=gate))


def cross_attention(
    cross: nn.Module, x: torch.Tensor, prologue: Prologue, text: torch.Tensor, text_mask: torch.Tensor
) -> torch.Tensor:
    """x + cross(prologue(x), text) for x [B, T, D], text [B, L, D], text_mask [B, L]."""
    B, T, D = x.shape
    L, H = text.shape[1], cross.num_heads
    q = linear(cross.q, x, prologue, head_norms([cross.q_norm], D)).reshape(B, T, H, D // H).transpose(1, 2)
    k, v = linear(cross.kv, text, epilogue=head_norms([cross.k_norm], D)).reshape(B, L, 2, H, D // H).permute(2, 0, 3, 1, 4)
    out = attention(q, k, v, attn_mask=text_mask[:, None, None, :])
    return linear(cross.proj, out.transpose(1, 2).reshape(B, T, D), epilogue=Epilogue(residual=x))


def block_forward(
    block: nn.Module, x: torch.Tensor, mod: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
) -> torch.Tensor:
    """DiTBlock.forward (same arguments and result) with fused row operations."""
    # One copy makes each modulation row [B, D] contiguous, as the kernel reads them.
    shift1, scale1, gate1, shift2, scale2, gate2 = (mod + block.modulation_table[None]).transpose(0, 1).contiguous()
    x = self_attention(block.attn, x, Prologue(block.norm1.eps, shift=shift1, scale=scale1), gate1)
    x = cross_attention(block.cross, x, Prologue(block.norm2.eps, block.norm2.weight, block.norm2.bias), text, text_mask)
    hidden = linear(block.mlp.fc1, x, Prologue(block.norm3.eps, shift=shift2, scale=scale2), Epilogue(gelu=True))
    return linear(block.mlp.fc2, hidden, epilogue=Epilogue(residual=x, gate=gate2))
