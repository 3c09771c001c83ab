"""The evaluator: a small CNN image encoder aligned contrastively with frozen MiniLM sentence
embeddings (locked-text CLIP training). Its pooled features feed the Fréchet distance; its
normalized 384-d embeddings score prompt adherence by caption retrieval.

Saved as safetensors weights + a JSON config, never pickle."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from bonsai.atomic import atomic_write

WEIGHTS_FILE = "evaluator.safetensors"
CONFIG_FILE = "evaluator.json"
FORMAT = "bonsai-evaluator"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class EvaluatorConfig:
    image_size: int = 64
    widths: tuple[int, ...] = (32, 64, 128, 192)  # one stage each, stride 2 between stages
    stem_stride: int = 4  # stride of the first stage's first convolution
    embed_dim: int = 384  # MiniLM sentence embedding width
    groups: int = 8  # GroupNorm groups


def _block(c_in: int, c_out: int, groups: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(groups, c_out),
        nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.GroupNorm(groups, c_out),
        nn.SiLU(),
    )


class Evaluator(nn.Module):
    """Images float [B, 3, H, W] in [-1, 1] -> features [B, widths[-1]] (for the Fréchet distance)
    and embeddings [B, embed_dim], L2-normalized (for retrieval against MiniLM sentence embeddings)."""

    def __init__(self, config: EvaluatorConfig = EvaluatorConfig()):
        super().__init__()
        self.config = config
        w, g = config.widths, config.groups
        # the first stage runs at 16x16 (stride 4): emoji keep their shapes there, and training
        # fits in minutes on two CPU cores
        stages = [_block(3, w[0], g, stride=config.stem_stride)]
        stages += [_block(w[i - 1], w[i], g, stride=2) for i in range(1, len(w))]
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Linear(w[-1], config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features float [B, widths[-1]]: global average of the last stage."""
        return self.stages(images).mean((2, 3))

    def embed_features(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(feats), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.features(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, F], embeddings [B, D]) in float32 on the CPU, computed in batches in eval mode."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        feats, embs = [], []
        for chunk in images.split(batch_size):
            f = self.features(chunk.to(device, torch.float32))
            feats.append(f.float().cpu())
            embs.append(self.embed_features(f).float().cpu())
        self.train(was_training)
        return torch.cat(feats), torch.cat(embs)


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching pairs (row i of each is one pair); [B, D] normalized."""
    logits = logit_scale.exp().clamp(max=100) * image_emb @ text_emb.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def save_evaluator(evaluator: Evaluator, folder: str | Path, dtype: torch.dtype = torch.float16, extra: dict | None = None) -> Path:
    """Write evaluator.safetensors (weights in `dtype`) and evaluator.json (config + `extra`)
    atomically into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in evaluator.state_dict().items()}
    config = {"format": FORMAT, "version": FORMAT_VERSION, "config": asdict(evaluator.config), **(extra or {})}
    atomic_write(folder / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": FORMAT}))
    atomic_write(folder / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return folder


def load_evaluator(folder: str | Path, device: str | torch.device = "cpu") -> Evaluator:
    """Load an evaluator saved by `save_evaluator` (float32 on `device`); checks the format, the
    config fields and every tensor's name and shape."""
    folder = Path(folder)
    meta_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; train one with scripts/train_evaluator.py")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: expected format {FORMAT} version {FORMAT_VERSION}, got {meta.get('format')} {meta.get('version')}")
    fields = dict(meta["config"])
    unknown = set(fields) - set(EvaluatorConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{meta_path}: unknown config fields {sorted(unknown)}")
    fields["widths"] = tuple(fields.get("widths", EvaluatorConfig.widths))
    model = Evaluator(EvaluatorConfig(**fields))
    expected = model.state_dict()
    tensors = load_file(weights_path)
    if set(tensors) != set(expected):
        raise ValueError(f"{weights_path}: tensor names differ from the config's network: "
                         f"missing {sorted(set(expected) - set(tensors))}, unexpected {sorted(set(tensors) - set(expected))}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape or not t.is_floating_point():
            raise ValueError(f"{weights_path}: tensor {name} is {t.dtype} {tuple(t.shape)}, expected floating {tuple(expected[name].shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{weights_path}: tensor {name} holds non-finite values")
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.to(device).eval()
