"""bonsai-4b: a latent text-to-image model of ~4B parameters whose linear layers are 1-bit.

One checkpoint holds the three parts (architecture "bonsai-t2i"):
- denoiser: the Bonsai DiT on 16-channel latents (patch 2, width 3072, 24 blocks, 24 heads);
- text_encoder: a BERT-large-sized encoder (24 x 1024) with 1-bit linears;
- decoder: the decoder half of a Flux/SD3-style 16-channel AutoencoderKL, kept in bf16.
models/bonsai-4b/README.md documents every choice; `part_sizes` computes its table.

We cannot train it here: `build_random` instantiates it directly in packed form (meta-device
skeleton, then random packed signs and scales), which gives its true size, memory and speed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from torch import nn

from ..format import LayerSpec
from ..quant import BinarizeConfig, QuantPolicy, bit_layers, plan
from .bert_text import BertTextEncoder
from .dit import DiT, DiTConfig
from .io import build_skeleton, layer_specs, model_tensors, save_model
from .random_init import fill_random_
from .registry import register_architecture
from .vae import FLUX_STYLE_VAE, LatentDecoder, downsample_factor

ARCHITECTURE = "bonsai-t2i"
PARTS = ("denoiser", "text_encoder", "decoder")
BINARIZED_PARTS = ("denoiser", "text_encoder")  # the decoder's convolutions stay high precision


@dataclass(frozen=True)
class T2IConfig:
    """The three parts of a latent text-to-image model."""

    denoiser: DiTConfig
    text_encoder: dict  # BertTextEncoder config (bonsai.text.bert.BertConfig fields + max_tokens)
    vae: dict  # diffusers AutoencoderKL keyword arguments

    def __post_init__(self) -> None:
        if self.denoiser.in_channels != self.vae["latent_channels"]:
            raise ValueError(f"denoiser in_channels {self.denoiser.in_channels} != VAE latent_channels {self.vae['latent_channels']}")
        if self.denoiser.text_dim != self.text_encoder["hidden_size"]:
            raise ValueError(f"denoiser text_dim {self.denoiser.text_dim} != text encoder hidden_size {self.text_encoder['hidden_size']}")

    @property
    def latent_factor(self) -> int:
        return downsample_factor(self.vae)

    def to_dict(self) -> dict:
        return {"denoiser": self.denoiser.to_dict(), "text_encoder": dict(self.text_encoder), "vae": dict(self.vae)}

    @classmethod
    def from_dict(cls, d: dict) -> "T2IConfig":
        if set(d) != {"denoiser", "text_encoder", "vae"}:
            raise ValueError(f"a {ARCHITECTURE} config has exactly denoiser, text_encoder and vae, got {', '.join(sorted(d))}")
        return cls(DiTConfig.from_dict(d["denoiser"]), dict(d["text_encoder"]), dict(d["vae"]))


BONSAI_4B = T2IConfig(
    denoiser=DiTConfig(in_channels=16, patch_size=2, hidden_size=3072, depth=24, num_heads=24, mlp_ratio=4.0, text_dim=1024, sample_size=64),
    text_encoder={"vocab_size": 30522, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                  "intermediate_size": 4096, "max_position_embeddings": 512, "max_tokens": 64},
    vae=FLUX_STYLE_VAE,
)  # fmt: skip

# Same code, small dims: what the tests build, save, load and generate with on a CPU.
BONSAI_4B_TINY = T2IConfig(
    denoiser=DiTConfig(in_channels=4, patch_size=2, hidden_size=64, depth=2, num_heads=4, mlp_ratio=2.0, text_dim=32, sample_size=8),
    text_encoder={"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "intermediate_size": 64, "max_position_embeddings": 64, "max_tokens": 16},
    vae={**FLUX_STYLE_VAE, "block_out_channels": [32, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
         "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "latent_channels": 4,
         "norm_num_groups": 8, "sample_size": 64},
)  # fmt: skip

# 1-bit scheme of bonsai-4b: mean-centred signs with one scale per output row (W1A8-kernel friendly).
BINARIZE_4B = BinarizeConfig(scheme="mean")
PIPELINE_4B = {"text_encoder": "bert", "decoder": "vae",
               "defaults": {"steps": 24, "cfg": 7.0, "width": 512, "height": 512, "sampler": "euler", "shift": 3.0}}  # fmt: skip


class TextToImage(nn.Module):
    """The parts of a latent text-to-image model, stored and loaded as one checkpoint."""

    def __init__(self, config: T2IConfig):
        super().__init__()
        self.config = config
        self.denoiser = DiT(config.denoiser)
        self.text_encoder = BertTextEncoder(config.text_encoder)
        self.decoder = LatentDecoder(config.vae)


register_architecture(ARCHITECTURE, lambda cfg: TextToImage(T2IConfig.from_dict(cfg)))


def packed_layer_specs(model: TextToImage, binarize: BinarizeConfig = BINARIZE_4B) -> dict[str, LayerSpec]:
    """The 1-bit layers QuantPolicy(binarize) picks in the denoiser and text encoder, as LayerSpecs
    (works on a meta-device model: only names and shapes are read)."""
    policy = QuantPolicy(binarize=binarize, convs=False)
    specs = {}
    for part in BINARIZED_PARTS:
        for name in plan(model.get_submodule(part), policy):
            linear = model.get_submodule(f"{part}.{name}")
            specs[f"{part}.{name}"] = LayerSpec(
                scheme=binarize.scheme, in_features=linear.in_features, out_features=linear.out_features,
                group_size=binarize.group_size, rank=binarize.rank, col_scale=binarize.scheme == "onebit",
                row_offset=binarize.scheme == "mean", bias=linear.bias is not None,
            )  # fmt: skip
    return specs


def skeleton(config: T2IConfig = BONSAI_4B, binarize: BinarizeConfig | None = BINARIZE_4B) -> TextToImage:
    """The model on the meta device (no memory): 1-bit layers packed unless `binarize` is None."""
    if binarize is None:
        with torch.device("meta"):
            return TextToImage(config)
    with torch.device("meta"):
        probe = TextToImage(config)
    return build_skeleton(ARCHITECTURE, config.to_dict(), packed_layer_specs(probe, binarize))


def build_random(
    config: T2IConfig = BONSAI_4B,
    binarize: BinarizeConfig | None = BINARIZE_4B,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> TextToImage:
    """A randomly initialized model, built directly in its final form on `device`: packed 1-bit
    layers (or, with binarize=None, plain `dtype` nn.Linear layers, the dense baseline)."""
    return fill_random_(skeleton(config, binarize), device, dtype, seed).eval().requires_grad_(False)


def save_t2i(model: TextToImage, path: str, name: str, pipeline: dict = PIPELINE_4B, **metadata) -> None:
    """Write the whole model (all three parts) as one Bonsai checkpoint."""
    save_model(model, path, ARCHITECTURE, model.config.to_dict(), name=name, pipeline=pipeline, **metadata)


@dataclass(frozen=True)
class PartSize:
    """Parameters and stored bytes of one part (a 1-bit weight counts as one parameter)."""

    params: int = 0
    one_bit_params: int = 0
    high_precision_params: int = 0
    stored_bytes: int = 0
    tensors: dict = field(default_factory=dict, repr=False)  # name -> (dtype, shape) as stored


def part_sizes(config: T2IConfig = BONSAI_4B, binarize: BinarizeConfig = BINARIZE_4B) -> dict[str, PartSize]:
    """Sizes per part computed from the config alone (meta-device skeleton, packed_shapes): no weight
    is allocated. stored_bytes is exactly what the checkpoint's data section holds for the part."""
    model = skeleton(config, binarize)
    bits = bit_layers(model)
    stored = model_tensors(model)  # the dtypes a checkpoint stores (meta tensors: no memory)
    out = {}
    for part in PARTS:
        one_bit = sum(m.in_features * m.out_features for n, m in bits.items() if n.startswith(part + "."))
        packed = {f"{n}.{f}" for n, m in bits.items() if n.startswith(part + ".") for f in m.packed.tensors()}
        names = [n for n in stored if n.startswith(part + ".")]
        high = sum(stored[n].numel() for n in names if n not in packed and stored[n].is_floating_point())
        out[part] = PartSize(
            params=one_bit + high, one_bit_params=one_bit, high_precision_params=high,
            stored_bytes=sum(stored[n].numel() * stored[n].element_size() for n in names),
            tensors={n: (str(stored[n].dtype).removeprefix("torch."), list(stored[n].shape)) for n in names},
        )  # fmt: skip
    return out


def estimate_file_bytes(config: T2IConfig = BONSAI_4B, binarize: BinarizeConfig = BINARIZE_4B, name: str = "bonsai-4b") -> int:
    """Checkpoint size on disk: the data section (exact) plus the safetensors header (its JSON
    rebuilt the way save_t2i writes it; within a few bytes of the real one)."""
    sizes = part_sizes(config, binarize)
    model = skeleton(config, binarize)
    meta = {"format": "bonsai", "format_version": 1, "architecture": ARCHITECTURE, "config": config.to_dict(),
            "quantization": {"layers": {n: s.to_json() for n, s in layer_specs(model).items()}, "high_precision_dtype": "bfloat16"},
            "provenance": {}, "license": "unknown", "name": name, "pipeline": PIPELINE_4B}  # fmt: skip
    codes = {"uint8": "U8", "float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64"}
    header: dict = {"__metadata__": {"bonsai": json.dumps(meta)}}
    offset = 0
    for part in sizes.values():
        for n, (dtype, shape) in part.tensors.items():
            nbytes = int(torch.empty(shape, dtype=getattr(torch, dtype), device="meta").nbytes)
            header[n] = {"dtype": codes[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    text = json.dumps(header, separators=(",", ":"))
    return 8 + -(-len(text) // 8) * 8 + offset


def describe(config: T2IConfig = BONSAI_4B, binarize: BinarizeConfig = BINARIZE_4B) -> str:
    """The README's parameter table (markdown), from part_sizes."""
    sizes = part_sizes(config, binarize)
    rows = ["| part | parameters | 1-bit | high precision | stored bytes |", "| --- | ---: | ---: | ---: | ---: |"]
    for part, s in sizes.items():
        rows.append(f"| {part} | {s.params:,} | {s.one_bit_params:,} | {s.high_precision_params:,} | {s.stored_bytes:,} |")
    total = PartSize(*(sum(getattr(s, f) for s in sizes.values()) for f in ("params", "one_bit_params", "high_precision_params", "stored_bytes")))
    rows.append(f"| total | {total.params:,} | {total.one_bit_params:,} | {total.high_precision_params:,} | {total.stored_bytes:,} |")
    rows.append(f"\nCheckpoint file (data + header): {estimate_file_bytes(config, binarize):,} bytes.")
    return "\n".join(rows)


if __name__ == "__main__":
    print(describe())
