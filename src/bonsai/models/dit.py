"""The Bonsai DiT: a diffusion transformer for flow-matching text-to-image generation.

Read top to bottom: patchify -> blocks (self-attention, cross-attention to text, MLP; each
modulated by the timestep) -> unpatchify. Conditioning follows PixArt-alpha: one shared adaLN
modulation MLP for the whole network plus a small learned table per block, so the
high-precision part stays tiny; text enters by cross-attention (token states of a frozen
encoder), which lets prompts of any length steer every block.

Shapes: B batch, C channels, H x W image (pixels or latents), p patch, T = (H/p)(W/p) tokens,
D hidden size, L text tokens, E text-encoder width.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from . import dit_fused
from .attention import attention
from .per_sample import per_sample


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 3  # 3 for pixel-space RGB, the VAE's latent channels otherwise
    patch_size: int = 4
    hidden_size: int = 384
    depth: int = 8
    num_heads: int = 6
    mlp_ratio: float = 4.0
    text_dim: int = 384  # width E of the text encoder's token states
    sample_size: int = 64  # native H = W the model was trained at (pixels or latents)

    def __post_init__(self) -> None:
        # A config read from a checkpoint's metadata must fail here with its field named, not deep in torch.
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (type(value) is not int or value < 1):
                raise ValueError(f"DiT config field {f.name} must be an integer >= 1, got {value!r}")
            if f.type == "float" and (type(value) not in (int, float) or not 0 < value < math.inf):
                raise ValueError(f"DiT config field {f.name} must be a positive number, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError("head dim must be divisible by 4 (2-D rotary-free sincos positions)")

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DiT config fields: {', '.join(sorted(unknown))}")
        return cls(**d)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 as in DDPM-style models): [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int, device: torch.device, base_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid_h * grid_w, dim]. Coordinates are scaled to the
    native grid (`base_size` tokens per side) so other resolutions see familiar frequencies."""
    ys = torch.arange(grid_h, device=device, dtype=torch.float32) * (base_size / grid_h)
    xs = torch.arange(grid_w, device=device, dtype=torch.float32) * (base_size / grid_w)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)

    def embed(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed(gy), embed(gx)], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def rms_norm(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` with the weight cast to x's dtype, so that under bf16 autocast the fused kernel
    runs (nn.RMSNorm falls back to a slow path when input and weight dtypes differ)."""
    return F.rms_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.eps)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # Normalizing q and k keeps attention logits bounded when the projections are binary.
        self.q_norm = nn.RMSNorm(dim // num_heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(dim // num_heads, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attention(rms_norm(self.q_norm, q), rms_norm(self.k_norm, k), v)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.RMSNorm(dim // num_heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(dim // num_heads, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        L, H = text.shape[1], self.num_heads
        q = self.q(x).reshape(B, T, H, D // H).transpose(1, 2)
        k, v = self.kv(text).reshape(B, L, 2, H, D // H).permute(2, 0, 3, 1, 4)
        mask = text_mask[:, None, None, :]  # [B, 1, 1, L]; True = attend
        out = attention(rms_norm(self.q_norm, q), rms_norm(self.k_norm, k), v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(D, cfg.num_heads)
        self.norm2 = nn.LayerNorm(D, eps=1e-6)
        self.cross = CrossAttention(D, cfg.num_heads)
        self.norm3 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(D, cfg.mlp_hidden)
        # Per-block offsets to the shared modulation (adaLN-single): shift/scale/gate x 2.
        self.modulation_table = nn.Parameter(torch.empty(6, D))

    def forward(self, x: torch.Tensor, mod: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        if dit_fused.applies(self, x):  # the same block with its norms, GELU and residuals in the 1-bit kernel
            return dit_fused.block_forward(self, x, mod, text, text_mask)
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod + self.modulation_table[None]).unbind(1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross(self.norm2(x), text, text_mask)
        return x + gate2[:, None] * self.mlp(modulate(self.norm3(x), shift2, scale2))


class DiT(nn.Module):
    """Predicts the flow-matching velocity v = noise - x0 for x_t = (1 - t) x0 + t noise."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        self.time_embed = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.pool_embed = nn.Linear(D, D)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_modulation_table = nn.Parameter(torch.empty(2, D))
        self.final_proj = nn.Linear(D, p * p * cfg.in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # Modulation tables: uniform with std 1/sqrt(D). (Uniform, not normal: on the meta device,
        # where checkpoints are loaded, torch's first normal_ costs seconds of one-time set-up.)
        bound = (3 / self.config.hidden_size) ** 0.5
        for table in [b.modulation_table for b in self.blocks] + [self.final_modulation_table]:
            nn.init.uniform_(table, -bound, bound)
        # Zero the last modulation and output layers: each block starts as the identity.
        nn.init.zeros_(self.modulation[-1].weight)
        nn.init.zeros_(self.final_proj.weight)

    def _condition(self, t_freq: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.time_embed(t_freq) + self.pool_embed(pooled)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """x [B, C, H, W], t [B] in [0, 1], text [B, L, E], text_mask [B, L] bool -> v [B, C, H, W]."""
        B, C, H, W = x.shape
        p, D = self.config.patch_size, self.config.hidden_size
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not divisible by the patch size {p}")
        h, w = H // p, W // p
        # The high-precision layers run sample by sample on CPU, where the rest is computed row by row, so
        # that an image does not depend on the batch it is in (see per_sample).
        each = per_sample if x.device.type == "cpu" else lambda fn, *xs: fn(*xs)
        tokens = each(self.patch_embed, x).flatten(2).transpose(1, 2)  # [B, T, D]
        tokens = tokens + sincos_pos_embed(D, h, w, x.device, self.config.sample_size // p).to(tokens.dtype)

        text = each(self.text_proj, text)  # [B, L, D]
        m = text_mask.unsqueeze(-1).to(text.dtype)
        pooled = (text * m).sum(1) / m.sum(1).clamp(min=1)
        cond = each(self._condition, timestep_embedding(t).to(tokens.dtype), pooled)  # [B, D]
        mod = each(self.modulation, cond).reshape(B, 6, D)

        for block in self.blocks:
            tokens = block(tokens, mod, text, text_mask)

        shift, scale = (cond[:, None] + self.final_modulation_table[None]).unbind(1)
        out = each(self.final_proj, modulate(self.final_norm(tokens), shift, scale))  # [B, T, p*p*C]
        out = out.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(B, C, H, W)
