"""bonsai-4b: the scaled-down model built in packed form, saved, loaded and generating through the
latent pipeline; the full config's sizes against models/bonsai-4b/README.md."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

from bonsai.format import read_header  # noqa: E402
from bonsai.kernels.packing import unpack_signs  # noqa: E402
from bonsai.models.bonsai4b import (  # noqa: E402
    BONSAI_4B, BONSAI_4B_TINY, build_random, estimate_file_bytes, packed_layer_specs, part_sizes, save_t2i, skeleton,
)  # fmt: skip
from bonsai.models.offload import on_device, sequential_offload  # noqa: E402
from bonsai.pipeline import InvalidRequest, Pipeline, image_geometry  # noqa: E402
from bonsai.quant import BitLinear, bit_layers  # noqa: E402

README = Path(__file__).resolve().parents[1] / "models" / "bonsai-4b" / "README.md"


@pytest.fixture(scope="module")
def tiny_model():
    return build_random(BONSAI_4B_TINY, seed=3)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("b4") / "tiny4b.safetensors"
    save_t2i(tiny_model, str(path), "bonsai-4b-tiny")
    return path


def test_built_packed_without_full_precision_copies(tiny_model):
    bits = bit_layers(tiny_model)
    assert set(bits) == set(packed_layer_specs(skeleton(BONSAI_4B_TINY, None)))
    dense = [n for n, m in tiny_model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("decoder")]
    assert set(dense) <= {n for n in dict(tiny_model.named_modules()) if re.search(r"embed|time|modulation|final|text_proj", n)}
    # Every byte the model holds is a byte the checkpoint stores: no float copy of a 1-bit layer exists.
    held = sum(t.nbytes for t in tiny_model.state_dict().values())
    assert held == sum(s.stored_bytes for s in part_sizes(BONSAI_4B_TINY).values())
    for layer in bits.values():
        assert layer.signs.dtype == torch.uint8 and bool(torch.isfinite(layer.row_scale).all())
        plus = (unpack_signs(layer.signs, layer.in_features) > 0).float().mean().item()
        assert 0.35 < plus < 0.65  # random signs, not a constant


def test_checkpoint_size_is_predicted(tiny_ckpt):
    header = read_header(tiny_ckpt)
    data = header.file_size - header.data_start
    assert data == sum(s.stored_bytes for s in part_sizes(BONSAI_4B_TINY).values())
    assert abs(estimate_file_bytes(BONSAI_4B_TINY, name="bonsai-4b-tiny") - header.file_size) < 0.01 * header.file_size


def test_load_round_trip(tiny_model, tiny_ckpt):
    pipe = Pipeline.from_pretrained(str(tiny_ckpt), device="cpu")
    loaded = {**{f"denoiser.{k}": v for k, v in pipe.denoiser.state_dict().items()},
              **{f"text_encoder.{k}": v for k, v in pipe.text_encoder.state_dict().items()},
              **{f"decoder.{k}": v for k, v in pipe.decoder.state_dict().items()}}  # fmt: skip
    built = tiny_model.state_dict()
    assert set(loaded) == set(built)
    for name, t in built.items():
        assert torch.equal(loaded[name].to(t.dtype), t), name


def test_generates_through_latents_and_vae(tiny_ckpt):
    pipe = Pipeline.from_pretrained(str(tiny_ckpt), device="cpu")
    assert pipe.latent_factor == 2 and pipe.channels == 4
    params = pipe.defaults.__class__(prompt="x", seed=5, width=32, height=24)
    assert pipe.noise(params, 1).shape == (1, 4, 12, 16)
    out = pipe.generate("a small red fox", steps=2, cfg=7.0, seed=5, width=32, height=24)
    assert out.images[0].size == (32, 24) and out.samples.shape == (1, 3, 24, 32)
    assert bool(torch.isfinite(out.samples).all()) and out.samples.std() > 0.01
    other = pipe.generate("a blue whale", steps=2, cfg=7.0, seed=5, width=32, height=24)
    assert not torch.equal(out.samples, other.samples)  # the prompt reaches the image
    with pytest.raises(InvalidRequest, match="multiple of 4"):
        pipe.generate("x", steps=2, width=30, height=24)
    # What the server checks before queueing, read from the header alone, is what the pipeline needs.
    step, native = image_geometry(read_header(tiny_ckpt).metadata)
    assert step == pipe.patch_size * pipe.latent_factor == 4
    assert native == pipe.denoiser.config.sample_size * pipe.latent_factor == 16  # where the defaults give no size


@pytest.mark.parametrize("memory", ["lean", "offload"])
def test_memory_modes_give_the_same_image(tiny_ckpt, memory):
    normal = Pipeline.from_pretrained(str(tiny_ckpt), device="cpu").generate("a fox", steps=2, seed=1, width=32, height=32)
    other = Pipeline.from_pretrained(str(tiny_ckpt), device="cpu", memory=memory).generate("a fox", steps=2, seed=1, width=32, height=32)
    # Tiles are 256 px, so at 32x32 tiled decoding is one tile: identical results.
    assert torch.equal(normal.samples, other.samples)


def test_on_device_and_sequential_offload_restore_the_originals():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    before = [t for t in model.state_dict(keep_vars=True).values()]
    with on_device(model, "meta", skip=[model[1]]):
        assert model[0].weight.is_meta and not model[1].weight.is_meta
    assert all(a is b for a, b in zip(before, model.state_dict(keep_vars=True).values()))
    seen = []
    model[0].register_forward_hook(lambda m, a, o: seen.append(m.weight.is_meta))
    with sequential_offload([model[0]], "meta"):
        model[0](torch.empty(1, 4, device="meta"))
    assert seen == [True] and not model[0].weight.is_meta


def _readme_table() -> dict[str, list[int]]:
    rows = {}
    for line in README.read_text().splitlines():
        m = re.match(r"\|\s*(denoiser|text_encoder|decoder|total)\s*\|([\d,\s|]+)\|\s*$", line)
        if m:
            rows[m.group(1)] = [int(c.strip().replace(",", "")) for c in m.group(2).split("|")]
    return rows


def test_full_config_matches_readme():
    sizes = part_sizes(BONSAI_4B)
    table = _readme_table()
    for part, s in sizes.items():
        assert table[part] == [s.params, s.one_bit_params, s.high_precision_params, s.stored_bytes], part
    assert table["total"] == [sum(getattr(s, f) for s in sizes.values()) for f in ("params", "one_bit_params", "high_precision_params", "stored_bytes")]
    file_bytes = estimate_file_bytes(BONSAI_4B)
    claimed = re.search(r"Checkpoint file \(data \+ header\): ([\d,]+) bytes", README.read_text())
    assert claimed and int(claimed.group(1).replace(",", "")) == file_bytes
    assert file_bytes <= 0.9e9  # the target
    assert 3.8e9 < sizes["denoiser"].params + sizes["text_encoder"].params < 4.3e9
    assert all(isinstance(m, BitLinear) for m in bit_layers(skeleton(BONSAI_4B)).values())


def test_bert_text_encoder_matches_transformers_in_float64():
    """The checkpoint's text encoder (Bonsai's plain BERT + the tokenizers library) gives the token
    states and mask of transformers' BertModel and tokenizer for the same weights."""
    transformers = pytest.importorskip("transformers")
    from bonsai.models.bert_text import BERT_FIELDS, BertTextEncoder
    from bonsai.text.minilm import minilm_path

    config = BONSAI_4B_TINY.text_encoder
    ours = BertTextEncoder(config).double().eval()
    torch.manual_seed(0)
    for p in ours.parameters():
        nn.init.normal_(p, std=0.5)
    theirs = transformers.BertModel(transformers.BertConfig(**{k: v for k, v in config.items() if k in BERT_FIELDS}), add_pooling_layer=False)
    missing, unexpected = theirs.load_state_dict(ours.bert.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(("position_ids", "token_type_ids")) for k in missing), (missing, unexpected)
    theirs = theirs.double().eval()
    prompts = ["a red fox, watercolor", "grinning face", "x " * 40]  # the last one is truncated
    states, mask = ours.encode(prompts)
    batch = transformers.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)(
        prompts, padding="max_length", truncation=True, max_length=config["max_tokens"], return_tensors="pt"
    )
    assert torch.equal(mask, batch["attention_mask"].bool())
    with torch.no_grad():
        expected = theirs(**batch).last_hidden_state
    real = mask[..., None]
    err = ((states.double() - expected) * real).norm() / (expected * real).norm()
    assert err < 1e-6, err


@pytest.mark.parametrize("affine", [True, False])
def test_split_group_norm_matches_group_norm_in_float64(affine):
    """The decoder's CUDA group norm (float32 statistics, one fused multiply-add) against torch's."""
    from bonsai.models.vae import split_group_norm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 24, 20, generator=gen, dtype=torch.float64) * 3 + torch.randn(2, 64, 1, 1, generator=gen, dtype=torch.float64)
    weight = torch.randn(64, generator=gen, dtype=torch.float64) if affine else None
    bias = torch.randn(64, generator=gen, dtype=torch.float64) if affine else None
    want = torch.nn.functional.group_norm(x, 8, weight, bias, 1e-6)
    got = split_group_norm(x.float(), 8, weight, bias, 1e-6)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < 1e-6, err


def test_decoder_group_norms_are_split_and_keep_their_keys(tiny_model):
    from diffusers import AutoencoderKL

    from bonsai.models.vae import SplitGroupNorm

    decoder = tiny_model.decoder.vae.decoder
    norms = [m for m in decoder.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(type(m) is SplitGroupNorm for m in norms)
    plain = AutoencoderKL(**BONSAI_4B_TINY.vae).decoder
    assert set(plain.state_dict()) == set(decoder.state_dict())
    x = torch.randn(1, 4, 8, 8)
    plain.load_state_dict(decoder.state_dict())
    assert torch.equal(plain.float()(x), decoder.float()(x))  # on CPU it is nn.GroupNorm itself


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_split_group_norm_on_cuda(dtype, tol):
    """Large inputs take the split path on CUDA; same result as nn.GroupNorm (float64 reference)."""
    from bonsai.models.vae import SplitGroupNorm

    norm = nn.GroupNorm(32, 128, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.3)
    x = torch.randn(1, 128, 256, 256, device="cuda") * 2 + torch.randn(1, 128, 1, 1, device="cuda")
    want = torch.nn.functional.group_norm(x.double(), 32, norm.weight.double().cuda(), norm.bias.double().cuda(), 1e-6)
    norm.__class__ = SplitGroupNorm
    norm = norm.to("cuda", dtype)
    assert x[0].numel() // 32 >= SplitGroupNorm.MIN_GROUP  # the split path runs
    got = norm(x.to(dtype))
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < tol, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_text_encoder_replays_match_eager_encoding(monkeypatch):
    """In the normal memory mode the 1-bit BERT runs from a CUDA graph: same states as the eager
    encode, one capture for repeated generations. Token ids are drawn at random (the tokenizer's
    vocabulary is not needed for this)."""
    from bonsai.models.bonsai4b import PIPELINE_4B, T2IConfig

    text = {**BONSAI_4B_TINY.text_encoder, "hidden_size": 1024, "num_attention_heads": 8, "intermediate_size": 2048}
    config = T2IConfig(denoiser=replace(BONSAI_4B_TINY.denoiser, text_dim=1024), text_encoder=text, vae=BONSAI_4B_TINY.vae)
    model = build_random(config, device="cuda", seed=2)
    meta = {"config": config.to_dict(), "pipeline": PIPELINE_4B, "name": "t"}
    pipe = Pipeline(model.denoiser, model.text_encoder, meta, torch.device("cuda"), "t", model.decoder, cuda_graph=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(1000, 30000, (2, text["max_tokens"]), device="cuda", generator=gen)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 5:] = False
    monkeypatch.setattr(model.text_encoder, "tokens", lambda prompts: (ids[: len(prompts)], mask[: len(prompts)]))
    with torch.no_grad():
        want, _ = model.text_encoder.encode(["a", "b"])
        for _ in range(3):
            got, got_mask = pipe._encode(["a", "b"])
            err = ((got.double() - want.double()).norm() / want.double().norm()).item()
            assert err < 1e-2 and torch.equal(got_mask, mask), err
    stats = pipe._graphs["text_encoder"].stats
    assert stats.captures == 1 and stats.replays == 3 and stats.failure is None
    pipe.generate("a fox", steps=2, width=32, height=32, seed=1)
    assert pipe._graphs["text_encoder"].stats.captures == 1  # the same signature: replayed, not captured again


@pytest.mark.parametrize("native", [True, False])
def test_large_decodes_run_in_bf16_only_where_the_cpu_computes_it(tiny_ckpt, monkeypatch, native):
    from bonsai import cpu_bf16

    monkeypatch.setattr(cpu_bf16, "cpu_computes_bf16", lambda: native)
    pipe = Pipeline.from_pretrained(str(tiny_ckpt), device="cpu")
    latents = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(0))  # 256 x 256 px
    with torch.no_grad():
        images = pipe.decode(latents)
        with torch.autocast("cpu", enabled=False):
            fp32 = pipe.decoder(latents)
        small = pipe.decode(latents[..., :64, :64])  # 128 x 128 px: float32 whatever the CPU
        assert torch.equal(small, pipe.decoder(latents[..., :64, :64]))
    assert images.dtype == torch.float32 and images.shape == (1, 3, 256, 256)
    err = ((images.double() - fp32.double()).norm() / fp32.double().norm()).item()
    assert (1e-4 < err < 2e-2) if native else err == 0
