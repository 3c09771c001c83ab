"""Tiny random diffusers models and pipeline parts, built offline from configs, for the tests of
conversion, the diffusers integration, LoRA and distillation."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Width 32 everywhere: 32x32 = 1024 weights, the policy's default minimum for binarizing a layer.
UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)
SDXL_UNET = dict(
    UNET, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
    use_linear_projection=True, transformer_layers_per_block=(1, 2),
)
SD3 = dict(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
           joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=16)
FLUX = dict(patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
PIXART = dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=4, caption_channels=32,
              in_channels=4, out_channels=8, cross_attention_dim=32, attention_bias=True, activation_fn="gelu-approximate",
              num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
SANA = dict(patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=4, attention_head_dim=8,
            num_cross_attention_heads=4, cross_attention_head_dim=8, cross_attention_dim=32, caption_channels=32, sample_size=8)

MODELS = {
    "sd15": ("UNet2DConditionModel", UNET),
    "sdxl": ("UNet2DConditionModel", SDXL_UNET),
    "sd3": ("SD3Transformer2DModel", SD3),
    "flux": ("FluxTransformer2DModel", FLUX),
    "pixart": ("PixArtTransformer2DModel", PIXART),
    "sana": ("SanaTransformer2DModel", SANA),
}


def tiny_model(kind: str, seed: int = 0) -> torch.nn.Module:
    import diffusers

    class_name, config = MODELS[kind]
    torch.manual_seed(seed)
    return getattr(diffusers, class_name)(**config).eval()


def tiny_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(block_out_channels=(32,), in_channels=3, out_channels=3, latent_channels=latent_channels, shift_factor=0.0,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=32)


def tiny_dc_vae():
    from diffusers import AutoencoderDC

    torch.manual_seed(1)
    return AutoencoderDC(in_channels=3, latent_channels=4, encoder_block_out_channels=(32, 32), decoder_block_out_channels=(32, 32),
                         encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
                         encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), (5,)),
                         decoder_qkv_multiscales=((), (5,)), upsample_block_type="interpolate", downsample_block_type="Conv",
                         decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)


def write_clip_tokenizer(folder: Path) -> None:
    """A character-level CLIP BPE vocabulary (no merges beyond letters) — enough to tokenize ASCII prompts."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789,.!")
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def tiny_sd15_pipeline(folder: Path, unet: torch.nn.Module) -> None:
    """A complete StableDiffusionPipeline folder (CLIP text encoder + tokenizer, VAE, scheduler) at `folder`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_clip_tokenizer(folder / "_tok")
    tokenizer = CLIPTokenizer(str(folder / "_tok" / "vocab.json"), str(folder / "_tok" / "merges.txt"), model_max_length=16)
    torch.manual_seed(2)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        vocab_size=len(tokenizer), max_position_embeddings=16, bos_token_id=len(tokenizer) - 2,
                                        eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1))
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int, down_attn: list[bool], up_attn: list[bool]) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict in the original (A1111 / LDM) key layout, "model.diffusion_model." prefixed
    (the inverse of diffusers' convert_ldm_unet_checkpoint, for the test's small configs)."""
    lpb = layers_per_block
    prefixes = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
                "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
                "mid_block.attentions.0.": "middle_block.1.", "mid_block.resnets.0.": "middle_block.0.",
                "mid_block.resnets.1.": "middle_block.2.", "add_embedding.linear_1.": "label_emb.0.0.",
                "add_embedding.linear_2.": "label_emb.0.2."}
    n = len(down_attn)
    for i in range(n):
        for j in range(lpb):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{(lpb + 1) * i + j + 1}.0."
            if down_attn[i]:
                prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{(lpb + 1) * i + j + 1}.1."
        if i < n - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(lpb + 1) * (i + 1)}.0.op."
        for j in range(lpb + 1):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(lpb + 1) * i + j}.0."
            if up_attn[i]:
                prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(lpb + 1) * i + j}.1."
        if i < n - 1:
            prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{(lpb + 1) * i + lpb}.{2 if up_attn[i] else 1}."
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
              "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
    out = {}
    for key, t in state.items():
        prefix = max((p for p in prefixes if key.startswith(p)), key=len)
        rest = key[len(prefix):]
        if ".resnets." in prefix:
            head, _, tail = rest.partition(".")
            rest = f"{resnet[head]}.{tail}"
        out["model.diffusion_model." + prefixes[prefix] + rest] = t
    return out


def sana_to_original(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """A diffusers Sana state dict in the original single-file layout (fused qkv and kv): the inverse of
    diffusers' convert_sana_transformer_to_diffusers, which needs the file converted whole."""
    out = {"pos_embed": torch.zeros(1), "y_embedder.y_embedding": torch.zeros(1)}  # read and dropped by the converter
    renames = {"patch_embed.proj.": "x_embedder.proj.", "time_embed.emb.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
               "time_embed.emb.timestep_embedder.linear_2.": "t_embedder.mlp.2.", "time_embed.linear.": "t_block.1.",
               "caption_projection.linear_1.": "y_embedder.y_proj.fc1.", "caption_projection.linear_2.": "y_embedder.y_proj.fc2.",
               "proj_out.": "final_layer.linear."}
    for new, old in renames.items():
        for s in ("weight", "bias"):
            out[old + s] = state[new + s]
    out["attention_y_norm.weight"] = state["caption_norm.weight"]
    out["final_layer.scale_shift_table"] = state["scale_shift_table"]
    for i in range(num_layers):
        d, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        out[o + "scale_shift_table"] = state[d + "scale_shift_table"]
        out[o + "attn.qkv.weight"] = torch.cat([state[d + f"attn1.to_{x}.weight"] for x in "qkv"])
        for s in ("weight", "bias"):
            out[o + "attn.proj." + s] = state[d + "attn1.to_out.0." + s]
            out[o + "cross_attn.q_linear." + s] = state[d + "attn2.to_q." + s]
            out[o + "cross_attn.kv_linear." + s] = torch.cat([state[d + "attn2.to_k." + s], state[d + "attn2.to_v." + s]])
            out[o + "cross_attn.proj." + s] = state[d + "attn2.to_out.0." + s]
            out[o + "mlp.inverted_conv.conv." + s] = state[d + "ff.conv_inverted." + s]
            out[o + "mlp.depth_conv.conv." + s] = state[d + "ff.conv_depth." + s]
        out[o + "mlp.point_conv.conv.weight"] = state[d + "ff.conv_point.weight"]
    return out
