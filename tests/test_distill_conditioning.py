"""`bonsai distill --prompts` on tiny random diffusers pipelines: the prompts are encoded by each
pipeline's own text encoder(s) (the teacher sees exactly encode_prompt's output, pooled
embeddings included), a few steps reduce the student-teacher loss (FLUX included), sample grids
are written, and a broken text encoder gives a clear error."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner
from diffusers_tiny import tiny_model, tiny_sd15_pipeline, tiny_vae, write_clip_tokenizer

from bonsai.cli import main
from bonsai.train import distill_cli

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPTS = ["a red apple", "two cats, smiling"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CI machine their barriers
    stall (measured: ~6x slower at load 7 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _clip_tokenizer(folder):
    write_clip_tokenizer(folder)
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def _clip(tokenizer, hidden: int, projection: int = 0):
    config = transformers.CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                                         vocab_size=len(tokenizer), max_position_embeddings=16, projection_dim=projection or hidden,
                                         bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1)
    return transformers.CLIPTextModelWithProjection(config) if projection else transformers.CLIPTextModel(config)


def _unigram_tokenizer(cls_name: str):
    """A character-level sentencepiece-style (Unigram) tokenizer for T5 / Gemma, built offline."""
    from tokenizers import Tokenizer, models

    pieces = ["<pad>", "</s>", "<unk>", "<bos>"] + [chr(c) for c in range(97, 123)] + list("0123456789,.!") + ["\u2581"]
    tok = Tokenizer(models.Unigram([(p, 0.0) for p in pieces], unk_id=2, byte_fallback=False))
    return getattr(transformers, cls_name)(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<bos>")


def _t5(vocab: int):
    return transformers.T5EncoderModel(transformers.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4, vocab_size=vocab))


def build_pipeline(kind: str, folder) -> None:
    """A tiny pipeline folder of `kind` with its real text encoder(s) and tokenizer(s)."""
    torch.manual_seed(3)
    if kind == "sd15":
        return tiny_sd15_pipeline(folder, tiny_model("sd15"))
    clip = _clip_tokenizer(folder / "_tok")
    flow = diffusers.FlowMatchEulerDiscreteScheduler()
    if kind == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=_clip(clip, 16), text_encoder_2=_clip(clip, 16, 32), tokenizer=clip,
                                                   tokenizer_2=clip, unet=tiny_model("sdxl"), scheduler=diffusers.EulerDiscreteScheduler())
    elif kind == "sd3":
        t5 = _unigram_tokenizer("T5Tokenizer")
        pipe = diffusers.StableDiffusion3Pipeline(transformer=tiny_model("sd3"), scheduler=flow, vae=tiny_vae(), text_encoder=_clip(clip, 16, 16),
                                                  tokenizer=clip, text_encoder_2=_clip(clip, 16, 16), tokenizer_2=clip,
                                                  text_encoder_3=_t5(len(t5)), tokenizer_3=t5)
    elif kind == "flux":
        t5 = _unigram_tokenizer("T5Tokenizer")
        pipe = diffusers.FluxPipeline(scheduler=flow, vae=tiny_vae(latent_channels=4), text_encoder=_clip(clip, 32), tokenizer=clip,
                                      text_encoder_2=_t5(len(t5)), tokenizer_2=t5, transformer=tiny_model("flux"))
    elif kind == "pixart":
        t5 = _unigram_tokenizer("T5Tokenizer")
        pipe = diffusers.PixArtSigmaPipeline(tokenizer=t5, text_encoder=_t5(len(t5)), vae=tiny_vae(), transformer=tiny_model("pixart"),
                                             scheduler=diffusers.DDIMScheduler())
    else:
        gemma = _unigram_tokenizer("GemmaTokenizer")
        encoder = transformers.Gemma2Model(transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                                                     num_key_value_heads=1, head_dim=8, vocab_size=len(gemma)))
        pipe = diffusers.SanaPipeline(tokenizer=gemma, text_encoder=encoder, vae=None, transformer=tiny_model("sana"), scheduler=flow)
    pipe.save_pretrained(folder)


def reference_conditioning(kind: str, folder, prompt: str) -> dict[str, torch.Tensor]:
    """encode_prompt of the pipeline class, called as that pipeline calls it, by input name of the denoiser."""
    cls = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline",
           "flux": "FluxPipeline", "pixart": "PixArtSigmaPipeline", "sana": "SanaPipeline"}[kind]
    pipe = getattr(diffusers, cls).from_pretrained(str(folder), vae=None)
    with torch.no_grad():
        if kind == "sd15":
            return {"encoder_hidden_states": pipe.encode_prompt(prompt, "cpu", 1, False)[0]}
        if kind == "sdxl":
            states, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
            return {"encoder_hidden_states": states, "text_embeds": pooled}
        if kind == "sd3":
            states, _, pooled, _ = pipe.encode_prompt(prompt, None, None, device="cpu", do_classifier_free_guidance=False)
            return {"encoder_hidden_states": states, "pooled_projections": pooled}
        if kind == "flux":
            states, pooled, _ = pipe.encode_prompt(prompt, None, device="cpu")
            return {"encoder_hidden_states": states, "pooled_projections": pooled}
        extra = {"complex_human_instruction": _sana_instruction()} if kind == "sana" else {}
        states, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device="cpu", **extra)
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask}


def _sana_instruction():
    import inspect

    return inspect.signature(diffusers.SanaPipeline.__call__).parameters["complex_human_instruction"].default


@pytest.fixture(scope="module", params=["sd15", "sdxl", "sd3", "flux", "pixart", "sana"])
def pipeline(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "pipe"
    build_pipeline(request.param, folder)
    return request.param, folder


def _seen_by_teacher(monkeypatch) -> list[dict]:
    """Records the conditioning inputs of every teacher forward call during the CLI run."""
    seen: list[dict] = []
    load = distill_cli._load_teacher

    def hooked(path):
        teacher = load(path)
        net = teacher.model.model

        def record(module, args, kwargs):
            if module is net:  # the student is a deep copy that carries the hook too
                cond = {**kwargs, **kwargs.get("added_cond_kwargs", {})}
                seen.append({k: v for k, v in cond.items() if isinstance(v, torch.Tensor)})

        net.register_forward_pre_hook(record, with_kwargs=True)
        return teacher

    monkeypatch.setattr(distill_cli, "_load_teacher", hooked)
    return seen


def test_prompts_encoded_by_the_pipelines_own_encoders_and_loss_falls(pipeline, tmp_path, monkeypatch):
    kind, folder = pipeline
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    seen = _seen_by_teacher(monkeypatch)
    args = ["distill", str(folder), "-o", str(tmp_path / "run"), "--prompts", str(tmp_path / "prompts.txt"), "--steps", "4", "--batch", "2",
            "--lr", "5e-4", "--latent-size", "8", "--no-samples", "--log-every", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "random" not in result.output
    refs = [reference_conditioning(kind, folder, p) for p in PROMPTS]
    assert seen and all(set(refs[0]) <= set(s) for s in seen)
    for s in seen:
        for row in range(s["encoder_hidden_states"].shape[0]):
            matches = [all(torch.allclose(s[k][row].float(), ref[k][0].float(), atol=1e-5) for k in ref) for ref in refs]
            assert any(matches), f"{kind}: the teacher saw a conditioning that is not encode_prompt's output for any prompt"
    before, after = map(float, re.search(r"([\d.]+) before, ([\d.]+) after", result.output).groups())
    assert after < before


def test_sample_grids_for_diffusers_pipeline(tmp_path):
    build_pipeline("sd15", tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    result = CliRunner().invoke(main, ["distill", str(tmp_path / "pipe"), "-o", str(tmp_path / "run"), "--prompts", str(tmp_path / "prompts.txt"),
                                       "--steps", "3", "--batch", "1", "--sample-every", "2", "--sample-steps", "2", "--latent-size", "8"])
    assert result.exit_code == 0, result.output
    from PIL import Image

    grids = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert grids == ["step-000002.png", "step-000003.png"]
    # 2 prompts -> 2 columns; teacher and student rows; tiny VAE: 1 pixel per latent pixel
    assert Image.open(tmp_path / "run" / "samples" / "step-000003.png").size == (2 * 8, 2 * 8)


def test_sample_grid_for_pixel_dit(tmp_path):
    from bonsai.models import DiT, DiTConfig, save_model

    torch.manual_seed(0)
    model = DiT(DiTConfig(in_channels=3, patch_size=4, hidden_size=32, depth=1, num_heads=2, sample_size=16))
    save_model(model, tmp_path / "teacher.safetensors", "dit", model.config.to_dict(), name="tiny", pipeline={"text_encoder": "minilm"})
    result = CliRunner().invoke(main, ["distill", str(tmp_path / "teacher.safetensors"), "-o", str(tmp_path / "run"), "--steps", "2",
                                       "--batch", "2", "--sample-steps", "2"])
    assert result.exit_code == 0, result.output
    from PIL import Image

    # no --prompts: 4 fixed random text states -> 4 columns of 16x16 images, 2 rows
    assert Image.open(tmp_path / "run" / "samples" / "step-000002.png").size == (4 * 16, 2 * 16)


def test_broken_text_encoder_is_a_clear_error(tmp_path):
    build_pipeline("sd15", tmp_path / "pipe")
    for f in (tmp_path / "pipe" / "text_encoder").glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    result = CliRunner().invoke(main, ["distill", str(tmp_path / "pipe"), "-o", str(tmp_path / "run"), "--prompts", str(tmp_path / "prompts.txt"),
                                       "--steps", "1"])
    # the pipeline's parts are checked when the teacher loads (the student records them), so the broken file is named then
    broken = tmp_path / "pipe" / "text_encoder" / "model.safetensors"
    assert result.exit_code == 1 and f"{broken}: not a readable safetensors file" in result.output, result.output
    assert "Traceback" not in result.output


def test_pipeline_without_text_encoder_falls_back_to_random_states(tmp_path):
    pipe = diffusers.StableDiffusionPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=tiny_model("sd15"), scheduler=diffusers.DDIMScheduler(),
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    result = CliRunner().invoke(main, ["distill", str(tmp_path / "pipe"), "-o", str(tmp_path / "run"), "--prompts", str(tmp_path / "prompts.txt"),
                                       "--steps", "1", "--batch", "1", "--no-samples"])
    assert result.exit_code == 0, result.output
    assert "has no text encoder: distilling on random N(0, I) text states" in result.output
