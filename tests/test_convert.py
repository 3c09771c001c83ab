"""bonsai quantize + bonsai.diffusers: every supported architecture as a tiny random diffusers
model -> 1-bit checkpoint -> loaded back -> images through its diffusers pipeline."""

from __future__ import annotations

import fnmatch
import json
import math

import pytest
import torch
from click.testing import CliRunner
from diffusers_tiny import MODELS, sana_to_original, tiny_dc_vae, tiny_model, tiny_sd15_pipeline, tiny_vae, unet_to_ldm
from safetensors.torch import load_file, save_file

from bonsai.cli import main
from bonsai.convert import ADAPTERS, SourceError, UnsupportedModel, quantize_model
from bonsai.diffusers import load_bonsai_model, load_bonsai_pipeline, load_bonsai_transformer, load_bonsai_unet
from bonsai.format import read_header, summarize
from bonsai.quant import BitConv2d, BitLinear

pytest.importorskip("diffusers")


def expected_bits_per_weight_1bit(path) -> float:
    """Scheme "mean", no groups: per row, ceil(K/8) bytes of signs + a f32 scale + a f32 offset."""
    layers = read_header(path).layers
    bits = sum(spec.out_features * (8 * math.ceil(spec.in_features / 8) + 64) for spec in layers.values())
    return bits / sum(spec.out_features * spec.in_features for spec in layers.values())


def count_bit_calls(model: torch.nn.Module) -> list[int]:
    calls = [0]
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _generate(kind: str, model, tmp_path):
    """Run the matching diffusers pipeline for two steps; returns images as a numpy array [B, H, W, 3]."""
    import diffusers as d

    embeds, pooled, mask = torch.randn(1, 6, 32), torch.randn(1, 32), torch.ones(1, 6, dtype=torch.long)
    size = 32 if kind == "sana" else 16  # Sana's pipeline wants multiples of 32
    common = dict(num_inference_steps=2, guidance_scale=1.0, output_type="np", height=size, width=size,
                  generator=torch.Generator().manual_seed(0))
    sched = d.FlowMatchEulerDiscreteScheduler()
    if kind == "sdxl":
        pipe = d.StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                           unet=model, scheduler=d.EulerDiscreteScheduler())
        return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, **common).images
    if kind == "sd3":
        pipe = d.StableDiffusion3Pipeline(transformer=model, scheduler=sched, vae=tiny_vae(), text_encoder=None, tokenizer=None,
                                          text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
        return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, **common).images
    if kind == "flux":
        pipe = d.FluxPipeline(scheduler=sched, vae=tiny_vae(), text_encoder=None, tokenizer=None, text_encoder_2=None,
                              tokenizer_2=None, transformer=model)
        return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, **common).images
    if kind == "pixart":
        pipe = d.PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=model, scheduler=d.DDIMScheduler())
        return pipe(prompt_embeds=embeds, prompt_attention_mask=mask, use_resolution_binning=False, **common).images
    if kind == "sana":
        pipe = d.SanaPipeline(tokenizer=None, text_encoder=None, vae=tiny_dc_vae(), transformer=model, scheduler=sched)
        return pipe(prompt_embeds=embeds, prompt_attention_mask=mask, use_resolution_binning=False, **common).images
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", [k for k in MODELS if k != "sd15"])
def test_quantize_load_generate(kind, tmp_path):
    tiny_model(kind).save_pretrained(tmp_path / "src")
    out = tmp_path / f"{kind}.safetensors"
    stats = quantize_model(tmp_path / "src", out, progress=False)
    loader = load_bonsai_unet if MODELS[kind][0] == "UNet2DConditionModel" else load_bonsai_transformer
    model = loader(out)
    assert type(model).__name__ == MODELS[kind][0]
    bit = {n for n, m in model.named_modules() if isinstance(m, BitLinear)}
    assert bit == set(read_header(out).layers) and len(bit) == stats.layers_1bit > 0
    keep = ADAPTERS[MODELS[kind][0]].keep
    float_layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                    and m.weight.numel() >= 1024 and getattr(m, "groups", 1) == 1]
    assert float_layers and all(any(fnmatch.fnmatchcase(n, p) for p in keep) for n in float_layers)
    s = summarize(out)
    assert s["bits_per_weight_1bit"] == pytest.approx(expected_bits_per_weight_1bit(out), rel=1e-12)
    assert s["parameters"] == stats.parameters
    calls = count_bit_calls(model)
    images = _generate(kind, model, tmp_path)
    assert images.shape[0] == 1 and images.shape[3] == 3 and images.shape[1] == images.shape[2] in (16, 32)
    assert bool(torch.isfinite(torch.from_numpy(images)).all())
    assert calls[0] >= 2 * len(bit)  # every 1-bit layer ran in each of the two steps


def test_sd15_cli_and_pipeline_from_pretrained(tmp_path):
    """The full workflow: `bonsai quantize` on a pipeline folder, then the diffusers pipeline by prompt."""
    unet = tiny_model("sd15")
    tiny_sd15_pipeline(tmp_path / "sd15", unet)
    out = tmp_path / "sd15-1bit.safetensors"
    result = CliRunner().invoke(main, ["quantize", str(tmp_path / "sd15"), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert "bits per weight" in result.output and "peak memory" in result.output
    pipe = load_bonsai_pipeline(out)
    assert isinstance(pipe.unet.conv_in, torch.nn.Conv2d)  # kept
    assert isinstance(pipe.unet.down_blocks[0].resnets[0].conv1, BitConv2d)
    assert isinstance(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q, BitLinear)
    calls = count_bit_calls(pipe.unet)
    images = pipe("a red apple", negative_prompt="blurry", num_inference_steps=2, height=16, width=16, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and calls[0] > 0
    # the 1-bit model is a different function from the float one, but a close one on the same inputs
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 5, 32)
    with torch.no_grad():
        ref, got = unet(x, t, text).sample, pipe.unet(x, t, text).sample
    assert 0 < (got - ref).norm() / ref.norm() < 1.5


def test_single_file_matches_folder(tmp_path):
    """An A1111/ComfyUI-layout SD1.5 file converts to exactly what the diffusers folder converts to."""
    unet = tiny_model("sd15")
    unet.save_pretrained(tmp_path / "unet")
    ldm = unet_to_ldm(unet.state_dict(), 1, [True, False], [False, True])
    ldm["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4)  # other parts of a full checkpoint are ignored
    save_file({k: v.contiguous() for k, v in ldm.items()}, tmp_path / "model.safetensors")
    quantize_model(tmp_path / "unet", tmp_path / "a.safetensors", progress=False)
    result = CliRunner().invoke(main, ["quantize", str(tmp_path / "model.safetensors"), "--config", str(tmp_path / "unet"),
                                       "-o", str(tmp_path / "b.safetensors"), "-q"])
    assert result.exit_code == 0, result.output
    a, b = load_bonsai_model(tmp_path / "a.safetensors"), load_bonsai_model(tmp_path / "b.safetensors")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_options_and_keep(tmp_path):
    tiny_model("flux").save_pretrained(tmp_path / "src")
    out = tmp_path / "o.safetensors"
    quantize_model(tmp_path / "src", out, progress=False)
    layers = read_header(out).layers
    assert "single_transformer_blocks.0.proj_out" in layers and "proj_out" not in layers and "x_embedder" not in layers
    result = CliRunner().invoke(main, ["quantize", str(tmp_path / "src"), "-o", str(out), "-q", "--scheme", "xnor",
                                       "--group-size", "16", "--rank", "2", "--keep", "single_transformer_blocks.*"])
    assert result.exit_code == 0, result.output
    layers = read_header(out).layers
    assert layers and not any(n.startswith("single_transformer_blocks") for n in layers)
    assert {(s.scheme, s.group_size, s.rank) for s in layers.values()} == {("xnor", 16, 2)}


def test_malformed_sources(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        quantize_model(tmp_path / "nope", tmp_path / "o.safetensors")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"_class_name": "Kandinsky3UNet"}')
    with pytest.raises(UnsupportedModel, match="Kandinsky3UNet.*not supported"):
        quantize_model(tmp_path / "m", tmp_path / "o.safetensors")
    (tmp_path / "te").mkdir()  # a transformers component (text encoder): its config has no _class_name
    (tmp_path / "te" / "config.json").write_text('{"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"}')
    with pytest.raises(UnsupportedModel, match="names no diffusers model class"):
        quantize_model(tmp_path / "te", tmp_path / "o.safetensors")
    tiny_model("sd3").save_pretrained(tmp_path / "sd3")
    (tmp_path / "sd3" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(SourceError, match="no diffusion_pytorch_model"):
        quantize_model(tmp_path / "sd3", tmp_path / "o.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(32, 4, 3, 3)}, tmp_path / "one.safetensors")
    result = CliRunner().invoke(main, ["quantize", str(tmp_path / "one.safetensors"), "-o", str(tmp_path / "o.safetensors")])
    assert result.exit_code != 0 and "--config" in result.output
    with pytest.raises(UnsupportedModel, match="not a converted diffusers model"):
        from bonsai.models import DiT, DiTConfig, save_model

        save_model(DiT(DiTConfig.from_dict({})), tmp_path / "dit.safetensors", "dit", {})
        load_bonsai_model(tmp_path / "dit.safetensors")


def test_a_failed_conversion_leaves_no_folder_it_made(tmp_path):
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "new" / "deeper" / "o.safetensors", tmp_path / "kept" / "o.safetensors"):
        with pytest.raises(SourceError, match="does not exist"):
            quantize_model(tmp_path / "nope", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # the folder that was there stays


def test_source_tensors_and_json_checked_against_the_config(tmp_path):
    tiny_model("sd3").save_pretrained(tmp_path / "sd3")  # its pos_embed is a persistent buffer
    weights = tmp_path / "sd3" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    for key, bad, message in (
        ("pos_embed.pos_embed", torch.randn(1, 4, 32), r"tensor 'pos_embed.pos_embed' has shape \(1, 4, 32\), the config implies \(1, 256, 32\)"),
        ("pos_embed.proj.bias", torch.zeros(32, dtype=torch.int64), "tensor 'pos_embed.proj.bias' has dtype torch.int64, the model holds torch.float32"),
    ):
        save_file({**state, key: bad}, weights)
        with pytest.raises(SourceError, match=message):
            quantize_model(tmp_path / "sd3", tmp_path / "o.safetensors", progress=False)
    save_file(state, weights)
    index = tmp_path / "sd3" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "../elsewhere/diffusion_pytorch_model.safetensors"}}))
    with pytest.raises(SourceError, match="weight_map must map tensor names to file names in"):
        quantize_model(tmp_path / "sd3", tmp_path / "o.safetensors", progress=False)
    index.unlink()
    (tmp_path / "sd3" / "config.json").write_text("[]")
    with pytest.raises(SourceError, match="config.json must hold a JSON object, not a list"):
        quantize_model(tmp_path / "sd3", tmp_path / "o.safetensors", progress=False)
    assert not (tmp_path / "o.safetensors").exists()


def test_a_diffusers_weights_file_passed_alone_names_its_folder(tmp_path):
    """A component's diffusion_pytorch_model.safetensors passed as a single file (its keys are diffusers', not a
    single-file layout's) is answered with the folder to pass instead: the pipeline folder above it, else its own."""
    tiny_sd15_pipeline(tmp_path / "sd15", tiny_model("sd15"))
    tiny_model("sd3").save_pretrained(tmp_path / "sd3")
    for file, extra, folder in (
        (tmp_path / "sd15" / "unet" / "diffusion_pytorch_model.safetensors", ["--config", str(tmp_path / "sd15")], tmp_path / "sd15"),
        (tmp_path / "sd3" / "diffusion_pytorch_model.safetensors", [], tmp_path / "sd3"),
    ):
        result = CliRunner().invoke(main, ["quantize", str(file), *extra, "-o", str(tmp_path / "o.safetensors"), "-q"])
        assert result.exit_code == 1 and f"pass the folder {folder} instead" in result.output, result.output
        result = CliRunner().invoke(main, ["quantize", str(folder), "-o", str(tmp_path / "o.safetensors"), "-q"])
        assert result.exit_code == 0, result.output


def test_single_file_with_the_config_of_another_model_is_a_one_line_error(tmp_path):
    """An SD 1.5 file with an SDXL config: diffusers' key translation fails inside; the user gets which file and config clash."""
    tiny_model("sdxl").save_pretrained(tmp_path / "sdxl")
    ldm = unet_to_ldm(tiny_model("sd15").state_dict(), 1, [True, False], [False, True])
    save_file({k: v.contiguous() for k, v in ldm.items()}, tmp_path / "sd15.safetensors")
    result = CliRunner().invoke(main, ["quantize", str(tmp_path / "sd15.safetensors"), "--config", str(tmp_path / "sdxl"),
                                       "-o", str(tmp_path / "o.safetensors"), "-q"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"{tmp_path / 'sd15.safetensors'}: its tensors do not match the config from {tmp_path / 'sdxl'}" in result.output
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("options", [["--keep", "*"], ["--min-params", str(10**9)]])
def test_options_that_leave_no_layer_to_binarize_are_refused_before_writing(tmp_path, options):
    """A 'quantized' file with no 1-bit layer is not what was asked for: one line, nothing written (it was a
    TypeError traceback from the report, after the file had been written)."""
    tiny_model("sd3").save_pretrained(tmp_path / "sd3")
    out = tmp_path / "o.safetensors"
    result = CliRunner().invoke(main, ["quantize", str(tmp_path / "sd3"), "-o", str(out), "-q", *options])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "no layer to binarize" in result.output and not out.exists()


def test_output_onto_the_source_weights_is_refused(tmp_path):
    """-o naming the file being converted would replace the user's full-precision model with its 1-bit copy."""
    unet = tiny_model("sd15")
    unet.save_pretrained(tmp_path / "unet")
    single = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in unet_to_ldm(unet.state_dict(), 1, [True, False], [False, True]).items()}, single)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    for args, target in (([str(single), "--config", str(tmp_path / "unet")], single), ([str(tmp_path / "unet")], weights)):
        before = target.read_bytes()
        result = CliRunner().invoke(main, ["quantize", *args, "-o", str(target), "-q"])
        assert result.exit_code == 1 and "is a weights file of the model being converted" in result.output, result.output
        assert target.read_bytes() == before


def test_single_file_converted_whole_matches_folder_and_counts_its_bytes(tmp_path):
    """Sana's original layout fuses qkv, so the file is translated whole (not tensor by tensor): the result is the
    folder's, and the report's source size is the file's (it said 0.0 MiB)."""
    sana = tiny_model("sana")
    sana.save_pretrained(tmp_path / "sana")
    single = tmp_path / "sana_orig.safetensors"
    save_file({k: v.contiguous() for k, v in sana_to_original(sana.state_dict(), MODELS["sana"][1]["num_layers"]).items()}, single)
    quantize_model(tmp_path / "sana", tmp_path / "a.safetensors", progress=False)
    with pytest.warns(UserWarning, match="converting it whole"):
        stats = quantize_model(single, tmp_path / "b.safetensors", config=tmp_path / "sana", progress=False)
    assert stats.source_bytes == single.stat().st_size
    sa, sb = load_bonsai_model(tmp_path / "a.safetensors").state_dict(), load_bonsai_model(tmp_path / "b.safetensors").state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_single_files_of_no_known_layout(tmp_path):
    """A Bonsai checkpoint is named as one; diffusers-layout weights away from their folder convert with --config
    (they were taken for an SD 1.5 UNet: 'config is for SD3Transformer2DModel, but ... holds a UNet2DConditionModel')."""
    tiny_model("sd3").save_pretrained(tmp_path / "sd3")
    quantize_model(tmp_path / "sd3", tmp_path / "a.safetensors", progress=False)
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((tmp_path / "sd3" / "diffusion_pytorch_model.safetensors").read_bytes())

    def quantize(*args):
        return CliRunner().invoke(main, ["quantize", *map(str, args), "-o", str(tmp_path / "b.safetensors"), "-q"])

    result = quantize(tmp_path / "a.safetensors", "--config", tmp_path / "sd3")
    assert result.exit_code == 1 and "is a Bonsai checkpoint already" in result.output, result.output
    result = quantize(lone)
    assert result.exit_code == 1 and "not a single-file checkpoint layout Bonsai recognizes" in result.output, result.output
    assert "pass --config" in result.output
    result = quantize(lone, "--config", tmp_path / "sd3" / "config.json")
    assert result.exit_code == 0, result.output
    sa, sb = load_bonsai_model(tmp_path / "a.safetensors").state_dict(), load_bonsai_model(tmp_path / "b.safetensors").state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_scaled_fp8_single_file_is_refused(tmp_path):
    """ComfyUI's fp8_scaled files store weight / scale_weight: converted without the scales every layer would be
    silently off by its own factor; plain fp8 files (no scales) convert."""
    unet = tiny_model("sd15")
    unet.save_pretrained(tmp_path / "unet")
    ldm = {k: v.contiguous().to(torch.float8_e4m3fn) for k, v in unet_to_ldm(unet.state_dict(), 1, [True, False], [False, True]).items()}
    save_file(ldm, tmp_path / "fp8.safetensors")
    quantize_model(tmp_path / "fp8.safetensors", tmp_path / "a.safetensors", config=tmp_path / "unet", progress=False)
    scaled = {**ldm, "model.diffusion_model.scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn),
              "model.diffusion_model.out.2.scale_weight": torch.tensor(0.5)}
    save_file(scaled, tmp_path / "fp8_scaled.safetensors")
    with pytest.raises(SourceError, match="scaled fp8 weights"):
        quantize_model(tmp_path / "fp8_scaled.safetensors", tmp_path / "b.safetensors", config=tmp_path / "unet", progress=False)
    assert not (tmp_path / "b.safetensors").exists()
